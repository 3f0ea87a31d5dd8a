"""`longpilot serve`: its parser and action, kept out of agents.cli (as `eval` is)."""

from __future__ import annotations

import argparse
import sys

from engine.catalog import DEFAULT_MODEL


def add_serve_parser(sub) -> argparse.ArgumentParser:
    """`longpilot serve`: host, port, base model, runs dir, max loaded adapters, API key, extra adapters."""
    p = sub.add_parser("serve", help="OpenAI-compatible server for the base and every finished run's adapter")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", default=DEFAULT_MODEL, help="the base model (alias, model directory or cached hub id)")
    p.add_argument("--runs-dir", default="runs", help="finished runs on --model in it are served by their run id")
    p.add_argument("--max-loaded", type=int, default=4, help="adapters kept in memory (least recently used evicted)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (constant-time check)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="also serve the adapter directory DIR as model NAME (repeatable)")  # fmt: skip
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    return p


def run_serve(args: argparse.Namespace) -> int:
    """Check the flags (one line, exit 2, before any weights load), load, serve until interrupted."""
    from agents.server import build_server_app, exposure_warning, parse_adapter_flag, serve_forever
    from agents.server.server import bind

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: must be in 0..65535")
    if args.max_loaded < 1:
        raise ValueError(f"--max-loaded {args.max_loaded}: must be at least 1")
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key is empty")
    adapters: dict = {}
    for flag in args.adapter:
        name, folder = parse_adapter_flag(flag)
        if name in adapters or name == args.model:
            raise ValueError(f"--adapter {flag!r}: the model id {name!r} is given twice")
        adapters[name] = folder
    if warning := exposure_warning(args.host, args.api_key):
        print(warning, file=sys.stderr)
    sock = bind(args.host, args.port)  # a port in use is refused before minutes of loading
    device = None if args.device == "auto" else args.device
    app, worker = build_server_app(args.model, runs_dir=args.runs_dir, adapters=adapters, max_loaded=args.max_loaded,
                                   api_key=args.api_key, device=device)  # fmt: skip
    ids = worker.pool.model_ids()
    port = sock.getsockname()[1]
    print(f"serving {len(ids)} model(s) on http://{args.host}:{port}/v1: {', '.join(ids)}", flush=True)
    try:
        serve_forever(app, sock)
    finally:
        worker.close()
    return 0
