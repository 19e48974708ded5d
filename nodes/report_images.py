"""Images the compare and probe nodes return: labelled side-by-side, amplified difference heat map, probe plot.

Everything takes and returns ComfyUI IMAGE tensors (``[frames, H, W, 3]``, float32 in ``[0, 1]``) and draws
with PIL only, so nothing here needs a plotting library.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (24, 24, 27)
FOREGROUND = (235, 235, 240)
MUTED = (150, 150, 160)
GRID = (60, 60, 68)
SELF_COLOR = (86, 156, 255)
CROSS_COLOR = (255, 159, 64)
WORST_COLOR = (255, 80, 80)
EXACT_COLOR = (170, 170, 180)

# Heat map colours from 0 (black: no difference) to 1 (white: the amplified difference saturates).
HEAT_STOPS = (
    (0.00, (0, 0, 0)),
    (0.20, (60, 10, 110)),
    (0.45, (190, 40, 80)),
    (0.70, (250, 130, 20)),
    (0.90, (250, 230, 80)),
    (1.00, (255, 255, 255)),
)


def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=max(8, int(size)))
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _rgb_frames(images: torch.Tensor) -> torch.Tensor:
    if images.ndim == 3:
        images = images.unsqueeze(0)
    images = images.detach().to("cpu", torch.float32)
    c = images.shape[-1]
    if c == 1:
        images = images.expand(-1, -1, -1, 3)
    elif c >= 3:
        images = images[..., :3]
    else:
        raise ValueError(f"cannot show an image with {c} channels")
    return images.clamp(0.0, 1.0)


def _pil_to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)


def _fit_text(draw: ImageDraw.ImageDraw, text: str, fnt, max_width: int) -> str:
    if draw.textlength(text, font=fnt) <= max_width:
        return text
    while len(text) > 1 and draw.textlength(text + "…", font=fnt) > max_width:
        text = text[:-1]
    return text + "…"


def label_bar(width: int, labels: Sequence[str], column_width: int, gap: int,
              height: int | None = None) -> torch.Tensor:
    """A dark bar with each label centred over its column: ``[bar_height, width, 3]``."""
    size = max(10, min(28, column_width // 18))
    fnt = font(size)
    height = height or int(size * 1.9)
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for i, text in enumerate(labels):
        x0 = i * (column_width + gap)
        text = _fit_text(draw, text, fnt, column_width - 6)
        tw = draw.textlength(text, font=fnt)
        draw.text((x0 + (column_width - tw) / 2, (height - size) / 2 - 1), text, font=fnt, fill=FOREGROUND)
    return _pil_to_tensor(img)


def side_by_side(left: torch.Tensor, right: torch.Tensor, left_label: str, right_label: str,
                 gap: int = 4) -> torch.Tensor:
    """Both outputs next to each other, frame by frame, under a bar naming each: ``[frames, bar + H, 2W + gap, 3]``."""
    a, b = _rgb_frames(left), _rgb_frames(right)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    frames, h, w, _ = a.shape
    sep = torch.full((frames, h, gap, 3), BACKGROUND[0] / 255.0)
    body = torch.cat([a, sep, b], dim=2)
    bar = label_bar(2 * w + gap, [left_label, right_label], w, gap)
    return torch.cat([bar.unsqueeze(0).expand(frames, -1, -1, -1), body], dim=1).contiguous()


def _colormap(v: torch.Tensor) -> torch.Tensor:
    """Map values in [0, 1] to RGB with HEAT_STOPS (0 maps to exactly black)."""
    pos = torch.tensor([p for p, _ in HEAT_STOPS], dtype=torch.float32)
    col = torch.tensor([c for _, c in HEAT_STOPS], dtype=torch.float32) / 255.0
    v = v.clamp(0.0, 1.0)
    idx = torch.bucketize(v, pos, right=True).clamp(1, len(HEAT_STOPS) - 1)
    lo, hi = pos[idx - 1], pos[idx]
    t = ((v - lo) / (hi - lo)).unsqueeze(-1)
    return col[idx - 1] * (1 - t) + col[idx] * t


def difference_magnitude(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-pixel largest absolute channel difference: ``[frames, H, W]``."""
    x, y = _rgb_frames(a), _rgb_frames(b)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    return (x - y).abs().amax(dim=-1)


def heat_map(a: torch.Tensor, b: torch.Tensor, gain: float = 10.0) -> tuple[torch.Tensor, float]:
    """Amplified difference heat map ``[frames, H, W, 3]`` and the gain used.

    The largest channel difference of each pixel is multiplied by ``gain``, clipped to 1, and coloured by its
    square root (so small differences stay visible) from black (equal) to white (a difference of ``1 / gain``
    or more). ``gain <= 0`` picks the gain that maps the largest difference to white. Identical inputs give an
    all-zero map.
    """
    d = difference_magnitude(a, b)
    peak = float(d.max()) if d.numel() else 0.0
    if gain <= 0:
        gain = 1.0 / peak if peak > 0 else 1.0
    if peak == 0.0:
        return torch.zeros(*d.shape, 3), float(gain)
    rgb = _colormap((d * gain).clamp(0.0, 1.0).sqrt())
    rgb[d == 0] = 0.0
    return rgb.contiguous(), float(gain)


# ---------------------------------------------------------------------------------------------------------------
# Probe plot


