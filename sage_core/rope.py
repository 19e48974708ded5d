"""Rotary position embedding as ComfyUI's Flux layers apply it (comfy/ldm/flux/math.py), for the calls that hand
their rotary table to the attention instead of rotating Q and K themselves.

The table is pe [Bp, Hp, N, D/2, 2, 2] in FP32: channel pair i of token n becomes out[2i + j] = pe[n, i, j, 0] ·
x[2i] + pe[n, i, j, 1] · x[2i + 1]. The kernels rotate inside their quantization (kernels/rotary.py); exact
attention gets Q and K rotated here first, with ComfyUI's own arithmetic, so that a call served exactly gives the
bits it gives unpatched. A table may also come in the kernels' own layout ([Bp, Hp, N, 2, D], row 0 each
channel's own coefficient, row 1 its pair partner's: kernels/launch.rope_table), made so where a model's rotation
is a per-head cos and sin (kernel_table_from_cos_sin).
"""
from __future__ import annotations

import functools
import math
import threading
import weakref

import torch


def rotate(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """x [B, H, N, D] rotated by pe, computed in pe's dtype and returned in x's (as ComfyUI does); a table in the
    kernels' layout: each channel times its own coefficient plus its partner times the partner's, in pe's dtype."""
    if pe.dim() == 5:
        xf = x.to(dtype=pe.dtype)
        partner = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
        return (pe[..., 0, :] * xf + pe[..., 1, :] * partner).type_as(x)
    pairs = x.to(dtype=pe.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    return (pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]).reshape(*x.shape).type_as(x)


def from_cos_sin(cos: torch.Tensor, sin: torch.Tensor, heads: int) -> torch.Tensor:
    """The table of a rotation given as per-channel cos and sin [B, N, H·D] over interleaved pairs (LTX-Video's
    freqs_cis: out[2i] = x[2i]·cos[2i] − x[2i+1]·sin[2i], out[2i+1] = x[2i+1]·cos[2i+1] + x[2i]·sin[2i+1]), each
    head its own slice of channels: [B, H, N, D/2, 2, 2], one copy in the coefficients' dtype. rotate() with it
    gives that rotation's bits (the same two products, then their sum)."""
    b, n, inner = cos.shape
    c, s = (t.view(b, n, heads, inner // heads // 2, 2) for t in (cos, sin))
    table = torch.stack((c[..., 0], -s[..., 0], s[..., 1], c[..., 1]), dim=-1)
    return table.unflatten(-1, (2, 2)).transpose(1, 2)


def kernel_table(pe: torch.Tensor) -> torch.Tensor:
    """pe ([Bp, Hp, N, D/2, 2, 2], any strides and floating dtype) in the kernels' layout: kernels/launch.rope_table's
    one FP32 copy, the one the kernels would make of pe on the call."""
    from ..kernels import launch

    return launch.rope_table(pe)


@functools.lru_cache(maxsize=16)
def partner_signs(head_dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[D]: −1 at even channels, +1 at odd ones. Channel 2i's partner x[2i+1] enters with −sin[2i], channel 2i+1's
    partner x[2i] with +sin[2i+1] (from_cos_sin's rotation)."""
    return (torch.arange(head_dim, device=device) % 2 * 2 - 1).to(dtype)


def kernel_table_from_cos_sin(cos: torch.Tensor, sin: torch.Tensor, heads: int) -> torch.Tensor:
    """from_cos_sin's table straight in the kernels' layout: [B, H, N, 2, D] in cos's dtype (a view of one [B, N, H,
    2, D] buffer), row 0 cos, row 1 ±sin; made in two writes, without from_cos_sin's copy and rope_table's stack and
    FP32 copy, for models whose table has a head each (LTX-Video: made on every self-attention call). The kernels
    widen a 16-bit table's values exactly (the same products as with from_cos_sin's), and rotate() with it computes
    in its dtype: from LTX-Video's BF16 cos and sin, its apply_rotary_emb's bits."""
    b, n, inner = cos.shape
    d = inner // heads
    table = torch.empty((b, n, heads, 2, d), device=cos.device, dtype=cos.dtype)
    table[:, :, :, 0].copy_(cos.view(b, n, heads, d))
    torch.mul(sin.view(b, n, heads, d), partner_signs(d, cos.device, cos.dtype), out=table[:, :, :, 1])
    return table.transpose(1, 2)


KERNEL_TABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the kernels load a table in


def validate(rope, q: torch.Tensor, k: torch.Tensor) -> None:
    """Raise a clear error naming `rope` for a table that does not fit q and k ([B, H, N, D] views)."""
    if not isinstance(rope, torch.Tensor):
        raise TypeError(f"rope must be a torch.Tensor, got {type(rope).__name__}")
    B, H, NQ, D = q.shape
    HK, NK = k.shape[1], k.shape[2]
    expected = f"[1 or {B}, 1 or {H}, {NQ}, {D // 2}, 2, 2]"
    fits = (rope.dim() == 6 and tuple(rope.shape[-3:]) == (D // 2, 2, 2)) or \
        (rope.dim() == 5 and tuple(rope.shape[-2:]) == (2, D))  # the kernels' layout
    if not fits or rope.shape[2] != NQ or D % 2:
        raise ValueError(f"rope must be a rotary table of shape {expected} (pe of ComfyUI's Flux layers) or "
                         f"[1 or {B}, 1 or {H}, {NQ}, 2, {D}] (the kernels' layout) for an even head dim, got "
                         f"{tuple(rope.shape)} with head dim {D}")
    if rope.shape[0] not in (1, B) or rope.shape[1] not in (1, H):
        raise ValueError(f"rope of shape {tuple(rope.shape)} does not broadcast over batch {B} and heads {H}")
    if NQ != NK:
        raise ValueError(f"rope needs as many keys as queries (one table rotates both), got {NQ} and {NK}")
    if rope.shape[1] > 1 and H != HK:
        raise ValueError(f"rope with a table per head needs as many k/v heads as q heads, got {H} and {HK}")
    if not rope.is_floating_point():
        raise TypeError(f"rope must be a floating-point table, got {rope.dtype}")
    if rope.dim() == 5 and (rope.dtype not in KERNEL_TABLE_DTYPES or rope.stride()[3:] != (D, 1)):
        raise ValueError(f"rope in the kernels' layout must be FP32, FP16 or BF16 with its last two axes contiguous, "
                         f"got {rope.dtype} with strides {tuple(rope.stride())}")
    if rope.device != q.device:
        raise ValueError(f"rope is on {rope.device}, q on {q.device}")


def axis_table(pos: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """ComfyUI's flux/math.rope: the [B, N, dim/2, 2, 2] rotations of positions pos [B, N] along one axis."""
    scale = torch.linspace(0, (dim - 2) / dim, steps=dim // 2, dtype=torch.float64, device=pos.device)
    angle = torch.einsum("...n,d->...nd", pos.to(torch.float64), 1.0 / theta ** scale)
    out = torch.stack([torch.cos(angle), -torch.sin(angle), torch.sin(angle), torch.cos(angle)], dim=-1)
    return out.reshape(*out.shape[:-1], 2, 2).float()


def position_table(ids: torch.Tensor, axes_dim, theta: float = 10000.0) -> torch.Tensor:
    """ComfyUI's EmbedND: the [B, 1, N, D/2, 2, 2] table of position ids [B, N, axes], each axis rotating its own
    axes_dim[i] channels."""
    return torch.cat([axis_table(ids[..., i], d, theta) for i, d in enumerate(axes_dim)], dim=-3).unsqueeze(1)


def grid_ids(frames: int, height: int, width: int) -> torch.Tensor:
    """Position ids (frame, row, column) of a frames x height x width grid of patches, frame-major: [N, 3]."""
    t, r, c = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([t, r, c], dim=-1).reshape(-1, 3)


def flux_table(text_tokens: int, height: int, width: int, axes_dim=(16, 56, 56), theta: float = 10000.0,
               device="cpu") -> torch.Tensor:
    """The table Flux.1 hands its attention for text_tokens text tokens (ids 0) followed by a height x width grid
    of image patches (ids (0, row, column)): [1, 1, N, 64, 2, 2] at the model's head dim 128. For benchmarks and
    tests that need the real table without ComfyUI."""
    image = grid_ids(1, height, width)
    ids = torch.cat([torch.zeros(text_tokens, 3, dtype=image.dtype), image])[None].to(device)
    return position_table(ids, axes_dim, theta)


def wan_table(frames: int, height: int, width: int, head_dim: int = 128, theta: float = 10000.0,
              device="cpu") -> torch.Tensor:
    """The table Wan2.1 rotates its self-attention by (WanModel.rope_encode) for a frames x height x width grid of
    patches, in [1, 1, N, D/2, 2, 2] order (Wan's own is [1, N, 1, ...]): its axes take D - 4·(D/6), 2·(D/6) and
    2·(D/6) channels."""
    sixth = head_dim // 6
    return position_table(grid_ids(frames, height, width)[None].to(device),
                          (head_dim - 4 * sixth, 2 * sixth, 2 * sixth), theta)


def qwen_image_table(text_tokens: int, height: int, width: int, axes_dim=(16, 56, 56), theta: float = 10000.0,
                     dtype=torch.bfloat16, device="cpu") -> torch.Tensor:
    """The table Qwen-Image hands its joint attention (QwenImageTransformer2DModel) for text_tokens text tokens
    followed by a height x width grid of image patches, in [1, 1, N, D/2, 2, 2] order (its own is [1, N, 1, ...])
    and the model's dtype: image ids (0, row, column) centred on the grid, text ids counting up on all three axes
    from max(height, width) // 2."""
    rows, cols = torch.meshgrid(torch.arange(height) - height // 2, torch.arange(width) - width // 2, indexing="ij")
    image = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    start = max(height, width) // 2
    text = torch.arange(start, start + text_tokens)[:, None].expand(-1, 3)
    ids = torch.cat([text, image])[None].to(device)
    return position_table(ids, axes_dim, theta).to(dtype)


def lumina2_table(caption_tokens: int, height: int, width: int, axes_dim=(32, 32, 32), theta: float = 10000.0,
                  dtype=torch.bfloat16, device="cpu") -> torch.Tensor:
    """The table Lumina 2 (NextDiT) hands its main layers' attention for caption_tokens caption tokens followed by
    a height x width grid of image patches, in [1, 1, N, D/2, 2, 2] order (its own is [1, N, 1, ...]) and the
    model's dtype: caption ids (i, 0, 0), image ids (caption_tokens, row, column)."""
    caption = torch.zeros(caption_tokens, 3, dtype=torch.long)
    caption[:, 0] = torch.arange(caption_tokens)
    image = grid_ids(1, height, width)
    image[:, 0] = caption_tokens
    return position_table(torch.cat([caption, image])[None].to(device), axes_dim, theta).to(dtype)


def hidream_table(text_tokens: int, height: int, width: int, axes_dim=(64, 32, 32), theta: float = 10000.0,
                  device="cpu") -> torch.Tensor:
    """The table HiDream-I1 (HiDreamImageTransformer2DModel, as ComfyUI detects it) hands its attention for a height x
    width grid of image patches (ids (0, row, column)) followed by text_tokens text tokens (ids 0): [1, 1, N, D/2,
    2, 2] in FP32 (its own is [1, N, 1, ...])."""
    image = grid_ids(1, height, width)
    ids = torch.cat([image, torch.zeros(text_tokens, 3, dtype=image.dtype)])[None].to(device)
    return position_table(ids, axes_dim, theta)


def ltxv_cos_sin(frames: int, height: int, width: int, inner_dim: int, frame_rate: float = 25.0,
                 scale_factors=(8, 32, 32), theta: float = 10000.0, max_pos=(20, 2048, 2048), dtype=torch.bfloat16,
                 device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The cos and sin [1, N, inner_dim] LTX-Video (LTXVModel, patch size 1) hands its self-attention for a frames x
    height x width latent: each token's latent (frame, row, column) scaled to pixels by the VAE's factors, the frame
    axis to seconds, all three to fractions of max_pos; inner_dim // 6 frequencies per axis, each for a channel pair,
    the inner_dim % 6 first channels unrotated (ComfyUI's precompute_freqs_cis). from_cos_sin makes the table."""
    pixels = grid_ids(frames, height, width).T[None].to(device) * torch.tensor(scale_factors, device=device)[:, None]
    pixels = pixels.to(torch.float32)
    pixels[:, 0] = pixels[:, 0] * (1.0 / frame_rate)
    fractional = torch.stack([pixels[:, i] / max_pos[i] for i in range(3)], dim=-1)
    steps = theta ** torch.linspace(math.log(1, theta), math.log(theta, theta), inner_dim // 6, device=device,
                                    dtype=torch.float32)
    freqs = (steps * math.pi / 2 * (fractional.unsqueeze(-1) * 2 - 1)).transpose(-1, -2).flatten(2)
    cos, sin = freqs.cos().repeat_interleave(2, dim=-1), freqs.sin().repeat_interleave(2, dim=-1)
    if inner_dim % 6:
        cos = torch.cat([torch.ones_like(cos[:, :, :inner_dim % 6]), cos], dim=-1)
        sin = torch.cat([torch.zeros_like(sin[:, :, :inner_dim % 6]), sin], dim=-1)
    return cos.to(dtype), sin.to(dtype)


def source_signature(t: torch.Tensor) -> tuple:
    """What a kept table's source must still show to be the same values: its storage, layout and, outside inference
    mode, its version counter (an in-place change bumps it; inference tensors have none)."""
    return (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device, None if t.is_inference() else t._version)


class HandedTables:
    """The kernels' table of the last rotary source a model's forward handed over, kept for the calls after it.

    A model makes its rotary table once per forward and hands the same tensor to every block (Flux's pe, Wan's
    freqs, LTX-Video's cos and sin): its kernels' layout (launch.rope_table's copy, or kernel_table_from_cos_sin) is
    made once per forward instead of once per call (host work and a pass over the table each). A hit needs the very
    same tensor objects (held by weak reference: a new forward's table is a new object, even at a freed one's
    address) with the same source_signature, and the same `extra` (what else the table was made with). Inference
    tensors carry no version counter, so an in-place change of one would not be seen: only the hand-offs use this
    (nodes/rotary_handoff.py), whose sources ComfyUI's forwards make and never change. One entry: a forward's blocks
    share one source; clear() drops it (at the end of a sampling run, with the call plans' buffers)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.entry = None
        self.made = 0  # tables made (each miss), for the tests

    def get(self, sources: tuple, make, extra=()) -> torch.Tensor:
        signature = (tuple(source_signature(t) for t in sources), extra)
        with self.lock:
            entry = self.entry
        if entry is not None:
            refs, kept_signature, table = entry
            if kept_signature == signature and all(ref() is t for ref, t in zip(refs, sources)):
                return table
        table = make()
        with self.lock:
            self.entry = (tuple(weakref.ref(t) for t in sources), signature, table)
            self.made += 1
        return table

    def clear(self) -> None:
        with self.lock:
            self.entry = None


HANDED_TABLES = HandedTables()


def handed_table(sources: tuple, make, extra=()):
    """What a hand-off gives Sage for a call's table: a function of no arguments returning the kernels' layout of a
    model's rotary `sources` (made by `make`), through HANDED_TABLES, so that it is made only where Sage runs the
    call and once per forward, not per call (the blocks of a forward share their model's table)."""
    return lambda: HANDED_TABLES.get(sources, make, extra)


def handed_pe(pe: torch.Tensor, tokens_first: bool = False):
    """handed_table of a table in pe's format: [B, H, N, D/2, 2, 2], or with tokens_first [B, N, H, ...] (as Wan,
    Qwen-Image and Lumina 2 hand theirs), kept by that tensor itself."""
    return handed_table((pe,), lambda: kernel_table(pe.transpose(1, 2) if tokens_first else pe))
