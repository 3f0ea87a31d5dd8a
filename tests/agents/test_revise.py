"""Plan revision (agents.workflow.revise): the phrases, the diff, the CLI (`plan`/`resume --request`), the chat, the
LLM."""

from __future__ import annotations

import json

import pytest

from agents import Assistant
from agents.app.chat import AssistantChat, ChatState
from agents.cli import main
from agents.language.client import LLMClient, LLMSettings
from agents.workflow.graph import read_run_file
from agents.workflow.revise import parse_revision, plan_changes, revise_plan, revised_spec
from sop.schemas import Spec
from tests.support.openai_server import ScriptedOpenAIServer

CLUSTER = Spec(base_model="llama-2-7b", target_context=32768, hardware="8xA100-80GB", profile="full")


@pytest.mark.parametrize(
    ("text", "fields"),
    [
        ("use rank 16", {"lora_rank": 16}),
        ("only 2 GPUs", {"hardware": "2xA100-80GB"}),
        ("finish in 10 hours", {"max_hours": 10.0}),
        ("what if 64k instead?", {"target_context": 65536}),
        ("with full attention", {"attention": "full"}),
        ("bf16 please", {"precision": "bf16"}),
        ("try yarn, r=32 and 500 steps", {"rope_method": "yarn", "lora_rank": 32, "max_steps": 500}),
        ("use ntk", {"rope_method": "dynamic"}),  # engine.catalog.ROPE_METHOD_ALIASES
        ("dynamic ntk scaling", {"rope_method": "dynamic"}),
        ("linear interpolation", {"rope_method": "linear"}),
        ("what if 100,000 tokens on 4 gpus", {"target_context": 100_000, "hardware": "4xA100-80GB"}),
        ("only 2 cards, 1.5M context", {"hardware": "2xA100-80GB", "target_context": 1_572_864}),  # request grammar
    ],
)
def test_revision_phrases(text, fields):
    revision = parse_revision(text, CLUSTER)
    assert revision.fields == fields and not revision.problems
    assert set(revision.said) == set(fields)


def test_gpus_on_a_cpu_plan_is_a_problem_and_custom_hardware_keeps_its_gpu():
    cpu = Spec(base_model="smollm2-135m", target_context=16384)
    assert "name the GPUs" in parse_revision("only 2 GPUs", cpu).problems[0]
    custom = Spec(base_model="llama-2-7b", target_context=32768, hardware="custom",
                  custom_hardware={"n_devices": 8, "memory_gib": 80, "peak_tflops": 312})  # fmt: skip
    assert parse_revision("only 2 GPUs", custom).fields["custom_hardware"]["n_devices"] == 2
    assert parse_revision("hello there", cpu).fields == {}


def test_the_diff_says_what_changed_and_what_it_costs(tmp_path):
    result = revise_plan(Assistant(tmp_path), CLUSTER, "use rank 16")
    assert result.spec.lora_rank == 16 and result.result.plan["lora"]["r"] == 16
    text = "\n".join(result.changes)
    assert 'LoRA rank 8 -> 16 (you asked: "rank 16")' in text
    old, new = Assistant(tmp_path).plan(CLUSTER).plan, result.result.plan
    extra = new["trainable"]["trainable"] - old["trainable"]["trainable"]
    assert extra > 0 and f"(+{extra * 2 / 1e6:.1f} MB)" in text  # bf16 on the cluster
    assert f"memory {old['memory']['total_gib']:.1f} -> {new['memory']['total_gib']:.1f} GiB" in text
    fewer = revise_plan(Assistant(tmp_path), CLUSTER, "only 2 GPUs")
    assert fewer.result.plan["hardware"]["n_devices"] == 2 and "hardware 8xA100-80GB -> 2xA100-80GB" in "\n".join(
        fewer.changes
    )
    with pytest.raises(ValueError, match="could not read a change"):
        revise_plan(Assistant(tmp_path), CLUSTER, "make it nicer")


def test_a_time_budget_maps_to_the_planners_search(tmp_path):
    revision = parse_revision("finish in 10 hours", CLUSTER)
    assert revised_spec(CLUSTER, revision).max_hours == 10.0
    doc = Assistant(tmp_path).plan(revised_spec(CLUSTER, revision)).plan
    lines = plan_changes(Assistant(tmp_path).plan(CLUSTER).plan, doc, revision, CLUSTER)
    assert lines[0].startswith("time budget None -> 10.0")


