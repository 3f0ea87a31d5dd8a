"""Guards between Gradio and the app's handlers: what a client may hand the server as a file or as chat history.

Gradio copies (or downloads) whatever path a client names in a `FileData` into its cache before any handler runs,
and its Chatbot preprocessing builds any component a history message names around a client-chosen path. These
guards keep both to what a browser actually uploaded (see agents/uploads.uploaded_file).
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from agents.app.uploads import NotUploadedError, safe_name, uploaded_file


def uploaded_or_refused(path, root: Path) -> Path:
    """`uploaded_file(path, root)`, with a refusal shown to the client as one line (gr.Error)."""
    try:
        return uploaded_file(str(path), root)
    except NotUploadedError as err:
        raise gr.Error(f"{safe_name(str(path))}: {err}") from None


def uploads_only(component: gr.File) -> gr.File:
    """Make a file input take only files that Gradio's upload route stored in its upload folder. Gradio copies (or
    downloads) the path a client sends into its cache before any handler runs, so the check wraps that copy step and
    sees the path exactly as the client sent it; the handlers check the path they get once more. Wrapped on the
    instance, not subclassed: Gradio writes a .pyi stub beside the module of every Component subclass."""
    root = Path(component.GRADIO_CACHE)
    move, async_move = component.move_resource_to_block_cache, component.async_move_resource_to_block_cache

    def refuse_foreign(path) -> None:
        if path is not None:
            uploaded_or_refused(path, root)

    def checked_move(path):
        refuse_foreign(path)
        return move(path)

    async def checked_async_move(path):
        refuse_foreign(path)
        return await async_move(path)

    component.move_resource_to_block_cache = checked_move
    component.async_move_resource_to_block_cache = checked_async_move
    return component


def text_history(history) -> list[dict]:
    """The chat history a client sent back, if it holds text only (else gr.Error). The events that take the chat run
    with preprocess=False: Gradio's Chatbot preprocessing builds any component a history message names and hands it
    a client-chosen path (an Image opens a server image, a File copies a server file) before a handler runs, and
    this app never puts anything but text in the chat."""
    history = list(history or [])
    for message in history:
        parts = message.get("content") if isinstance(message, dict) else None
        if not isinstance(parts, list) or not all(isinstance(p, dict) and p.get("type") == "text" for p in parts):
            raise gr.Error("the chat history may hold text only")
    return history
