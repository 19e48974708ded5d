"""Image and latent comparison metrics: PSNR, SSIM, largest pixel difference, cosine similarity.

Images are ComfyUI IMAGE tensors, ``[frames, height, width, channels]`` with values in ``[0, 1]`` (a single
``[height, width, channels]`` image is accepted too). Video is a batch of frames, so every metric is given
per frame as well as over the whole output. All arithmetic runs in float64 on the tensors' device.

SSIM follows Wang et al. (2004): an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, statistics over
"valid" windows only (no padding), computed per channel and averaged. Images smaller than the window use a
window as large as the smaller side (odd).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _as_frames(images: torch.Tensor) -> torch.Tensor:
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4:
        raise ValueError(f"expected an IMAGE tensor [frames, H, W, C], got shape {tuple(images.shape)}")
    return images.detach().to(torch.float64)


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _as_frames(a), _as_frames(b.to(a.device))
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return a, b


def mse_per_frame(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    a, b = _check_pair(a, b)
    return [float(v) for v in ((a - b) ** 2).flatten(1).mean(dim=1)]


def _psnr_from_mse(mse: float, data_range: float) -> float:
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range * data_range / mse)


def psnr_per_frame(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> list[float]:
    """PSNR in dB of each frame; ``inf`` for identical frames."""
    return [_psnr_from_mse(m, data_range) for m in mse_per_frame(a, b)]


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> float:
    """PSNR in dB over all frames together (the mean squared error of every pixel); ``inf`` when identical."""
    a, b = _check_pair(a, b)
    return _psnr_from_mse(float(((a - b) ** 2).mean()), data_range)


def _gaussian_window(size: int, sigma: float, device, dtype) -> torch.Tensor:
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2.0 * sigma * sigma))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim_per_frame(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> list[float]:
    """Mean SSIM of each frame (channels averaged)."""
    a, b = _check_pair(a, b)
    frames, height, width, channels = a.shape
    size = min(SSIM_WINDOW, height, width)
    if size % 2 == 0:
        size -= 1
    sigma = SSIM_SIGMA * size / SSIM_WINDOW
    window = _gaussian_window(size, sigma, a.device, a.dtype).expand(channels, 1, size, size)

    x = a.permute(0, 3, 1, 2)
    y = b.permute(0, 3, 1, 2)

    def filt(t):
        return F.conv2d(t, window, groups=channels)

    mu_x, mu_y = filt(x), filt(y)
    sxx = filt(x * x) - mu_x * mu_x
    syy = filt(y * y) - mu_y * mu_y
    sxy = filt(x * y) - mu_x * mu_y
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (sxx + syy + c2))
    return [float(v) for v in ssim_map.flatten(1).mean(dim=1)]


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean SSIM over all frames."""
    values = ssim_per_frame(a, b, data_range)
    return sum(values) / len(values)


def max_abs_diff_per_frame(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Largest absolute difference of any channel of any pixel, per frame, in the images' own units."""
    a, b = _check_pair(a, b)
    return [float(v) for v in (a - b).abs().flatten(1).amax(dim=1)]


def to_8bit(images: torch.Tensor) -> torch.Tensor:
    """The 8-bit values ComfyUI writes when it saves these images (clip to [0, 1], scale by 255, round down)."""
    return (images.to(torch.float64).clamp(0.0, 1.0) * 255.0).to(torch.uint8)


def max_8bit_diff_per_frame(a: torch.Tensor, b: torch.Tensor) -> list[int]:
    """Largest difference, in 8-bit levels (0..255), between the saved forms of the two outputs, per frame."""
    a8, b8 = _check_pair(to_8bit(a), to_8bit(b))
    return [int(v) for v in (a8 - b8).abs().flatten(1).amax(dim=1)]


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two tensors taken as flat vectors (1.0 for identical, also when both are zero)."""
    x = a.detach().reshape(-1).to(torch.float64)
    y = b.detach().reshape(-1).to(x.device, torch.float64)
    if x.shape != y.shape:
        raise ValueError(f"tensors differ in size: {a.numel()} vs {b.numel()}")
    if torch.equal(x, y):
        return 1.0
    nx, ny = torch.linalg.vector_norm(x), torch.linalg.vector_norm(y)
    if nx == 0 or ny == 0:
        return 0.0
    return float(torch.dot(x, y) / (nx * ny))


@dataclass
class FrameMetrics:
    frame: int
    psnr: float
    ssim: float
    max_abs_diff: float
    max_diff_8bit: int


@dataclass
class ImageComparison:
    """Every figure comparing two outputs: overall and per frame."""

    psnr: float
    ssim: float
    max_abs_diff: float
    max_diff_8bit: int
    frames: list[FrameMetrics] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def compare_images(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> ImageComparison:
    """PSNR, SSIM and the largest pixel difference of two IMAGE tensors, overall and per frame."""
    p = psnr_per_frame(a, b, data_range)
    s = ssim_per_frame(a, b, data_range)
    m = max_abs_diff_per_frame(a, b)
    m8 = max_8bit_diff_per_frame(a, b)
    frames = [FrameMetrics(i, p[i], s[i], m[i], m8[i]) for i in range(len(p))]
    return ImageComparison(
        psnr=psnr(a, b, data_range),
        ssim=sum(s) / len(s),
        max_abs_diff=max(m),
        max_diff_8bit=max(m8),
        frames=frames,
    )
