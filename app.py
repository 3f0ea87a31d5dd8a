"""LongPilot Gradio app: chat with the assistant, approve the plan, watch the run live, inspect results, and chat with
the extended model over a long document. Layout and calls into the agents API only.

    python app.py [--host 127.0.0.1] [--port 7860] [--runs-dir runs] [--auth user:password]   # or: longpilot app
    python app.py --model-server http://127.0.0.1:8000/v1   # Model chat through `longpilot serve` (or any such server)
Runs continue in worker processes and are read back from their directories, so a reloaded page or another browser
re-attaches by run id. Binds to loopback, never shares, analytics off; files served only from the runs directory.
Files are taken only as uploads through Gradio's upload route: a client naming a path on the server is refused.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import gradio as gr  # noqa: E402
from gradio.utils import get_upload_folder  # noqa: E402

from agents.app.callbacks import STAGE_COLUMNS, AppCallbacks  # noqa: E402
from agents.app.chat import AssistantChat, ChatState  # noqa: E402
from agents.app.guards import uploads_only  # noqa: E402
from agents.app.model_chat import ModelChat  # noqa: E402
from agents.app.model_chat_server import NO_KEY, ServerModelChat, check_server_url, server_key  # noqa: E402
from agents.app.uploads import MAX_UPLOAD_BYTES, UPLOAD_TRANSPORT_FACTOR  # noqa: E402
from engine.catalog import DEFAULT_MODEL  # noqa: E402


def build_app(
    runs_dir: Path,
    *,
    llm=None,
    base_model: str = DEFAULT_MODEL,
    upload_limit: int | None = None,
    allowed_paths: tuple[Path, ...] = (),
    model_server: str | None = None,
    model_server_key: str | None = None,
):
    """The Blocks app. Paths named in chat must lie in `runs_dir`, `allowed_paths` or the base model's own folder.
    `model_server` (an OpenAI-compatible /v1 URL): Model chat answers through it instead of loading models here."""
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    model_roots = (Path(base_model),) if Path(base_model).exists() else ()
    upload_root = Path(get_upload_folder())  # where Gradio's upload route stores what a browser sends
    chat = AssistantChat(runs_dir, llm=llm, upload_limit=upload_limit, allowed_paths=(*allowed_paths, *model_roots),
                         upload_root=upload_root)  # fmt: skip
    model_chat = (ServerModelChat(model_server, model_server_key or NO_KEY) if model_server
                  else ModelChat(runs_dir, base_model))  # fmt: skip
    on = AppCallbacks(runs_dir, chat, model_chat, upload_root)

    with gr.Blocks(title="LongPilot", analytics_enabled=False) as app:
        gr.Markdown("# LongPilot: extend an LLM's context window with LongLoRA")
        state = gr.State(ChatState())
        files_seen = gr.State(None)  # per page: what poll last sent of the watched run's plots and downloads
        with gr.Tab("Assistant"):
            chatbot = gr.Chatbot(label="Assistant", height=320)
            with gr.Row():
                message = gr.Textbox(placeholder=f"e.g. extend {DEFAULT_MODEL} to 16k using the docs I uploaded",
                                     show_label=False, scale=4, elem_id="message")  # fmt: skip
                uploads = uploads_only(gr.File(file_count="multiple", label="documents", scale=1))
                send_btn = gr.Button("Send", variant="primary", elem_id="send")
            with gr.Row():
                approve_btn = gr.Button("Approve", variant="primary", elem_id="approve")
                reject_btn = gr.Button("Reject", elem_id="reject")
                run_box = gr.Textbox(label="run id (paste one to re-attach)", elem_id="run-id")
            with gr.Row():
                alternatives = gr.Dropdown([], label="plans that fit", scale=4, elem_id="alternatives")
                adopt_btn = gr.Button("Use this plan", elem_id="adopt")
            status_md = gr.Markdown(elem_id="run-status")
            stages = gr.Dataframe(headers=STAGE_COLUMNS, label="stages", interactive=False)
            with gr.Row():
                loss = gr.LinePlot(x="step", y="loss", label="training loss", height=220)
                log = gr.Textbox(label="log", lines=8, max_lines=8)
            report = gr.Markdown(elem_id="report")
            # whole plots, never cropped to a fixed-height tile (a fixed height cut the PPL plot off)
            plots = gr.Gallery(label="plots", columns=2, height="auto", object_fit="contain", elem_id="plots")
            downloads = gr.File(label="downloads", file_count="multiple", interactive=False)
            export_btn = gr.Button("Export merged model")
        with gr.Tab("Runs"):
            runs_table = gr.Dataframe(headers=["run", "status", "stage", "updated"], interactive=False)
            with gr.Row():
                refresh_runs = gr.Button("Refresh")
                open_id = gr.Textbox(label="run id")
                open_btn = gr.Button("Open in Assistant tab")
                resume_btn = gr.Button("Resume")
            runs_msg = gr.Markdown()
        with gr.Tab("Model chat"):
            with gr.Row():
                offered = model_chat.choices()
                choice = gr.Dropdown(offered, value=offered[0] if offered else None, label="model")
                refresh_models = gr.Button("Refresh models")
            document = gr.Textbox(label="document (paste)", lines=8)
            doc_file = uploads_only(gr.File(label="or upload a text file", file_types=[".txt", ".md", ".py", ".rst"]))
            question = gr.Textbox(label="question")
            with gr.Row():
                ask = gr.Button("Ask", variant="primary")
                tokens = gr.Markdown()
            answer = gr.Textbox(label="answer", lines=6)

        outputs = [stages, loss, log, report, plots, downloads, status_md, files_seen]
        send_io = [message, uploads, chatbot, state], [message, uploads, chatbot, state, run_box]
        adopt_btn.click(on.adopt, [alternatives, chatbot, state], [chatbot, state, run_box, alternatives],
                        api_name="adopt", preprocess=False)  # fmt: skip
        for sent in (send_btn.click(on.send, *send_io, api_name="chat", preprocess=False),
                     message.submit(on.send, *send_io, preprocess=False)):  # fmt: skip
            sent.then(on.choices, state, alternatives, preprocess=False, api_visibility="private")  # choices
        decide_inputs = [chatbot, state, run_box]
        approve_btn.click(lambda h, s, r: on.decide(True, h, s, r), decide_inputs, [chatbot, state],
                          api_name="approve", preprocess=False)  # fmt: skip
        reject_btn.click(lambda h, s, r: on.decide(False, h, s, r), decide_inputs, [chatbot, state],
                         api_name="reject", preprocess=False)  # fmt: skip
        gr.Timer(2.0).tick(on.poll, [run_box, files_seen], outputs)
        run_box.change(lambda r: on.poll(r), run_box, outputs, api_name="poll")  # a new run: send everything
        export_btn.click(on.export, run_box, outputs)
        refresh_runs.click(on.list_runs, None, runs_table)
        app.load(on.list_runs, None, runs_table)
        open_btn.click(lambda r: r, open_id, run_box)
        resume_btn.click(on.resume, open_id, runs_msg)
        refresh_models.click(on.model_choices, None, choice)
        app.load(on.model_choices, None, choice)  # runs finished since start-up
        doc_file.change(on.load_doc, doc_file, document)
        ask.click(on.count, [choice, document, question], tokens, api_name="count")
        ask.click(on.ask_model, [choice, document, question], answer, api_name="ask")
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="longpilot app", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--auth", default=os.environ.get("LONGPILOT_APP_AUTH"), help="user:password (or env)")
    parser.add_argument("--base-model", default=DEFAULT_MODEL, help="model offered in the Model chat tab")
    parser.add_argument("--allow-path", action="append", default=[], metavar="DIR",
                        help="a folder whose files chat requests may name (models, docs); repeatable")  # fmt: skip
    parser.add_argument("--model-server", default=None, metavar="URL",
                        help="Model chat via this OpenAI-compatible server (http://127.0.0.1:8000/v1)")  # fmt: skip
    parser.add_argument("--model-server-key-env", default=None, metavar="VAR",
                        help="env variable holding the server's key (default LONGPILOT_MODEL_SERVER_KEY)")  # fmt: skip
    args = parser.parse_args(argv)
    auth = None
    if args.auth:
        user, _, password = args.auth.partition(":")
        if not user or not password:
            print("longpilot app: error: --auth must be user:password, both non-empty", file=sys.stderr)
            return 2
        auth = (user, password)
    if args.host not in ("127.0.0.1", "localhost", "::1") and auth is None:
        print(f"longpilot app: warning: serving on {args.host} without --auth: anyone who can reach it can start "
              "training runs", file=sys.stderr)  # fmt: skip
    allowed = tuple(Path(p).resolve() for p in args.allow_path)
    if missing := [str(p) for p in allowed if not p.is_dir()]:
        print(f"longpilot app: error: --allow-path {missing[0]} is not a directory", file=sys.stderr)
        return 2
    try:
        server = check_server_url(args.model_server) if args.model_server else None
        key = server_key(args.model_server_key_env) if server else None
    except ValueError as err:
        print(f"longpilot app: error: {err}", file=sys.stderr)
        return 2
    runs = Path(args.runs_dir).resolve()
    limit = int(os.environ.get("LONGPILOT_UPLOAD_LIMIT_BYTES", MAX_UPLOAD_BYTES))
    app = build_app(runs, base_model=args.base_model, upload_limit=limit, allowed_paths=allowed, model_server=server,
                    model_server_key=key)  # fmt: skip
    # Gradio's own cap sits well above ours, so an oversized file reaches the chat and gets a sentence, not a popup.
    app.queue().launch(server_name=args.host, server_port=args.port, auth=auth, share=False,
                       allowed_paths=[str(runs)], max_file_size=UPLOAD_TRANSPORT_FACTOR * limit)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
