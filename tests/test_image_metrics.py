"""Image metrics against known values and an independent reference implementation."""
import math

import numpy as np
import pytest
import torch

from sage_attention_pack.sage_core import image_metrics as im


def _reference_ssim(x: np.ndarray, y: np.ndarray, data_range=1.0, size=11, sigma=1.5) -> float:
    """Straight loops over every valid window of every channel (Wang et al. 2004)."""
    c = np.arange(size) - (size - 1) / 2
    g = np.exp(-(c**2) / (2 * sigma**2))
    w = np.outer(g, g)
    w /= w.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    h, wd, ch = x.shape
    vals = []
    for k in range(ch):
        for i in range(h - size + 1):
            for j in range(wd - size + 1):
                px = x[i:i + size, j:j + size, k]
                py = y[i:i + size, j:j + size, k]
                mx, my = (w * px).sum(), (w * py).sum()
                vx = (w * (px - mx) ** 2).sum()
                vy = (w * (py - my) ** 2).sum()
                cxy = (w * (px - mx) * (py - my)).sum()
                vals.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_psnr_known_values():
    a = torch.zeros(1, 8, 8, 3)
    b = torch.full((1, 8, 8, 3), 0.1, dtype=torch.float64)
    # MSE = 0.01 -> PSNR = 10 log10(1 / 0.01) = 20 dB
    assert im.psnr(a, b) == pytest.approx(20.0, abs=1e-9)
    # Half the pixels off by 0.5: MSE = 0.125 -> 9.0309 dB
    c = torch.zeros(1, 4, 4, 1)
    d = c.clone()
    d[0, :2] = 0.5
    assert im.psnr(c, d) == pytest.approx(10 * math.log10(8), abs=1e-9)
    assert im.psnr(a, a) == math.inf
    assert im.psnr_per_frame(a, a) == [math.inf]
    # 8-bit data range
    assert im.psnr(a * 255, b * 255, data_range=255.0) == pytest.approx(20.0, abs=1e-9)


def test_psnr_per_frame_and_overall():
    a = torch.zeros(3, 4, 4, 3)
    b = a.clone()
    b[1] += 0.1  # frame 1: 20 dB
    b[2] += 0.01  # frame 2: 40 dB
    per = im.psnr_per_frame(a, b)
    assert per[0] == math.inf
    assert per[1] == pytest.approx(20.0)
    assert per[2] == pytest.approx(40.0)
    overall_mse = (0.01 + 0.0001) / 3
    assert im.psnr(a, b) == pytest.approx(10 * math.log10(1 / overall_mse))


def test_ssim_identical_and_constant_shift():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 20, 24, 3, generator=g)
    assert im.ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    # Two flat images: variances are zero, so SSIM is the luminance term alone.
    x = torch.full((1, 16, 16, 3), 0.5)
    y = torch.full((1, 16, 16, 3), 0.6, dtype=torch.float64)
    c1 = (0.01) ** 2
    expected = (2 * 0.5 * 0.6 + c1) / (0.5**2 + 0.6**2 + c1)
    assert im.ssim(x, y) == pytest.approx(expected, abs=1e-7)


def test_ssim_matches_reference_implementation():
    rng = np.random.default_rng(1)
    x = rng.random((18, 21, 3))
    y = np.clip(x + rng.normal(0, 0.08, x.shape), 0, 1)
    ours = im.ssim(torch.from_numpy(x)[None], torch.from_numpy(y)[None])
    assert ours == pytest.approx(_reference_ssim(x, y), abs=1e-10)
    assert 0.0 < ours < 1.0


def test_ssim_small_image_uses_smaller_window():
    rng = np.random.default_rng(2)
    x = rng.random((8, 9, 1))
    y = np.clip(x + 0.05 * rng.standard_normal(x.shape), 0, 1)
    ours = im.ssim(torch.from_numpy(x)[None], torch.from_numpy(y)[None])
    assert ours == pytest.approx(_reference_ssim(x, y, size=7, sigma=1.5 * 7 / 11), abs=1e-10)


def test_max_diff_and_8bit():
    a = torch.zeros(2, 4, 4, 3)
    b = a.clone()
    b[0, 1, 2, 1] = 0.25
    b[1, 3, 3, 0] = -0.5  # clipped to 0 when saved
    b[1, 0, 0, 2] = 1.0
    assert im.max_abs_diff_per_frame(a, b) == [pytest.approx(0.25), pytest.approx(1.0)]
    assert im.max_8bit_diff_per_frame(a, b) == [63, 255]


def test_cosine_similarity():
    a = torch.tensor([1.0, 0.0, 0.0])
    assert im.cosine_similarity(a, a) == 1.0
    assert im.cosine_similarity(a, torch.tensor([0.0, 2.0, 0.0])) == 0.0
    assert im.cosine_similarity(a, -a) == pytest.approx(-1.0)
    assert im.cosine_similarity(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0])) == pytest.approx(2**-0.5)
    assert im.cosine_similarity(torch.zeros(4), torch.zeros(4)) == 1.0


def test_compare_images_video():
    g = torch.Generator().manual_seed(3)
    a = torch.rand(4, 16, 16, 3, generator=g)
    b = a.clone()
    b[2] = (b[2] + 0.02).clamp(0, 1)
    r = im.compare_images(a, b)
    assert len(r.frames) == 4
    assert [f.frame for f in r.frames] == [0, 1, 2, 3]
    assert r.frames[0].psnr == math.inf and r.frames[2].psnr < 60
    assert r.frames[0].ssim == pytest.approx(1.0)
    assert r.max_abs_diff == pytest.approx(0.02, abs=1e-6)
    assert r.psnr == pytest.approx(im.psnr(a, b))
    d = r.as_dict()
    assert d["frames"][2]["frame"] == 2 and set(d) == {"psnr", "ssim", "max_abs_diff", "max_diff_8bit", "frames"}


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        im.psnr(torch.zeros(1, 4, 4, 3), torch.zeros(1, 4, 5, 3))
