"""The suite's one table (markdown: printed, written beside the JSON, and put into README's Results section)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

README_BEGIN = "<!-- gpu-suite:begin -->"
README_END = "<!-- gpu-suite:end -->"


def _num(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _k(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else f"{n:,}"


def _attention_rows(part: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for r in part.get("rows", []):
        target = ""
        if "target" in r:
            target = f" (target >= {r['target']}x: {'met' if r['target_met'] else 'MISSED'})"
        kernels = f" (SDPA kernel: dense {r['dense_backend']}, S2 {r['s2_backend']})" if "dense_backend" in r else ""
        rows.append((f"{_k(r['tokens'])} tokens, {part.get('heads')} heads x {part.get('head_dim')}, "
                     f"{part.get('dtype')}", f"dense {r['dense_ms']:.1f} ms, S2 {r['s2_ms']:.1f} ms: "
                     f"**{r['speedup']:.2f}x**{target}{kernels}"))  # fmt: skip
    return rows


def _llama_rows(part: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for r in part.get("rows", []):
        if "oom" in r:
            rows.append((f"{_k(r['tokens'])} {r['attention']}", f"out of memory: {r['oom']}"))
            continue
        rows.append((f"{_k(r['tokens'])} {r['attention']}", _train_figures(r)))
    if "peak_tflops" in part:
        rows.append(("MFU peak", f"{part['peak_tflops']:g} TFLOP/s ({part['peak_source']}); {part['mfu_formula']}"))
    return rows


def _train_figures(r: dict[str, Any]) -> str:
    pred = r["predicted_gib"]
    reserved = f", reserved {r['reserved_gib']:.3g} GiB" if r.get("reserved_gib") is not None else ""
    kernel = f", SDPA {r['sdpa_backend']}" if r.get("sdpa_backend") else ""
    return (f"{r['tokens_per_s']:,.0f} tok/s, MFU {100 * r['mfu']:.3g}% ({r['model_tflops']:.3g} TFLOP/s), peak "
            f"allocated {r['peak_gib']:.3g} GiB{reserved} vs planner {pred['allocated']:.3g} allocated / "
            f"{pred['planned']:.3g} planned, loss {r['loss']:.2f}{kernel}")  # fmt: skip


def _longest_rows(part: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [(f"probe {_k(r['tokens'])}", _train_figures(r) if r["trained"] else "out of memory")
            for r in part.get("rows", [])]  # fmt: skip
    if "planner_longest" in part:
        trained, failed = part.get("trained"), part.get("failed")
        bound = f", {_k(failed)} did not" if failed else ""
        exact = " (exact on the grid)" if part.get("exact") else " (the bisection stopped before the bounds met)"
        rows.append(("longest that trains", f"{_k(trained) if trained else 'none'}{bound}{exact}; the planner "
                     f"said {_k(part['planner_longest']) if part['planner_longest'] else 'none'} in "
                     f"{part['capacity_gib']} GiB, grid {_k(part['step'])}"))  # fmt: skip
    return rows


def _decode_rows(part: dict[str, Any]) -> list[tuple[str, str]]:
    return [(f"{_k(r['tokens'])} prompt, batch 1", f"s2_attention (eval path) {r['s2_attention_ms_per_token']:.3g} "
             f"ms/token, sdpa {r['sdpa_ms_per_token']:.3g} ms/token (ratio {r['ratio']})")
            for r in part.get("rows", [])]  # fmt: skip


def _by_length(models: dict[str, Any], key: str, fmt: str) -> str:
    base, ext = models.get("base", {}).get(key, {}), models.get("extended", {}).get(key, {})
    lengths = sorted({int(n) for n in [*base, *ext]})

    def cell(d: dict, n: int) -> str:
        return format(d[str(n)], fmt) if d.get(str(n)) is not None else "-"

    return ", ".join(f"{_k(n)} {cell(base, n)} / {cell(ext, n)}" for n in lengths)


def _extension_rows(part: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    if "warmup" in part:
        w = part["warmup"]
        rows.append(("warm-up", f"{w['tokens_per_s']:,.0f} tok/s at {_k(w['tokens'])} ({w['precision']}) -> "
                     f"{part.get('steps')} steps for {part.get('train_budget_s')} s of training"))  # fmt: skip
    if "command" in part:
        rows.append(("command", f"`{part['command']}`"))
    if "data" in part:
        d = part["data"]
        rows.append(("training data", f"train {d['train_tasks']} (plain text only: {d['plain_text_only']}, passkey "
                     f"in training: {d['passkey_in_training']})"))  # fmt: skip
    if "train" in part:
        t = part["train"]
        rows.append(
            (
                "training",
                f"{t['steps']} steps, loss {t['initial_loss']} -> {t['final_loss']}, "
                f"{t['median_tokens_per_s']} tok/s median, {t['wall_s']} s, {t['attention']}, {t['precision']}",
            )
        )
    ev = part.get("eval")
    if ev:
        models = ev["models"]
        rows.append(("PPL base / extended", _by_length(models, "ppl", ".2f")))
        if models.get("rope_only", {}).get("ppl"):
            rope = models["rope_only"]["ppl"]
            rows.append(("PPL RoPE-only (no training)", ", ".join(f"{_k(int(n))} {v:.2f}" for n, v in rope.items())))
        rows.append(("passkey base / extended", _by_length(models, "passkey", ".2f")))
        for name in ("base", "extended"):
            reg = models.get(name, {}).get("regression") or {}
            if reg.get("length"):
                rows.append((f"{name} at {_k(reg['length'])} (regression)", f"PPL {_num(reg['ppl'])}, passkey "
                             f"{_num(reg['passkey'])}, RULER niah {_num(reg['ruler_average'])}"))  # fmt: skip
        if ev.get("gate"):
            rows.append(("quality gate (informational)", f"passed {ev['gate']['passed']}: {ev['gate']['checks']}"))
        if ev.get("status") != "complete":
            rows.append(("evaluation", f"{ev.get('status')}: {ev.get('error')}"))
    return rows


ROWS = {"attention": _attention_rows, "llama7b": _llama_rows, "longest": _longest_rows, "decode": _decode_rows,
        "extension": _extension_rows}  # fmt: skip
TITLES = {"attention": "1. S2 vs dense attention", "llama7b": "2. Llama-2-7B shape", "longest": "3. longest context",
          "decode": "4. eval decode", "extension": "5. 8k -> 32k"}  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    """Header (hardware, command, wall times) and one table over every part, in markdown."""
    hw = result["machine"]
    lines = [
        f"GPU suite ({result['mode']} mode) on **{hw['device']}**"
        + (f" ({hw['memory_gib']} GiB, CUDA {hw['cuda']})" if hw.get("cuda") else "")
        + f", torch {hw['torch']}, {result['started']}; command `{result['command']}`; "
        f"wall {result['wall_s']:.0f} s"
        + (f" (the whole command, wheels and imports included: {result['command_wall_s']:.0f} s of "
           f"{result['total_s']:.0f} s)" if "command_wall_s" in result else "")
        + ".",
        "",
        "| part | what | measured |",
        "|---|---|---|",
    ]
    for name, part in result["parts"].items():
        title = TITLES.get(name, name)
        status = f"{part['status']} in {part['wall_s']:.0f} s of {part['budget_s']:.0f} s"
        lines.append(f"| {title} | status | {status}" + (f": {part['reason']}" if part.get("reason") else "") + " |")
        for what, measured in ROWS[name](part):
            lines.append(f"| {title} | {what} | {measured.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def fill_readme(readme: Path, text: str) -> None:
    """Replace what lies between the Results markers of `readme` with `text`.

    Raises:
        ValueError: the markers are missing (nothing is written).
    """
    old = readme.read_text()
    pattern = re.compile(re.escape(README_BEGIN) + r".*?" + re.escape(README_END), re.S)
    if not pattern.search(old):
        raise ValueError(f"{readme} has no {README_BEGIN} ... {README_END} block to fill")
    readme.write_text(pattern.sub(lambda _: f"{README_BEGIN}\n{text}{README_END}", old, count=1))
