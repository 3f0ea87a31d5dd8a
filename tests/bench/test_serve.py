"""bench/serve.py in its --tiny mode: the real server, base + two adapters, sequential and 1/4/8 clients."""

from __future__ import annotations

import json
import math

from bench import serve


def test_tiny_serving_bench_prints_and_writes_every_row(tmp_path, capsys):
    out = tmp_path / "serve.json"
    assert serve.main(["--tiny", "--requests", "4", "--max-tokens", "3", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["clients"] for r in rows] == ["sequential", 1, 4, 8]
    for r in rows:
        assert r["requests"] == 4 and 4 <= r["tokens"] <= 12  # an early end of sequence stops an answer short
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0 and 0 < r["p50_s"] <= r["p95_s"]
        assert abs(r["tokens_per_s"] - r["tokens"] / r["wall_s"]) <= 0.01 * r["tokens_per_s"] + 0.1  # rounding
    assert all(r["same"] for r in rows[1:])  # concurrent answers equal the sequential ones (greedy)
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "p95 s" in printed and printed.count(" yes") == 3


def test_percentile_interpolates_between_ranks():
    assert serve.percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert serve.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 95) == 4.8
    assert serve.percentile([7.0], 95) == 7.0