def _nice_max(v: float) -> float:
    if not math.isfinite(v) or v <= 0:
        return 1.0
    exp = math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if m * 10**exp >= v:
            return m * 10**exp
    return 10 ** (exp + 1)


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 0.01:
        return f"{v:.3g}"
    return f"{v:.1e}"


def _panel(draw, box, values, colors, title, fnt, small, y_label, markers: Iterable[int] = (), vmax=None):
    x0, y0, x1, y1 = box
    draw.text((x0, y0 - 44), title, font=fnt, fill=FOREGROUND)
    if vmax is None:
        vmax = max([v for v in values if math.isfinite(v)], default=0.0)
    vmax = _nice_max(vmax)
    for k in range(5):
        yy = y1 - (y1 - y0) * k / 4
        draw.line([(x0, yy), (x1, yy)], fill=GRID)
        label = _fmt(vmax * k / 4)
        draw.text((x0 - 6 - draw.textlength(label, font=small), yy - 6), label, font=small, fill=MUTED)
    draw.text((x0 - 6 - draw.textlength(y_label, font=small), y0 - 22), y_label, font=small, fill=MUTED)
    n = max(1, len(values))
    step = (x1 - x0) / n
    bw = max(1.0, step * 0.8)
    for i, v in enumerate(values):
        if not math.isfinite(v):
            v = vmax
        h = (y1 - y0) * min(1.0, max(0.0, v) / vmax)
        bx = x0 + i * step + (step - bw) / 2
        draw.rectangle([bx, y1 - h, bx + bw, y1], fill=colors[i])
    for i in markers:
        bx = x0 + i * step + step / 2
        draw.polygon([(bx - 4, y0 - 8), (bx + 4, y0 - 8), (bx, y0 - 1)], fill=WORST_COLOR)
    draw.line([(x0, y1), (x1, y1)], fill=MUTED)
    return step


def probe_plot(rows: Sequence[dict], title: str = "Sage attention probe", worst_blocks: Iterable = ()) -> torch.Tensor:
    """Per-call error and time of a probe, as one image ``[1, H, W, 3]``.

    ``rows``: dicts with ``block`` (label), ``kind`` ("self"/"cross"), ``rel_l1``, ``cosine``, ``sage_ms`` and
    ``exact_ms``, in call order. Calls of blocks in ``worst_blocks`` are marked with a red triangle.
    """
    n = len(rows)
    width = int(min(2400, max(900, 110 + 8 * n)))
    height = 760
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    fnt, small = font(18), font(12)
    draw.text((20, 14), title, font=font(22), fill=FOREGROUND)
    legend_x = width - 360
    for i, (name, col) in enumerate((("self-attention", SELF_COLOR), ("cross-attention", CROSS_COLOR),
                                      ("exact time", EXACT_COLOR))):
        lx = legend_x + i * 120
        draw.rectangle([lx, 20, lx + 12, 32], fill=col)
        draw.text((lx + 16, 19), name, font=small, fill=FOREGROUND)
    if n == 0:
        draw.text((20, 80), "no attention calls were recorded", font=fnt, fill=MUTED)
        return _pil_to_tensor(img).unsqueeze(0)

    left, right = 90, width - 20
    worst = {str(b) for b in worst_blocks}
    marks = [i for i, r in enumerate(rows) if str(r.get("block")) in worst]
    colors = [CROSS_COLOR if r.get("kind") == "cross" else SELF_COLOR for r in rows]

    err_box = (left, 110, right, 340)
    _panel(draw, err_box, [float(r.get("rel_l1", 0.0)) for r in rows], colors,
           "Relative L1 error of Sage vs exact attention, per call", fnt, small, "rel L1", marks)

    time_box = (left, 440, right, 670)
    sage_ms = [float(r.get("sage_ms", 0.0)) for r in rows]
    exact_ms = [float(r.get("exact_ms", 0.0)) for r in rows]
    scale = _nice_max(max(sage_ms + exact_ms))
    step = _panel(draw, time_box, sage_ms, colors, "Time per call: Sage (bars) and exact (grey ticks)", fnt, small,
                  "ms", vmax=scale)
    x0, y0, x1, y1 = time_box
    for i, e in enumerate(exact_ms):
        yy = y1 - (y1 - y0) * min(1.0, max(0.0, e) / scale)
        cx = x0 + i * step
        draw.line([(cx + step * 0.05, yy), (cx + step * 0.95, yy)], fill=EXACT_COLOR, width=2)

    # Block labels under the time panel, at the first call of each block.
    last_x = -1e9
    prev = object()
    for i, r in enumerate(rows):
        b = r.get("block")
        if b == prev:
            continue
        prev = b
        cx = x0 + i * step
        draw.line([(cx, y1), (cx, y1 + 5)], fill=MUTED)
        for box in (err_box,):
            draw.line([(cx, box[1]), (cx, box[3])], fill=GRID)
        text = str(b)
        if cx - last_x > draw.textlength(text, font=small) + 6:
            draw.text((cx + 2, y1 + 6), text, font=small, fill=MUTED)
            last_x = cx
    draw.text((left, height - 40), "attention calls in order; numbers mark the first call of each block "
              "(as exact_blocks counts them)", font=small, fill=MUTED)
    return _pil_to_tensor(img).unsqueeze(0)
