"""Read a corpus into bounded-size documents: any mix of files and directories, or the default every machine has.

Text files stream in blocks, so a file of any size keeps memory bounded; binary files are skipped and counted;
non-UTF-8 bytes are decoded with replacement and counted. JSON/JSONL in LongAlpaca (`instruction`/`output`) or chat
(`messages`) form become ready-made QA records instead of documents.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

CODE_SUFFIXES = {".py", ".c", ".h", ".cc", ".cpp", ".js", ".ts", ".java", ".go", ".rs", ".rb", ".sh", ".sql", ".toml"}
PROSE_SUFFIXES = {".txt", ".md", ".rst"}
JSON_SUFFIXES = {".json", ".jsonl"}
MAX_DOCUMENT_CHARS = 400_000  # a document larger than this is cut into several (bounded memory, bounded records)
BLOCK_BYTES = 1 << 20


@dataclass(frozen=True)
class Document:
    source: str  # path (plus #part-N for pieces of a large file, #topic for pydoc topics)
    kind: str  # "code" or "prose"
    text: str
    file_key: str = ""  # the file's path relative to the corpus root given: machine-independent, used for splits


@dataclass(frozen=True)
class QARecord:
    """A ready-made question/answer pair from a JSON corpus file."""

    source: str
    question: str
    answer: str


@dataclass
class CorpusStats:
    files: int = 0
    documents: int = 0
    qa_records: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    replaced_decoding: int = 0  # files with non-UTF-8 bytes decoded with replacement
    sources: dict[str, str] = field(default_factory=dict)  # path -> sha256 of its bytes


def stdlib_dir() -> Path:
    """The Python standard library's source directory: text every machine with Python has."""
    return Path(logging.__file__).resolve().parent.parent


def default_corpus_paths() -> list[Path]:
    """The standard library's top-level sources and its pydoc topics."""
    stdlib = stdlib_dir()
    return [stdlib / "pydoc_data" / "topics.py"] + sorted(stdlib.glob("*.py"))  # prose first: reading stops early


def _is_binary(head: bytes) -> bool:
    return b"\x00" in head


def _iter_files(paths: list[Path], stats: CorpusStats) -> Iterator[tuple[Path, str]]:
    """(file, key) pairs; the key is the path relative to the directory given (or the file name)."""
    for path in paths:
        if path.is_dir():
            yield from ((p, str(p.relative_to(path))) for p in sorted(path.rglob("*")) if p.is_file())
        elif path.is_file():
            yield path, path.name if path.parent.name != "pydoc_data" else f"pydoc_data/{path.name}"
        else:
            stats.skipped["missing path"] += 1


def _stream_text(path: Path, stats: CorpusStats) -> Iterator[str] | None:
    """Blocks of decoded text, or None for a binary file. Hashes the bytes as they stream."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        head = fh.read(8192)
        if _is_binary(head):
            return None
    replaced = False

    def blocks() -> Iterator[str]:
        nonlocal replaced
        import codecs

        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        with path.open("rb") as fh:
            while block := fh.read(BLOCK_BYTES):
                digest.update(block)
                text = decoder.decode(block)
                if "\ufffd" in text:
                    replaced = True
                yield text
            yield decoder.decode(b"", final=True)
        stats.sources[str(path)] = digest.hexdigest()
        if replaced:
            stats.replaced_decoding += 1

    return blocks()


def _documents_from_stream(path: Path, key: str, kind: str, blocks: Iterator[str]) -> Iterator[Document]:
    """Cut a text stream at line boundaries into documents of at most MAX_DOCUMENT_CHARS."""
    buffer, part = "", 0
    for block in blocks:
        buffer += block
        while len(buffer) >= MAX_DOCUMENT_CHARS:
            cut = buffer.rfind("\n", 0, MAX_DOCUMENT_CHARS)
            cut = cut + 1 if cut > 0 else MAX_DOCUMENT_CHARS
            yield Document(f"{path}#part-{part}", kind, buffer[:cut], key)
            buffer, part = buffer[cut:], part + 1
    if buffer.strip():
        yield Document(f"{path}#part-{part}" if part else str(path), kind, buffer, key)


def _qa_from_json(path: Path, text: str) -> Iterator[QARecord]:
    lines = text.splitlines() if path.suffix == ".jsonl" else [text]
    for line in lines:
        if not line.strip():
            continue
        data = json.loads(line)
        for item in data if isinstance(data, list) else [data]:
            if "instruction" in item and "output" in item:
                yield QARecord(str(path), str(item["instruction"]), str(item["output"]))
            elif "messages" in item:
                users = [m["content"] for m in item["messages"] if m.get("role") == "user"]
                answers = [m["content"] for m in item["messages"] if m.get("role") == "assistant"]
                if users and answers:
                    yield QARecord(str(path), users[-1], answers[-1])


def _pdf_text(path: Path) -> str | None:
    try:
        from pypdf import PdfReader  # optional
    except ImportError:
        return None
    return "\n".join(page.extract_text() or "" for page in PdfReader(str(path)).pages)


def _pydoc_topics(path: Path) -> Iterator[Document]:
    """pydoc's topics.py is one dict of reST help texts: each topic becomes a prose document (parsed, never run)."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            for key, value in zip(node.value.keys, node.value.values):
                if isinstance(key, ast.Constant) and isinstance(value, ast.Constant) and isinstance(value.value, str):
                    yield Document(f"{path}#{key.value}", "prose", value.value, f"pydoc_data/topics#{key.value}")


