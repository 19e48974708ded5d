"""Attention calls handed to Sage before their rotary embedding: Flux-family blocks and Wan's self-attention.

ComfyUI rotates Q and K in eager PyTorch right before the attention hook: Flux's layers (and Chroma's,
HunyuanVideo's and Hunyuan3D's, which reuse them) call `attention(q, k, v, pe, mask, transformer_options)` from
comfy/ldm/flux/math.py, which rotates them (a cast to FP32, two products, a sum and a cast back per tensor: 10
kernels and about 1 GB of memory traffic per call at Flux.1's 1024 px shape); Wan's self-attention rotates them with
`apply_rope1` inside its own `forward`. Where the Sage override of the model serves the call, the hand-off gives it
Q, K and the table instead, and the quantization rotates them in the pass that reads them anyway
(kernels/rotary.py). Every other call (no Sage override on top, no table, a compiling graph) runs ComfyUI's own
code, untouched, and so does every call the override sends to exact attention.

Installed when a Sage node patches a model, once, and only over ComfyUI's own code: Flux's `attention` where a
caller module still holds ComfyUI's function (another extension's replacement is left alone) with the parameters
this hand-off knows; Wan's `WanSelfAttention.forward` where its source is the one this hand-off restates (its
projections, then ComfyUI's rotation and attention call on the exact paths), so that a ComfyUI that changed it keeps
its own. SAGE_ATTENTION_ROTARY_HANDOFF=0 in the environment keeps the hand-off out.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import logging
import os
import sys
import textwrap

import torch

from .override import OVERRIDE_KEY

log = logging.getLogger("sage_attention_pack")
SWITCH = "SAGE_ATTENTION_ROTARY_HANDOFF"
FLUX_SOURCE = "comfy.ldm.flux.math"
FLUX_CALLERS = ("comfy.ldm.flux.layers", "comfy.ldm.chroma.layers")  # modules calling FLUX_SOURCE's attention by name
FLUX_PARAMETERS = ["q", "k", "v", "pe", "mask", "transformer_options"]
WAN_MODULE = "comfy.ldm.wan.model"
# SHA-256 of the dedented source of ComfyUI's WanSelfAttention.forward that wan_hand_off restates
WAN_FORWARD_SHA256 = "820985e6e19d88d577444779291a734ceadd77685f006273e050b89fda37c08c"


def takes_rotary(transformer_options) -> bool:
    """Whether the call's attention override takes calls before their rotation (the Sage override, or the compare
    node's timer above one), outside a compiling graph."""
    override = transformer_options.get(OVERRIDE_KEY) if transformer_options else None
    return bool(getattr(override, "takes_rotary", False)) and not torch.compiler.is_compiling()


def flux_hand_off(attention_fn):
    """`attention_fn` (ComfyUI's Flux attention) with the rotation given to the override where it takes it."""

    @functools.wraps(attention_fn)
    def attention(q, k, v, pe, mask=None, transformer_options={}):  # noqa: B006 - ComfyUI's own signature
        if pe is None or not takes_rotary(transformer_options):
            return attention_fn(q, k, v, pe, mask=mask, transformer_options=transformer_options)
        return transformer_options[OVERRIDE_KEY].attend_rotary(
            (q, k, v, q.shape[1]), {"mask": mask, "skip_reshape": True, "transformer_options": transformer_options},
            pe, lambda options: attention_fn(q, k, v, pe, mask=mask, transformer_options=options))

    attention.sage_original = attention_fn
    return attention


