"""ComfyUI's attention call convention, translated to and from the [B, H, N, D] tensors sage_core takes.

ComfyUI calls `func(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
skip_output_reshape=False, **kwargs)` (comfy/ldm/modules/attention.py). skip_reshape=False means
[B, N, H*D] inputs, True means [B, H, N, D]; skip_output_reshape=True asks for [B, H, N, D] back,
otherwise [B, N, H*D].
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
        # exactly as ComfyUI's own attention functions view them (k and v may arrive as [B, N, H, D])
        b, d = q.shape[0], q.shape[-1] // heads
        q, k, v = (t.view(b, -1, heads, d) for t in (q, k, v))
    if mask is not None:
        if mask.ndim == 2:  # as ComfyUI's own sage/pytorch paths do: add batch, then heads
            mask = mask.unsqueeze(0)
        if mask.ndim == 3:
            mask = mask.unsqueeze(1)
    return AttentionCall(q, k, v, layout, mask, bool(a.get("skip_output_reshape", False)),
                         a.get("transformer_options") or {})
