"""ComfyUI's attention call convention, translated to and from the [B, H, N, D] tensors sage_core takes.

ComfyUI calls `func(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
skip_output_reshape=False, **kwargs)` (comfy/ldm/modules/attention.py). skip_reshape=False means
[B, N, H*D] inputs, True means [B, H, N, D]; skip_output_reshape=True asks for [B, H, N, D] back,
otherwise [B, N, H*D].

Newer ComfyUI releases pass more keywords, which every one of its own attention functions honours, so a call
served here must too: `scale` (the softmax scale, default 1/sqrt(D)), `enable_gqa` (K and V with fewer heads than
Q, each serving a group of Q heads; in [B, N, HK*D] their head count follows from the head dim) and
`low_precision_attention=False` (a model's call that must not run in 8 bits: ComfyUI's own Sage path then runs
PyTorch's attention). Any other keyword (e.g. the wrapper's `_inside_attn_wrapper`) passes through untouched.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_PARAMS = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape")


@dataclass
class AttentionCall:
    q: torch.Tensor  # views in the layout below, no copies
    k: torch.Tensor
    v: torch.Tensor
    layout: str  # "NHD" or "HND"
    mask: torch.Tensor | None
    skip_output_reshape: bool
    transformer_options: dict
    scale: float | None = None  # the softmax scale ComfyUI asks for; None: 1/sqrt(D)
    low_precision: bool = True  # False: the model asks for this call in full precision

    @property
    def is_self_attention(self) -> bool:
        n = 1 if self.layout == "NHD" else 2
        return self.q.shape[n] == self.k.shape[n]

    def describe(self) -> str:
        b, n, h, d = self.q.shape if self.layout == "NHD" else self.q.transpose(1, 2).shape
        nk = self.k.shape[1] if self.layout == "NHD" else self.k.shape[2]
        return f"B{b} H{h} Nq{n} Nk{nk} D{d}"

    def finish(self, out: torch.Tensor) -> torch.Tensor:
        """Shape an output in `layout` the way ComfyUI's caller expects it."""
        if self.layout == "NHD":
            if self.skip_output_reshape:
                return out.transpose(1, 2)
            return out.reshape(out.shape[0], out.shape[1], -1)
        if self.skip_output_reshape:
            return out
        return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


def bind(args: tuple, kwargs: dict) -> dict:
    """ComfyUI's positional/keyword attention arguments as one dict (unknown keywords kept)."""
    bound = dict(zip(_PARAMS, args))
    bound.update(kwargs)
    return bound


def parse(args: tuple, kwargs: dict) -> AttentionCall:
    a = bind(args, kwargs)
    q, k, v, heads = a["q"], a["k"], a["v"], a["heads"]
    mask = a.get("mask")
    if a.get("skip_reshape", False):
        layout = "HND"
    else:
        layout = "NHD"
        # exactly as ComfyUI's own attention functions view them (k and v may arrive as [B, N, H, D]); with
        # enable_gqa, K's and V's heads are their width over the head dim (ComfyUI's _heads_from_dim)
        b, d = q.shape[0], q.shape[-1] // heads
        q = q.view(b, -1, heads, d)
        k_heads, v_heads = (kv_heads(k, d), kv_heads(v, d)) if a.get("enable_gqa") else (heads, heads)
        k, v = k.view(b, -1, k_heads, d), v.view(b, -1, v_heads, d)
    if mask is not None:
        if mask.ndim == 2:  # as ComfyUI's own sage/pytorch paths do: add batch, then heads
            mask = mask.unsqueeze(0)
        if mask.ndim == 3:
            mask = mask.unsqueeze(1)
    return AttentionCall(q, k, v, layout, mask, bool(a.get("skip_output_reshape", False)),
                         a.get("transformer_options") or {}, scale=a.get("scale"),
                         low_precision=a.get("low_precision_attention", True) is not False)


def kv_heads(t: torch.Tensor, head_dim: int) -> int:
    """The heads of a [B, N, HK*D] K or V of a grouped-query call."""
    if t.shape[-1] % head_dim:
        raise ValueError(f"a grouped-query K/V of width {t.shape[-1]} is not a whole number of heads of {head_dim}")
    return t.shape[-1] // head_dim
