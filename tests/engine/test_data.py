"""Data engineer engine: generators, grounding, checks (each with a failing case), determinism, bad input."""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

from engine.data import DataConfig, prepare_data
from engine.data import build as build_module
from engine.data.checks import (
    check_answers_grounded,
    check_fillers_clean,
    check_lengths,
    check_no_duplicates,
    check_splits_disjoint,
)
from engine.data.corpus import CorpusStats, Document, read_corpus
from engine.data.grounded import code_questions, grounded_proposals, prose_questions, which_document_question
from engine.data.tasks import GENERATORS, TEMPLATES, UNANSWERABLE, Namespace, split_of
from engine.model.loading import DEFAULT_MODEL, load_tokenizer, resolve_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model(DEFAULT_MODEL))


@pytest.fixture(scope="module")
def built(tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "ds"
    cfg = DataConfig(output_dir=str(out), target_context=1024, n_train=16, n_eval=8, short_range=(200, 400), seed=3)
    return cfg, prepare_data(cfg, tokenizer)


# ----------------------------------------------------------------------------- generators


@pytest.mark.parametrize("task", sorted(GENERATORS))
@pytest.mark.parametrize("split", ["train", "eval"])
def test_each_synthetic_generator(task, split):
    rng, ns = random.Random(0), Namespace(random.Random(1), split)
    item = GENERATORS[task](rng, ns)
    assert item.task == task and item.template_id.startswith(f"{task}/{split}/")
    assert all(split_of(token) == split for token in item.namespace), "namespace crosses the split"
    needles = " ".join(item.needles)
    if task == "unanswerable":
        assert item.answer == UNANSWERABLE and item.namespace[0] not in needles
    else:
        assert item.answer_parts and all(part in needles for part in item.answer_parts)
    assert all(fact in item.needles for fact in item.chain)
    again = GENERATORS[task](random.Random(0), Namespace(random.Random(1), split))
    assert again == item, "not deterministic"


def test_train_and_eval_templates_are_disjoint():
    for task, templates in TEMPLATES.items():
        assert set(templates[0::2]).isdisjoint(templates[1::2]), task


CODE = """
def connect(host, port=8080, retries=3):
    if port < 0:
        raise ValueError("bad port")
    return host

def helper(x):
    return x * 2 + 1
"""


def test_code_questions_are_grounded():
    qs = code_questions(Document("m.py", "code", CODE), random.Random(0), "train")
    by_task = {(q.task, q.answer) for q in qs}
    assert ("code_default", "8080") in by_task and ("code_default", "3") in by_task
    assert ("code_raises", "ValueError") in by_task and ("code_returns", "host") in by_task
    assert any(q.task == "code_returns" and q.answer == "x * 2 + 1" for q in qs)
    assert all(q.evidence in CODE for q in qs)


def test_ambiguous_function_gets_no_question():
    doc = Document("m.py", "code", CODE + "\ndef connect(host, port=1):\n    return 1\n")
    assert not [q for q in code_questions(doc, random.Random(0), "train") if "connect" in q.question]


def test_which_document_question():
    docs = [Document("a.py", "code", "def alpha(x=1):\n    return x\n"), Document("b.py", "code", CODE)]
    q = which_document_question(docs, random.Random(0), "eval")
    assert q is not None and q.answer in {"Document 1", "Document 2"}
    func = q.subject
    assert f"def {func}(" in docs[int(q.answer.split()[1]) - 1].text


def test_prose_heading_question():
    text = (
        "Intro.\n\nInstallation\n============\n\nRun the installer first.\nThen reboot.\n\n"
        "# Usage\n\nCall it once every single day.\n"
    )
    qs = prose_questions(Document("r.rst", "prose", text), random.Random(0), "train")
    answers = {q.answer for q in qs}
    assert "Run the installer first." in answers and "Call it once every single day." in answers
    assert ("prose_which_section", "Installation") in {(q.task, q.answer) for q in qs}


def test_llm_proposals_pass_the_same_grounding():
    chunk = "The reactor uses 12 rods. Cooling comes from the river."

    def proposer(text):
        return [
            ("How many rods?", "12", "The reactor uses 12 rods."),
            ("Where is cooling from?", "the lake", "Cooling comes from the river."),
            ("Invented?", "x", "not in the chunk"),
        ]

    kept, rejected = grounded_proposals(proposer, chunk, "train")
    assert [q.answer for q in kept] == ["12"]
    assert sorted(rejected) == ["answer not in the evidence", "evidence not in the document"]


# ----------------------------------------------------------------------------- the built dataset


def test_built_dataset_passes_every_check_and_has_the_promised_shape(built, tokenizer):
    cfg, result = built
    assert all(c.passed for c in result.checks), result.checks
    out = result.output_dir
    assert {"train", "eval"} <= {p.name for p in out.iterdir()}
    assert (out / "token_lengths.png").stat().st_size > 1000
    card = json.loads((out / "data_card.json").read_text())
    assert card["records"] == {"train": 16, "eval": 8} and card["seed"] == 3
    assert card["sources"] and all(len(h) == 64 for h in card["sources"].values())
    assert card["files"] and card["generator_version"]
    from datasets import load_from_disk

    ds = load_from_disk(str(out))
    kinds = {r["kind"] for r in ds["train"]}
    assert {"longqa", "lm", "short"} <= kinds
    for r in ds["train"]:
        assert len(r["input_ids"]) == len(r["labels"]) == len(r["attention_mask"]) == r["num_tokens"] <= 1024
        if r["kind"] == "lm":
            assert r["labels"] == r["input_ids"] and r["num_tokens"] == 1024
        else:
            labelled = [t for t in r["labels"] if t != -100]
            assert tokenizer.decode(labelled).startswith(r["answer"])  # only the answer carries labels
            assert r["labels"][0] == -100
    assert sum(r["kind"] == "short" for r in ds["train"]) == 4  # a quarter


def test_chat_prompt_equals_the_training_prompt_token_for_token(built, tokenizer):
    """The app's Model chat asks a trained long-QA record's question about its document in exactly the tokens the
    model was trained on (engine.model.prompts renders both); a short record's bare question likewise."""
    from datasets import load_from_disk

    from engine.serving.chat import chat_prompt_ids

    train = load_from_disk(str(built[1].output_dir))["train"]
    checked = set()
    for r in train:
        if r["kind"] not in ("longqa", "short") or r["kind"] in checked:
            continue
        prompt = [t for t, label in zip(r["input_ids"], r["labels"]) if label == -100]
        assert chat_prompt_ids(tokenizer, r["context"], r["question"]) == prompt, r["kind"]
        checked.add(r["kind"])
    assert checked == {"longqa", "short"}


def test_same_inputs_and_seed_give_byte_identical_datasets(built, tokenizer, tmp_path):
    cfg, first = built
    second = prepare_data(dataclasses.replace(cfg, output_dir=str(tmp_path / "again")), tokenizer)
    a = (first.output_dir / "data_card.json").read_text()
    b = (second.output_dir / "data_card.json").read_text()
    assert a == b
    for arrow in first.output_dir.rglob("*.arrow"):
        twin = second.output_dir / arrow.relative_to(first.output_dir)
        assert arrow.read_bytes() == twin.read_bytes(), arrow.name


def test_other_seed_gives_other_data(built, tokenizer, tmp_path):
    cfg, first = built
    other = prepare_data(dataclasses.replace(cfg, output_dir=str(tmp_path / "o"), seed=4), tokenizer)
    assert other.card["files"] != first.card["files"]


# ----------------------------------------------------------------------------- each check fails when it should


def _row(**kw):
    base = {
        "kind": "longqa",
        "task": "niah_single",
        "context": "A 1234567 B",
        "answer": "1234567",
        "answer_parts": ["1234567"],
        "chain": [],
        "needles": ["A 1234567"],
        "namespace": ["1234567"],
        "template_id": "t/train/0",
        "qa_hash": "h1",
        "source": "a.py",
        "num_tokens": 3,
        "input_ids": [1, 2, 3],
    }
    return {**base, **kw}


def _ds(train, eval_=None):
    return DatasetDict(
        {
            "train": Dataset.from_list(train),
            "eval": Dataset.from_list(
                eval_
                or [
                    _row(
                        qa_hash="h9",
                        namespace=["7654321"],
                        context="x 7654321",
                        needles=["x 7654321"],
                        answer_parts=["7654321"],
                        template_id="t/eval/0",
                        source="e.py",
                    )
                ]
            ),
        }
    )


def test_each_check_passes_on_good_data():
    ds = _ds([_row()])
    assert check_answers_grounded(ds).passed and check_fillers_clean(ds).passed
    assert check_no_duplicates(ds).passed and check_splits_disjoint(ds).passed
    assert check_lengths(DatasetDict({"x": Dataset.from_list([_row(num_tokens=3)])}), 3, 0.9).passed


@pytest.mark.parametrize(
    "check,rows,reason",
    [
        (check_answers_grounded, [_row(context="A B")], "not in context"),
        (check_answers_grounded, [_row(chain=["A"], context="A 1234567 A")], "not unique"),
        (
            check_answers_grounded,
            [_row(answer=UNANSWERABLE, answer_parts=[], namespace=["Zed"], context="Zed")],
            "unanswerable",
        ),
        (check_fillers_clean, [_row(context="1234567 A 1234567 B")], "occurs 2x"),
        (check_no_duplicates, [_row(), _row()], "duplicate"),
    ],
)
def test_each_check_fails_on_bad_data(check, rows, reason):
    result = check(_ds(rows))
    assert not result.passed and reason in result.detail


def test_length_check_fails():
    too_long = DatasetDict({"x": Dataset.from_list([_row(num_tokens=5, input_ids=[1] * 5)])})
    assert "5 tokens" in check_lengths(too_long, 4, 0.9).detail
    too_short = DatasetDict({"x": Dataset.from_list([_row(num_tokens=3)])})
    assert not check_lengths(too_short, 10, 0.9).passed


@pytest.mark.parametrize(
    "eval_row,what",
    [
        ({"namespace": ["1234567"]}, "namespace"),
        ({"template_id": "t/train/0"}, "templates"),
        ({"qa_hash": "h1"}, "hashes"),
        ({"source": "a.py"}, "source documents"),
    ],
)
def test_split_disjointness_fails_on_each_kind_of_overlap(eval_row, what):
    good_eval = {"qa_hash": "h9", "namespace": ["7654321"], "template_id": "t/eval/0", "source": "e.py"}
    result = check_splits_disjoint(_ds([_row()], [_row(**{**good_eval, **eval_row})]))
    assert not result.passed and what in result.detail


# ----------------------------------------------------------------------------- bad input


def test_existing_output_directory_is_refused(built, tokenizer):
    cfg, result = built
    before = (result.output_dir / "data_card.json").read_bytes()
    with pytest.raises(ValueError, match="already exists"):
        prepare_data(cfg, tokenizer)
    assert (result.output_dir / "data_card.json").read_bytes() == before


def test_empty_or_unusable_corpus_is_one_line(tokenizer, tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "blob.py").write_bytes(b"\x00\x01binary")
    with pytest.raises(ValueError, match="no usable text") as err:
        prepare_data(
            DataConfig(output_dir=str(tmp_path / "o"), target_context=512, corpus=(str(tmp_path / "c"),)), tokenizer
        )
    assert "binary" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "o").exists()


