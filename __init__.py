"""Sage Attention Pack: ComfyUI entry point.

ComfyUI loads this folder as a package and calls `comfy_entrypoint`. Nothing here imports ComfyUI or
compiles a kernel at import time, so the package is also usable (and importable) outside ComfyUI.
"""

__version__ = "0.1.0"

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes.extension import SageAttentionExtension

    return SageAttentionExtension()
