"""Sequence parallelism (DeepSpeed Ulysses, as ALST uses it) in the planner: which degrees P are valid, what each
rank holds, what the all-to-alls cost, and the launch command of a plan.

Why its own module: P changes three of the planner's facts at once (activation memory, step time, the data-parallel
degree) and brings its own constraints; engine.planning.plan calls these small functions rather than growing.

The layout (Jacobs et al. 2023, "DeepSpeed Ulysses"; ALST, Bekman et al. 2025): each of the P ranks of a sequence
group holds ceil(L / P) of its tokens through embeddings, norms, MLPs, the layer inputs kept for checkpointing and
the loss. Around attention an all-to-all turns (L/P tokens, H heads) into (L tokens, H/P heads), attention (S2 or
full) runs over the whole sequence for those heads, and a second all-to-all turns the output back. A rank's attention
tensors are therefore L x (H/P) x d = (L/P) x H x d: the same bytes as any other per-token tensor of the rank's
L/P tokens. Two things grow instead of shrinking:
- KV heads fewer than P are replicated (DeepSpeed's UlyssesSPAttentionHF `repeat_interleave`s them to P heads
  before the swap), so a rank's key/value width per local token is max(KV, P) x d, not KV x d;
- the tensors on both sides of the swap are alive together during the layer's attention: q, k, v and the output
  once more (2 q + 2 kv per local token).
Weights, gradients and optimizer states do not change: DeepSpeed's ZeRO partitions over its sequence-data-parallel
group, which is every rank (DP x SP; `seq_data_parallel_group` in deepspeed/runtime/engine.py), so ZeRO still
shards over all n devices.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

from engine.catalog import ArchConfig, HardwareProfile
from engine.training.launch import launcher_command
from engine.training.sequence_parallel import check_model, check_world


def _allowed(a: ArchConfig, n_devices: int, sp: int, seq_len: int | None) -> bool:
    """The engine's own refusals (engine.training.sequence_parallel, the rules DeepSpeed Ulysses enforces), asked of a
    shape: P divides the world and the H query heads, KV and P divide one another, and P divides the sequence
    (TrainConfig's rule: every row is cut into P equal shards)."""
    heads = SimpleNamespace(num_attention_heads=a.num_heads, num_key_value_heads=a.num_kv_heads)
    try:
        check_model(heads, sp)
        check_world(n_devices, sp)
    except ValueError:
        return False
    return seq_len is None or seq_len % sp == 0


def sp_degrees(a: ArchConfig, n_devices: int, seq_len: int | None = None) -> tuple[int, ...]:
    """The degrees Ulysses accepts for this model on n devices (and this sequence length): P divides n (data
    parallel is n / P) and the query heads (each rank attends with H / P of them); KV heads fewer than P are
    replicated, so KV and P need only divide one another."""
    return tuple(p for p in range(1, n_devices + 1) if _allowed(a, n_devices, p, seq_len))


def sp_problem(a: ArchConfig, n_devices: int, sp: int, seq_len: int) -> str | None:
    """Why `sp` is not a valid Ulysses degree here (one line naming the valid ones), or None."""
    if sp >= 1 and _allowed(a, n_devices, sp, seq_len):
        return None
    valid = [str(p) for p in sp_degrees(a, n_devices, seq_len)]
    choices = valid[0] if len(valid) == 1 else f"{', '.join(valid[:-1])} or {valid[-1]}"
    return (f"sequence parallel {sp} is not possible for {a.name} at {seq_len:,} tokens on {n_devices} device(s): "
            f"the degree must divide the device count, the {a.num_heads} attention heads and the target, and divide "
            f"or be divided by the {a.num_kv_heads} KV heads; use sequence parallel {choices}")  # fmt: skip


def local_tokens(seq_len: int, sp: int) -> int:
    """Tokens of one sequence that one rank of its sequence group holds: ceil(L / P)."""
    return math.ceil(seq_len / sp)


def kv_width(a: ArchConfig, sp: int) -> int:
    """Key (or value) features per local token on a rank: max(KV, P) x d, KV heads being replicated to P when fewer."""
    return max(a.num_kv_heads, sp) * a.head_dim


def all_to_all_buffer_bytes(a: ArchConfig, weight_bytes: int, sp: int) -> int:
    """Extra bytes per local token in the layer being recomputed: the other side of each swap (q, k, v and the
    attention output, 2 q + 2 kv' with kv' = kv_width) plus, when KV heads are replicated, the replicated k and v
    before the swap (2 kv'). Zero without sequence parallelism."""
    if sp == 1:
        return 0
    q, kv = a.num_heads * a.head_dim, kv_width(a, sp)
    replicated = 2 * kv if a.num_kv_heads < sp else 0
    return weight_bytes * (2 * q + 2 * kv + replicated)


def all_to_all_bytes_per_layer(a: ArchConfig, weight_bytes: int, sp: int, tokens: int) -> float:
    """Bytes one rank sends in one layer's forward (a backward pass sends the same): four all-to-alls, q, k, v in and
    the output back (2 q + 2 kv' per local token; 4 h for a model without GQA, as the Ulysses paper counts), of which
    (P - 1) / P leaves the rank."""
    q, kv = a.num_heads * a.head_dim, kv_width(a, sp)
    return weight_bytes * (2 * q + 2 * kv) * local_tokens(tokens, sp) * (sp - 1) / sp


def all_to_all_seconds(a: ArchConfig, hw: HardwareProfile, sp: int, seq_len: int, sequences: int,
                       weight_bytes: int, checkpointing: bool) -> float:  # fmt: skip
    """Seconds a step spends in Ulysses all-to-alls on one rank, not overlapped (attention waits for its inputs).

    sequences: the sequences each rank's sequence group processes a step (batch x accumulation); passes per layer:
    forward, backward, and the checkpointed forward again. A group within a node (P <= gpus_per_node) swaps over
    NVLink; a larger one sends (P - g) / (P - 1) of its bytes over InfiniBand, concurrently with the NVLink share,
    so the slower of the two sets the time.
    """
    if sp == 1:
        return 0.0
    passes = 3 if checkpointing else 2
    sent = a.num_layers * passes * sequences * all_to_all_bytes_per_layer(a, weight_bytes, sp, seq_len)
    on_node = min(sp, hw.gpus_per_node) - 1
    nvlink, infiniband = sent * on_node / (sp - 1), sent * (sp - 1 - on_node) / (sp - 1)
    return max(nvlink / (hw.intra_node_gb_s * 1e9), infiniband / (hw.inter_node_gb_s * 1e9))


def sp_notes(a: ArchConfig, hw: HardwareProfile, sp: int, seq_len: int, seconds: float) -> list[str]:
    """The plan's notes on its sequence parallelism: the layout, the data-parallel degree, the traffic priced."""
    if sp == 1:
        return []
    where = "NVLink" if sp <= hw.gpus_per_node else f"InfiniBand beyond {hw.gpus_per_node} GPUs a node (slow)"
    notes = [f"sequence parallel {sp} (DeepSpeed Ulysses): each rank holds {local_tokens(seq_len, sp):,} of the "
             f"{seq_len:,} tokens and attends over all of them with {a.num_heads // sp} of {a.num_heads} heads; "
             f"data parallel {hw.n_devices // sp}; ZeRO shards over all {hw.n_devices} ranks",
             f"all-to-all: {seconds:,.1f} s a step over {where} counted, not overlapped"]  # fmt: skip
    if a.num_kv_heads < sp:
        notes.append(f"{a.num_kv_heads} KV heads < {sp}: each is replicated x{sp // a.num_kv_heads} across the group "
                     "(DeepSpeed Ulysses does), priced in memory and traffic")  # fmt: skip
    return notes


def plan_launch_command(config_path: str, hw: HardwareProfile, stage: str, sp: int) -> list[str]:
    """The command a plan prints: one process, or the launcher on this node, or DeepSpeed over a hostfile when the
    plan needs more GPUs than a node has (the fewest nodes holding an equal share, at most gpus_per_node each);
    `--sequence-parallel P` when P > 1."""
    n = hw.n_devices
    if n == 1:
        return ["python", "-m", "engine.training.launch", "train", "--config", config_path]
    if n <= hw.gpus_per_node:
        return launcher_command(config_path, n, "torchrun" if stage == "none" else "deepspeed", sequence_parallel=sp)
    nodes = next(k for k in range(math.ceil(n / hw.gpus_per_node), n + 1) if n % k == 0)
    return launcher_command(config_path, n // nodes, "deepspeed", hostfile="hostfile", nnodes=nodes,
                            sequence_parallel=sp)  # fmt: skip
