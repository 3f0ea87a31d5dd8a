"""Quiet by default at LongPilot's entry points (the CLI): third-party warnings, log lines and progress bars that say
nothing to our user are filtered while a command runs and restored after it; `--verbose` shows them all.

Only entry points call `quiet_third_party`: importing `engine` or `agents` as a library changes no filter, level or
environment variable. What is filtered, and why it says nothing to a LongPilot user:
  - FutureWarning / DeprecationWarning / UserWarning raised inside transformers, peft, accelerate, datasets,
    huggingface_hub, torch and deepspeed (e.g. the `gradient_checkpointing*` renames, `is_gradient_checkpointing`,
    peft's "Could not find a config file" for the embedded GGUF model): settings LongPilot chose, not the user;
  - their progress bars (GGUF de-quantisation, "Loading weights", Datasets' shard bars): our own view says what
    each stage is doing (agents.cli.progress);
  - their INFO/WARNING log lines (errors still show).
The environment variables are the libraries' own switches, read when they are imported, so a library imported
later by this process or by a launched training process (torchrun) is quiet too; libraries already imported are
switched through their own functions. tqdm has no such function and reads `TQDM_DISABLE` once, when first imported:
that is why `agents.cli` imports nothing that loads torch (or tqdm) at module level, so the switch set here comes
first (tests/agents/test_progress.py checks the import).
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console

from engine.environ import set_environ

LIBRARIES = ("transformers", "peft", "accelerate", "datasets", "huggingface_hub", "torch", "deepspeed")
QUIET_CATEGORIES = (FutureWarning, DeprecationWarning, UserWarning)
QUIET_ENV = {
    "TQDM_DISABLE": "1",  # tqdm's own switch: bars created without an explicit `disable` (the GGUF de-quantisation)
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # huggingface_hub, and transformers' "Loading weights" through it
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # Datasets' map/save shard bars
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


@contextmanager
def quiet_third_party(enabled: bool = True) -> Iterator[None]:
    """Filter the libraries' warnings, bars and log lines for the duration of the block (nothing when disabled)."""
    if not enabled:
        yield
        return
    with set_environ(QUIET_ENV, keep_existing=True):  # a user's explicit setting wins
        saved_levels = {name: logging.getLogger(name).level for name in LIBRARIES}
        for name in LIBRARIES:
            logging.getLogger(name).setLevel(logging.ERROR)
        restore_bars = _switch_loaded_bars(False)
        try:
            with warnings.catch_warnings():
                for category in QUIET_CATEGORIES:
                    warnings.filterwarnings("ignore", category=category, module=rf"({'|'.join(LIBRARIES)})(\.|$)")
                yield
        finally:
            restore_bars()
            for name, level in saved_levels.items():
                logging.getLogger(name).setLevel(level)


def _switch_loaded_bars(on: bool):
    """Turn the progress bars of libraries this process has already imported on or off; returns the undo."""
    undo = []
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        if hf_logging.is_progress_bar_enabled() != on:
            (hf_logging.enable_progress_bar if on else hf_logging.disable_progress_bar)()
            undo.append(hf_logging.disable_progress_bar if on else hf_logging.enable_progress_bar)
    if "datasets" in sys.modules:
        import datasets

        if datasets.is_progress_bar_enabled() != on:
            (datasets.enable_progress_bars if on else datasets.disable_progress_bars)()
            undo.append(datasets.disable_progress_bars if on else datasets.enable_progress_bars)

    def restore() -> None:
        for step in undo:
            step()

    return restore


def log_level(quiet: bool, verbose: bool) -> int:
    """Our own loggers (engine.*, agents.*): warnings by default, everything with --verbose, errors with --quiet."""
    return logging.ERROR if quiet else logging.INFO if verbose else logging.WARNING


def setup_logging(level: int, console: Console | None = None) -> None:
    """Our messages go through `logging`: on a terminal through rich (printed above a live progress view, never
    through it), otherwise as plain `HH:MM:SS name: message` lines on stderr."""
    console = console or Console(stderr=True)  # sys.stderr when written, so a live view's redirection applies
    if console.is_terminal:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=console, show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s", datefmt="%H:%M:%S"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    logging.basicConfig(level=level, handlers=[handler])
