"""Serving throughput of `longpilot serve`: tokens/s and p50/p95 latency at 1, 4 and 8 concurrent clients.

    python -m bench.serve           # embedded SmolLM2-135M + two LongLoRA adapters (RoPE x2 and x4), CPU minutes
    python -m bench.serve --tiny    # a tiny random model and two tiny adapters in a temp dir (seconds)
The real server (agents.server) runs on a free loopback port; clients are the official `openai` SDK, one thread
each. The same requests (greedy /v1/completions, spread round-robin over the base and the two adapters) are sent
one after another first, then by 1, 4 and 8 concurrent clients; every concurrent answer is checked against its
sequential answer ("same" column). The adapters are random LoRA+ initialisations with small random noise on every
trained tensor (LoRA, embeddings, norms), so each adapter computes something of its own; nothing is trained.
Each model answers one warm-up request first (an adapter loads on first use), not counted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from engine.catalog import DEFAULT_MODEL  # noqa: E402
from tests.support.models import BYTE_VOCAB, make_tiny_model_dir, perturbed_adapter  # noqa: E402

MODEL = DEFAULT_MODEL
CLIENTS = (1, 4, 8)
ADAPTERS = {"x2": 2, "x4": 4}  # adapter id -> RoPE factor over the base's native context
PROMPTS = ("The history of the printing press", "def fibonacci(n):", "Long-context language models",
           "A short note on shifted sparse attention", "Once upon a time", "import numpy as np")  # fmt: skip


def make_tiny_base(out_dir: Path, context: int = 1024) -> Path:
    """The tiny random Llama with the byte tokenizer (tests.support.models), `<eos>` its eos and pad token."""
    return make_tiny_model_dir(out_dir, context, eos=BYTE_VOCAB - 1, pad=BYTE_VOCAB - 1)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the two nearest ranks."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _send(client, request: tuple[str, str], max_tokens: int) -> tuple[str, int, float]:
    """(text, completion tokens, seconds) of one greedy completion."""
    model, prompt = request
    t0 = time.perf_counter()
    out = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
    return out.choices[0].text, out.usage.completion_tokens, time.perf_counter() - t0


def measure(client, requests: list[tuple[str, str]], clients: int | None, max_tokens: int) -> dict:
    """Send `requests` one after another (clients None) or from `clients` threads; the row of figures."""
    t0 = time.perf_counter()
    if clients is None:
        results = [_send(client, r, max_tokens) for r in requests]
    else:
        with ThreadPoolExecutor(max_workers=clients) as pool:
            results = list(pool.map(lambda r: _send(client, r, max_tokens), requests))
    wall = time.perf_counter() - t0
    latencies = [s for _, _, s in results]
    return {"clients": clients or "sequential", "requests": len(requests), "tokens": sum(n for _, n, _ in results),
            "wall_s": round(wall, 3), "tokens_per_s": round(sum(n for _, n, _ in results) / wall, 1),
            "p50_s": round(percentile(latencies, 50), 3), "p95_s": round(percentile(latencies, 95), 3),
            "texts": [t for t, _, _ in results]}  # fmt: skip


def run(base_ref: str, adapters: dict[str, Path], n_requests: int, max_tokens: int) -> tuple[list[dict], str]:
    """Serve base + adapters, measure sequential then each client count; (rows, the base's model id)."""
    import openai

    from agents.server import build_server_app, start_in_thread

    app, worker = build_server_app(base_ref, runs_dir=None, adapters=adapters, max_loaded=len(adapters), device="cpu")
    server = start_in_thread(app)
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=600)
        ids = [m.id for m in client.models.list()]
        requests = [(ids[i % len(ids)], PROMPTS[i % len(PROMPTS)]) for i in range(n_requests)]
        for model_id in ids:  # warm-up: adapters load on first use
            _send(client, (model_id, PROMPTS[0]), 1)
        rows = [measure(client, requests, None, max_tokens)]
        for clients in CLIENTS:
            row = measure(client, requests, clients, max_tokens)
            row["same"] = row["texts"] == rows[0]["texts"]
            rows.append(row)
        return rows, ids[0]
    finally:
        server.stop()
        worker.close()


def table(rows: list[dict]) -> str:
    lines = [f"{'clients':>10} {'requests':>8} {'tokens':>7} {'tokens/s':>9} {'p50 s':>7} {'p95 s':>7} {'same':>5}"]
    for r in rows:
        same = "-" if "same" not in r else "yes" if r["same"] else "NO"
        lines.append(f"{r['clients']!s:>10} {r['requests']:>8} {r['tokens']:>7} {r['tokens_per_s']:>9.1f} "
                     f"{r['p50_s']:>7.3f} {r['p95_s']:>7.3f} {same:>5}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny random model and adapters (seconds on CPU)")
    parser.add_argument("--requests", type=int, default=None, help="requests per row (default 24; --tiny 12)")
    parser.add_argument("--max-tokens", type=int, default=None, help="tokens per answer (default 32; --tiny 16)")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    n_requests, max_tokens = args.requests or (12 if args.tiny else 24), args.max_tokens or (16 if args.tiny else 32)
    if n_requests < 1 or max_tokens < 1:
        print("bench.serve: error: --requests and --max-tokens must be at least 1", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        base = str(make_tiny_base(Path(tmp) / "base")) if args.tiny else MODEL
        adapters = {name: perturbed_adapter(base, Path(tmp) / name, factor=factor, seed=seed)
                    for seed, (name, factor) in enumerate(ADAPTERS.items(), start=1)}  # fmt: skip
        rows, base_id = run(base, adapters, n_requests, max_tokens)
    device = f"cpu x{os.cpu_count()}"  # the server runs on CPU here (device="cpu")
    print(f"model={'tiny random' if args.tiny else MODEL} (+ adapters {', '.join(ADAPTERS)}) device={device} "
          f"greedy /v1/completions, max_tokens={max_tokens}, requests round-robin over {base_id} and the adapters")
    print(table(rows), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps([{k: v for k, v in r.items() if k != "texts"} for r in rows], indent=2))
    return 0 if all(r.get("same", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
