"""`longpilot serve`: an OpenAI-compatible server for the base model and many LongLoRA adapters at once.

    from agents.server import build_server_app, start_in_thread
    app, worker = build_server_app("smollm2-135m", runs_dir="runs")
    server = start_in_thread(app)  # a free loopback port
    # openai.OpenAI(base_url=server.base_url, api_key="none") ...
    server.stop()
"""

from agents.server.guard import Limits
from agents.server.http_app import build_app
from agents.server.models_index import ModelsIndex, finished_adapter, parse_adapter_flag
from agents.server.server import RunningServer, build_server_app, exposure_warning, serve_forever, start_in_thread

__all__ = [
    "Limits",
    "ModelsIndex",
    "RunningServer",
    "build_app",
    "build_server_app",
    "exposure_warning",
    "finished_adapter",
    "parse_adapter_flag",
    "serve_forever",
    "start_in_thread",
]
