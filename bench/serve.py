"""Serving throughput of `longpilot serve`: tokens/s, p50/p95 latency, and time to first token during a long prefill.

    python -m bench.serve            # embedded SmolLM2-135M + two LongLoRA adapters (RoPE x2 and x4), CPU minutes
    python -m bench.serve --exact    # the same, plus the serial (--exact) mode's rows first: before and after
    python -m bench.serve --tiny     # a tiny random model and two tiny adapters in a temp dir (seconds)
The real server (agents.server) runs on a free loopback port; clients are the official `openai` SDK, one thread
each. The same requests (greedy /v1/completions, spread round-robin over the base and the two adapters, so every
batch mixes three models and two RoPE factors) are sent one after another first, then by 1, 4, 8 and 16 concurrent
clients; every answer is checked against the first row's ("same" column: with --exact, the serial mode's answers).
Then the time to first token: a long prompt is sent, and while it prefills, short streaming requests measure when
their first text arrives. The adapters are random LoRA+ initialisations with small random noise on every trained
tensor (LoRA, embeddings, norms), so each adapter computes something of its own; nothing is trained. Each model
answers one warm-up request first (an adapter loads on first use), not counted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from engine.catalog import DEFAULT_MODEL  # noqa: E402
from tests.support.models import BYTE_VOCAB, make_tiny_model_dir, perturbed_adapter  # noqa: E402

MODEL = DEFAULT_MODEL
CLIENTS = (1, 4, 8, 16)
EXACT_CLIENTS = (8,)  # the serial mode's concurrent row (its throughput is one stream's at any client count)
ADAPTERS = {"x2": 2, "x4": 4}  # adapter id -> RoPE factor over the base's native context
PROMPTS = ("The history of the printing press", "def fibonacci(n):", "Long-context language models",
           "A short note on shifted sparse attention", "Once upon a time", "import numpy as np")  # fmt: skip
LONG_PROMPT_TOKENS = 2000  # the long prompt of the time-to-first-token row (--tiny: 600)
SHORT_DURING_LONG = 4  # short streaming requests sent while it prefills


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


def measure(client, requests: list[tuple[str, str]], clients: int | None, max_tokens: int, mode: str) -> dict:
    """Send `requests` one after another (clients None) or from `clients` threads; the row of figures."""
    t0 = time.perf_counter()
    if clients is None:
        results = [_send(client, r, max_tokens) for r in requests]
    else:
        with ThreadPoolExecutor(max_workers=clients) as pool:
            results = list(pool.map(lambda r: _send(client, r, max_tokens), requests))
    wall = time.perf_counter() - t0
    latencies = [s for _, _, s in results]
    return {"mode": mode, "clients": clients or "sequential", "requests": len(requests),
            "tokens": sum(n for _, n, _ in results), "wall_s": round(wall, 3),
            "tokens_per_s": round(sum(n for _, n, _ in results) / wall, 1),
            "p50_s": round(percentile(latencies, 50), 3), "p95_s": round(percentile(latencies, 95), 3),
            "texts": [t for t, _, _ in results]}  # fmt: skip


def long_prompt(tokenizer, tokens: int) -> str:
    """About `tokens` tokens of text: the prompts repeated, cut at that many tokens."""
    ids = tokenizer(" ".join(PROMPTS) * (tokens // 8 + 1))["input_ids"][:tokens]
    return tokenizer.decode(ids, skip_special_tokens=True)


def first_token_during_long_prefill(client, ids: list[str], long_text: str, mode: str) -> dict:
    """The long prompt (to the last adapter) and, once it is running, short streaming requests: the seconds until
    each short one's first text (p50 and max) and the long request's own seconds."""
    done: dict = {}

    def long_request() -> None:
        t0 = time.perf_counter()
        out = client.completions.create(model=ids[-1], prompt=long_text, max_tokens=8, temperature=0)
        done.update(tokens=out.usage.prompt_tokens, seconds=time.perf_counter() - t0)

    def short(i: int) -> float:
        t0 = time.perf_counter()
        for chunk in client.completions.create(model=ids[i % len(ids)], prompt=PROMPTS[i % len(PROMPTS)],
                                               max_tokens=4, temperature=0, stream=True):  # fmt: skip
            if chunk.choices and chunk.choices[0].text:
                return time.perf_counter() - t0
        return time.perf_counter() - t0

    thread = threading.Thread(target=long_request)
    thread.start()
    time.sleep(0.3)  # the long prompt is in (its prefill takes seconds)
    with ThreadPoolExecutor(max_workers=SHORT_DURING_LONG) as pool:
        ttft = list(pool.map(short, range(SHORT_DURING_LONG)))
    thread.join()
    return {"mode": mode, "long_prompt_tokens": done["tokens"], "long_request_s": round(done["seconds"], 3),
            "ttft_p50_s": round(percentile(ttft, 50), 3), "ttft_max_s": round(max(ttft), 3)}  # fmt: skip


def run(base_ref: str, adapters: dict[str, Path], n_requests: int, max_tokens: int, exact: bool,
        long_tokens: int, packed_weights: str = "auto") -> tuple[list[dict], list[dict], str]:  # fmt: skip
    """Serve base + adapters (the serial mode first when `exact`, then the batched one, on one pool); measure each
    mode's rows and its time to first token. (rows, first-token rows, the base's model id)."""
    import openai

    from agents.server import ModelsIndex, build_app, start_in_thread
    from engine.serving import ModelPool, ServingWorker

    pool = ModelPool(base_ref, max_loaded=len(adapters), device="cpu", packed_weights=packed_weights)
    index = ModelsIndex(pool, None, adapters)
    rows, first_token, reference = [], [], None
    for mode in (("exact", "batched") if exact else ("batched",)):
        worker = ServingWorker(pool, exact=mode == "exact")
        server = start_in_thread(build_app(worker, index))
        try:
            client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=1800)
            ids = [m.id for m in client.models.list()]
            requests = [(ids[i % len(ids)], PROMPTS[i % len(PROMPTS)]) for i in range(n_requests)]
            for model_id in ids:  # warm-up: adapters load on first use
                _send(client, (model_id, PROMPTS[0]), 1)
            for clients in (None, *(EXACT_CLIENTS if mode == "exact" else CLIENTS)):
                row = measure(client, requests, clients, max_tokens, mode)
                if reference is None:
                    reference = row["texts"]
                else:
                    row["same"] = row["texts"] == reference
                rows.append(row)
            long_text = long_prompt(pool.tokenizer, long_tokens)
            first_token.append(first_token_during_long_prefill(client, ids, long_text, mode))
        finally:
            server.stop()
            worker.close()
    return rows, first_token, pool.base_id


def table(rows: list[dict]) -> str:
    lines = [f"{'mode':>8} {'clients':>10} {'requests':>8} {'tokens':>7} {'tokens/s':>9} {'p50 s':>7} {'p95 s':>7} "
             f"{'same':>5}"]  # fmt: skip
    for r in rows:
        same = "-" if "same" not in r else "yes" if r["same"] else "NO"
        lines.append(f"{r['mode']:>8} {r['clients']!s:>10} {r['requests']:>8} {r['tokens']:>7} "
                     f"{r['tokens_per_s']:>9.1f} {r['p50_s']:>7.3f} {r['p95_s']:>7.3f} {same:>5}")  # fmt: skip
    return "\n".join(lines)


def first_token_table(rows: list[dict]) -> str:
    lines = [f"{'mode':>8} {'long prompt':>11} {'long s':>7} {'ttft p50 s':>10} {'ttft max s':>10}"]
    for r in rows:
        lines.append(f"{r['mode']:>8} {r['long_prompt_tokens']:>11} {r['long_request_s']:>7.2f} "
                     f"{r['ttft_p50_s']:>10.3f} {r['ttft_max_s']:>10.3f}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny random model and adapters (seconds on CPU)")
    parser.add_argument("--exact", action="store_true", help="also measure the serial mode (the before figures)")
    parser.add_argument("--requests", type=int, default=None, help="requests per row (default 24; --tiny 12)")
    parser.add_argument("--max-tokens", type=int, default=None, help="tokens per answer (default 32; --tiny 16)")
    parser.add_argument("--long-prompt", type=int, default=None,
                        help=f"tokens of the long prompt (default {LONG_PROMPT_TOKENS}; --tiny 600)")  # fmt: skip
    parser.add_argument("--packed-weights", choices=["auto", "on", "off"], default="auto",
                        help="as longpilot serve's flag (off: the dense weights, for a before/after)")  # fmt: skip
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    n_requests, max_tokens = args.requests or (12 if args.tiny else 24), args.max_tokens or (16 if args.tiny else 32)
    long_tokens = args.long_prompt or (600 if args.tiny else LONG_PROMPT_TOKENS)
    if n_requests < 1 or max_tokens < 1 or long_tokens < 1:
        print("bench.serve: error: --requests, --max-tokens and --long-prompt must be at least 1", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        base = str(make_tiny_base(Path(tmp) / "base")) if args.tiny else MODEL
        adapters = {name: perturbed_adapter(base, Path(tmp) / name, factor=factor, seed=seed)
                    for seed, (name, factor) in enumerate(ADAPTERS.items(), start=1)}  # fmt: skip
        rows, first_token, base_id = run(base, adapters, n_requests, max_tokens, args.exact, long_tokens,
                                           args.packed_weights)  # fmt: skip
    device = f"cpu x{os.cpu_count()}"  # the server runs on CPU here (device="cpu")
    print(f"model={'tiny random' if args.tiny else MODEL} (+ adapters {', '.join(ADAPTERS)}) device={device} "
          f"greedy /v1/completions, max_tokens={max_tokens}, requests round-robin over {base_id} and the adapters")
    print(table(rows))
    print("time to first token of short requests while a long prompt prefills:")
    print(first_token_table(first_token), flush=True)
    if args.out:
        out = {"rows": [{k: v for k, v in r.items() if k != "texts"} for r in rows], "first_token": first_token}
        Path(args.out).write_text(json.dumps(out, indent=2))
    return 0 if all(r.get("same", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
