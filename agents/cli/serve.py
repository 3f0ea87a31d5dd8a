"""`longpilot serve`: its parser and action, kept out of agents.cli (as `eval` is)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from engine.catalog import DEFAULT_MODEL

KEY_ENV = "LONGPILOT_API_KEY"  # as the app reads LONGPILOT_APP_AUTH: a secret kept off the command line
FLAG_KEY_WARNING = ("longpilot: warning: --api-key puts the key on the command line, where any local user reads it "
                    f"(ps, /proc/PID/cmdline); set {KEY_ENV} or use --api-key-file instead")  # fmt: skip


def add_serve_parser(sub) -> argparse.ArgumentParser:
    """`longpilot serve`: host, port, base model, runs dir, max loaded adapters, API key, extra adapters, limits."""
    p = sub.add_parser("serve", help="OpenAI-compatible server for the base and every finished run's adapter")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", default=DEFAULT_MODEL, help="the base model (alias, model directory or cached hub id)")
    p.add_argument("--runs-dir", default="runs", help="finished runs on --model in it are served by their run id")
    p.add_argument("--max-loaded", type=int, default=4, help="adapters kept in memory (least recently used evicted)")
    p.add_argument("--api-key-file", default=None, metavar="PATH",
                   help=f"require `Authorization: Bearer KEY`, KEY read from PATH (default: ${KEY_ENV})")  # fmt: skip
    p.add_argument("--api-key", default=None,
                   help="the key itself (visible to local users in ps: prefer --api-key-file or the env)")  # fmt: skip
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="also serve the adapter directory DIR as model NAME (repeatable)")  # fmt: skip
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--packed-weights", choices=["auto", "on", "off"], default="auto",  # packed.PACKED_SETTINGS
                   help="a oneDNN-packed copy of the base's Linear weights for batched steps on CPU (auto: float32 "
                        "weights, the copy within a quarter of the memory; docs/serving.md)")  # fmt: skip
    p.add_argument("--exact", action="store_true",
                   help="serial mode: one request at a time, exactly plain transformers' tokens (default: continuous "
                        "batching across all models, docs/serving.md)")  # fmt: skip
    limits = p.add_argument_group("limits (docs/serving.md)")
    limits.add_argument("--max-body-bytes", type=int, default=4 * 2**20, help="request body cap (default 4 MiB): 413")
    limits.add_argument("--max-queued", type=int, default=64, help="requests waiting for the model: one more gets 429")
    limits.add_argument("--request-timeout", type=float, default=600.0, metavar="S",
                        help="seconds a request may run; then it is stopped (504)")  # fmt: skip
    limits.add_argument("--body-timeout", type=float, default=30.0, metavar="S",
                        help="seconds to receive a request's body (408)")  # fmt: skip
    limits.add_argument("--header-timeout", type=float, default=10.0, metavar="S",
                        help="seconds to receive a request's headers (the connection is closed)")  # fmt: skip
    limits.add_argument("--max-prompt-chars", type=int, default=None, metavar="N",
                        help="longer prompts refused (400) before tokenising (default 128 x context)")  # fmt: skip
    return p


def api_key_from(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> tuple[str | None, str | None]:
    """The key (--api-key, else --api-key-file's contents stripped, else $LONGPILOT_API_KEY; None: no key) and the
    warning to show (for --api-key, whose value `ps` shows), both before any weights load.

    Raises:
        ValueError: both flags, an unreadable or empty key file, or an empty key (one line, never the key).
    """
    if args.api_key is not None and args.api_key_file is not None:
        raise ValueError("give --api-key or --api-key-file, not both")
    if args.api_key is not None:
        if not args.api_key.strip():
            raise ValueError("--api-key is empty")
        return args.api_key.strip(), FLAG_KEY_WARNING
    if args.api_key_file is not None:
        try:
            key = Path(args.api_key_file).expanduser().read_text().strip()
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"--api-key-file {args.api_key_file}: cannot read it ({type(err).__name__})") from None
        if not key:
            raise ValueError(f"--api-key-file {args.api_key_file} is empty")
        return key, None
    key = environ.get(KEY_ENV, "").strip()
    return key or None, None


def _limits(args: argparse.Namespace):
    """The flags' agents.server.Limits (its own checks: one line each)."""
    from agents.server import Limits

    return Limits(max_body_bytes=args.max_body_bytes, body_timeout_s=args.body_timeout,
                  header_timeout_s=args.header_timeout, request_timeout_s=args.request_timeout,
                  max_queued=args.max_queued, max_prompt_chars=args.max_prompt_chars)  # fmt: skip


def run_serve(args: argparse.Namespace) -> int:
    """Check the flags (one line, exit 2, before any weights load), load, serve until interrupted."""
    from agents.server import build_server_app, exposure_warning, parse_adapter_flag, serve_forever
    from agents.server.server import bind

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: must be in 0..65535")
    if args.max_loaded < 1:
        raise ValueError(f"--max-loaded {args.max_loaded}: must be at least 1")
    if args.packed_weights == "on" and args.device != "cpu":
        import torch

        if args.device == "cuda" or torch.cuda.is_available():
            raise ValueError("--packed-weights on: packed weights are for a model on CPU (add --device cpu, or use "
                             "--packed-weights auto)")  # fmt: skip
    api_key, key_warning = api_key_from(args)
    limits = _limits(args)
    adapters: dict = {}
    for flag in args.adapter:
        name, folder = parse_adapter_flag(flag)
        if name in adapters or name == args.model:
            raise ValueError(f"--adapter {flag!r}: the model id {name!r} is given twice")
        adapters[name] = folder
    for warning in (key_warning, exposure_warning(args.host, api_key)):
        if warning:
            print(warning, file=sys.stderr)
    sock = bind(args.host, args.port)  # a port in use is refused before minutes of loading
    device = None if args.device == "auto" else args.device
    app, worker = build_server_app(args.model, runs_dir=args.runs_dir, adapters=adapters, max_loaded=args.max_loaded,
                                   api_key=api_key, device=device, limits=limits, exact=args.exact,
                                   packed_weights=args.packed_weights)  # fmt: skip
    ids = worker.pool.model_ids()
    port = sock.getsockname()[1]
    print(f"serving {len(ids)} model(s) on http://{args.host}:{port}/v1: {', '.join(ids)}", flush=True)
    try:
        serve_forever(app, sock)
    finally:
        worker.close()
    return 0
