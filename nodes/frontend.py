"""Messages from the nodes to the frontend over ComfyUI's websocket."""
from __future__ import annotations


def send_to_frontend(event: str, data: dict) -> None:
    """Send ``data`` to the client that queued the prompt, tagged with the prompt's id (a client that queued
    several prompts, or a script reading the websocket, tells their messages apart by it). No-op without a
    server (library use)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    srv = getattr(PromptServer, "instance", None)
    if srv is None:
        return
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:  # a ComfyUI without the execution context: the message goes untagged
        context = None
    else:
        context = get_executing_context()
    if context is not None and "prompt_id" not in data:
        data = {**data, "prompt_id": context.prompt_id}
    srv.send_sync(event, data, getattr(srv, "client_id", None))
