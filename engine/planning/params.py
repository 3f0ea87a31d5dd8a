"""What a model is made of, for the planner: parameter counts, LoRA+ trainables and the FLOPs a token costs.

Shape-only (an ArchConfig, no weights). Its own module so that engine.planning.plan (the plan's bookkeeping) and
engine.planning.sequence_parallel (sequence parallelism's memory and traffic) both count from one place;
engine.planning.plan re-exports every name, so `from engine.planning.plan import total_params` keeps working.
"""

from __future__ import annotations

from engine.catalog import ArchConfig
from engine.model.lora_config import LoraPlusConfig, TrainableCounts
from engine.model.s2_groups import DEFAULT_GROUP_SIZE_RATIO, group_size
from engine.planning.cost import train_flops


def _lora_shapes(a: ArchConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear layer in one decoder layer; GQA shrinks k/v to kv_heads * head_dim."""
    q, kv, h, i = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.hidden_size, a.intermediate_size
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def layer_matmul_params(a: ArchConfig) -> int:
    """Weights of one decoder layer's linear layers: h*q + 2*h*kv + q*h + 3*h*i."""
    return sum(n_in * n_out for n_in, n_out in _lora_shapes(a).values())


def layer_norm_params(a: ArchConfig) -> int:
    """Norm weights of one decoder layer: 2h (input and post-attention), + 2 * head_dim for Qwen3's q_norm/k_norm."""
    return 2 * a.hidden_size + (2 * a.head_dim if a.qk_norm else 0)


def layer_bias_params(a: ArchConfig) -> int:
    """Bias terms of one decoder layer: q + 2 kv (Qwen2's q/k/v), h (o_proj), 2i + h (Llama's mlp_bias)."""
    q, kv, h, i = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.hidden_size, a.intermediate_size
    return (q + 2 * kv if a.qkv_bias else 0) + (h if a.o_bias else 0) + (2 * i + h if a.mlp_bias else 0)


def total_params(a: ArchConfig) -> int:
    """All base-model parameters: V*h (embed) + layers * (linears + biases + norms) + h (final norm) + V*h unless
    tied."""
    per_layer = layer_matmul_params(a) + layer_bias_params(a) + layer_norm_params(a)
    lm_head = 0 if a.tied_embeddings else a.vocab_size * a.hidden_size
    return a.vocab_size * a.hidden_size + a.num_layers * per_layer + a.hidden_size + lm_head


def trainable_params(a: ArchConfig, lora: LoraPlusConfig = LoraPlusConfig()) -> TrainableCounts:
    """LoRA+ trainables, counted as `engine.model.lora.count_trainable` counts a real model (total includes LoRA).

    LoRA: layers * sum over targets of r * (in + out); embeddings: V*h (a tied lm_head is the same tensor, an untied
    one stays frozen); norms: layers * layer_norm_params + h (lora_config.NORM_MODULES names q_norm/k_norm too).

    Raises:
        ValueError: a target module that a Llama decoder layer does not have.
    """
    shapes = _lora_shapes(a)
    unknown = [t for t in lora.target_modules if t not in shapes]
    if unknown:
        raise ValueError(f"LoRA targets {unknown} are not Llama linear layers ({', '.join(shapes)})")
    n_lora = a.num_layers * sum(lora.r * sum(shapes[t]) for t in lora.target_modules)
    return TrainableCounts(
        lora=n_lora,
        embeddings=a.vocab_size * a.hidden_size if lora.train_embeddings else 0,
        norms=a.num_layers * layer_norm_params(a) + a.hidden_size if lora.train_norms else 0,
        other=0,
        total_params=total_params(a) + n_lora,
    )


def flops_per_token(a: ArchConfig, seq_len: int, group_size_ratio: float | None = DEFAULT_GROUP_SIZE_RATIO) -> float:
    """Model FLOPs per token as MFU is quoted (Kaplan et al. 2020; PaLM app. B; bench/ reports MFU with it): 6 N,
    N = layers * layer_matmul_params + V*h, + causal attention 6 * layers * heads * head_dim * L (x G/L under S2).
    Plans are priced on the work a LoRA step really executes: train_flops_per_token."""
    n = a.num_layers * layer_matmul_params(a) + a.vocab_size * a.hidden_size
    attention = 6 * a.num_layers * a.num_heads * a.head_dim * seq_len
    return 6 * n + attention * (group_size_ratio if group_size_ratio else 1.0)


def train_flops_per_token(a: ArchConfig, seq_len: int, group_size_ratio: float | None = DEFAULT_GROUP_SIZE_RATIO,
                          lora: LoraPlusConfig = LoraPlusConfig(), checkpointing: bool = True) -> float:  # fmt: skip
    """FLOPs per token one LoRA step on this frozen base executes (engine.planning.cost.train_flops: forward, input
    gradients, LoRA weight gradients, recomputation); group_size_ratio None = full causal attention."""
    span = group_size(seq_len, group_size_ratio) if group_size_ratio else seq_len
    decoder, tied_trained = a.num_layers * layer_matmul_params(a), a.tied_embeddings and lora.train_embeddings
    return sum(train_flops(a, span, decoder, trainable_params(a, lora).lora, tied_trained, checkpointing).values())
