"""lm-evaluation-harness as a real client of `longpilot serve`: its `local-completions` model with its DEFAULT
settings (token-id prompts, `echo: true`, `logprobs: 1`, `max_tokens: 1`) scores a tiny local multiple-choice task
(tests/agents/lm_eval_task/) against a LongLoRA adapter (RoPE x4) behind the real server, and every choice's
log-likelihood equals the one computed in-process from the model directly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from agents.server import ModelsIndex, build_app, start_in_thread
from engine.model.lora import load_adapter
from engine.serving import ModelPool, ServingWorker
from tests.support.models import byte_tokenizer, make_served_models

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is installed by `make setup` (pip --no-deps, with its "
                              "two runtime needs sacrebleu and aiohttp in the [dev] extra)")  # fmt: skip

REPO = Path(__file__).resolve().parents[2]
TASK_DIR = Path(__file__).parent / "lm_eval_task"
TOLERANCE = 1e-4  # a sum of a few float32 log-probabilities, server against in-process


def _in_process(model, context: str, continuation: str) -> float:
    """The continuation's log-likelihood after the context, from the model itself (lm-eval's split of the pair:
    trailing spaces of the context move to the continuation, the whole is encoded and the context's ids cut off)."""
    tok = byte_tokenizer()
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, head = tok(context + continuation)["input_ids"], tok(context)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    return sum(logp[i - 1, whole[i]].item() for i in range(len(head), len(whole)))


def test_lm_eval_scores_a_multiple_choice_task_as_the_model_does(tmp_path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    base_dir, adapters = make_served_models(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path / "tokenizer")  # lm-eval tokenises the pairs itself (offline)
    pool = ModelPool(str(base_dir), base_id="tiny-base", device="cpu")
    worker = ServingWorker(pool)
    server = start_in_thread(build_app(worker, ModelsIndex(pool, None, adapters)))
    monkeypatch.chdir(REPO)  # the task's data_files are relative to the repository root
    try:
        out = simple_evaluate(model="local-completions", tasks=["longpilot_tiny_mc"], log_samples=True,
                              task_manager=TaskManager(include_path=str(TASK_DIR)),
                              model_args={"model": "b", "base_url": f"{server.base_url}/completions",
                                          "tokenizer": str(tmp_path / "tokenizer")})  # fmt: skip
    finally:
        server.stop()
        worker.close()
    samples = out["samples"]["longpilot_tiny_mc"]
    model = load_adapter(adapters["b"])
    diffs = [abs(resp[0][0] - _in_process(model, context, continuation))
             for sample in samples for (context, continuation), resp in zip(sample["arguments"], sample["resps"])]
    assert len(diffs) == 11  # 3 + 3 + 3 + 2 choices
    assert max(diffs) <= TOLERANCE, max(diffs)
    assert 0.0 <= out["results"]["longpilot_tiny_mc"]["acc,none"] <= 1.0
