"""The CPU speed-ups of batched serving change no answer: oneDNN-packed base weights (engine.serving.packed) compute
what the dense Linear computes within float32 rounding, are really the ones a batched step runs, give the same greedy
answers as the dense weights, and are refused in one line where they cannot run; releasing the loading thread's
OpenMP team (engine.serving.openmp) leaves torch computing the same numbers."""

from __future__ import annotations

import pytest
import torch

from engine.serving import ModelPool, SamplingParams, ServingWorker, text_ids
from engine.serving.openmp import _loaded_runtime, release_openmp_team
from engine.serving.packed import PackedLinear, base_linears, pack_linears, packing_choice
from tests.support.models import byte_tokenizer, make_served_models

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")


@pytest.mark.parametrize("shape", [(576, 576), (1536, 576), (96, 200), (7, 33)])
@pytest.mark.parametrize("bias", [False, True])
def test_a_packed_linear_computes_what_the_dense_one_does(shape, bias):
    out_f, in_f = shape
    gen = torch.Generator().manual_seed(out_f + in_f)
    linear = torch.nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_f, in_f, generator=gen))
    packed = pack_linears([linear])[id(linear)]
    for rows in (1, 3, 8, 64):
        x = torch.randn(rows, 1, in_f, generator=gen)
        with torch.no_grad():
            got, want = packed(x), linear(x)
        assert got.shape == want.shape == (rows, 1, out_f)
        assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    assert packed.weight is linear.weight and packed.in_features == in_f


def test_packing_choice_packs_float32_cpu_weights_and_refuses_the_rest_in_one_line():
    cpu = [torch.nn.Linear(8, 8)]
    assert packing_choice(cpu, "auto")[0] and packing_choice(cpu, "on")[0]
    assert packing_choice(cpu, "off") == (False, "off as asked")
    assert packing_choice([torch.nn.Linear(8, 8).to(torch.bfloat16)], "auto") == (
        False, "auto packs float32 weights only")  # fmt: skip
    meta = [torch.nn.Linear(8, 8, device="meta")]  # stands for weights that are not on the CPU
    assert not packing_choice(meta, "auto")[0]
    with pytest.raises(ValueError, match="need the model on CPU"):
        packing_choice(meta, "on")
    with pytest.raises(ValueError, match="auto, on or off"):
        packing_choice(cpu, "fast")


def test_base_linears_leaves_out_the_lm_head():
    from tests.support.models import tiny_llama

    model = tiny_llama(seed=0)
    found = base_linears(model)
    assert model.get_output_embeddings() not in found
    assert len(found) == 7 * model.config.num_hidden_layers  # q, k, v, o, gate, up, down


def test_a_batched_step_runs_the_packed_weights_and_answers_as_the_dense_ones(tmp_path):
    base_dir, adapters = make_served_models(tmp_path)
    answers = {}
    for setting in ("on", "off"):
        pool = ModelPool(str(base_dir), base_id="base", max_loaded=2, device="cpu", packed_weights=setting)
        for name, folder in adapters.items():
            pool.register(name, folder)
        pool.load("a")
        with pool.rows(["base", "a"]) as model:
            attn = model.model.layers[0].self_attn
            inside = (type(attn.q_proj.layer.base_layer), type(model.model.layers[0].mlp.up_proj))  # GroupedLora's
        assert inside == ((PackedLinear, PackedLinear) if setting == "on" else (torch.nn.Linear, torch.nn.Linear))
        assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear  # put back after the step
        worker = ServingWorker(pool)
        tok = byte_tokenizer()
        jobs = [worker.submit(m, text_ids(tok, p), SamplingParams(max_tokens=12))
                for p in ("The quick brown fox", "Once upon a time", "def f(n):") for m in ("base", "a", "b")]
        answers[setting] = [job.result().text for job in jobs]
        worker.close()
    assert len(set(answers["on"])) > 3 and answers["on"] == answers["off"]


def test_releasing_the_openmp_team_leaves_torch_computing_the_same():
    x = torch.randn(300, 300, generator=torch.Generator().manual_seed(0))
    before = x @ x
    released = release_openmp_team()
    assert released == (_loaded_runtime() is not None)  # Linux with torch's OpenMP runtime: released
    assert torch.equal(x @ x, before)
