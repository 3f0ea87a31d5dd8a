"""What a LoRA training step on a frozen base costs: the FLOPs it executes per token, and the seconds they take.

Why its own module: the planner prices every plan twice (S2-Attn and full attention) and the search prices hundreds
of candidates, so the formula must be one small pure function, separate from the plan's bookkeeping. It takes the
parameter counts from engine.planning.plan (which owns counting) and the hardware from engine.catalog (which owns the
throughput constants and where each comes from).

FLOPs per token (a matmul of an n-token input with a k x m weight costs 2 n k m; P = decoder-layer linear weights,
H = V * h the lm_head, R = LoRA parameters, A = 2 * layers * heads * head_dim * S the causal attention forward, S the
causal span: the target L, or the S2 group G = L * ratio; a token attends to S / 2 keys on average):

    forward            2P + 2H + 2R + A
    backward (inputs)  2P + 2H + 2R + 2.5 A     a frozen weight needs its input gradient only, no weight gradient
    LoRA weight grads  2R                       (+ 2H when the lm_head is tied to the trained embeddings)
    recomputation      2P + 2R + A              gradient checkpointing re-runs each decoder layer's forward

FlashAttention-2's backward is 2.5 x its forward (five matmuls against two: it recomputes QK^T; Dao 2023, sec. 3.1).
Embedding lookups, norms, RoPE and the loss are not matmuls and are left out. Against the 6 N x 4/3 usual for full
fine-tuning, a frozen base saves the weight-gradient third of the backward.
"""

from __future__ import annotations

import math

from engine.catalog import ArchConfig, HardwareProfile

FLASH_BACKWARD = 2.5  # FlashAttention-2 backward / forward matmul FLOPs (Dao 2023, "FlashAttention-2", sec. 3.1)
FP32_RATE = 0.5  # TF32 / BF16 dense tensor-core peak on the A100 (156 / 312) and H100 SXM (495 / 989) datasheets


def train_flops(
    a: ArchConfig, span: int, decoder_params: int, lora_params: int, head_trained: bool, checkpointing: bool = True
) -> dict[str, float]:
    """FLOPs per token of one training step by term (the module docstring's table); their sum is the step's work.

    span: the attention span (L for full causal attention, the S2 group G); decoder_params: layers x linear weights;
    lora_params: all LoRA A and B weights; head_trained: a tied lm_head whose (embedding) weight is trained.
    """
    head = a.vocab_size * a.hidden_size
    attn = 2 * a.num_layers * a.num_heads * a.head_dim * span
    return {
        "forward": 2 * decoder_params + 2 * head + 2 * lora_params + attn,
        "input_backward": 2 * decoder_params + 2 * head + 2 * lora_params + FLASH_BACKWARD * attn,
        "weight_gradients": 2 * lora_params + (2 * head if head_trained else 0),
        "recompute": (2 * decoder_params + 2 * lora_params + attn) if checkpointing else 0,
    }


def tiled_mlp_flops_per_token(a: ArchConfig) -> float:
    """The tiled MLP's extra work: its backward re-runs each tile's forward (engine.model.tiled_mlp keeps no
    tokens x intermediate activations), one more MLP forward per layer, 2 * 3 h i FLOPs a token."""
    return a.num_layers * 2 * 3 * a.hidden_size * a.intermediate_size


def achieved_flops(hw: HardwareProfile, precision: str) -> float:
    """FLOP/s one device sustains on the plan's work: peak x utilisation (engine.catalog says where each comes from);
    fp32 runs on TF32 tensor cores at half the bf16 rate on a GPU (the CPU profile is calibrated in fp32)."""
    return hw.peak_tflops * 1e12 * hw.mfu * (FP32_RATE if hw.gpu and precision == "fp32" else 1.0)


def offload_seconds_per_step(
    total_params: int, weight_bytes: int, hw: HardwareProfile, micro_batches: int, checkpointing: bool
) -> float:
    """Host<->GPU parameter traffic of ZeRO-3 offload: every forward (and the recompute) and the backward fetch each
    device's 1/n shard of the weights over its host link (w * P / n bytes a pass). Not overlapped with compute here,
    so an upper bound; the small optimizer step on the CPU is left out."""
    passes = 3 if checkpointing else 2
    return micro_batches * passes * weight_bytes * total_params / hw.n_devices / (hw.host_link_gb_s * 1e9)


def step_costs(
    hw: HardwareProfile, precision: str, tokens_per_step: int, steps: int, flops: dict[str, float], extra_s: float = 0
) -> dict[str, dict[str, float]]:
    """Throughput and wall time of each attention mode ({"s2": FLOPs/token, "full": ...}) on `hw`:
    wall = steps x (tokens per step x FLOPs per token / (n x achieved FLOP/s) + extra seconds per step)."""
    rate = hw.n_devices * achieved_flops(hw, precision)
    out = {}
    for mode, fpt in flops.items():
        step_s = tokens_per_step * fpt / rate + extra_s
        wall = steps * step_s
        rate_s = round(tokens_per_step / step_s, 1) if step_s else math.inf
        out[mode] = {"flops_per_token": fpt, "tokens_per_s": rate_s, "wall_time_s": round(wall, 1),
                     "wall_time_h": round(wall / 3600, 2)}  # fmt: skip
    return out


# (unit, its name, the next smaller unit, its name): a duration is said in its largest unit and the next one down
_DURATION_UNITS = ((86_400, "d", 3_600, "h"), (3_600, "h", 60, "min"), (60, "min", 1, "s"))


def duration(seconds: float) -> str:
    """A time in human units, the largest one first and the next one down: `45 s`, `3 min 20 s`, `12 min`,
    `3 h 20 min`, `18 d 4 h` (the plan card's predicted times and the CLI's progress lines and ETAs)."""
    whole = max(round(seconds), 0)
    for unit, name, smaller, smaller_name in _DURATION_UNITS:
        if whole >= unit:
            rounded = round(whole / smaller) * smaller
            if rounded != whole:  # rounding may carry into a larger unit (23 h 59 min 40 s -> 1 d)
                return duration(rounded)
            big, rest = divmod(whole, unit)
            return f"{big} {name}" + (f" {rest // smaller} {smaller_name}" if rest else "")
    return f"{whole} s"
