"""Hardware in the torch-free catalog: GPU profiles, their throughput and interconnects, and the published run the
throughput is calibrated on. `engine.catalog` re-exports every name (`from engine.catalog import HARDWARE`)."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class HardwareProfile:
    """Devices, memory per device, and throughput: peak FLOP/s times the utilisation a LoRA run sustains on the FLOPs
    it executes (engine.planning.cost counts recomputation and the frozen base's missing weight gradients)."""

    name: str
    n_devices: int
    memory_gib: float
    peak_tflops: float
    mfu: float
    gpu: bool = True
    runtime_overhead_gib: float = 1.5  # CUDA context + caching-allocator slack, beyond max_memory_allocated
    host_link_gb_s: float = 25.0  # host<->GPU GB/s for ZeRO offload: PCIe 4.0 x16 is 32 GB/s a direction, ~25 achieved
    # Host memory per GPU that pinned buffers may take (offloaded activations, ZeRO offload). DGX A100 80GB and DGX
    # H100 carry 2 TB for 8 GPUs (256 GiB each); a one-GPU cloud H100 instance ~200 GiB. Leave room for the OS and
    # the data loader: a plan's host need is compared with this figure as it is.
    host_memory_gib: float = 256.0
    # Interconnects, for sequence parallelism's all-to-alls (engine.planning.sequence_parallel): an HGX/DGX node joins
    # 8 GPUs by NVLink/NVSwitch; A100 SXM NVLink 3 is 600 GB/s bidirectional (300 a direction), H100 SXM NVLink 4 900
    # (450). Between nodes, DGX A100 has one 200 Gb/s HDR InfiniBand NIC per GPU (25 GB/s), DGX H100 one 400 Gb/s
    # NDR (50).
    gpus_per_node: int = 8
    intra_node_gb_s: float = 300.0  # per GPU, a direction (datasheet; nccl-tests all-to-all reach ~70-80% of it)
    inter_node_gb_s: float = 25.0  # per GPU, a direction


@dataclass(frozen=True)
class PublishedRun:
    """A training run whose wall time was published: what the planner's throughput is calibrated and checked on."""

    source: str
    arch: str
    target_context: int
    steps: int
    global_batch: int
    hardware: str
    attention: str
    hours: float


# LongLoRA (Chen et al., ICLR 2024), its efficiency table: Llama-2-7B to 65,536 tokens, 1000 steps of global batch 64
# on 8 x A100-80GB with S2-Attn, FlashAttention-2 and DeepSpeed: 52.4 hours.
PUBLISHED_RUNS: tuple[PublishedRun, ...] = (PublishedRun("LongLoRA paper, efficiency table", "llama-2-7b", 65536, 1000,
                                                         64, "8xA100-80GB", "s2", 52.4),)  # fmt: skip
# A100 utilisation, fitted on that run (its only free constant): 1000 x 64 x 65,536 tokens x 58,774,781,952 FLOPs a
# token (engine.planning.plan.train_flops_per_token, S2 ratio 1/4; tests/engine/test_plan_cost.py checks it) in 52.4 h
# on 8 x 312 TFLOP/s (bf16 dense datasheet peak) = 0.5236 of peak, rounded to 0.52.
_LONGLORA = PUBLISHED_RUNS[0]
A100_MFU = round(_LONGLORA.steps * _LONGLORA.global_batch * _LONGLORA.target_context * 58_774_781_952
                 / (_LONGLORA.hours * 3600 * 8 * 312e12), 2)  # fmt: skip
# H100: no published LoRA run to fit. 790 TFLOP/s is the bf16 matmul peak measured on one H100 SXM; 0.40 of it (316
# TFLOP/s, 32% of the 989 datasheet peak) follows FlashAttention-3 (Shah et al. 2024), which reports FlashAttention-2
# at about 35% of the H100's peak. PCIe 5.0 x16 (64 GB/s a direction) links it to the host.
H100_MFU = 0.40
# Measured: SmolLM2-135M, fwd+bwd with S2-Attn and gradient checkpointing at 16k tokens, fp32, 2-core CPU ran 55-60
# tokens/s (runs/demo/*/train/metrics.jsonl). Effective FLOP/s = 57.5 tokens/s * 1,451,261,952 FLOPs a token
# (engine.planning.plan.train_flops_per_token(smollm2, 16k), recomputation included; checked by
# tests/engine/test_plan.py).
CPU_MEASURED_TOKENS_PER_S = 57.5
CPU_EFFECTIVE_TFLOPS = CPU_MEASURED_TOKENS_PER_S * 1_451_261_952 / 1e12
HARDWARE: dict[str, HardwareProfile] = {
    # CPU: runtime overhead = interpreter, libraries, allocator slack; with it the 16k demo run above predicts
    # 6.3 GiB against 6.4-6.6 GiB peak RSS measured.
    "cpu": HardwareProfile("cpu", 1, 24.0, CPU_EFFECTIVE_TFLOPS, 1.0, gpu=False, runtime_overhead_gib=2.0,
                           host_memory_gib=24.0),
    "1xH100-80GB": HardwareProfile("1xH100-80GB", 1, 80.0, 790.0, H100_MFU, host_link_gb_s=50.0,
                                   intra_node_gb_s=450.0, inter_node_gb_s=50.0, host_memory_gib=200.0),
    "8xA100-80GB": HardwareProfile("8xA100-80GB", 8, 80.0, 312.0, A100_MFU),
    "8xA100-40GB": HardwareProfile("8xA100-40GB", 8, 40.0, 312.0, A100_MFU, host_memory_gib=128.0),  # DGX A100 1 TB
}
# One GPU of each kind: `NxGPU` names any count of it (e.g. 2xH100-80GB, 4xA100-80GB), the planner's device lever.
GPU_KINDS: dict[str, HardwareProfile] = {h.name.split("x", 1)[1]: h for h in HARDWARE.values() if h.gpu}


def custom_hardware(n_devices: int, memory_gib: float, peak_tflops: float, mfu: float = 0.40) -> HardwareProfile:
    """A GPU profile of your own. Raises ValueError on a non-positive count/memory/peak or mfu outside (0, 1]."""
    if n_devices <= 0 or memory_gib <= 0 or peak_tflops <= 0 or not 0 < mfu <= 1:
        raise ValueError(
            f"bad hardware: n_devices={n_devices}, memory_gib={memory_gib}, tflops={peak_tflops}, mfu={mfu}"
        )
    return HardwareProfile(f"custom-{n_devices}x{memory_gib:g}GiB", n_devices, memory_gib, peak_tflops, mfu)


def with_devices(hw: HardwareProfile, n_devices: int) -> HardwareProfile:
    """The same GPU, `n_devices` of it (a catalog GPU is named NxKIND; a custom profile keeps the custom- form)."""
    kind = hw.name.split("x", 1)[1] if hw.name.split("x", 1)[0].isdigit() else None
    name = f"{n_devices}x{kind}" if kind in GPU_KINDS else f"custom-{n_devices}x{hw.memory_gib:g}GiB"
    return replace(hw, name=name, n_devices=n_devices)


def resolve_hardware(name: str | HardwareProfile) -> HardwareProfile:
    """A profile by name (or as given), or N of a catalog GPU (`4xA100-80GB`). Raises ValueError naming the known."""
    if isinstance(name, HardwareProfile):
        return name
    if name in HARDWARE:
        return HARDWARE[name]
    count, _, kind = name.partition("x")
    if count.isdigit() and 0 < int(count) <= 1024 and kind in GPU_KINDS:
        return with_devices(GPU_KINDS[kind], int(count))
    raise ValueError(f"unknown hardware {name!r}: use one of {', '.join(HARDWARE)} (any NxGPU count of those GPUs) "
                     "or custom_hardware(...)")  # fmt: skip
