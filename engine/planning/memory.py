"""Training memory per device, device and host, with every lever the engine runs priced exactly as it runs it.

Why its own module: the planner's answer to "how long a context fits on this GPU" is this arithmetic, and the same
formula must serve make_plan, the lever choice (engine.planning.levers), the search and the bench that checks it
against the engine (bench/memory.py measures the live tensor bytes of a real training step on CPU and
tests/engine/test_memory_model.py holds the formula to within 10 % of it). Torch-free: counts from the shape only.

The levers (each a TrainConfig field the engine executes):
  checkpointing        each decoder layer keeps only its input; its activations are re-created in backward
  offload_activations  those layer inputs live in pinned host memory (engine.training.offload); the GPU holds the
                       layers in flight only
  tiled_mlp            the MLP runs over sequence tiles in forward and recompute (engine.model.tiled_mlp): no
                       tokens x intermediate tensor lives, only one tile's
  sequence_parallel    Ulysses: each rank holds ceil(L / P) tokens of every sequence
  zero                 DeepSpeed's stage: sharded trainable state, sharded or offloaded weights
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.catalog import ArchConfig
from engine.model.lora_config import LoraPlusConfig, TrainableCounts
from engine.model.tiling import auto_tile_tokens
from engine.planning.params import layer_matmul_params, total_params, trainable_params
from engine.planning.sequence_parallel import all_to_all_buffer_bytes, local_tokens

GIB = 2**30
# Unchunked causal-LM loss on (tokens, V) logits: fp32 log-softmax output saved for backward, the incoming gradient
# and the gradient w.r.t. the logits (4 + 4 + 4 bytes per logit) are alive together at the start of backward.
LOSS_BYTES_PER_LOGIT = 12
ZERO_STAGES = ("zero2", "zero3", "zero3_offload")  # engine/deepspeed/<stage>.json, cheapest first
# Offloaded layer inputs on the device at once: the one being recomputed and the next one being prefetched.
OFFLOAD_IN_FLIGHT_LAYERS = 2


def mlp_tile_tokens(a: ArchConfig, tokens: int) -> int:
    """Tokens per MLP tile: the tiled MLP's own auto tile (engine.model.tiling)."""
    return auto_tile_tokens(tokens, a.hidden_size)


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory per device in GiB: `breakdown` sums to `total_gib`; `transient` names the larger peak term;
    `host_gib` is the pinned host memory per device the plan needs (offloaded activations, ZeRO offload's state)."""

    breakdown: dict[str, float]
    total_gib: float
    transient: str  # "loss" or "layer_recompute": the two never coexist (the loss is freed before layer backward)
    host_gib: float = 0.0
    total_bytes: int = 0  # the exact figures, unrounded (bench/memory.py compares them with a meter, byte for byte)
    host_bytes: int = 0


# Per-token bytes outside the layers: input ids, labels and positions (3 int64), and RoPE's cos and sin (2 d * w),
# computed once per forward and saved by every layer's rotation.
TOKEN_IDS_BYTES = 24


@dataclass(frozen=True)
class ActivationBytes:
    """Activation bytes per token (of this rank) in the two moments that can set a step's peak, as the engine runs.

    kept: what lives from the forward to the end of backward (the checkpointed layer inputs on the device, ids,
    cos/sin); layer: what the one layer re-run in backward adds at its peak (its saved tensors and the gradients
    then alive; with offload, the layer inputs brought back in flight); loss: what the chunked loss phase adds
    beyond `kept` besides the logits chunk (the final norm's saved tensors).
    """

    kept: int
    layer: int
    loss: int


def _attention_saved(a: ArchConfig, w: int, attention: str, lora_width: int, tiled: bool) -> int:
    """Bytes per token the recomputed layer saves outside its MLP, counted tensor by tensor from the memory meter's
    dump of real steps (bench/memory.py --top; lora_width: r per adapted projection). S2-Attn writes its output
    into its own buffer, which the dense path does not (one q less).

    fp32: the input norm's two products, the residual, the post norm's product, the attention output, RoPE'd q and
    k, v, SDPA's output, LoRA's r-wide intermediates. Tiled norms: each norm's output instead of its products.
    bf16 (fp32 master norm weights): each norm's fp32 upcast and bf16 output, LoRA's bf16 copies of the four
    projection inputs, RoPE'd q and k, v, SDPA's output. Tiled norms: their fp32 outputs and peft's casts of them.
    """
    q, kv, h = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.hidden_size
    s2 = attention == "s2"
    if w == 4:
        return 4 * ((3 if tiled else 4) * h + (3 if s2 else 2) * q + 2 * kv + lora_width)
    if tiled:
        return 22 * h + (6 if s2 else 4) * q + 4 * kv + 2 * lora_width
    return 20 * h + 4 * q + 4 * kv + 2 * lora_width


def activation_bytes_per_token(
    a: ArchConfig, weight_bytes: int, *, attention: str = "s2", tiled_mlp: bool = False,
    offload_activations: bool = False, checkpointing: bool = True, lora: LoraPlusConfig = LoraPlusConfig(),
) -> ActivationBytes:
    """Activation bytes per token, from the memory meter's decomposition of real steps (tests hold the result to
    10 % of the meter at three lengths per lever and precision; tests/engine/test_memory_model.py).

    layer, untiled: the attention part (_attention_saved) + the MLP's gate, SiLU and up outputs and their three
    gradients (6 i w) + the gradient of the layer's input (h w). Tiled (the MLP and both norms run over sequence
    tiles, engine.model.tiled_mlp): no i-wide tensor or norm temporary outlives a tile (`tile_bytes`, a constant);
    the gradients then alive are two h-wide ones in fp32, one in bf16. Offload: the device keeps no layer input, but
    the one recomputed and the one prefetched are in flight (OFFLOAD_IN_FLIGHT_LAYERS * h * w). Loss phase: the final
    norm's saved tensors (final_norm_bytes); with offload they wait on the host. Without checkpointing every layer
    keeps what a recomputed one saves (not measured: an upper bound).
    """
    h, i, d = a.hidden_size, a.intermediate_size, a.head_dim
    w = weight_bytes
    attn = _attention_saved(a, w, attention, lora.r * len(lora.target_modules), tiled_mlp)
    final_norm = final_norm_bytes(a, w)
    base = TOKEN_IDS_BYTES + 2 * d * w
    if not checkpointing:
        kept = base + a.num_layers * (attn + 3 * i * w) + final_norm
        return ActivationBytes(kept, 3 * i * w + h * w, 0)
    grads = (6 * i * w + h * w) if not tiled_mlp else (2 * h * w if w == 4 else h * w)
    if offload_activations:
        return ActivationBytes(base, attn + grads + OFFLOAD_IN_FLIGHT_LAYERS * h * w, 0)
    return ActivationBytes(base + a.num_layers * h * w, attn + grads, final_norm)


def final_norm_bytes(a: ArchConfig, weight_bytes: int) -> int:
    """Bytes per token the final RMSNorm saves for the loss's backward: in fp32 its input, x * rsqrt and its output
    (12 h); in bf16 its fp32 upcast, the fp32 product and the bf16 output (4 + 4 + 2 = 10 h)."""
    return (12 if weight_bytes == 4 else 10) * a.hidden_size


def offloaded_bytes_per_token(a: ArchConfig, weight_bytes: int) -> int:
    """Host bytes per token activation offload pins: every layer input, plus the final norm's saved tensors (the
    only ones saved outside the checkpointed layers), each copied once (engine.training.offload)."""
    return a.num_layers * a.hidden_size * weight_bytes + final_norm_bytes(a, weight_bytes)


def tile_bytes(a: ArchConfig, weight_bytes: int, tokens: int) -> int:
    """The tiled MLP's one tile: gate, SiLU, up and their gradients (6 i w) for one tile's tokens."""
    return 6 * a.intermediate_size * weight_bytes * mlp_tile_tokens(a, tokens)


def trainable_state_bytes(counts: TrainableCounts, weight_bytes: int, zero: str, n_devices: int) -> float:
    """Per-device bytes of the trainable params, their grads and Adam m, v.

    DeepSpeed (mixed precision, ZeRO paper sec. 3): 2 (bf16 param) + 2 (grad) + 12 (fp32 master, m, v) = 16 B/param;
    ZeRO-2 shards all but the bf16 param (w + (16 - w) / n), ZeRO-3 shards all (16 / n), offload keeps none on GPU.
    Without DeepSpeed every trainable parameter is an fp32 master whatever the base dtype (peft upcasts LoRA,
    engine.training.precision the embed/norm copies), and torch AdamW keeps grad, m, v in its dtype: 4 * 4 = 16
    B/param.
    """
    n = counts.trainable
    if zero == "none":
        return 16 * n
    if zero == "zero2":
        return n * (weight_bytes + (16 - weight_bytes) / n_devices)
    return 16 * n / n_devices if zero == "zero3" else 0.0


def frozen_weight_bytes(a: ArchConfig, weight_bytes: int, zero: str, n_devices: int) -> float:
    """All base weights * w (peft keeps frozen originals of embed/norm copies), sharded / n under ZeRO-3, which also
    gathers the weights in use: w * max(2 layers, V*h). Offload keeps only that gathered working set on the GPU."""
    gathered = weight_bytes * max(2 * layer_matmul_params(a), a.vocab_size * a.hidden_size)
    full = total_params(a) * weight_bytes
    return {"none": full, "zero2": full, "zero3": full / n_devices + gathered}.get(zero, gathered)


def host_state_bytes(a: ArchConfig, counts: TrainableCounts, weight_bytes: int, zero: str, n_devices: int) -> float:
    """Per-device host bytes ZeRO-3 offload pins (engine/deepspeed/zero3_offload.json offloads parameters and the
    optimizer): its shard of the weights (w * P / n) and of the trainable state (16 B/param / n); 0 otherwise."""
    if zero != "zero3_offload":
        return 0.0
    return (weight_bytes * total_params(a) + 16 * counts.trainable) / n_devices


def memory_per_device(
    a: ArchConfig,
    seq_len: int,
    *,
    batch: int = 1,
    precision: str = "bf16",
    zero: str = "none", n_devices: int = 1,
    lora: LoraPlusConfig = LoraPlusConfig(),
    chunked_loss: bool = True, loss_chunk_tokens: int = 4096,
    runtime_overhead_gib: float = 1.5,
    checkpointing: bool = True, sequence_parallel: int = 1,
    offload_activations: bool = False, tiled_mlp: bool = False, attention: str = "s2",
) -> MemoryEstimate:
    """Peak training memory on one device: weights, trainable state, and activations at whichever of two moments is
    larger, the layer re-run in backward or the chunked loss (activation_bytes_per_token says what each holds).

    peak = frozen weights + trainable state + kept * T + max(layer * T (+ one MLP tile), loss extras * T + 12 * V *
    min(T, chunk)) + runtime overhead, T = batch * seq_len (12 * V * T unchunked). The activation terms are counted
    from the memory meter's dump of real steps and held to 10 % of it (bench/memory.py, tests/engine/
    test_memory_model.py); trainable state is counted at 16 B/param although at the layer peak the embedding's
    gradient does not exist yet (4 B/param conservative). With activation offload the layer inputs wait on the host
    (host_gib). With Ulysses sequence parallelism of degree P (engine.planning.sequence_parallel) T = batch *
    ceil(seq_len / P) per rank, and the layer being recomputed also holds the all-to-alls' other side (ZeRO still
    shards over all n_devices); not measured here (the meter runs one process).

    Raises:
        ValueError: an unknown ZeRO stage, or offload/tiling without checkpointing (the engine refuses them too).
    """
    if zero not in ("none", *ZERO_STAGES):
        raise ValueError(f"unknown ZeRO stage {zero!r}: use none, {', '.join(ZERO_STAGES)}")
    if offload_activations and not checkpointing:
        raise ValueError("offload_activations moves the checkpointed layer inputs: it needs gradient checkpointing")
    if tiled_mlp and not checkpointing:
        raise ValueError("tiled_mlp tiles the checkpointed layers' MLP: it needs gradient checkpointing")
    w = 2 if precision == "bf16" else 4  # engine.training.train loads fp16 runs in fp32 (autocast)
    tokens = batch * local_tokens(seq_len, sequence_parallel)  # this rank's share of each sequence
    act = activation_bytes_per_token(a, w, attention=attention, tiled_mlp=tiled_mlp,
                                     offload_activations=offload_activations, checkpointing=checkpointing,
                                     lora=lora)  # fmt: skip
    layer = (act.layer + all_to_all_buffer_bytes(a, w, sequence_parallel)) * tokens
    layer += tile_bytes(a, w, tokens) if tiled_mlp else 0
    loss = LOSS_BYTES_PER_LOGIT * a.vocab_size * (min(tokens, loss_chunk_tokens) if chunked_loss else tokens)
    loss += act.loss * tokens
    host = offloaded_bytes_per_token(a, w) * tokens if offload_activations else 0
    counts = trainable_params(a, lora)
    parts = {
        "frozen_weights": frozen_weight_bytes(a, w, zero, n_devices) / GIB,
        "trainable_state": trainable_state_bytes(counts, w, zero, n_devices) / GIB,
        "activation_checkpoints": act.kept * tokens / GIB,
        "peak_transient": max(layer, loss) / GIB,
        "runtime_overhead": runtime_overhead_gib,
    }
    transient = "loss" if loss > layer else "layer_recompute"
    host_bytes = host + host_state_bytes(a, counts, w, zero, n_devices)
    return MemoryEstimate({k: round(v, 3) for k, v in parts.items()}, round(sum(parts.values()), 3), transient,
                          round(host_bytes / GIB, 3), round(sum(parts.values()) * GIB), round(host_bytes))  # fmt: skip
