"""Flux-family attention calls handed to Sage before their rotary embedding.

ComfyUI's Flux layers (and Chroma's, which reuse them) call `attention(q, k, v, pe, mask, transformer_options)`
from comfy/ldm/flux/math.py, which rotates Q and K in eager PyTorch (a cast to FP32, two products, a sum and a cast
back per tensor: 10 kernels and about 1 GB of memory traffic per call at Flux.1's 1024 px shape) and only then
reaches the attention hook. Where the Sage override of the model serves the call, the hand-off gives it Q, K and the
table instead, and the quantization rotates them in the pass that reads them anyway (kernels/rotary.py). Every
other call (no Sage override on top, no table, a compiling graph) runs ComfyUI's own function, untouched.

Installed when a Sage node patches a model, once, into the modules whose `attention` is still ComfyUI's own: a
replacement made by another extension is left alone, and so is a function whose parameters are not the ones this
hand-off knows. SAGE_ATTENTION_ROTARY_HANDOFF=0 in the environment keeps it out (ComfyUI then rotates as always).
"""
from __future__ import annotations

import importlib
import inspect
import logging
import os
import sys

import torch

from .override import OVERRIDE_KEY

log = logging.getLogger("sage_attention_pack")
SOURCE = "comfy.ldm.flux.math"
CALLERS = ("comfy.ldm.flux.layers", "comfy.ldm.chroma.layers")  # modules that call SOURCE's attention by name
PARAMETERS = ["q", "k", "v", "pe", "mask", "transformer_options"]
SWITCH = "SAGE_ATTENTION_ROTARY_HANDOFF"


def hand_off(attention_fn):
    """`attention_fn` (ComfyUI's Flux attention) with the rotation given to the override of the call's model where
    that override takes it (`takes_rotary`: the Sage override, or the compare node's timer above one)."""

    def attention(q, k, v, pe, mask=None, transformer_options={}):  # noqa: B006 - ComfyUI's own signature
        override = transformer_options.get(OVERRIDE_KEY) if transformer_options else None
        if pe is None or not getattr(override, "takes_rotary", False) or torch.compiler.is_compiling():
            return attention_fn(q, k, v, pe, mask=mask, transformer_options=transformer_options)
        return override.attend_rotary(attention_fn, q, k, v, pe, mask, transformer_options)

    attention.sage_original = attention_fn
    attention.__doc__ = attention_fn.__doc__
    attention.__name__ = attention_fn.__name__
    return attention


def install() -> list[str]:
    """Put the hand-off into every caller module still using ComfyUI's own attention; returns the modules that have
    it (idempotent: a second call changes nothing); none where the environment switches it off (SWITCH=0)."""
    if os.environ.get(SWITCH, "1").strip() in ("0", ""):
        return []
    try:
        source = importlib.import_module(SOURCE)
    except Exception:  # noqa: BLE001 - a ComfyUI without Flux: nothing to hand off
        return []
    original = source.attention
    if list(inspect.signature(original).parameters) != PARAMETERS:
        log.info("Sage Attention: %s.attention has parameters %s; its rotary embedding stays in ComfyUI", SOURCE,
                 list(inspect.signature(original).parameters))
        return []
    wrapped = None
    installed = []
    for name in CALLERS:
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - an older ComfyUI without this model family
            continue
        current = getattr(module, "attention", None)
        if getattr(current, "sage_original", None) is original:
            installed.append(name)
        elif current is original:
            wrapped = wrapped or hand_off(original)
            module.attention = wrapped
            installed.append(name)
    return installed


def uninstall() -> None:
    """Give every caller module ComfyUI's own function back."""
    for name in CALLERS:
        current = getattr(sys.modules.get(name), "attention", None)
        if getattr(current, "sage_original", None) is not None:
            sys.modules[name].attention = current.sage_original
