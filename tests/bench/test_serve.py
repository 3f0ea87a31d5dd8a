"""bench/serve.py in its --tiny mode: the real server, base + two adapters, the serial (--exact) mode's rows and the
batched mode's (sequential and 1/4/8/16 clients), and the time to first token during a long prefill."""

from __future__ import annotations

import json
import math

from bench import serve


def test_tiny_serving_bench_prints_and_writes_every_row(tmp_path, capsys):
    out = tmp_path / "serve.json"
    assert serve.main(["--tiny", "--exact", "--requests", "4", "--max-tokens", "3", "--long-prompt", "300",
                       "--out", str(out)]) == 0  # fmt: skip
    written = json.loads(out.read_text())
    rows = written["rows"]
    assert [(r["mode"], r["clients"]) for r in rows] == [("exact", "sequential"), ("exact", 8), *(
        ("batched", c) for c in ("sequential", 1, 4, 8, 16))]  # fmt: skip
    for r in rows:
        assert r["requests"] == 4 and 4 <= r["tokens"] <= 12  # an early end of sequence stops an answer short
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0 and 0 < r["p50_s"] <= r["p95_s"]
        assert abs(r["tokens_per_s"] - r["tokens"] / r["wall_s"]) <= 0.01 * r["tokens_per_s"] + 0.1  # rounding
    assert all(r["same"] for r in rows[1:])  # every answer equals the serial mode's (greedy)
    assert [f["mode"] for f in written["first_token"]] == ["exact", "batched"]
    for f in written["first_token"]:
        assert f["long_prompt_tokens"] >= 300 and 0 < f["ttft_p50_s"] <= f["ttft_max_s"]
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "p95 s" in printed and printed.count(" yes") == 6 and "ttft p50 s" in printed


def test_percentile_interpolates_between_ranks():
    assert serve.percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert serve.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 95) == 4.8
    assert serve.percentile([7.0], 95) == 7.0
