"""Headless batch rendering for ComfyUI workflows (`sage-batch`).

A plain HTTP/websocket client of ComfyUI servers: it never imports ComfyUI or torch, so it runs on any machine
that can reach the servers. See docs/batch.md.
"""

from .errors import BatchError, JobError, ServerError

__all__ = ["BatchError", "JobError", "ServerError", "main"]


def main(argv=None) -> int:
    from .cli import main as _main

    return _main(argv)
