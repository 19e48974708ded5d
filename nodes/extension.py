"""The ComfyExtension that lists the pack's nodes, and the one startup line."""
from __future__ import annotations

import logging

from comfy_api.latest import ComfyExtension, io

from . import compare, patch, probe

log = logging.getLogger("sage_attention_pack")


def node_classes() -> list[type[io.ComfyNode]]:
    nodes = [patch.SageAttention, compare.SageAttentionCompare, probe.SageAttentionProbe]
    return nodes


def log_startup_line() -> None:
    """One line at startup: version, GPU, Triton, which kernels will serve (or why none)."""
    from .. import __version__
    from ..sage_core.selfcheck import describe

    info = describe()
    log.info("Sage Attention Pack %s: device %s, triton %s; serving: %s", __version__, info["device"],
             info["triton"], info["serving"])


class SageAttentionExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        # ComfyUI 0.3.x asks for the node list once at startup (it does not call on_load)
        log_startup_line()
        return node_classes()
