"""bench/memory.py in its --tiny mode: the measured-vs-planned memory table prints and its JSON holds every row."""

from __future__ import annotations

import json

import torch

from bench import memory


def test_tiny_memory_bench_prints_the_table_and_writes_every_row(tmp_path, capsys):
    out = tmp_path / "memory.json"
    threads = torch.get_num_threads()
    try:
        argv = ["--tiny", "--lengths", "256", "512", "--levers", "off", "--top", "3", "--out", str(out)]
        assert memory.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert [(r["attention"], r["tokens"]) for r in rows] == [("s2", 256), ("s2", 512), ("full", 256), ("full", 512)]
    for r in rows:
        assert r["device_peak_bytes"] > 0 and r["predicted_device_bytes"] > 0 and r["host_peak_bytes"] == 0
        assert r["ratio"] == r["device_peak_bytes"] / r["predicted_device_bytes"]
        assert sum(r["breakdown"].values()) == r["device_peak_bytes"]  # the meter's replay is exact
        assert len(r["top"]) == 3 and r["top"][0]["nbytes"] >= r["top"][-1]["nbytes"]
    longer = [r for r in rows if r["tokens"] == 512]
    assert all(b["device_peak_bytes"] > a["device_peak_bytes"] for a, b in zip(rows[::2], longer))
    assert {s["case"] for s in data["slopes"]} == {"s2", "full"}
    printed = capsys.readouterr().out
    assert "measured MiB" in printed and "slope meas" in printed and "largest live storages" in printed