def wan_hand_off(forward_fn, module):
    """`forward_fn` (ComfyUI's WanSelfAttention.forward) with the rotation given to the override where it takes it.
    The projections are ComfyUI's; on the exact paths the rest is too: `module`'s apply_rope1 and
    optimized_attention, looked up at the call as ComfyUI's forward looks them up."""

    @functools.wraps(forward_fn)
    def forward(self, x, freqs, transformer_options={}):  # noqa: B006 - ComfyUI's own signature
        if freqs is None or not takes_rotary(transformer_options):
            return forward_fn(self, x, freqs, transformer_options=transformer_options)
        b, s, n, d = *x.shape[:2], self.num_heads, self.head_dim
        q = self.norm_q(self.q(x)).view(b, s, n * d)
        k = self.norm_k(self.k(x)).view(b, s, n * d)
        v = self.v(x).view(b, s, n * d)

        def exact_with(options):
            rotate = module.apply_rope1
            return module.optimized_attention(rotate(q.view(b, s, n, d), freqs).view(b, s, n * d),
                                              rotate(k.view(b, s, n, d), freqs).view(b, s, n * d), v,
                                              heads=n, transformer_options=options)

        # Wan's table is [B, N, 1, D/2, 2, 2] (tokens before heads): the hand-off takes [B, H, N, ...]
        out = transformer_options[OVERRIDE_KEY].attend_rotary(
            (q, k, v, n), {"transformer_options": transformer_options}, freqs.transpose(1, 2), exact_with)
        return self.o(out)

    forward.sage_original = forward_fn
    return forward


def source_digest(fn) -> str:
    return hashlib.sha256(textwrap.dedent(inspect.getsource(fn)).encode()).hexdigest()


# Each node run installs the hand-off again (a no-op once it is in): ComfyUI's functions are checked, and a refusal
# said, once per function rather than once per run.
@functools.lru_cache(maxsize=None)
def known_flux_attention(fn) -> bool:
    """Whether `fn` (FLUX_SOURCE's attention) has the parameters the hand-off passes on."""
    parameters = list(inspect.signature(fn).parameters)
    if parameters != FLUX_PARAMETERS:
        log.info("Sage Attention: %s.attention has parameters %s; its rotary embedding stays in ComfyUI", FLUX_SOURCE,
                 parameters)
    return parameters == FLUX_PARAMETERS


@functools.lru_cache(maxsize=None)
def known_wan_forward(fn) -> bool:
    """Whether `fn` is the WanSelfAttention.forward whose source wan_hand_off restates (WAN_FORWARD_SHA256)."""
    try:
        known = source_digest(fn) == WAN_FORWARD_SHA256
    except (OSError, TypeError):  # no source to compare: leave ComfyUI's method alone
        known = False
    if not known:
        log.info("Sage Attention: this ComfyUI's WanSelfAttention.forward is not the one the rotary hand-off knows; "
                 "Wan's rotary embedding stays in ComfyUI")
    return known


def install_flux() -> list[str]:
    try:
        source = importlib.import_module(FLUX_SOURCE)
    except Exception:  # noqa: BLE001 - a ComfyUI without Flux: nothing to hand off
        return []
    original = source.attention
    if not known_flux_attention(original):
        return []
    wrapped, installed = None, []
    for name in FLUX_CALLERS:
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - an older ComfyUI without this model family
            continue
        current = getattr(module, "attention", None)
        if getattr(current, "sage_original", None) is original:
            installed.append(name)
        elif current is original:
            wrapped = wrapped or flux_hand_off(original)
            module.attention = wrapped
            installed.append(name)
    return installed


def install_wan() -> list[str]:
    try:
        module = importlib.import_module(WAN_MODULE)
        cls = module.WanSelfAttention
    except Exception:  # noqa: BLE001 - a ComfyUI without Wan
        return []
    current = cls.__dict__.get("forward")
    if getattr(current, "sage_original", None) is not None:
        return [f"{WAN_MODULE}.WanSelfAttention"]
    if not known_wan_forward(current):
        return []
    cls.forward = wan_hand_off(current, module)
    return [f"{WAN_MODULE}.WanSelfAttention"]


def install() -> list[str]:
    """Put the hand-off over ComfyUI's own code where it is still in place; returns where it now is (idempotent: a
    second call changes nothing); nowhere where the environment switches it off (SWITCH=0)."""
    if os.environ.get(SWITCH, "1").strip() in ("0", ""):
        return []
    return install_flux() + install_wan()


def uninstall() -> None:
    """Give ComfyUI its own code back."""
    for name in FLUX_CALLERS:
        current = getattr(sys.modules.get(name), "attention", None)
        if getattr(current, "sage_original", None) is not None:
            sys.modules[name].attention = current.sage_original
    cls = getattr(sys.modules.get(WAN_MODULE), "WanSelfAttention", None)
    current = cls.__dict__.get("forward") if cls is not None else None
    if getattr(current, "sage_original", None) is not None:
        cls.forward = current.sage_original