def test_bad_files_are_skipped_and_counted(tmp_path):
    (tmp_path / "ok.md").write_text("# Title\n\nHello there.\n")
    (tmp_path / "latin.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (tmp_path / "bin.py").write_bytes(b"\x00" * 20)
    (tmp_path / "img.png").write_bytes(b"\x89PNG")
    (tmp_path / "qa.jsonl").write_text(json.dumps({"instruction": "Q?", "output": "A."}) + "\n")
    (tmp_path / "chat.json").write_text(
        json.dumps([{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Yes."}]}])
    )
    (tmp_path / "broken.json").write_text("{not json")
    stats = CorpusStats()
    items = list(read_corpus([tmp_path, tmp_path / "missing"], stats))
    docs = [i for i in items if isinstance(i, Document)]
    assert sorted(Path(d.source).name for d in docs) == ["latin.txt", "ok.md"]
    assert "\ufffd" in next(d.text for d in docs if d.source.endswith("latin.txt"))
    assert stats.replaced_decoding == 1 and stats.qa_records == 2
    assert stats.skipped == {"binary": 1, "unsupported file type": 1, "malformed json": 1, "missing path": 1}


def test_huge_file_streams_with_bounded_memory(tmp_path):
    """A 200 MB file is read to the end in a fresh process whose peak RSS grows far less than the file size."""
    big = tmp_path / "big.txt"
    line = ("All work and no play makes a long context model. " * 4 + "\n").encode()
    with big.open("wb") as fh:
        for _ in range(200 * 2**20 // (len(line) * 1000)):
            fh.write(line * 1000)
    code = (
        "import resource, sys\n"
        "from engine.data.corpus import CorpusStats, read_corpus\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"  # after imports (torch and friends)
        "stats = CorpusStats(); n = sum(len(d.text) for d in read_corpus([sys.argv[1]], stats))\n"
        "print(n, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(big)], cwd=ROOT, capture_output=True, text=True, check=True)
    chars, extra_mib = map(int, out.stdout.split())
    assert chars == big.stat().st_size
    assert extra_mib < 64, f"peak RSS grew {extra_mib} MiB while streaming a {big.stat().st_size >> 20} MiB file"


def test_partial_output_never_looks_complete(tokenizer, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(build_module, "_plot_histogram", boom)
    cfg = DataConfig(output_dir=str(tmp_path / "o"), target_context=512, n_train=4, n_eval=2, short_range=(100, 200))
    with pytest.raises(RuntimeError):
        prepare_data(cfg, tokenizer)
    assert not (tmp_path / "o").exists() and (tmp_path / "o.partial").exists()
    monkeypatch.undo()
    assert prepare_data(cfg, tokenizer).output_dir.exists()  # a rerun replaces the stale partial directory
    assert not (tmp_path / "o.partial").exists()


def test_bad_config_is_collected():
    with pytest.raises(ValueError, match="target_context.*ratios"):
        DataConfig(output_dir="x", target_context=10, longqa_ratio=0.9)
    with pytest.raises(ValueError, match="`train_mix` must be one of longqa, plain, got 'qa'"):
        DataConfig(output_dir="x", target_context=1024, train_mix="qa")


def test_plain_train_mix_is_packed_text_only_and_eval_keeps_the_qa_mix(tokenizer, tmp_path):
    """LongLoRA extends context on plain long text: no passkey or other retrieval record may be trained on."""
    cfg = DataConfig(output_dir=str(tmp_path / "d"), target_context=1024, n_train=3, n_eval=4, seed=1,
                     short_range=(200, 400), train_mix="plain")  # fmt: skip
    result = prepare_data(cfg, tokenizer)
    assert result.card["counts"]["train"] == {"packed_lm": 3} and result.card["config"]["train_mix"] == "plain"
    assert set(result.card["counts"]["eval"]) - {"packed_lm"}  # the evaluation still has QA records
    assert all(c.passed for c in result.checks), result.checks


def test_json_records_are_used(tokenizer, tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"doc{i}.md").write_text(f"# Part {i}\n\n" + "Plain words fill this page. " * 300)
    rows = [{"instruction": f"Question number {i}?", "output": f"Answer {i}."} for i in range(20)]
    (corpus / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    result = prepare_data(
        DataConfig(
            output_dir=str(tmp_path / "o"),
            target_context=512,
            corpus=(str(corpus),),
            n_train=4,
            n_eval=4,
            short_range=(100, 200),
        ),
        tokenizer,
    )
    total = sum(result.card["counts"][s].get("json_qa", 0) for s in ("train", "eval"))
    assert total == 20 and all(c.passed for c in result.checks)


def test_llm_proposer_hook_feeds_grounded_records(tokenizer, tmp_path):
    """With only the llm_qa task, every QA record comes from the proposer and passed grounding."""
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"doc{i}.md").write_text(
            f"# Part {i}\n\nThe code word of part {i} is Q{i}X. " + "Filler text. " * 300
        )

    def proposer(chunk: str):
        word = chunk.split("The code word of part ")[1].split(".")[0]  # e.g. "3 is Q3X"
        number, answer = word.split(" is ")
        return [
            (f"What is the code word of part {number}?", answer, f"The code word of part {word}."),
            ("Made up?", "nothing", "absent sentence"),
        ]

    cfg = DataConfig(
        output_dir=str(tmp_path / "o"),
        target_context=512,
        corpus=(str(corpus),),
        n_train=4,
        n_eval=4,
        lm_ratio=0.0,
        short_ratio=0.5,
        longqa_ratio=0.5,
        tasks=("llm_qa",),
        unanswerable_ratio=0.0,
        short_range=(100, 300),
    )
    result = prepare_data(cfg, tokenizer, proposer=proposer)
    assert result.card["counts"]["train"] == {"llm_qa": 4}
    assert result.card["rejected"].get("llm proposal: evidence not in the document", 0) >= 4
    assert all(c.passed for c in result.checks)


def test_unreachable_target_length_is_counted_then_reported(tokenizer, tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"d{i}.md").write_text("A short page. " * 20)
    cfg = DataConfig(
        output_dir=str(tmp_path / "o"),
        target_context=65536,
        corpus=(str(corpus),),
        n_train=2,
        n_eval=2,
        lm_ratio=0.0,
        short_ratio=0.0,
        longqa_ratio=1.0,
        tasks=("niah_single",),
    )
    with pytest.raises(ValueError, match="no records could be built.*length bucket not reachable") as err:
        prepare_data(cfg, tokenizer)
    assert "\n" not in str(err.value) and not (tmp_path / "o").exists()
