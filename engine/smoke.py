"""Engine smoke run (what `make demo` does until the full SOP run lands): extend a model end to end, once.

load -> RoPE interpolation to the target -> LoRA+ -> one S2-Attn training step at the full target length on real
text -> save ONE PEFT directory -> reload it -> merge to a standalone model -> reload that; logits are compared at
every hand-over so a broken save path cannot pass silently.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from engine.lora import (
    LoraPlusConfig,
    apply_lora_plus,
    count_trainable,
    describe,
    load_adapter,
    merge_to_model_dir,
    save_adapter,
)
from engine.models import DEFAULT_MODEL, load_model, resolve_model
from engine.rope import apply_rope_extension
from engine.s2attn import DEFAULT_GROUP_SIZE_RATIO, S2_ATTENTION, group_size

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SmokeReport:
    model: str
    from_context: int
    target_context: int
    rope_factor: float
    s2_group_size: int
    trainable: str
    loss: float
    step_seconds: float
    tokens_per_second: float
    peak_rss_gib: float
    adapter_dir: str
    merged_dir: str
    adapter_reload_max_abs_diff: float
    merged_reload_max_abs_diff: float
    total_seconds: float


def stdlib_text_tokens(tokenizer, n_tokens: int) -> torch.Tensor:
    """`n_tokens` of real text every machine has: Python standard-library sources, in a fixed (sorted) order."""
    stdlib = Path(logging.__file__).resolve().parent.parent
    ids: list[int] = []
    for path in sorted(stdlib.glob("*.py")):
        ids.extend(tokenizer(path.read_text(errors="replace"), add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
        if len(ids) >= n_tokens:
            return torch.tensor(ids[:n_tokens]).unsqueeze(0)  # (1, T)
    raise ValueError(f"the standard library holds fewer than {n_tokens} tokens")


def _peak_rss_gib() -> float:
    scale = 1024**2 if sys.platform != "darwin" else 1024**3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def run_smoke(
    model_ref: str = DEFAULT_MODEL,
    target_context: int = 16384,
    out_dir: str | Path = "runs/demo",
    lr: float = 2e-5,
    s2_ratio: float = DEFAULT_GROUP_SIZE_RATIO,
    seed: int = 0,
) -> SmokeReport:
    """Run the engine once end to end on CPU or GPU and return what happened (see module docstring)."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    out = Path(out_dir)
    model, tokenizer = load_model(model_ref, attn_implementation=S2_ATTENTION)
    device = next(model.parameters()).device
    ext = apply_rope_extension(model, target_context, "linear")
    model.config.use_cache = False
    model.config.s2_group_size_ratio = s2_ratio
    peft_model = apply_lora_plus(model, LoraPlusConfig())
    counts = count_trainable(peft_model)
    log.info("RoPE %s x%.2f: %d -> %d; %s", ext.method, ext.factor, ext.from_context, ext.to_context, describe(counts))

    ids = stdlib_text_tokens(tokenizer, target_context).to(device)
    peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    step_start = time.perf_counter()
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    step_seconds = time.perf_counter() - step_start
    log.info("one S2-Attn step at %d tokens: loss %.4f in %.1f s", target_context, loss.item(), step_seconds)

    peft_model.eval()
    probe = ids[:, :512]
    adapter_dir = save_adapter(peft_model, out / "adapter", resolve_model(model_ref), tokenizer)
    reloaded = load_adapter(adapter_dir, device=device, dtype=next(model.parameters()).dtype)
    with torch.no_grad():
        expected = peft_model(probe).logits
        adapter_diff = (reloaded(probe).logits - expected).abs().max().item()
    del reloaded
    merged_dir = merge_to_model_dir(peft_model, out / "merged", tokenizer)
    del peft_model, model
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, local_files_only=True).to(device).eval()
    with torch.no_grad():
        merged_diff = (merged(probe).logits - expected).abs().max().item()

    return SmokeReport(
        model=model_ref,
        from_context=ext.from_context,
        target_context=ext.to_context,
        rope_factor=ext.factor,
        s2_group_size=group_size(target_context, s2_ratio),
        trainable=describe(counts),
        loss=loss.item(),
        step_seconds=step_seconds,
        tokens_per_second=target_context / step_seconds,
        peak_rss_gib=_peak_rss_gib(),
        adapter_dir=str(adapter_dir),
        merged_dir=str(merged_dir),
        adapter_reload_max_abs_diff=adapter_diff,
        merged_reload_max_abs_diff=merged_diff,
        total_seconds=time.perf_counter() - start,
    )


def format_report(report: SmokeReport) -> str:
    return "\n".join(
        f"  {k:<30} {v:.6g}" if isinstance(v, float) else f"  {k:<30} {v}" for k, v in asdict(report).items()
    )
