"""Every command in README.md and docs/*.md is executed here, on a tiny model, or is on an asserted exemption list.

The documents' commands are read from their fenced ```bash/```sh/``` blocks (lines starting with `longpilot `,
`make `, `python `; `\\` and indented synopsis continuations joined, `# comments` dropped) and from their inline code
spans with the same prefixes. COMMANDS maps each (whitespace-normalised) command to how it is run: concrete command
lines with placeholders filled by a tiny model (a random 2-layer Llama with the embedded SmolLM2 tokenizer,
1,024-token native context, extended to 2,048), heavy parts shortened by flags. A documented command with no entry
fails `test_every_readme_command_has_an_entry`; an entry whose command left every document fails the reverse test.
The ```python blocks are executed too (PY_BLOCKS: textual substitutions, each asserted to match the documented text).
A command shown in several documents is one entry and runs once.

One SOP run (`longpilot run ...` waiting for approval, then `longpilot resume RUN_DIR --yes`) is shared by the
status, resume, eval and export entries; `make demo` runs the real Makefile target on the tiny model.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.models import make_tiny_model_dir
from tests.support.servers import free_port

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
VENV = Path(sys.prefix)
PREFIXES = ("longpilot", "make", "python")
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
TARGET = 2048  # the tiny model's native context is 1024: RoPE x2, as in the README's 8k -> 16k


# ---------------------------------------------------------------- reading the README and docs/


def documents() -> list[Path]:
    """README.md, then every docs/*.md (sorted): the files whose commands and code blocks this file runs."""
    return [README, *sorted(DOCS.glob("*.md"))]


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def docs_text() -> str:
    """Every document's text, one after another (for checks that compare output with what the docs show)."""
    return "\n".join(path.read_text() for path in documents())


def _strip_comment(line: str) -> str:
    """Drop a shell `# comment` (a `#` at the start or after whitespace, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def _is_command(text: str) -> bool:
    return bool(re.match(rf"({'|'.join(PREFIXES)}) \S", text))


def shell_commands(block: str) -> list[str]:
    """Command lines of one shell block: `\\` continuations and indented synopsis lines joined, comments dropped."""
    commands: list[str] = []
    current: str | None = None
    for raw in block.splitlines():
        line = _strip_comment(raw).rstrip()
        if current is not None and (current.endswith("\\") or (raw[:1].isspace() and line.strip())):
            current = current.removesuffix("\\") + " " + line.strip()
            continue
        if current is not None:
            commands.append(current)
            current = None
        if _is_command(line):
            current = line
    if current is not None:
        commands.append(current)
    return [" ".join(c.split()) for c in commands]


def readme_commands(text: str | None = None) -> list[str]:
    """Every command the documents show (or `text` shows): per document, fenced shell blocks first, then inline code
    spans (deduplicated, in order)."""
    if text is None:
        return list(dict.fromkeys(c for path in documents() for c in readme_commands(path.read_text())))
    found: list[str] = []
    for m in FENCE.finditer(text):
        if m.group(1) in ("", "bash", "sh", "shell", "console"):
            found += shell_commands(m.group(2))
    prose = FENCE.sub("", text)
    found += [span for s in re.findall(r"`([^`]+)`", prose) if _is_command(span := " ".join(s.split()))]
    return list(dict.fromkeys(found))


def readme_python_blocks(text: str | None = None) -> list[str]:
    if text is None:
        return [block for _, block in documented_python_blocks()]
    return [m.group(2) for m in FENCE.finditer(text) if m.group(1) == "python"]


def documented_python_blocks() -> list[tuple[Path, str]]:
    """Every ```python block of the documents, with the file it is in."""
    return [(path, block) for path in documents() for block in readme_python_blocks(path.read_text())]


def command_sources() -> dict[str, list[str]]:
    """Each documented command -> the documents (relative paths) that show it."""
    sources: dict[str, list[str]] = {}
    for path in documents():
        for command in readme_commands(path.read_text()):
            sources.setdefault(command, []).append(_rel(path))
    return sources


def test_the_extractor_joins_continuations_and_drops_comments():
    block = (
        "make demo   # set-up + run\n"
        "longpilot eval --model a=b \\\n"
        "               --out eval/\n"
        "longpilot run  --model m [--corpus DOCS ...]\n"
        '               [--request "x # y"]\n'
        "# runs: deepspeed ...\n"
        "agents/    not a command\n"
    )
    assert shell_commands(block) == [
        "make demo",
        "longpilot eval --model a=b --out eval/",
        'longpilot run --model m [--corpus DOCS ...] [--request "x # y"]',
    ]
    prose = "Run `make lint` or `longpilot plan --model M\n--target-context T`; the `longpilot` CLI; `make`."
    assert readme_commands(prose) == ["make lint", "longpilot plan --model M --target-context T"]


# ---------------------------------------------------------------- the table: README command -> what runs


@dataclass
class Result:
    rc: int
    out: str
    err: str

    def tail(self) -> str:
        return f"rc {self.rc}\n--- stdout\n{self.out[-3000:]}\n--- stderr\n{self.err[-3000:]}"


@dataclass(frozen=True)
class Step:
    """One invocation. Placeholders: {tiny} {run} {demo} {tmp} {venv} {stamp} {repo} {corpus} {corpus2} {port}
    {port2}.

    via: "main" calls the entry point in this process (`longpilot` -> agents.cli.commands, `python -m
    engine.training.launch`
    -> engine.training.launch.main: the console script's own function, without a second interpreter start-up);
    "process" runs
    it as its own process; "serve" starts a server process, waits for HTTP 200 on {port}/{port2}, then stops it."""

    command: str  # split like a shell line (shlex), then each word's placeholders filled
    rc: int = 0
    check: Callable[[Result, dict], None] | None = None
    via: str = "main"
    cwd: str = "{tmp}"


@dataclass(frozen=True)
class Entry:
    how: str
    steps: tuple[Step, ...] = ()
    after: tuple[str, ...] = ()  # entries whose artifacts these steps use (run first, once)
    custom: Callable[[dict], None] | None = None
    same_as: str | None = None
    exempt: str | None = None  # why this file does not execute it (only the asserted EXEMPT keys)


def _manifest_all_passed(run_dir: Path) -> None:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert all(s["status"] == "passed" for s in manifest["stages"].values()), manifest["stages"]
    assert all(c["passed"] for a in manifest["artifacts"].values() for c in a["checks"])


def _check_demo(r: Result, ctx: dict) -> None:
    demo = Path(ctx["demo"])
    assert (demo / "report.md").is_file() and "passed" in r.out, r.tail()
    # about one screen, every stage named, none of the libraries' warnings or bars (agents.cli.quiet)
    assert len((r.out + r.err).splitlines()) <= 40 and "Warning" not in r.out + r.err and "it/s" not in r.err, r.tail()
    assert all(f">> {stage} " in r.out for stage in ("plan", "prepare_data", "train", "evaluate", "report")), r.out
    _manifest_all_passed(demo)


def _check_make_n_demo(r: Result, ctx: dict) -> None:
    documented = "longpilot run --model smollm2-135m --target-context 16384 --profile smoke --yes"
    line = [x for x in r.out.splitlines() if "longpilot run" in x]
    assert len(line) == 1 and re.sub(r" --run-dir \S+", "", line[0].split("/bin/", 1)[1]).strip() == documented, r.out
    assert re.search(r"--run-dir runs/demo-\d{8}-\d{6}", line[0]), line  # README: outputs in runs/demo-<date>/


def _check_launch_dry_run(r: Result, ctx: dict) -> None:
    documented = next(x for x in docs_text().splitlines() if x.startswith("# runs: ")).removeprefix("# runs: ")
    head = documented.split("...")[0]
    printed = r.out.strip().splitlines()[-1]
    assert printed.startswith(head) and printed.endswith("engine/recipes/llama2-7b-32k-8xA100.json"), printed
    from engine.training.train import TrainConfig

    recipe = TrainConfig.from_dict(json.loads((REPO / "engine/recipes/llama2-7b-32k-8xA100.json").read_text()))
    assert recipe.target_context == 32768 and recipe.deepspeed == "engine/deepspeed/zero2.json", recipe


def _plan_cards() -> list[list[str]]:
    """The plan cards the docs' ```text blocks show (a subset of each card's lines, cards separated by blank lines)."""
    blocks = [m.group(2) for m in FENCE.finditer(docs_text()) if m.group(1) == "text"]
    return [c.strip("\n").splitlines() for b in blocks for c in b.split("\n\n") if c.strip().startswith("Plan: ")]


def _check_card(r: Result, ctx: dict) -> None:
    """The docs show exactly one card for this command, told apart from the others of the same request by its first
    line and its `memory levers:` line (which levers were pinned, which the planner chose): every line shown is
    printed."""
    printed = [line.rstrip() for line in r.out.splitlines()]
    levers = [line for line in printed if line.strip().startswith("memory levers:")]
    assert len(levers) == 1, r.tail()
    cards = [c for c in _plan_cards() if c[0] in printed and levers[0] in c]
    assert len(cards) == 1, (levers[0], cards, r.out)
    assert all(line.rstrip() in printed for line in cards[0]), (cards[0], r.out)


def _check_search_card(r: Result, ctx: dict) -> None:
    """A plan that does not fit or misses a budget: its docs card (_check_card), and the search's answer printed."""
    _check_card(r, ctx)
    searched = r"^  searched \((does not fit|over --max-hours)\): [1-9]\d* plan\(s\) that fit$"
    assert re.search(searched, r.out, re.M), r.out


def _check_levers_card(r: Result, ctx: dict) -> None:
    """A plan that fits with the memory levers the planner chose: its docs card, and no search."""
    _check_card(r, ctx)
    assert "(fits)" in r.out and "(planner)" in r.out and "searched" not in r.out, r.out


def _levers_table_rows() -> list[tuple[str, ...]]:
    """The docs' one-H100 memory-levers table: (model, longest levers off, longest with levers, 524,288, step)."""
    rows = re.findall(r"^\| (Llama-[\w.-]+) \|([^|]+)\|([^|]+)\|([^|]+)\|([^|]+)\|$", docs_text(), re.M)
    assert len(rows) >= 2, rows
    return [tuple(c.strip() for c in row) for row in rows]


LEVER_WORDS = {"zero3_offload": "ZeRO-3 + CPU offload", "offload_activations": "activation offload",
               "tiled_mlp": "tiled MLP"}  # fmt: skip


def _run_levers_table(ctx: dict) -> None:
    """Every row of the docs' one-H100 table, from the planner: `longpilot plan --model M --target-context 524288
    --hardware 1xH100-80GB --json`, levers pinned off and left to the planner."""
    off = "--zero-stage none --offload-activations off --tiled-mlp off"
    for model, before, now, at_512k, step in _levers_table_rows():
        plans = {}
        for name, extra in (("off", off), ("auto", "")):
            r = _execute(Step(f"longpilot plan --model {model.lower()} --target-context 524288 "
                              f"--hardware 1xH100-80GB --json {extra}"), ctx)  # fmt: skip
            plans[name] = json.loads(r.out)["plan"]
            assert r.rc == (1 if name == "off" else 0), r.tail()
        p0, p = plans["off"], plans["auto"]
        lv = p["levers"]
        on = [LEVER_WORDS[lv["zero"]]] if lv["zero"] in LEVER_WORDS else []
        on += [LEVER_WORDS[k] for k in ("offload_activations", "tiled_mlp") if lv[k]]
        seconds = p["tokens_per_step"] / p["tokens_per_s"]
        want = (f"{p0['longest_target']:,} (524,288 needs {p0['memory']['total_gib']:.1f} GiB)",
                f"{p['longest_target']:,}",
                f"fits: {p['memory']['total_gib']:.1f} GiB, {p['memory']['host_gib']:.1f} GiB host; {', '.join(on)}",
                f"{seconds:,.0f} s ({p['tokens_per_step'] // 524288} x 524,288 tokens)")  # fmt: skip
        assert p["fits"] and lv["sequence_parallel"] == 1 and set(lv["chosen_by_planner"]) >= {"zero"}, lv
        documented = (before, now, at_512k, step)
        assert documented == want, f"docs row {model}: {documented}; planner: {want}"
        if model == "Llama-3-8B":  # the README's and results.md's headline rows quote the same plan
            gib, host = f"{p['memory']['total_gib']:.1f}", f"{p['memory']['host_gib']:.1f}"
            assert f"fits *predicted*: {gib} GiB + {host} GiB of host memory" in README.read_text(), want
            results = (DOCS / "results.md").read_text()
            assert f"it fits: {gib} GiB and {host} GiB of host memory" in results and want[3].split(" (")[0] in results
            assert f"longest target {now} ({p0['longest_target']:,} with the levers off)" in results, want


def _check_sp_cluster(r: Result, ctx: dict) -> None:
    """The docs' cluster plan: it fits, and its launch line is the hostfile one the docs show."""
    block = next(m.group(2) for m in FENCE.finditer(docs_text()) if m.group(1) == "text" and
                 "--hostfile hostfile" in m.group(2))  # fmt: skip
    printed = [line.rstrip() for line in r.out.splitlines()]
    assert all(line.rstrip() in printed for line in block.splitlines() if line.strip()), (block, r.out)
    assert "(fits)" in r.out and "sequence parallel 8 (Ulysses, data parallel 2)" in r.out, r.out


def _check_revised(r: Result, ctx: dict) -> None:
    assert "Revised plan:" in r.out and "LoRA rank 8 -> 16" in r.out and "trainable parameters" in r.out, r.tail()
    assert "r=16" in r.out, r.out  # the revised card


def _check_plan_text(r: Result, ctx: dict) -> None:
    assert "Plan: llama-2-7b 4096 -> 32768 tokens (full profile on 8xA100-80GB)" in r.out, r.tail()
    assert "launch: deepspeed --num_gpus=8" in r.out and "FAILED" not in r.out, r.out


def _check_awaiting(r: Result, ctx: dict) -> None:
    run = Path(ctx["run"])
    assert "awaits plan approval" in r.err and (run / "plan.json").is_file() and not (run / "report.md").exists()
    spec = json.loads((run / "spec.json").read_text())
    assert spec["base_model"] == ctx["tiny"] and spec["target_context"] == TARGET, spec  # flags win over --request
    assert len(spec["corpus"]) == 2 and spec["device"] == "cpu" and spec["request_text"], spec
    assert (spec["attention"], spec["batch_size"], spec["grad_accum"]) == ("s2", 1, 1), spec
    levers = ("rope_method", "train_mix", "precision", "lora_rank", "group_size_ratio", "sequence_parallel",
              "max_hours", "max_gib")  # fmt: skip
    assert [spec[k] for k in levers] == ["linear", "longqa", "fp32", 8, 0.25, 1, 24, 64], spec


def _check_resumed(r: Result, ctx: dict) -> None:
    run = Path(ctx["run"])
    assert "run passed" in r.out and (run / "report.md").is_file(), r.tail()
    _manifest_all_passed(run)
    data_card = json.loads((run / "data" / "data_card.json").read_text())
    assert data_card, "the data card is empty"


def _check_resume_noop(r: Result, ctx: dict) -> None:
    stages = json.loads((Path(ctx["run"]) / "manifest.json").read_text())["stages"]
    assert all(s["attempts"] == 1 for s in stages.values()), stages  # a finished run: nothing redone


def _check_status_text(r: Result, ctx: dict) -> None:
    assert r.out.startswith("run run: passed") and "artifact final_report" in r.out, r.out


def _check_status_json(r: Result, ctx: dict) -> None:
    status = json.loads(r.out)
    assert status["status"] == "passed" and set(status["stages"]) >= {"plan", "train", "report"}, status


def _check_eval(r: Result, ctx: dict) -> None:
    report = json.loads((Path(ctx["tmp"]) / "eval" / "eval_report.json").read_text())
    assert set(report["models"]) == {"base", "extended"} and report["status"] == "complete", report.get("status")
    failed = [c["name"] for c in report["gate"]["checks"] if not c["passed"]]
    assert failed == ["passkey_min"] and "gate failed: passkey_min" in r.err, (failed, r.err[-500:])


def _check_export(r: Result, ctx: dict) -> None:
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(Path(ctx["tmp"]) / "merged")
    assert merged.config.rope_parameters["factor"] == 2.0, merged.config.rope_parameters


def _check_engine_demo(r: Result, ctx: dict) -> None:
    assert "LongPilot engine demo: done" in r.out and (Path(ctx["tmp"]) / "engine-demo").is_dir(), r.tail()


def _check_dist_dry_run(r: Result, ctx: dict) -> None:
    printed = r.out.strip().splitlines()[-1]
    launcher = {"torchrun": "--nproc_per_node=2", "deepspeed": "--hostfile hosts --num_gpus=2",
                "accelerate": "--num_processes=2"}  # fmt: skip
    assert printed.endswith("engine.training.launch train --config run.json"), printed
    assert launcher[printed.split()[0]] in printed, printed


def _dist_config(ctx: dict) -> None:
    """run.json and hosts for `python -m engine.training.launch distributed --config run.json ...` (printed, not
    trained)."""
    cfg = {"output_dir": f"{ctx['tmp']}/dist", "dataset_dir": f"{ctx['tmp']}/data", "base_model": ctx["tiny"],
           "target_context": TARGET, "max_steps": 1, "gradient_accumulation_steps": 1, "save_steps": 1,
           "quiet": True}  # fmt: skip
    Path(ctx["tmp"], "run.json").write_text(json.dumps(cfg))
    Path(ctx["tmp"], "hosts").write_text("localhost slots=2\n")


def _http(url: str, timeout: float = 5) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def _check_app_with_auth(r: Result, ctx: dict) -> None:
    assert _http(f"http://127.0.0.1:{ctx['port']}/config") == 401  # --auth is on: the app's config needs a login
    assert Path(ctx["tmp"], "app-runs").is_dir()  # --runs-dir reached the app


def _check_app_plain(r: Result, ctx: dict) -> None:
    assert _http(f"http://127.0.0.1:{ctx['port2']}/config") == 200
    assert Path(ctx["tmp"], "app-runs2").is_dir()


def _check_lint(r: Result, ctx: dict) -> None:
    assert "kept, 0 broken" in r.out, r.tail()


def _check_make_n_gpu_check(r: Result, ctx: dict) -> None:
    assert r.rc == 0 and "bash bench/gpu_window.sh runs/gpu-suite --readme README.md" in r.out, r.tail()
    assert "GPU_PY=python3" in r.out and "pip" not in r.out and ".longpilot-installed" not in r.out, r.out


def _check_make_n_gpu_wheels(r: Result, ctx: dict) -> None:
    assert r.rc == 0 and "pip download -q --no-deps --only-binary=:all:" in r.out, r.tail()
    assert "--python-version 3.12" in r.out and "-d .whl -r bench/gpu_wheels.txt" in r.out, r.out


def _check_gpu_suite_tiny(r: Result, ctx: dict) -> None:
    result = json.loads((Path(ctx["tmp"]) / "gpu-suite" / "gpu_suite.json").read_text())
    assert result["mode"] == "tiny" and result["parts"]["attention"]["status"] == "complete", r.tail()
    assert "| 1. S2 vs dense attention | status | complete" in r.out, r.tail()


def _check_serve_bench_tiny(r: Result, ctx: dict) -> None:
    out = json.loads((Path(ctx["tmp"]) / "serve.json").read_text())
    rows = out["rows"]
    assert [row["clients"] for row in rows] == ["sequential", 1, 4, 8, 16], r.tail()
    assert all(row["same"] for row in rows[1:]) and "tokens/s" in r.out and out["first_token"], r.tail()


SERVE_KEY = "sk-readme-key"


def _check_serve(r: Result, ctx: dict) -> None:
    """While `longpilot serve` runs: the SDK with the key lists the base, the finished run and the --adapter, and
    chats with the run's adapter; a wrong key gets 401; the key is not in the server's output."""
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{ctx['port']}/v1", api_key=SERVE_KEY, max_retries=0)
    ids = [m.id for m in client.models.list()]
    assert ids[0] == ctx["tiny"] and {"run", "extra"} <= set(ids), ids
    reply = client.chat.completions.create(model="run", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                           temperature=0)  # fmt: skip
    assert reply.usage.completion_tokens >= 1 and reply.choices[0].finish_reason in ("stop", "length"), reply
    wrong = openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert SERVE_KEY not in r.out, r.out


def _plan_table_rows() -> list[tuple[str, ...]]:
    """The docs' planner-prediction table: (model, target, factor, zero, memory, tokens/s, wall time)."""
    rows = re.findall(r"^\| (Llama-[\w.-]+) -> ([\d,]+)[^|]*\|([^|]+)\|([^|]+)\|([^|]+)\|([^|]+)\|([^|]+)\|$",
                      docs_text(), re.M)  # fmt: skip
    assert len(rows) >= 3, rows
    return [tuple(c.strip() for c in row) for row in rows]


def _matches(documented: str, value: float) -> bool:
    """`35.9 h` matches 35.85 h; `16,248` matches 16248.3: equal at the documented precision."""
    number = re.match(r"[\d,.]+", documented).group().replace(",", "")
    decimals = len(number.split(".")[1]) if "." in number else 0
    return round(value, decimals) == float(number)


def _run_plan_table(ctx: dict) -> None:
    """`longpilot plan --model M --target-context T --profile full --hardware 8xA100-80GB` for every table row."""
    zero = {"ZeRO-2": "zero2", "ZeRO-3": "zero3", "ZeRO-3 + CPU offload": "zero3_offload"}
    for model, target, factor, stage, memory, tokens, wall in _plan_table_rows():
        length = target.replace(",", "")
        r = _execute(Step(f"longpilot plan --model {model.lower()} --target-context {length} --profile full "
                          "--hardware 8xA100-80GB --json"), ctx)  # fmt: skip
        assert r.rc == 0, r.tail()
        plan = json.loads(r.out)["plan"]
        got = (plan["rope_factor"], plan["deepspeed_stage"], plan["memory"]["total_gib"], plan["tokens_per_s"],
               plan["wall_time_h"])  # fmt: skip
        assert (
            _matches(factor, got[0]) and zero[stage] == got[1] and _matches(memory, got[2])
            and _matches(tokens, got[3]) and _matches(wall, got[4])
        ), f"docs row {model} -> {target}: {factor} | {stage} | {memory} | {tokens} | {wall}; planner: {got}"


RUN_CMD = (
    "longpilot run --model smollm2-135m --target-context 16384 [--corpus DOCS ...] [--profile smoke|standard|full] "
    "[--hardware cpu|1xH100-80GB|8xA100-80GB|8xA100-40GB] [--device auto|cpu|cuda] [--seed N] [--max-steps N] "
    "[--batch-size N] [--grad-accum N] [--attention s2|full] [--rope-method linear|yarn|dynamic] "
    "[--train-mix longqa|plain] [--precision bf16|fp32] [--lora-rank N] [--group-size-ratio R] "
    "[--sequence-parallel P] [--max-hours H] [--max-gib G] [--report-to none|tensorboard|wandb|mlflow] "
    '[--llm none|URL --llm-model NAME] '
    '[--request "extend smollm2 to 16k"] [--run-dir DIR] [--yes]'
)
RUN = "longpilot resume RUN_DIR [--yes]"  # the entry that leaves a finished run in {run}
EVAL_SHORT = (
    "--seeds 0 --depths 0.5 --ruler-tasks niah_single_numbers --task-lengths ruler=1024 --max-new-tokens-cap 8 "
    f"--longqa-max-items 1 --longqa-max-tokens 1024 --ppl-tokens {TARGET} --ppl-stride 1024 --no-progress"
)
LAUNCH = "python -m engine.training.launch distributed --config run.json --nproc 2"
APP = "longpilot app [--host 127.0.0.1] [--port 7860] [--runs-dir runs] [--auth user:password] [--allow-path DIR ...]"
SERVE = (
    "longpilot serve [--host 127.0.0.1] [--port 8000] [--model BASE] [--runs-dir runs] [--max-loaded N] "
    "[--api-key KEY] [--adapter NAME=DIR ...] [--exact]"
)
PLAN_512K = "longpilot plan --model llama-3-8b --target-context 524288 --hardware 1xH100-80GB"
PLAN_262K = "longpilot plan --model llama-3-8b --target-context 262144 --hardware 8xA100-80GB --profile full"
PLAN_64K_PINNED = ("longpilot plan --model llama-3-8b --target-context 65536 --hardware 1xH100-80GB --profile smoke "
                   "--zero-stage none --offload-activations off --tiled-mlp off")  # fmt: skip
PLAN_262K_PINNED = f"{PLAN_262K} --zero-stage zero3 --offload-activations off --tiled-mlp off --sequence-parallel 1"
SP_CLUSTER = ("longpilot plan --model llama-3-8b --target-context 1048576 --hardware 16xA100-80GB --grad-accum 64 "
              "--sequence-parallel 8")

COMMANDS: dict[str, Entry] = {
    # ------------------------------------------------------------ fenced ```bash blocks
    "make demo": Entry(
        "the real target on the tiny model: make demo DEMO_MODEL=<tiny> DEMO_TARGET=2048 DEMO_RUN_DIR=<tmp>/demo "
        "(-o the install stamp: never reinstalls); its default expansion is checked by the next-but-one entry",
        steps=(
            Step(
                f"make -o {{stamp}} demo VENV={{venv}} DEMO_MODEL={{tiny}} DEMO_TARGET={TARGET} DEMO_RUN_DIR={{demo}}",
                check=_check_demo,
                via="process",
                cwd="{repo}",
            ),
        ),
    ),
    "make test": Entry(
        "not run here",
        exempt="runs the whole default suite, this file included (recursion); CI runs it: .ci/run is `make test`",
    ),
    "python -m engine.training.launch distributed --config engine/recipes/llama2-7b-32k-8xA100.json --nproc 8 "
    "--launcher deepspeed": Entry(
        "with --dry-run (it needs 8 GPUs and the Llama-2-7B weights): the printed launcher command must be the "
        "README's `# runs:` line, and the recipe must load as a TrainConfig",
        steps=(
            Step(
                "python -m engine.training.launch distributed --config engine/recipes/llama2-7b-32k-8xA100.json "
                "--nproc 8 --launcher deepspeed --dry-run",
                check=_check_launch_dry_run,
                cwd="{repo}",
            ),
        ),
    ),
    "longpilot plan --model llama-2-7b --target-context 32768 --profile full --hardware 8xA100-80GB": Entry(
        "as written (the planner needs no weights)",
        steps=(
            Step(
                "longpilot plan --model llama-2-7b --target-context 32768 --profile full --hardware 8xA100-80GB",
                check=_check_plan_text,
            ),
        ),
    ),
    RUN_CMD: Entry(
        "every option once, on the tiny model at 2048 with two corpus paths (stdlib json/, argparse.py), smoke, cpu, "
        "batch 1, accumulation 1, s2, --llm none, the README's --request (flags win), no --yes: exit 3, waits for "
        "approval (the resume entry finishes it); --yes is what `make demo` runs; GPU hardware/cuda and an LLM URL "
        "are tested in tests/agents/test_workflow.py",
        steps=(
            Step(
                f"longpilot run --model {{tiny}} --target-context {TARGET} --corpus {{corpus}} {{corpus2}} "
                "--profile smoke --hardware cpu --device cpu --seed 0 --max-steps 1 --batch-size 1 --grad-accum 1 "
                "--attention s2 --rope-method linear --train-mix longqa --precision fp32 --lora-rank 8 "
                "--group-size-ratio 0.25 --sequence-parallel 1 --max-hours 24 --max-gib 64 --report-to none "
                "--llm none --request 'extend smollm2 to 16k' --run-dir {run}",
                rc=3,
                check=_check_awaiting,
            ),
        ),
    ),
    RUN: Entry(
        "resume RUN_DIR --yes on the run waiting for approval (it finishes: report.md, every gate passed), then "
        "resume RUN_DIR on the finished run (nothing redone)",
        after=(RUN_CMD,),
        steps=(
            Step("longpilot resume {run} --yes", check=_check_resumed),
            Step("longpilot resume {run}", check=_check_resume_noop),
        ),
    ),
    "longpilot status RUN_DIR [--json]": Entry(
        "both forms on the finished run",
        after=(RUN,),
        steps=(
            Step("longpilot status {run}", check=_check_status_text),
            Step("longpilot status {run} --json", check=_check_status_json),
        ),
    ),
    "longpilot eval --model base=smollm2-135m --model extended=RUN_DIR/train/adapter --allow-beyond base --lengths "
    "2048 4096 8192 16384 --data RUN_DIR/data --gate passkey_min=0.95 --out eval/": Entry(
        "base = the tiny model, extended = the finished run's adapter, --lengths 1024 2048, the README's gate, plus "
        "--seeds 0 --depths 0.5 --ruler-tasks niah_single_numbers (at 1024) and small caps; a random model fails "
        "the passkey gate: exit 1 as documented, with eval/eval_report.json written",
        after=(RUN,),
        steps=(
            Step(
                "longpilot eval --model base={tiny} --model extended={run}/train/adapter --allow-beyond base "
                f"--lengths 1024 {TARGET} --data {{run}}/data --gate passkey_min=0.95 --out eval/ {EVAL_SHORT}",
                rc=1,
                check=_check_eval,
            ),
        ),
    ),
    "longpilot export RUN_DIR --out merged/": Entry(
        "on the finished run; merged/ loads with AutoModelForCausalLM.from_pretrained (RoPE factor 2)",
        after=(RUN,),
        steps=(Step("longpilot export {run} --out merged/", check=_check_export),),
    ),
    APP: (
        Entry(
            "the `longpilot` console script with every option (a free port, two --allow-path, --base-model the tiny "
            "model) until it serves HTTP 200 (its /config answers 401: --auth is on), then stopped",
            steps=(
                Step(
                    "longpilot app --host 127.0.0.1 --port {port} --runs-dir {tmp}/app-runs --auth user:password "
                    "--allow-path {tmp} --allow-path {repo}/docs --base-model {tiny}",
                    check=_check_app_with_auth,
                    via="serve",
                ),
            ),
        )
    ),
    "python app.py ...": Entry(
        "python app.py --host 127.0.0.1 --port <free> --runs-dir <tmp> from the repository root until HTTP 200",
        steps=(
            Step(
                "python app.py --host 127.0.0.1 --port {port2} --runs-dir {tmp}/app-runs2 --base-model {tiny}",
                check=_check_app_plain,
                via="serve",
                cwd="{repo}",
            ),
        ),
    ),
    SERVE: Entry(
        "every option once: the tiny model, runs dir = the tmp folder (the finished shared run is served as `run`), "
        "--adapter extra=<run's adapter>, a key, a free port; while it serves, the openai SDK lists and chats",
        after=(RUN,),
        steps=(
            Step(
                "longpilot serve --host 127.0.0.1 --port {port} --model {tiny} --runs-dir {tmp} --max-loaded 1 "
                f"--api-key {SERVE_KEY} --adapter extra={{run}}/train/adapter",
                check=_check_serve,
                via="serve",
            ),
        ),
    ),
    # ------------------------------------------------------------ inline code spans
    "make test-slow": Entry("not run here", exempt="the slow suite: the real 135M demo run and more, tens of minutes"),
    "make test-gpu": Entry("not run here", exempt="needs CUDA; on a CPU machine every test it selects skips"),
    "make lint": Entry(
        "as written (-o the install stamp): ruff and the import-linter contracts",
        steps=(Step("make -o {stamp} lint VENV={venv}", check=_check_lint, via="process", cwd="{repo}"),),
    ),
    "make bench": Entry("not run here", exempt="benchmarks on the embedded 135M model: many minutes, prints figures"),
    "longpilot run --model smollm2-135m --target-context 16384 --profile smoke --yes": Entry(
        "what `make demo` runs: `make -n demo` must expand to exactly this (plus --run-dir runs/demo-<date>); the "
        "make demo entry runs it on the tiny model",
        steps=(Step("make -o {stamp} -n demo", check=_check_make_n_demo, via="process", cwd="{repo}"),),
    ),
    "longpilot demo": Entry(
        "longpilot demo --model <tiny> --target-context 2048 --out <tmp>/engine-demo (engine only)",
        steps=(
            Step(f"longpilot demo --model {{tiny}} --target-context {TARGET} --out {{tmp}}/engine-demo",
                 check=_check_engine_demo),  # fmt: skip
        ),
    ),
    'make test TORCH_PIP_ARGS="--index-url <CUDA wheel index>"': Entry(
        "not run here", exempt="`make test` (recursion, CI runs it) with a CUDA wheel index (network, a GPU image)"
    ),
    "python -m engine.training.launch distributed --config run.json --nproc 2 "
    "[--launcher torchrun|deepspeed|accelerate] [--hostfile hosts]": Entry(
        "with --dry-run, on a tiny run.json, for the default launcher (torchrun), --launcher deepspeed --hostfile "
        "hosts and --launcher accelerate: each prints its launcher command (a real 2-process run of the same entry "
        "point: tests/agents/test_workflow.py::test_a_multi_device_plan_trains_on_that_many_processes)",
        custom=_dist_config,
        steps=(
            Step(f"{LAUNCH} --dry-run", check=_check_dist_dry_run),
            Step(f"{LAUNCH} --launcher deepspeed --hostfile hosts --dry-run", check=_check_dist_dry_run),
            Step(f"{LAUNCH} --launcher accelerate --dry-run", check=_check_dist_dry_run),
        ),
    ),
    "longpilot resume RUN_DIR --yes": Entry("the `longpilot resume RUN_DIR [--yes]` entry", same_as=RUN),
    "longpilot app": Entry("the README's one-liner: the `longpilot app [--host ...]` entry", same_as=APP),
    "longpilot serve": Entry("the README's one-liner: the `longpilot serve [--host ...]` entry", same_as=SERVE),
    PLAN_512K: Entry(
        "as written: exit 0, the planner's memory levers, the docs' card lines printed; then every row of the docs' "
        "one-H100 levers table from the planner (--json, levers pinned off: exit 1; left to the planner: exit 0)",
        steps=(Step(PLAN_512K, check=_check_levers_card),),
        custom=_run_levers_table,
    ),
    PLAN_262K: Entry(
        "as written: exit 0 (the planner turns activation offload on), the docs' card lines printed",
        steps=(Step(PLAN_262K, check=_check_levers_card),),
    ),
    PLAN_64K_PINNED: Entry(
        "as written: exit 1 (the pinned levers do not fit), the search's card lines printed",
        steps=(Step(PLAN_64K_PINNED, rc=1, check=_check_search_card),),
    ),
    PLAN_262K_PINNED: Entry(
        "as written: exit 1 (the pinned levers do not fit), the search's card lines printed (sequence parallel 2)",
        steps=(Step(PLAN_262K_PINNED, rc=1, check=_check_search_card),),
    ),
    SP_CLUSTER: Entry(
        "as written (16 GPUs on two nodes, planned only): it fits and prints the README's hostfile launch line",
        steps=(Step(SP_CLUSTER, check=_check_sp_cluster),),
    ),
    'longpilot plan --model llama-2-7b --target-context 32768 --hardware 8xA100-80GB --request "use rank 16"': Entry(
        "as written: the diff (rank 8 -> 16, trainable, memory, time) and the revised card",
        steps=(Step('longpilot plan --model llama-2-7b --target-context 32768 --hardware 8xA100-80GB --request '
                    '"use rank 16"', check=_check_revised),),  # fmt: skip
    ),
    'longpilot resume RUN_DIR --request "use rank 16"': Entry(
        "on a fresh tiny run waiting for approval (not the shared one, which this would reject): exit 3, the revised "
        "run waits",
        steps=(Step(f"longpilot run --model {{tiny}} --target-context {TARGET} --run-dir {{tmp}}/revise", rc=3),
               Step('longpilot resume {tmp}/revise --request "use rank 16"', rc=3, check=_check_revised)),
    ),
    "longpilot plan --model llama-2-7b --target-context 65536 --hardware 8xA100-80GB --max-hours 45": Entry(
        "as written (the plan fits, over the budget: exit 0), the search's card lines printed",
        steps=(Step("longpilot plan --model llama-2-7b --target-context 65536 --hardware 8xA100-80GB --max-hours 45",
                    check=_check_search_card),),  # fmt: skip
    ),
    "longpilot plan --model M --target-context T --profile full --hardware 8xA100-80GB": Entry(
        "once per row of the README's prediction table (--json); every column must match at the README's precision",
        custom=_run_plan_table,
    ),
    "python bench/eval.py": Entry("not run here", exempt="evaluator benchmark on the embedded 135M at 4k and 16k"),
    "make gpu-check": Entry(
        "`make -n gpu-check` (it needs CUDA): the recipe runs bench/gpu_window.sh on the image's python with "
        "--readme README.md, pip-installs nothing from an index, and needs no set-up stamp (bare GPU images)",
        steps=(Step("make -n gpu-check", check=_check_make_n_gpu_check, via="process", cwd="{repo}"),),
    ),
    "make gpu-wheels": Entry(
        "`make -n gpu-wheels` (it downloads 15 MiB): cp312 wheels of bench/gpu_wheels.txt into .whl, no deps resolved",
        steps=(Step("make -n gpu-wheels", check=_check_make_n_gpu_wheels, via="process", cwd="{repo}"),),
    ),
    "make gpu-rehearsal": Entry(
        "not run here", exempt="CI runs it after `make test` (.ci/run): minutes, a venv of the GPU image's packages"
    ),
    "python -m bench.gpu_suite --tiny --out-dir /tmp/gpu-suite": Entry(
        "with --out-dir <tmp> --parts attention (the whole --tiny run, every part, is tests/bench/test_gpu_suite.py)",
        steps=(
            Step("python -m bench.gpu_suite --tiny --out-dir {tmp}/gpu-suite --parts attention",
                 check=_check_gpu_suite_tiny, via="process", cwd="{repo}"),  # fmt: skip
        ),
    ),
    "python -m bench.serve": Entry(
        "not run here", exempt="serving benchmark on the embedded 135M with two adapters: minutes on CPU"
    ),
    "python -m bench.serve --exact": Entry(
        "not run here", exempt="the same benchmark, serial mode first (the before figure): minutes on CPU"
    ),
    "python -m bench.serve --tiny": Entry(
        "with --requests 3 --max-tokens 2 --out <tmp> (the default 12 x 16 is tests/bench/test_serve.py's job)",
        steps=(
            Step("python -m bench.serve --tiny --requests 3 --max-tokens 2 --out {tmp}/serve.json",
                 check=_check_serve_bench_tiny, via="process", cwd="{repo}"),  # fmt: skip
        ),
    ),
}

EXEMPT = {"make test", "make test-slow", "make test-gpu", "make bench",
          'make test TORCH_PIP_ARGS="--index-url <CUDA wheel index>"', "python bench/eval.py",
          "python -m bench.serve", "python -m bench.serve --exact", "make gpu-rehearsal"}  # fmt: skip


# ---------------------------------------------------------------- running the table


@contextlib.contextmanager
def _cwd(path: Path):
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _env(ctx: dict) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}  # fmt: skip
    env["PATH"] = f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}"  # as in an activated venv
    for name in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL"):  # under `make test`: a make of its own, not a sub-make
        env.pop(name, None)
    return env


def _executable(argv: list[str]) -> list[str]:
    if argv[0] == "longpilot":
        return [str(VENV / "bin" / "longpilot"), *argv[1:]]
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    return argv


def _serve(argv: list[str], cwd: Path, ctx: dict) -> Result:
    """Start the server, wait (at most 120 s) for HTTP 200, run the check while it serves, stop it (SIGTERM)."""
    port = argv[argv.index("--port") + 1]
    log = Path(ctx["tmp"]) / f"serve-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(_executable(argv), cwd=cwd, env=_env(ctx), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline, code = time.time() + 120, None
        while code != 200:
            if proc.poll() is not None:
                return Result(proc.returncode, "", log.read_text(errors="replace"))
            assert time.time() < deadline, f"no HTTP 200 on port {port} within 120 s: {log.read_text()[-2000:]}"
            time.sleep(0.5)
            with contextlib.suppress(OSError):
                code = _http(f"http://127.0.0.1:{port}/", timeout=2)
        result = Result(0, log.read_text(errors="replace"), "")
        if (check := ctx.get("_serve_check")) is not None:
            check(result, ctx)  # while it still serves
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    _assert_stopped(int(port))
    return result


def _assert_stopped(port: int) -> None:
    """Nothing serves the port once the started process is gone (no orphaned server child)."""
    deadline = time.time() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return
        assert time.time() < deadline, f"port {port} still served after the server process stopped"
        time.sleep(0.5)


def _execute(step: Step, ctx: dict) -> Result:
    argv = [word.format(**ctx) for word in shlex.split(step.command)]
    cwd = Path(step.cwd.format(**ctx))
    if step.via == "serve":
        return _serve(argv, cwd, {**ctx, "_serve_check": step.check})
    if step.via == "process":
        done = subprocess.run(_executable(argv), cwd=cwd, env=_env(ctx), capture_output=True, text=True, timeout=600)
        return Result(done.returncode, done.stdout, done.stderr)
    if argv[0] == "longpilot":
        from agents.cli import main
    elif argv[:3] == ["python", "-m", "engine.training.launch"]:
        from engine.training.launch import main

        argv = argv[2:]
    else:
        raise AssertionError(f"no in-process entry point for {argv}")
    out, err = io.StringIO(), io.StringIO()
    with _cwd(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv[1:])
        except SystemExit as exc:  # argparse
            rc = exc.code if isinstance(exc.code, int) else 2
    return Result(rc, out.getvalue(), err.getvalue())


@dataclass
class Runner:
    ctx: dict
    done: dict[str, list[Result]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def run(self, key: str, table: dict | None = None) -> list[Result]:
        table = COMMANDS if table is None else table
        if key in self.failed:
            pytest.fail(f"{key!r} failed earlier: {self.failed[key]}")
        if key in self.done:
            return self.done[key]
        entry = table[key]
        try:
            for dep in entry.after:
                self.run(dep, table)
            if entry.same_as:
                return self.run(entry.same_as, table)
            results = []
            if entry.custom is not None:
                entry.custom(self.ctx)
            for step in entry.steps:
                result = _execute(step, self.ctx)
                assert result.rc == step.rc, f"{step.command}: exit {result.rc}, expected {step.rc}\n" + (
                    result.tail()
                )
                if step.check is not None and step.via != "serve":  # a server is checked while it serves
                    step.check(result, self.ctx)
                results.append(result)
        except BaseException as err:
            self.failed[key] = f"{type(err).__name__}: {str(err)[:3000]}"
            raise
        self.done[key] = results
        return results


def _tiny_model_dir(path: Path) -> Path:
    """A random 2-layer Llama (1,024-token context) with the embedded SmolLM2 tokenizer, saved as a model dir."""
    from engine.model.loading import DEFAULT_MODEL, load_tokenizer, resolve_model

    return make_tiny_model_dir(path, 1024, tokenizer=load_tokenizer(resolve_model(DEFAULT_MODEL)))


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> Runner:
    import argparse
    import json as json_module

    tmp = tmp_path_factory.mktemp("readme")
    ctx = {"tmp": str(tmp), "tiny": str(_tiny_model_dir(tmp / "tiny")), "run": str(tmp / "run"),
           "demo": str(tmp / "demo"), "venv": str(VENV), "stamp": str(VENV / ".longpilot-installed"),
           "repo": str(REPO), "corpus": str(Path(json_module.__file__).parent), "corpus2": argparse.__file__,
           "port": str(free_port()), "port2": str(free_port())}  # fmt: skip
    (tmp / "py").mkdir()
    return Runner(ctx)


# ---------------------------------------------------------------- the tests


def test_every_readme_command_has_an_entry():
    """A command documented in README.md or docs/*.md with no way to run it here fails the suite."""
    missing = [f"{c}  ({', '.join(files)})" for c, files in command_sources().items() if c not in COMMANDS]
    assert not missing, "documented commands with no entry in COMMANDS (add one: how it runs, what it produces):\n" + (
        "\n".join(missing)
    )


def test_every_entry_is_still_in_the_readme():
    stale = sorted(set(COMMANDS) - set(readme_commands()))
    assert not stale, f"COMMANDS entries whose command is no longer in README.md or docs/*.md: {stale}"


def test_the_docs_are_read():
    """docs/*.md are read like the README: their commands and python blocks are in the tables."""
    docs = [path for path in documents() if path != README]
    assert docs and all(path.parent == DOCS for path in docs), docs
    assert any(f != "README.md" for files in command_sources().values() for f in files)
    assert any(path != README for path, _ in documented_python_blocks())


LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")
REPO_PATH = re.compile(r"`((?:engine|agents|sop|bench|tests|docs)/[\w./-]*\.(?:py|json|yaml|md|png))`")


def test_every_link_and_repository_path_in_the_docs_exists():
    """Relative links (and their #anchors) and the `engine/...py`-style paths the documents name point at something
    that exists: a moved module or a renamed heading fails here, not in a reader's hands."""
    problems = []
    for path in documents():
        text = path.read_text()
        for target, anchor in LINK.findall(FENCE.sub("", text)):
            if re.match(r"[a-z]+:", target):
                continue
            dest = (path.parent / target).resolve()
            if not dest.exists():
                problems.append(f"{_rel(path)}: link to missing {target}")
            elif anchor and dest.suffix == ".md":
                slugs = {re.sub(r"[^\w -]", "", h.strip().lower()).replace(" ", "-")
                         for h in re.findall(r"^#+ (.+)$", FENCE.sub("", dest.read_text()), re.M)}  # fmt: skip
                if anchor[1:] not in slugs:
                    problems.append(f"{_rel(path)}: no heading {anchor} in {target}")
        for named in REPO_PATH.findall(text):
            if not (REPO / named).exists():
                problems.append(f"{_rel(path)}: names missing {named}")
    assert not problems, "\n".join(problems)


def test_the_exemptions_are_exactly_the_listed_ones():
    assert {k for k, e in COMMANDS.items() if e.exempt} == EXEMPT
    ci = [x.strip() for x in (REPO / ".ci" / "run").read_text().splitlines()]
    assert "make test" in ci, "`make test` is exempt because CI runs it: .ci/run must run it"
    assert "make gpu-rehearsal" in ci, "`make gpu-rehearsal` is exempt because CI runs it: .ci/run must run it"
    assert all(COMMANDS[k].exempt and COMMANDS[k].how for k in EXEMPT)
    assert all(e.steps or e.custom or e.same_as for k, e in COMMANDS.items() if k not in EXEMPT)


def test_longpilot_app_forwards_every_option_to_the_app(monkeypatch):
    """`longpilot app --port N ...` used to fail (argparse REMAINDER takes no leading option): app.py parses them."""
    from agents.cli import commands as cli
    calls = []

    def execv(path, argv):  # the app replaces the `longpilot` process: a terminated longpilot leaves no server
        calls.append((path, argv))
        raise SystemExit(0)

    monkeypatch.setattr(cli.os, "execv", execv)
    options = ["--host", "127.0.0.1", "--port", "7999", "--runs-dir", "d", "--auth", "u:p", "--allow-path", "a",
               "--allow-path", "b", "--base-model", "m", "-h"]  # fmt: skip
    with pytest.raises(SystemExit):
        cli.main(["app", *options])
    assert calls == [(sys.executable, [sys.executable, "-m", "app", *options])]
    with pytest.raises(SystemExit) as exc:  # other commands still refuse what they do not know
        cli.main(["status", "x", "--port", "1"])
    assert exc.value.code == 2


def _id(command: str) -> str:
    return re.sub(r"[^\w.=-]+", "_", command)[:70].strip("_")


@pytest.mark.parametrize("command", [k for k in COMMANDS if k not in EXEMPT], ids=_id)
def test_readme_command_runs(command, runner):
    runner.run(command)


# ---------------------------------------------------------------- the ```python blocks


@dataclass(frozen=True)
class PyBlock:
    how: str
    subs: tuple[tuple[str, str], ...] = ()  # (documented text, replacement): each must occur in the block
    preamble: str = ""
    check: Callable[[dict, dict], None] | None = None
    after: tuple[str, ...] = ()


def _check_engine_api(ns: dict, ctx: dict) -> None:
    from transformers import AutoModelForCausalLM

    assert Path("out/adapter/adapter_config.json").is_file()
    assert AutoModelForCausalLM.from_pretrained("out/merged").config.rope_parameters["factor"] == 2.0


def _check_reload(ns: dict, ctx: dict) -> None:
    from peft import PeftModel

    assert isinstance(ns["model"], PeftModel) and ns["config"].rope_parameters["factor"] == 2.0


def _check_train(ns: dict, ctx: dict) -> None:
    assert ns["result"].status == "completed" and ns["result"].steps == 1, ns["result"]
    for name in ("run_config.json", "metrics.jsonl", "adapter", "train_summary.json"):
        assert Path("runs/x", name).exists(), name


def _check_data(ns: dict, ctx: dict) -> None:
    card = json.loads(Path("runs/x/data/data_card.json").read_text())
    assert card and Path("runs/x/data/token_lengths.png").is_file()


def _check_assistant(ns: dict, ctx: dict) -> None:
    run = ns["run"]
    assert run.status == "passed" and Path(run.report).is_file(), (run.status, run.failure)
    assert all(s["status"] == "passed" for s in ns["assistant"].status(run.run_dir).stages.values())


def _check_evaluate(ns: dict, ctx: dict) -> None:
    report = ns["report"]
    assert set(report["models"]) == {"base", "rope_only", "extended"} and report["gate"] is not None
    assert Path("eval/eval_report.json").is_file()


def _check_serve_block(ns: dict, ctx: dict) -> None:
    try:
        assert ns["reply"].usage.total_tokens > ns["reply"].usage.prompt_tokens, ns["reply"]
        assert ns["chunk"].choices[0].finish_reason in ("stop", "length"), ns["chunk"]  # the stream's last chunk
    finally:
        ns["_server"].stop()
        ns["_worker"].close()


def _tiny(ctx: dict) -> str:
    return repr(ctx["tiny"])


PY_BLOCKS: dict[str, PyBlock] = {
    'import engine  # lazy; engine.load_model registers attn_implementation="s2_attention"': PyBlock(
        "the tiny model for smollm2-135m, RoPE to 2048 instead of 32768; out/merged must load (factor 2)",
        subs=(('"smollm2-135m"', "{tiny}"), ("32768", str(TARGET))),
        check=_check_engine_api,
    ),
    'config = AutoConfig.from_pretrained("out/adapter")': PyBlock(
        "after the engine block (its out/adapter), base_path = the tiny model, the imports it leaves out",
        preamble="from transformers import AutoConfig, AutoModelForCausalLM\nfrom peft import PeftModel\n"
        "base_path = {tiny}\n",
        check=_check_reload,
        after=('import engine  # lazy; engine.load_model registers attn_implementation="s2_attention"',),
    ),
    "from engine import DataConfig, prepare_data": PyBlock(
        "target 2048, n_train 8, n_eval 4, tokenizer = the tiny model's (the embedded SmolLM2 one)",
        subs=(("target_context=16384", f"target_context={TARGET}"), ("n_train=64", "n_train=8"),
              ("n_eval=16", "n_eval=4")),  # fmt: skip
        preamble="from engine.model.loading import load_tokenizer, resolve_model\n"
        "tokenizer = load_tokenizer(resolve_model({tiny}))\n",
        check=_check_data,
    ),
    "from engine import TrainConfig, train": PyBlock(
        "on the data block's runs/x/data (for data/), the tiny model, target 2048, 1 step of 1 micro-batch",
        subs=(('dataset_dir="data/"', 'dataset_dir="runs/x/data"'), ('base_model="smollm2-135m"', "base_model={tiny}"),
              ("target_context=16384", f"target_context={TARGET}"),
              ("max_steps=1000", "max_steps=1, gradient_accumulation_steps=1, quiet=True")),  # fmt: skip
        check=_check_train,
        after=("from engine import DataConfig, prepare_data",),
    ),
    "from agents import Assistant": PyBlock(
        "the tiny model at 2048 (smoke: one step); plan, run (stops for approval), approve, status",
        subs=(('"smollm2-135m"', "{tiny}"), ("target_context=16384", f"target_context={TARGET}")),
        check=_check_assistant,
    ),
    "from openai import OpenAI": PyBlock(
        "against a server started in-process on the tiny model (agents.server, a free port, no key), model = the tiny "
        "model's id; the server is stopped by the check",
        subs=(('"http://127.0.0.1:8000/v1"', "_server.base_url"), ('"smollm2-135m"', "{tiny}")),
        preamble="from agents.server import build_server_app, start_in_thread\n"
        "_app, _worker = build_server_app({tiny}, runs_dir=None)\n_server = start_in_thread(_app)\n",
        check=_check_serve_block,
    ),
    "from engine import EvalConfig, ModelUnderTest, evaluate": PyBlock(
        "lengths (1024, 2048), the tiny model, rope_only to 2048, extended = the training block's adapter "
        "(runs/x/adapter: TrainConfig's layout; runs/x/train/adapter is a SOP run's), one seed/depth/RULER task "
        "(RULER at 1024 only), 2,048 PPL tokens, one long-QA item",
        subs=(("lengths=(2048, 4096, 8192, 16384)", f"lengths=(1024, {TARGET})"), ('"smollm2-135m"', "{tiny}"),
              ("rope_target=16384", f"rope_target={TARGET}"), ('"runs/x/train/adapter"', '"runs/x/adapter"'),
              ('output_dir="eval/",', 'output_dir="eval/", seeds=(0,), depths=(0.5,), ruler_tasks=('
               '"niah_single_numbers",), task_lengths={"ruler": (1024,)}, max_new_tokens_cap=8, longqa_max_items=1, '
               "longqa_max_tokens=1024, ppl_tokens=2048, ppl_stride=1024, progress=False,")),
        check=_check_evaluate,
        after=("from engine import TrainConfig, train",),
    ),
}


def _first_line(block: str) -> str:
    return block.strip().splitlines()[0].strip()


def test_every_readme_python_block_has_an_entry():
    """Every ```python block of README.md and docs/*.md has a PY_BLOCKS entry (keyed by its first line)."""
    blocks = [_first_line(b) for b in readme_python_blocks()]
    assert len(blocks) == len(set(blocks)), blocks
    assert sorted(blocks) == sorted(PY_BLOCKS), (
        f"documented python blocks with no entry: {sorted(set(blocks) - set(PY_BLOCKS))}; "
        f"entries with no block: {sorted(set(PY_BLOCKS) - set(blocks))}"
    )


def _run_block(key: str, runner: Runner) -> None:
    done = runner.done.setdefault("__py__", [])
    if key in done:
        return
    entry = PY_BLOCKS[key]
    for dep in entry.after:
        _run_block(dep, runner)
    source, block = next((p, b) for p, b in documented_python_blocks() if _first_line(b) == key)
    code = block
    for old, new in entry.subs:
        assert old in code, f"{_rel(source)} python block {key!r} no longer contains {old!r}: update PY_BLOCKS"
        code = code.replace(old, new.replace("{tiny}", _tiny(runner.ctx)))
    ns: dict = {"__name__": "__readme__"}
    with _cwd(Path(runner.ctx["tmp"]) / "py"):
        exec(compile(entry.preamble.replace("{tiny}", _tiny(runner.ctx)) + code, f"{_rel(source)}: {key}", "exec"), ns)
        if entry.check is not None:
            entry.check(ns, runner.ctx)
    done.append(key)


@pytest.mark.parametrize("block", list(PY_BLOCKS), ids=_id)
def test_readme_python_block_runs(block, runner):
    _run_block(block, runner)
