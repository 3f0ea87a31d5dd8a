"""The Gradio app, launched on loopback by the test: through gradio_client (chat -> plan -> approve -> a complete
tiny run -> report) and in a real browser (Playwright driving Debian's Chromium; a screenshot is kept)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agents.app.uploads import inside, safe_name, store_uploads
from tests.support.servers import REPO, message_text

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; `make test` installs it where it can (apt-get as root)
SCREENSHOT = REPO / "runs" / "test-artifacts" / "app.png"


def _paths(value) -> list[str]:
    """Every file path in a gradio_client output (nested dicts/lists/tuples of the client's download paths)."""
    if isinstance(value, str):
        return [value] if Path(value).suffix else []
    if isinstance(value, dict):
        return [p for v in value.values() for p in _paths(v)]
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _paths(v)]
    return []


def _wait_for_report(client, run_id: str, timeout: float = 300) -> tuple:
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = client.predict(run_id, api_name="/poll")
        if "passed" in out[-1] or "failed" in out[-1]:
            return out
        time.sleep(2)
    raise AssertionError(f"run {run_id} did not finish in {timeout} s: {out[-1]}")


def test_chat_plan_approve_run_report_through_gradio_client(app_server):
    from gradio_client import Client

    client = Client(app_server["url"], verbose=False)
    _, _, history, run_id = client.predict(f"extend {app_server['tiny']} to 2k", None, [], api_name="/chat")
    reply = message_text(history[-1])
    assert "RoPE choice (" in reply and "waits for your approval" in reply and run_id
    history = client.predict(history, run_id, api_name="/approve")
    assert "continues in the background" in message_text(history[-1])
    stages, losses, log, report, plots, downloads, status = _wait_for_report(client, run_id)
    assert "passed" in status, (status, log)
    assert "What this run proves" in report and "Passkey" in report
    assert sorted(Path(p).name for p in _paths(plots)) == ["passkey_heatmap.png", "ppl_vs_length.png"]
    assert any(p.endswith("adapter.zip") for p in _paths(downloads))
    assert [row[1] for row in stages["data"]] == ["passed"] * 5


def test_two_sessions_run_two_runs_and_another_browser_reattaches(app_server):
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client

    def session(target: str) -> tuple[str, str]:
        client = Client(app_server["url"], verbose=False)
        _, _, history, run_id = client.predict(f"extend {app_server['tiny']} to {target}", None, [],
                                               api_name="/chat")  # fmt: skip
        client.predict(history, "", api_name="/approve")  # approves this session's plan, not the other one's
        return run_id, _wait_for_report(client, run_id)[-1]

    with ThreadPoolExecutor(2) as pool:
        (run_a, status_a), (run_b, status_b) = pool.map(session, ["2k", "4k"])
    assert run_a != run_b and "-2k-" in run_a and "-4k-" in run_b
    assert "passed" in status_a and "passed" in status_b
    stranger = Client(app_server["url"], verbose=False)  # a fresh browser, knowing only the run id
    assert f"run `{run_b}`: **passed**" in stranger.predict(run_b, api_name="/poll")[-1]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("hello", "Which model should I extend"),
        ("make it better please", "Which model should I extend"),
        ("extend {tiny} to 512", "not longer than"),
        ("extend gpt-9 to 32k", "I can't plan that yet"),
    ],
)
def test_bad_requests_get_a_clear_message(app_server, text, expected):
    from gradio_client import Client

    client = Client(app_server["url"], verbose=False)
    _, _, history, run_id = client.predict(text.format(tiny=app_server["tiny"]), None, [], api_name="/chat")
    reply = message_text(history[-1])
    assert expected in reply and "Traceback" not in reply
    assert run_id == {"__type__": "update"}  # no new run: the watched run id is left as it was (gr.skip)


def test_uploads_are_sanitised_and_size_limited(app_server, tmp_path):
    from gradio_client import Client, handle_file

    small, big = tmp_path / "..notes; rm -rf.txt", tmp_path / "big.txt"
    small.write_text("def f(x=1):\n    return x\n")
    big.write_text("x" * 5000)  # over the 2,000-byte limit the app was started with
    client = Client(app_server["url"], verbose=False)
    _, _, history, _ = client.predict("hello", [handle_file(str(small)), handle_file(str(big))], [], api_name="/chat")
    assert "big.txt" in message_text(history[-1]) and "over the" in message_text(history[-1])
    stored = list((app_server["runs"] / "uploads").rglob("*.txt"))
    assert [p.name for p in stored] == ["notes_rm_-rf.txt"]


def test_model_chat_streams_an_answer_and_counts_tokens(app_server):
    from gradio_client import Client

    client = Client(app_server["url"], verbose=False)
    choice = f"base: {app_server['tiny']}"
    count = client.predict(choice, "a short document", "what is it?", api_name="/count")
    assert "tokens of 1,024" in count
    answer = client.predict(choice, "a short document", "what is it?", api_name="/ask")
    assert isinstance(answer, str) and answer  # a random tiny model: any text, but generated and streamed back
    too_long = client.predict(choice, "x" * 5000, "what is it?", api_name="/ask")
    assert "handles 1,024" in too_long


def test_upload_helpers_refuse_paths():
    assert safe_name("../../etc/passwd") == "passwd" and safe_name("..\\..\\boot.ini") == "boot.ini"
    assert safe_name("...") == "upload.txt" and "/" not in safe_name("a/b/c d.txt")
    with pytest.raises(ValueError, match="outside the runs directory"):
        inside("../../etc", Path("/tmp/runs"))
    folder, problems = store_uploads(["/nonexistent/file.txt"], Path("/tmp/unused-runs"))
    assert folder is None and "not a readable file" in problems[0]


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"Chromium is not installed ({CHROMIUM}): `make test` installs it")
def test_real_browser_send_approve_and_see_the_plots(app_server):
    from playwright.sync_api import expect, sync_playwright

    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run"]  # fmt: skip
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=flags)
        page = browser.new_page(viewport={"width": 1280, "height": 1800})
        page.goto(app_server["url"])
        page.locator("#message textarea").fill(f"extend {app_server['tiny']} to 2k")
        page.locator("#send").click()
        expect(page.get_by_text("waits for your approval")).to_be_visible(timeout=60_000)
        page.locator("#approve").click()
        expect(page.locator("#run-status")).to_contain_text("passed", timeout=300_000)
        expect(page.locator("#report")).to_contain_text("What this run proves", timeout=30_000)
        images = page.locator("#plots img")
        expect(images.first).to_be_visible(timeout=30_000)
        assert images.count() >= 2
        expect(page.locator("#report table").first).to_be_visible()  # the answer first: base vs extended
        for i in range(images.count()):  # each plot whole: its box has the image's own shape, or is letterboxed
            shape = images.nth(i).evaluate(
                "img => { const r = img.getBoundingClientRect(); return [img.naturalWidth, img.naturalHeight,"
                " r.width, r.height, getComputedStyle(img).objectFit]; }"
            )
            natural_w, natural_h, box_w, box_h, fit = shape
            assert box_w > 0 and box_h > 0 and natural_w > 0, shape
            assert fit in ("contain", "scale-down") or abs(box_w / box_h - natural_w / natural_h) < 0.02, shape
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)
        browser.close()
    assert SCREENSHOT.stat().st_size > 20_000