def test_plan_with_a_revision_request_prints_the_diff(capsys):
    args = ["plan", "--model", "llama-2-7b", "--target-context", "32768", "--hardware", "8xA100-80GB",
            "--request", "what if 64k instead?"]  # fmt: skip
    assert main([*args, "--json"]) in (0, 1)  # 64k may not fit: the diff is shown either way
    out = json.loads(capsys.readouterr().out)
    assert out["spec"]["target_context"] == 65536 and out["revision"][0].startswith("target 32768 -> 65536")
    main(args)
    assert "Revised plan:" in capsys.readouterr().out


def test_resume_with_a_request_revises_the_waiting_run(tmp_path, tiny_model_dir, capsys):
    run = tmp_path / "r"
    args = ["run", "--model", str(tiny_model_dir), "--target-context", "2048", "--run-dir", str(run)]
    assert main(args) == 3  # waits for approval
    capsys.readouterr()
    assert main(["resume", str(run), "--request", "use rank 4"]) == 3
    out = capsys.readouterr().out
    assert "LoRA rank 8 -> 4" in out and "Plan:" in out
    assert read_run_file(run)["status"] == "rejected"
    new = [d for d in tmp_path.iterdir() if d != run and (d / "plan.json").is_file()]
    assert len(new) == 1 and json.loads((new[0] / "plan.json").read_text())["lora"]["r"] == 4
    assert main(["resume", str(run), "--request", "use rank 2"]) == 2  # that plan is no longer waiting


def test_the_chat_revises_its_waiting_plan_and_the_llm_reads_what_the_rules_cannot(tmp_path, tiny_model_dir):
    chat, state = AssistantChat(tmp_path, allowed_paths=(tiny_model_dir.parent,)), ChatState()
    reply, state = chat.message(f"extend {tiny_model_dir} to 2048 tokens", None, state)
    first = state.run_id
    assert first and "waits for your approval" in reply
    reply, state = chat.message("use rank 4", None, state)
    assert "Revised plan" in reply and "LoRA rank 8 -> 4" in reply and state.run_id != first
    assert read_run_file(tmp_path / first)["status"] == "rejected"
    server = ScriptedOpenAIServer().start()
    try:
        server.script(json.dumps({"lora_rank": 2, "n_gpus": None, "max_hours": None, "target_context": None,
                                  "attention": None, "precision": None, "rope_method": None, "max_steps": None}))
        llm = LLMClient(LLMSettings(base_url=server.url, model="m", timeout=5, max_retries=0))
        chat.llm = chat.assistant.llm = llm
        reply, state = chat.message("halve the adapter size again", None, state)
        assert "LoRA rank 4 -> 2" in reply and "read by the LLM" in reply
        assert "revises a context-extension training plan" in json.dumps(server.requests[0].body)
    finally:
        server.stop()


@pytest.mark.parametrize("decision", ["approved", "rejecting"])
def test_a_plan_decided_while_its_revision_is_planned_stands_and_the_revision_is_dropped(
    tmp_path, tiny_model_dir, monkeypatch, decision
):
    """The app's race: Approve (or Reject) is pressed while a revision is still planning. The decision wins: the old
    run is not rejected behind the user's back, the revised plan is dropped, and the chat does not claim the old
    plan still waits."""
    chat, state = AssistantChat(tmp_path, allowed_paths=(tiny_model_dir.parent,)), ChatState()
    _, state = chat.message(f"extend {tiny_model_dir} to 2048 tokens", None, state)
    first = state.run_id
    plan_revision = chat.assistant.run

    def decided_meanwhile(spec, **kwargs):
        result = plan_revision(spec, **kwargs)  # the revised plan is ready ...
        run_dir, why = chat._claim_waiting(first, decision)  # ... and the user's click landed first
        assert run_dir is not None, why
        return result

    monkeypatch.setattr(chat.assistant, "run", decided_meanwhile)
    reply, state = chat.message("use rank 4", None, state)
    assert "was decided while the revision was planned" in reply and "still waits" not in reply, reply
    assert read_run_file(tmp_path / first)["status"] == decision  # the click stands
    revised = [d for d in tmp_path.iterdir() if d.name != first and (d / "plan.json").is_file()]
    assert len(revised) == 1 and read_run_file(revised[0])["status"] == "rejected"  # nothing left waiting
    assert state.run_id == first
