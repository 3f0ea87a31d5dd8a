"""Data preparation throughput on a ~100 MB corpus, one table: raw batched tokenisation, and prepare_data building
packed LM sequences from all of it (read -> tokenise -> pack -> check -> save).

    python bench/data.py          # knobs below; the corpus is the standard library copied until CORPUS_MB is reached
"""

import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engine.data import DataConfig, prepare_data  # noqa: E402
from engine.data.corpus import stdlib_dir  # noqa: E402
from engine.model.loading import DEFAULT_MODEL, load_tokenizer, resolve_model  # noqa: E402

CORPUS_MB = 100
TARGET = 32768
BATCH = 64


def make_corpus(folder: Path) -> int:
    stdlib = stdlib_dir()
    files = sorted(stdlib.glob("*.py"))
    size, copy = 0, 0
    while size < CORPUS_MB * 2**20:
        for src in files:
            dst = folder / f"copy{copy:03d}_{src.name}"
            shutil.copyfile(src, dst)
            size += dst.stat().st_size
        copy += 1
    return size


def main() -> None:
    tokenizer = load_tokenizer(resolve_model(DEFAULT_MODEL))
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        size = make_corpus(corpus)
        texts = [p.read_text(errors="replace") for p in sorted(corpus.iterdir())]
        start = time.perf_counter()
        tokens = 0
        for i in range(0, len(texts), BATCH):
            tokens += sum(len(ids) for ids in tokenizer(texts[i : i + BATCH], add_special_tokens=False)["input_ids"])
        raw = time.perf_counter() - start
        n_records = tokens // TARGET
        cfg = DataConfig(
            output_dir=str(Path(tmp) / "out"),
            target_context=TARGET,
            corpus=(str(corpus),),
            n_train=int(n_records * 0.75),
            n_eval=max(1, int(n_records * 0.15)),
            longqa_ratio=0.0,
            lm_ratio=1.0,
            short_ratio=0.0,
            eval_document_fraction=0.2,
        )
        start = time.perf_counter()
        result = prepare_data(cfg, tokenizer)
        prep = time.perf_counter() - start
        packed = sum(result.card["records"].values()) * TARGET
    print(f"corpus {size / 2**20:.0f} MiB, {tokens:,} tokens, {os.cpu_count()} cores")
    print(f"{'stage':<34} {'seconds':>8} {'tokens/s':>12}")
    print(f"{'batched tokenisation (batch 64)':<34} {raw:>8.1f} {tokens / raw:>12,.0f}")
    print(f"{'prepare_data, packed LM, saved':<34} {prep:>8.1f} {packed / prep:>12,.0f}")


if __name__ == "__main__":
    main()
