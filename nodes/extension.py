"""The ComfyExtension that lists the pack's nodes, and the one startup line."""
from __future__ import annotations

import logging

from comfy_api.latest import ComfyExtension, io

from . import compare, patch, probe

log = logging.getLogger("sage_attention_pack")


def node_classes() -> list[type[io.ComfyNode]]:
    nodes = [patch.SageAttention, compare.SageAttentionCompare, probe.SageAttentionProbe]
    return nodes


class SageAttentionExtension(ComfyExtension):
    async def on_load(self) -> None:
        from .. import __version__
        from ..sage_core.selfcheck import describe

        info = describe()
        log.info("Sage Attention Pack %s: device %s, triton %s; %s", __version__, info["device"], info["triton"],
                 info["serving"])

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return node_classes()
