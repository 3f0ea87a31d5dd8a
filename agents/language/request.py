"""Chat text -> Spec without an LLM: the deterministic first reading of a request.

Why no LLM: the chat app, the CLI and the Python API must understand "extend smollm2 to 16k on cpu" offline and
reproducibly; an LLM, when one is configured, is only needed for what this parser leaves in `missing`/`problems`.
Rules are regexes applied in a fixed order (paths, model, device/hardware, seed, sequence-parallel degree, then
lengths), and each match is blanked out of the text, so a number that belongs to a model name ("SmolLM2 135M"), a
path, hardware ("8xA100 80GB"), a seed or "sequence parallel 4" is never read as the target context.

Lengths and GPU counts are read with agents.language.grammar ("16k" = 16384, "8xA100", "two GPUs"). "from 4k" (or
"4k native") is the model's current window, never the target; a length after "to" wins over other lengths.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from agents.language import grammar
from engine.catalog import (
    BASE_MODEL_REFS,
    BUILTIN_ARCHS,
    DEFAULT_MODEL,
    HARDWARE,
    HARDWARE_FOR_PROFILE,
    PROFILE_FOR_HARDWARE,
    PROFILE_NAMES,
    PROFILES,
    REFUSED_FAMILIES,
    configured_context,
    profile_for_devices,
)
from sop.schemas import Spec

# The catalog is torch-free: reading it costs no `import torch`.
NATIVE_CONTEXT = {name: arch.native_context for name, arch in BUILTIN_ARCHS.items()}
HARDWARE_NAMES = tuple(HARDWARE)
REQUIRED = ("base_model", "target_context")
MAX_CHARS = 10_000  # a request is a sentence or two; a pasted document belongs in the corpus
QUESTIONS = {
    "base_model": f"Which model should I extend (e.g. {DEFAULT_MODEL} or a local model directory)?",
    "target_context": "How long should the context become (e.g. 16k or 32768 tokens)?",
    "both": f"Which model should I extend (e.g. {DEFAULT_MODEL} or a local model directory), and how long should its "
    "context become (e.g. 16k or 32768 tokens)?",
}
# the embedded default is SmolLM2-135M: its hub id names it too
_HUB_ALIASES = {ref.lower(): a for a, ref in BASE_MODEL_REFS.items()} | {"huggingfacetb/smollm2-135m": DEFAULT_MODEL}
_QUOTED = re.compile(r"[\"`“”]([^\"`“”\n]+)[\"`“”]|(?<!\w)'([^'\n]+)'(?!\w)")
_DOC_EXT = re.compile(r"\.(txt|md|markdown|rst|json|jsonl|csv|tsv|html?|pdf|py|tex|xml|ya?ml|log|parquet|gguf)$", re.I)
_HUB_ID = re.compile(r"^[A-Za-z][\w.-]*/(?=[\w.-]*\d)(?=[\w.-]*[A-Za-z])[\w.-]+$")  # org/name-7b, never "and/or"
_SMOLLM = re.compile(r"\bsmol[\s-]*lm[\s-]*2(?:[\s-]*135[\s-]*m\b|(?![\s-]*\d+\s*[mb]\b))")
_LLAMA = re.compile(r"\b(?:meta[\s-]*)?llama[\s-]*(\d(?:\.\d)?)(?:[\s-]*(\d+)\s*b)?\b")
_QWEN = re.compile(r"\bqwen[\s-]*(2\.5|2|3)(?:[\s-]*(\d+)\s*b)?(?:[\s-]*(instruct))?\b")
_MISTRAL = re.compile(r"\bmistral(?:[\s-]*(\d+)\s*b)?(?:[\s-]*v?(0\.\d))?\b")
# Families people name that LongPilot refuses (engine.catalog.REFUSED_FAMILIES says why).
_REFUSED = {"gemma2": re.compile(r"\bgemma[\s-]*2\b"), "gemma3": re.compile(r"\bgemma[\s-]*3\b"),
            "phi3": re.compile(r"\bphi[\s-]*3(?:\.5)?\b")}  # fmt: skip
_OTHER = re.compile(
    r"\b(?:gpt|mistral|mixtral|qwen|gemma|phi|falcon|bloom|pythia|deepseek|olmo|smollm)(?:[\s-]?\d[\w.-]*)?\b"
)
_NAMED = re.compile(r"\b(?:extend|model|stretch|fine-?tune)\s+(?:the\s+|my\s+|model\s+)?([a-z][\w.-]*\d[\w.-]*)")
_NO_GPU = re.compile(r"\b(?:no|without(?:\s+an?)?)\s+gpus?\b")
_MEMORY = re.compile(r"\b(40|80)\s*gi?b\b")
_SEED = re.compile(r"\bseed\s*(?:=|:|of|is)?\s*(-?\d{1,18})\b")  # bounded digits: int() and float() never overflow
_SP = re.compile(r"\b(?:sequence[- ]parallel(?:ism)?|ulysses)\s*(?:=|:|of|degree)?\s*(\d{1,4})\b")  # "ulysses 4"
_TO = re.compile(r"\b(?:to|into|reach(?:es)?|handle|target(?:_context)?|up to|or)\s*[=:]?\s*(?:about\s+)?$")
_FROM = re.compile(r"\b(?:from|native(?:ly)?|currently|originally)\s+(?:context\s+)?(?:of\s+)?$")
# A profile by its catalog name ("standard", "full profile", "--profile window"); a name that also means a length in a
# request ("context window") counts only next to the word "profile", and "full context" is no profile. Its other
# words ("quick" for smoke) count when no name does.
_LENGTH_WORDS = ("window", "context", "length")
_NOT_A_PROFILE = r"(?!\s+(?:context|length|window|corpus|docs?|set))"
_NAMES = "|".join(map(re.escape, PROFILE_NAMES))
_BARE = "|".join(re.escape(n) for n in PROFILE_NAMES if n not in _LENGTH_WORDS) or "(?!)"
_PROFILE = re.compile(
    rf"\bprofile\s*[=:]?\s*({_NAMES}){_NOT_A_PROFILE}\b|\b({_NAMES})\s+profile\b|\b({_BARE}){_NOT_A_PROFILE}\b"
)
_ALIASES = {word: p.name for p in PROFILES.values() for word in p.aliases}
_PROFILE_ALIAS = re.compile(rf"\b({'|'.join(map(re.escape, _ALIASES)) or '(?!)'})\b")
_GPU_COUNTS = {hw.n_devices for hw in HARDWARE.values() if hw.gpu}  # "N GPUs" with a hardware profile


@dataclass(frozen=True)
class ParsedRequest:
    """What `parse_request` understood; `spec` is set only when nothing is missing and nothing is wrong."""

    fields: dict = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    spec: Spec | None = None
    question: str | None = None


def _short(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else f"{tokens:,}"


def _blank(text: str, start: int, end: int) -> str:
    """Blank a claimed span with spaces, so later matches keep the offsets of the original text."""
    return text[:start] + " " * (end - start) + text[end:]


def _exists(ref: str, name: str = "") -> bool:
    """Path.exists that says False for names the OS rejects (too long, NUL, ~nobody): chat text can hold them."""
    try:
        return (Path(ref).expanduser() / name).exists()
    except (OSError, RuntimeError, ValueError):
        return False


def _missing_path(path: str) -> str:
    return f"{'file' if Path(path).suffix else 'directory'} {path!r} does not exist"


def _native_of(ref: str, problems: list[str]) -> int | None:
    """The native context of a built-in (by alias or hub id), or of a model directory whose config.json says."""
    alias = next((a for a, r in BASE_MODEL_REFS.items() if r == ref), None) or _HUB_ALIASES.get(ref.lower())
    if alias or not _exists(ref, "config.json"):
        return NATIVE_CONTEXT.get(alias or "")
    path = Path(ref).expanduser()
    try:
        cfg = json.loads((path / "config.json").read_text())
        native = cfg.get("max_position_embeddings")
        if not isinstance(native, int):
            return None
        return configured_context(native, cfg.get("rope_parameters") or cfg.get("rope_scaling"))  # Llama 3.1, YaRN
    except (OSError, ValueError, AttributeError, TypeError):
        problems.append(f"{str(path / 'config.json')!r} is not a readable JSON config")
        return None


def _within(token: str, roots: Sequence[Path]) -> bool:
    """Whether a path named in chat text resolves inside one of `roots` (symlinks and `..` resolved first)."""
    try:
        resolved = Path(token).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):
        return False
    return any(root == resolved or root in resolved.parents for root in roots)


def _paths(
    text: str, problems: list[str], allowed_roots: Sequence[Path] | None = None
) -> tuple[str, list[tuple[str, int | None]], list[str]]:
    """Quoted or path-like tokens (a slash, a document extension): model dirs, hub ids and corpus paths.

    With `allowed_roots` (the app), a path outside them is refused with one fixed sentence before the disk is looked
    at, so chat text can neither read nor probe the rest of the file system; hub ids are then never looked up on disk.

    Returns the text with every claimed path blanked, the models as (base_model, native context or None), the corpus.
    """
    models, corpus = [], []
    roots = [Path(r).resolve() for r in allowed_roots] if allowed_roots is not None else None
    for pattern in (_QUOTED, re.compile(r"\S+")):  # quoted first: a quoted path may contain spaces
        for m in pattern.finditer(text):
            start, end = m.span(0 if pattern is not _QUOTED else 1 if m.group(1) else 2)
            token = text[start:end].strip("([{<>}])\"'`“”‘’,;:!?")
            while token.endswith(".") and token not in (".", ".."):
                token = token[:-1]
            start = text.index(token, start) if token else start
            explicit = token.startswith(("/", "./", "../", "~")) or bool(_DOC_EXT.search(token))
            if not token or "://" in token:
                continue
            if roots is not None and not _within(token, roots):
                if _HUB_ID.match(token) and not explicit:
                    ref = BASE_MODEL_REFS.get(_HUB_ALIASES.get(token.lower(), ""), token)
                    models.append((ref, _native_of(ref, problems)))
                elif explicit:
                    problems.append(f"{token!r}: the app reads only uploaded files and files in its allowed folders")
                else:
                    continue
                text = _blank(text, start, start + len(token))
                continue
            if not (explicit or "/" in token or pattern is _QUOTED and _exists(token)):
                continue
            if _exists(token, "config.json") or (token.endswith(".gguf") and _exists(token)):
                models.append((token, _native_of(token, problems)))
            elif _exists(token):
                corpus.append(token)
            elif _HUB_ID.match(token) and not explicit:
                ref = BASE_MODEL_REFS.get(_HUB_ALIASES.get(token.lower(), ""), token)
                models.append((ref, _native_of(ref, problems)))
            elif explicit:
                problems.append(_missing_path(token))
            else:
                continue
            text = _blank(text, start, start + len(token))
    return text, models, corpus


def _builtin_name(m: re.Match) -> str:
    """The catalog name a match of _SMOLLM, _LLAMA, _QWEN or _MISTRAL spells (it may not be a built-in)."""
    if m.re is _SMOLLM:  # SmolLM2-135M: the embedded default
        return DEFAULT_MODEL
    if m.re is _MISTRAL:  # no version, or v0.3: mistral-7b
        size, version = m.group(1), m.group(2)
        return "mistral" + (f"-{size}b" if size else "") + ("" if version in (None, "0.3") else f"-v{version}")
    size = f"-{m.group(2)}b" if m.group(2) else ""
    if m.re is _LLAMA:
        return f"llama-{m.group(1)}{size}"
    return f"qwen{m.group(1)}{size}" + ("-instruct" if m.group(3) else "")


def _builtin_models(rest: str, models: list, problems: list[str]) -> str:
    """Built-in names in their common spellings; a known family at an unknown size or version is a problem, and a
    refused family (Gemma 2/3, Phi-3) says why."""
    known = len(problems)
    for m in [*_SMOLLM.finditer(rest), *_LLAMA.finditer(rest), *_QWEN.finditer(rest), *_MISTRAL.finditer(rest)]:
        name = _builtin_name(m)
        sizes = [k for k in BASE_MODEL_REFS if k.startswith(f"{name}-") and "-v0." not in k]
        if name in BASE_MODEL_REFS:
            models.append((BASE_MODEL_REFS[name], NATIVE_CONTEXT[name]))
        elif sizes:
            problems.append(f"which {name.replace('-', ' ').title()} do you mean: {' or '.join(sizes)}?")
        else:
            problems.append(f"I don't know the model {name!r}; built-in: {', '.join(BASE_MODEL_REFS)}")
        rest = _blank(rest, *m.span())
    refused = next((t for t, pattern in _REFUSED.items() if pattern.search(rest)), None)
    if not models and len(problems) == known and refused:
        problems.append(f"LongPilot does not extend {refused} models: {REFUSED_FAMILIES[refused]}")
    elif not models and len(problems) == known and (other := _OTHER.search(rest) or _NAMED.search(rest)):
        name = other.group(other.lastindex or 0)
        problems.append(f"I don't know the model {name!r}; built-in: {', '.join(BASE_MODEL_REFS)}")
    if len(refs := list(dict.fromkeys(ref for ref, _ in models))) > 1:
        problems.append(f"I found several models ({', '.join(refs)}): which one?")
    return rest


def _hardware(rest: str, fields: dict, problems: list[str]) -> str:
    """Device, hardware and profile. An explicit profile word wins; otherwise the hardware implies the profile."""
    no_gpu = _NO_GPU.search(rest)
    rest = _blank(rest, *no_gpu.span()) if no_gpu else rest
    cpu = bool(no_gpu or re.search(r"\bcpu\b", rest))
    if cpu or re.search(r"\bcuda\b|\bgpus?\b", rest):
        fields["device"] = "cpu" if cpu else "cuda"
    hardware, implied = "cpu" if cpu else None, None
    if memory := _MEMORY.search(rest):
        rest = _blank(rest, *memory.span())
    for m in grammar.GPU_MODEL.finditer(rest):
        gpu, count = m.group(2).upper(), m.group(1) or ("1" if m.group(2) == "h100" else "8")
        n = grammar.count(count)
        name = f"{n}x{gpu}-{memory.group(1) if memory else 80}GB"
        if name not in HARDWARE_NAMES:
            problems.append(f"no hardware profile for {n}x{gpu}; known: {', '.join(HARDWARE_NAMES)}")
        hardware = name if name in HARDWARE_NAMES else hardware
        rest = _blank(rest, *m.span())
    for m in grammar.GPU_COUNT.finditer(rest):
        n = grammar.count(m.group(1))
        if (implied := profile_for_devices(n) if n in _GPU_COUNTS else None) is None:
            problems.append(f"no hardware profile for {n} GPUs; known: {', '.join(HARDWARE_NAMES)}")
        rest = _blank(rest, *m.span())
    named, alias = _PROFILE.search(rest), _PROFILE_ALIAS.search(rest)
    if named:
        profile = next(name for name in named.groups() if name)
    else:
        profile = _ALIASES[alias.group(1)] if alias else PROFILE_FOR_HARDWARE[hardware] if hardware else implied
    if profile:
        fields["profile"] = profile
        fields["hardware"] = hardware or HARDWARE_FOR_PROFILE[profile]
    return rest


def _target(rest: str, fields: dict, models: list, problems: list[str]) -> None:
    """The length after "to" is the target, one after "from" the native window; others count only when alone."""
    strong, plain = [], []
    for m, tokens in grammar.lengths(rest):
        before = max(0, m.start() - 40)  # a bounded look back keeps a 10k-character message linear
        if _FROM.search(rest, before, m.start()):
            continue
        if _TO.search(rest, before, m.start()):
            strong.append(tokens)
        elif grammar.stands_alone(rest, m, tokens):
            plain.append(tokens)
    lengths = sorted(set(strong or plain))
    if len(lengths) > 1:
        problems.append(f"I see several lengths ({' and '.join(map(_short, lengths))}): which is the target?")
    elif lengths and (tokens := lengths[0]) > 0:
        fields["target_context"] = tokens
        ref, native = models[0] if models else ("", None)
        if native and tokens <= native:
            name = next((a for a, r in BASE_MODEL_REFS.items() if r == ref), Path(ref).name)
            problems.append(f"target {_short(tokens)} is not longer than {name}'s native {_short(native)} context")


def parse_request(
    text: str, defaults: dict | None = None, allowed_roots: Sequence[Path] | None = None
) -> ParsedRequest:
    """Read a chat request into Spec fields. Never raises on user input: problems are data, as in sop/ checks.

    Args:
        text: what the user typed.
        defaults: Spec fields from elsewhere (uploaded files as `corpus`, LLM settings). The text overrides them,
            except `corpus`: uploads are kept and paths named in the text are added.
        allowed_roots: when given (the app), the only folders whose files a path in the text may name.

    Returns:
        ParsedRequest: the fields found, the required ones missing, one-line problems, the Spec when complete and
        nothing is wrong, and a one-sentence question asking for what is missing.
    """
    fields, problems = dict(defaults or {}), []
    problems += [f"unknown setting {k!r}" for k in fields if k not in Spec.model_fields]
    uploads = list(fields.pop("corpus", None) or [])
    problems += [_missing_path(p) for p in uploads if not _exists(p)]
    text = text or ""
    if len(text) > MAX_CHARS:
        problems.append(f"that message is {len(text):,} characters; please describe the run in under {MAX_CHARS:,}")
        text = ""
    elif text.strip():
        fields["request_text"] = text.strip()
    rest, models, corpus = _paths(text, problems, allowed_roots)
    rest = _builtin_models(rest.lower(), models, problems)
    if models:
        fields["base_model"] = models[0][0]
    elif fields.get("base_model"):  # a follow-up answer ("16k") to a question about an earlier request
        models.append((fields["base_model"], _native_of(str(fields["base_model"]), problems)))
    rest = _hardware(rest, fields, problems)
    if seed := _SEED.search(rest):
        fields["seed"] = int(seed.group(1))
        rest = _blank(rest, *seed.span())
    if sp := _SP.search(rest):
        fields["sequence_parallel"] = int(sp.group(1))
        rest = _blank(rest, *sp.span())
    _target(rest, fields, models, problems)
    if "upload" in rest and not uploads:
        problems.append("you mention uploaded files, but none arrived: attach them again or name a path")
    if corpus := list(dict.fromkeys(uploads + corpus)):
        fields["corpus"] = corpus
    problems = list(dict.fromkeys(problems))  # "./x ./x" is one problem
    missing = [name for name in REQUIRED if name not in fields]
    question = QUESTIONS["both" if len(missing) == 2 else missing[0]] if missing else None
    spec = None
    if not missing and not problems:
        try:
            spec = Spec(**fields)
        except ValidationError as err:
            problems += [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]
    return ParsedRequest(fields=fields, missing=missing, problems=problems, spec=spec, question=question)


def describe_spec(spec: Spec) -> str:
    """One line for the chat, so the user can confirm what will run before anything costly starts."""
    where = spec.hardware if spec.device in ("auto", spec.hardware) else f"{spec.hardware}, device {spec.device}"
    names = [Path(p).name or p for p in spec.corpus]
    corpus = "the built-in corpus" if not names else "your corpus: " + ", ".join(names[:3])
    corpus += f" and {len(names) - 3} more" if len(names) > 3 else ""
    seed = f", seed {spec.seed}" if spec.seed else ""
    return (
        f"Extend {spec.base_model} to {spec.target_context:,} tokens with the {spec.profile} profile on {where}"
        f"{seed}, using {corpus}."
    )