def read_corpus(paths: list[str | Path] | None, stats: CorpusStats) -> Iterator[Document | QARecord]:
    """Documents (and JSON QA records) from `paths`, or from `default_corpus_paths()` when `paths` is None."""
    files = [Path(p) for p in paths] if paths is not None else default_corpus_paths()
    for path, key in _iter_files(files, stats):
        yield from _read_file(path, key, stats)


def _read_file(path: Path, key: str, stats: CorpusStats) -> Iterator[Document | QARecord]:
    """What one file gives: documents, JSON QA records, or nothing (the reason counted in `stats.skipped`)."""
    suffix = path.suffix.lower()
    if path.name == "topics.py" and path.parent.name == "pydoc_data":
        stats.files += 1
        stats.sources[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        for doc in _pydoc_topics(path):
            stats.documents += 1
            yield doc
        return
    if suffix == ".pdf":
        text = _pdf_text(path)
        if text is None:
            stats.skipped["pdf without a PDF library"] += 1
            return
        stats.files += 1
        stats.sources[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        yield from _documents_from_stream(path, key, "prose", iter([text]))
        return
    kind = "code" if suffix in CODE_SUFFIXES else "prose" if suffix in PROSE_SUFFIXES | JSON_SUFFIXES else None
    if kind is None:
        stats.skipped["unsupported file type"] += 1
        return
    try:
        blocks = _stream_text(path, stats)
    except OSError:
        stats.skipped["unreadable"] += 1
        return
    if blocks is None:
        stats.skipped["binary"] += 1
        return
    stats.files += 1
    if suffix in JSON_SUFFIXES:
        try:
            records = list(_qa_from_json(path, "".join(blocks)))
        except (json.JSONDecodeError, TypeError, KeyError, AttributeError):
            stats.skipped["malformed json"] += 1
            return
        stats.qa_records += len(records)
        yield from records
        return
    for doc in _documents_from_stream(path, key, kind, blocks):
        stats.documents += 1
        yield doc


MIN_DOCUMENT_FILES = 2  # engine.data.build splits whole files, by their key: at least one for eval, one for train


def _walk_files(paths: list[Path], stats: CorpusStats) -> Iterator[tuple[Path, str]]:
    """`_iter_files`' pairs, listing one directory at a time (sorted names, links to directories not followed, as
    rglob): a scan that stops early never lists the rest of a large tree. Not rglob's order, so only for checks."""
    for path in paths:
        if not path.is_dir():
            yield from _iter_files([path], stats)
            continue
        for root, dirs, names in os.walk(path):
            dirs.sort()
            for name in sorted(names):
                if (file := Path(root) / name).is_file():
                    yield file, str(file.relative_to(path))


def check_corpus(paths: list[str | Path]) -> None:
    """Refuse, cheaply and before any run, a corpus that `engine.data.build.prepare_data` would refuse: text in fewer
    than MIN_DOCUMENT_FILES files (binary, empty, unsupported or only JSON QA files). Each file goes through
    read_corpus's own readers but only up to its first document (a text file costs at most one 1 MiB block), and the
    scan, listing directories as it goes, stops at the MIN_DOCUMENT_FILES-th file with text; JSON files are not read
    (they give QA records, never documents).

    Raises:
        ValueError: one line saying what was found and what to change.
    """
    stats = CorpusStats()
    found: dict[str, Path] = {}  # file key -> first file with text under that key
    same_key = 0  # files whose key (their name, or path inside the directory given) an earlier file already had
    for path, key in _walk_files([Path(p).expanduser() for p in paths], stats):
        if path.suffix.lower() in JSON_SUFFIXES:
            stats.skipped["JSON QA file (not a document)"] += 1
            continue
        if key in found:
            same_key += 1
            continue
        skipped = sum(stats.skipped.values())
        items = _read_file(path, key, stats)
        try:
            has_text = any(isinstance(item, Document) for item in items)
        finally:
            items.close()
        if has_text:
            found[key] = path
            if len(found) >= MIN_DOCUMENT_FILES:
                return
        elif sum(stats.skipped.values()) == skipped:
            stats.skipped["empty"] += 1
    seen = ", ".join(f"{n} {reason}" for reason, n in sorted(stats.skipped.items()))
    if same_key:
        seen += f"{', ' if seen else ''}{same_key} with the name of another (counted once)"
    if not found:
        raise ValueError(f"no usable text in the corpus ({f'skipped: {seen}' if seen else 'no files found'}): give "
                         "the corpus (--corpus) text or code files (.txt, .md, .rst, .py, ...), or leave it out for "
                         "the built-in corpus")  # fmt: skip
    raise ValueError(f"corpus too small: need text in at least {MIN_DOCUMENT_FILES} files (one for eval), found it "
                     f"only in {str(next(iter(found.values())))!r}{f' (skipped: {seen})' if seen else ''}: add "
                     "another text file to the corpus (--corpus)")  # fmt: skip
