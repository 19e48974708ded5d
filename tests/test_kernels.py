"""The Triton kernels, run for real (through Triton's interpreter on the CPU, natively on a GPU), against
the pure-PyTorch reference of the same quantized algorithm and against FP32 attention."""
import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

from sage_attention_pack.kernels import carried_stats, hopper_launch, launch, tuning
from sage_attention_pack.kernels.call_plan import PLANS, CallPlans
from sage_attention_pack.sage_core.config import SageConfig
from sage_attention_pack.sage_core.metrics import attention_error
from sage_attention_pack.sage_core.reference import quantize_int8_groups, sage_reference, sampled_keys

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="no GPU and TRITON_INTERPRET is not 1: the kernels cannot run here")
# Kernel vs reference of the same algorithm: only accumulation order and FP32 rounding differ.
SAME_ALGO_TOL = {"int8_fp16": 2e-3, "int8_fp8": 2e-2}
# FP16 P·V, the Hopper kernel against the portable one: it normalises by the row sums of the FP16/BF16 P that P·V
# multiplies (on the tensor cores), the portable kernel by those of P in FP32 before its rounding
HOPPER_FP16_TOL = 4e-3
SPLIT_TAIL_TOL = 3.5e-2  # FP8 P·V, the grid's tail split in key ranges (test_tail_split.py) against unsplit
# Against FP32 attention on inputs with a K offset (the bounds for model-shaped inputs).
EXACT_BOUNDS = {"int8_fp16": (0.9999, 0.015), "int8_fp8": (0.999, 0.045)}


HOPPER = DEVICE == "cuda" and hopper_launch.AVAILABLE and torch.cuda.get_device_capability() == (9, 0)
NO_HOPPER = "the Gluon kernel needs an sm90 GPU and Triton's Gluon Hopper API"


def inputs(b, hq, hk, nq, nk, d, dtype, seed=0, k_offset=3.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g)
    k = torch.randn(b, hk, nk, d, generator=g) + k_offset * torch.randn(1, hk, 1, d, generator=g)
    v = torch.randn(b, hk, nk, d, generator=g)
    return [t.to(DEVICE, dtype) for t in (q, k, v)]


def run_kernel(q, k, v, cfg: SageConfig, is_causal=False, bias=None, return_lse=False, launch_cfg=None,
               repair_counter=None, out=None):
    if out is None:
        out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    lse, bad = launch.sage_forward(
        q, k, v, out, sm_scale=q.shape[-1] ** -0.5, is_causal=is_causal, bias=bias, q_group=cfg.q_group_rows,
        k_group=cfg.k_group_rows, pv_fp8=cfg.kernel == "int8_fp8", smooth_k=cfg.smooth_k, smooth_v=cfg.smooth_v,
        return_lse=return_lse, config=launch_cfg or tuning.INTERPRETER_CONFIG, repair_counter=repair_counter)
    return out, lse, bad


def reference_for(q, k, v, cfg, is_causal=False, bias=None, return_lse=False, block_m=None, fp16_tile_keys=0):
    block_m = block_m or tuning.INTERPRETER_CONFIG.block_m
    return sage_reference(q, k, v, is_causal=is_causal, bias=bias, q_group=cfg.q_group_rows,
                          k_group=cfg.k_group_rows or tuning.INTERPRETER_CONFIG.block_n,
                          block_m=block_m, pv_fp8=cfg.kernel == "int8_fp8",
                          smooth_k=cfg.smooth_k, smooth_v=cfg.smooth_v, return_lse=return_lse,
                          fp16_tile_keys=fp16_tile_keys)


def exact(q, k, v, is_causal=False, mask=None):
    rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(rep, 1),
                                          v.double().repeat_interleave(rep, 1), is_causal=is_causal, attn_mask=mask)


def rel_diff(a, b):
    return ((a.double() - b.double()).abs().sum() / b.double().abs().sum().clamp_min(1e-30)).item()


@pytest.mark.parametrize("kernel", ["int8_fp16", "int8_fp8"])
@pytest.mark.parametrize("gran", ["per_block", "per_warp", "per_thread"])
@pytest.mark.parametrize("d", [64, 96, 128])
def test_variants_match_reference_and_exact(kernel, gran, d):
    cfg = SageConfig(kernel=kernel, qk_granularity=gran, quant_block=64)
    q, k, v = inputs(1, 2, 2, 150, 130, d, torch.float16, seed=d)
    out, _, bad = run_kernel(q, k, v, cfg)
    assert torch.isfinite(out).all() and int(bad.sum()) == 0
    assert rel_diff(out, reference_for(q, k, v, cfg)) < SAME_ALGO_TOL[kernel]
    err = attention_error(out, exact(q, k, v))
    cos_min, l1_max = EXACT_BOUNDS[kernel]
    assert err["cosine"] >= cos_min and err["rel_l1"] <= l1_max, err


@pytest.mark.parametrize("d", [16, 40, 72, 80, 160, 256])
def test_odd_head_dims_padded(d):
    cfg = SageConfig(kernel="int8_fp16")
    q, k, v = inputs(1, 2, 2, 70, 90, d, torch.float16, seed=d)
    out, _, _ = run_kernel(q, k, v, cfg)
    assert out.shape == q.shape
    assert rel_diff(out, reference_for(q, k, v, cfg)) < SAME_ALGO_TOL["int8_fp16"]
    assert attention_error(out, exact(q, k, v))["cosine"] >= 0.9999


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kernel", ["int8_fp16", "int8_fp8"])
def test_dtypes_keep_input_dtype(dtype, kernel):
    cfg = SageConfig(kernel=kernel)
    q, k, v = inputs(2, 2, 2, 64, 64, 64, dtype, seed=3)
    out, _, _ = run_kernel(q, k, v, cfg)
    assert out.dtype == dtype
    # a bf16 output differs by up to one bf16 ulp (2^-8 relative) where the two round differently
    tol = SAME_ALGO_TOL[kernel] + (8e-3 if dtype == torch.bfloat16 else 0.0)
    assert rel_diff(out, reference_for(q, k, v, cfg)) < tol


@pytest.mark.parametrize("kernel", ["int8_fp16", "int8_fp8"])
@pytest.mark.parametrize("nq,nk", [(65, 65), (40, 100), (130, 33)])
def test_causal_ragged_lengths(kernel, nq, nk):
    cfg = SageConfig(kernel=kernel)
    q, k, v = inputs(1, 2, 2, nq, nk, 64, torch.float16, seed=nq + nk)
    out, _, _ = run_kernel(q, k, v, cfg, is_causal=True)
    ref = exact(q, k, v, is_causal=True)
    rows = torch.isfinite(ref).all(-1)  # SDPA's top-left causal leaves no row empty here, but stay general
    assert rows.all()
    assert rel_diff(out, reference_for(q, k, v, cfg, is_causal=True)) < SAME_ALGO_TOL[kernel]
    assert attention_error(out, ref)["cosine"] >= EXACT_BOUNDS[kernel][0]


def test_gqa_fewer_kv_heads():
    cfg = SageConfig(kernel="int8_fp16")
    q, k, v = inputs(2, 4, 1, 80, 96, 64, torch.float16, seed=11)
    out, _, _ = run_kernel(q, k, v, cfg)
    assert attention_error(out, exact(q, k, v))["cosine"] >= 0.9999


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp16_pv_multiplies_a_16bit_v_as_it_is(dtype):
    """FP16 P·V with V smoothing asked for: a 16-bit V is exact in its own type, so the kernel multiplies it as it
    is (smoothed, V - mean rounded to that type lost accuracy: launch.sage_forward). The same bits as without the
    option, and the same in the reference."""
    q, k, v = inputs(1, 2, 2, 70, 150, 64, dtype, seed=9)
    v = v + 3.0
    cfg_on, cfg_off = SageConfig(kernel="int8_fp16", smooth_v=True), SageConfig(kernel="int8_fp16")
    on, _, _ = run_kernel(q, k, v, cfg_on)
    off, _, _ = run_kernel(q, k, v, cfg_off)
    assert torch.equal(on, off)
    assert torch.equal(reference_for(q, k, v, cfg_on), reference_for(q, k, v, cfg_off))
    assert attention_error(on, exact(q, k, v))["cosine"] >= EXACT_BOUNDS["int8_fp16"][0]


@pytest.mark.parametrize("kernel", ["int8_fp16", "int8_fp8"])
def test_smooth_v_adds_mean_back(kernel):
    """FP8 P·V codes V smoothed and adds its mean back; FP16 P·V multiplies the 16-bit V as it is, which smoothing
    could only round (launch.sage_forward), and meets the same bounds."""
    cfg = SageConfig(kernel=kernel, smooth_v=True)
    q, k, v = inputs(1, 2, 2, 64, 128, 64, torch.float16, seed=5)
    v = v + 5.0  # a large channel mean is what V smoothing is for
    out, _, _ = run_kernel(q, k, v, cfg)
    assert rel_diff(out, reference_for(q, k, v, cfg)) < SAME_ALGO_TOL[kernel]
    assert attention_error(out, exact(q, k, v))["cosine"] >= EXACT_BOUNDS[kernel][0]


@pytest.mark.parametrize("key", [None, "m64n128w4s3mcgp", "m64n128w4s4mcpdgppp", "m64n128w4s4mcpdgpppps"])
@pytest.mark.parametrize("smooth_v", [False, True])
def test_uniform_attention_returns_the_mean_of_v(key, smooth_v):
    """With uniform attention (Q = 0) every output row is V's mean over the keys. FP8 V rounds each value
    with an error whose mean over the keys does not vanish; the kernels take that mean off the output
    (launch.quantize_qkv's v_shift), so the output is V's mean up to the accumulation's own rounding: to FP32
    precision in the interpreter; on an H200 1e-4 (portable), 3e-5 (in place) and 6e-4 (FP16 tiles) against a bias
    of 8e-3."""
    lc = tuning.LaunchConfig.from_key(key) if key else None
    if lc is not None and not HOPPER:
        pytest.skip(NO_HOPPER)
    nk = 4096 if DEVICE == "cuda" else 300
    _, k, v = inputs(1, 2, 2, 64, nk, 128, torch.float32, seed=9)
    v = v + 2.0 * torch.randn(1, 2, 1, 128, generator=torch.Generator().manual_seed(10)).to(v)
    q = torch.zeros(1, 2, 64, 128, device=DEVICE)
    out, _, bad = run_kernel(q, k, v, SageConfig(kernel="int8_fp8", smooth_v=smooth_v), launch_cfg=lc)
    mean = v.double().mean(2, keepdim=True)
    error = (out.double() - mean).abs().max().item()
    vs = v.double() - (mean if smooth_v else 0)
    scale = vs.abs().amax(2, keepdim=True) / 448
    bias = ((vs / scale).float().to(torch.float8_e4m3fn).double() * scale - vs).mean(2).abs().max().item()
    assert int(bad.sum()) == 0
    assert bias > 2e-4  # what the output would carry without the shift
    assert error < (2e-5 if DEVICE == "cpu" else 0.25 * bias), (error, bias)


def test_key_padding_bias_inside_kernel():
    # per-token K scales, so that masked keys share no scale with the keys that count
    cfg = SageConfig(kernel="int8_fp16", qk_granularity="per_thread")
    q, k, v = inputs(2, 2, 2, 48, 77, 64, torch.float16, seed=7)
    keep = torch.ones(2, 1, 77, dtype=torch.bool, device=DEVICE)
    keep[0, :, 60:] = False
    bias = torch.zeros(keep.shape, device=DEVICE).masked_fill(~keep, float("-inf"))
    out, _, _ = run_kernel(q, k, v, cfg, bias=bias * launch.LOG2E)
    ref = exact(q, k, v, mask=keep[:, :, None, :])
    assert attention_error(out, ref)["cosine"] >= 0.9999
    # the masked keys really are ignored: other values there leave the result exact (they only move
    # K's smoothing mean, which softmax cancels)
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 60:] = -k2[0, :, 60:]
    v2[0, :, 60:] += 50
    out2, _, _ = run_kernel(q, k2, v2, cfg, bias=bias * launch.LOG2E)
    assert attention_error(out2, ref)["cosine"] >= 0.9999
    assert torch.equal(out[1], out2[1])


def test_lse_matches_logsumexp_including_smoothing_shift():
    cfg = SageConfig(kernel="int8_fp16")
    q, k, v = inputs(1, 2, 2, 70, 90, 64, torch.float32, seed=9)
    _, lse, _ = run_kernel(q, k, v, cfg, return_lse=True)
    true_lse = torch.logsumexp((q.double() @ k.double().transpose(-1, -2)) * 64 ** -0.5, dim=-1)
    assert lse.shape == (1, 2, 70)
    assert (lse.double() - true_lse).abs().max().item() < 0.05


def test_non_contiguous_nhd_views():
    cfg = SageConfig(kernel="int8_fp16")
    q, k, v = inputs(1, 2, 2, 64, 64, 64, torch.float16, seed=13)
    qn, kn, vn = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))  # NHD storage, HND view
    assert not qn.is_contiguous()
    out, _, _ = run_kernel(qn, kn, vn, cfg)
    ref, _, _ = run_kernel(q, k, v, cfg)
    assert torch.equal(out, ref)


def test_int8_quantization_kernel_is_bit_exact():
    x = inputs(1, 2, 2, 100, 100, 64, torch.float32, seed=17)[1]
    for group in (1, 16, 64, 128):
        codes, scales = launch.quantize_int8(x, group, 64, multiplier=0.3)
        ref_codes, ref_rows = quantize_int8_groups(x.float() * 0.3, group)
        assert torch.equal(codes.float(), ref_codes)
        torch.testing.assert_close(scales.repeat_interleave(group, -1)[..., :100], ref_rows, rtol=1e-6, atol=0)


@pytest.mark.parametrize("group", [16, 64, 128])
def test_a_nan_makes_only_its_own_int8_group_scale_nan(group):
    # 128 rows per program: groups of 16 are coded two to a 32-row slice (launch.QUANT_SUB), 64 in a slice of their
    # own, and 128 (the whole program) after a first pass that finds the maximum
    x = inputs(1, 1, 1, 300, 300, 64, torch.float32, seed=3)[1]
    x[0, 0, 130, 7] = float("nan")
    _, scales = launch.quantize_int8(x, group, 64)
    bad = torch.isnan(scales[0, 0])
    assert bad.tolist() == [g == 130 // group for g in range(scales.shape[-1])]


@pytest.mark.parametrize("sign_from_x", [False, True])
@pytest.mark.parametrize("group", [16, 64, 128])
def test_int8_codes_round_ties_zeros_and_tiny_values_as_the_reference(monkeypatch, group, sign_from_x):
    """quant_kernels.int8_codes takes the ±0.5 from a sign bit (the product's, or with SIGN_FROM_X the coded
    value's), not from a compare and a select: exact ties (a group whose maximum is 127 has scale 1) round half away
    from zero, -0 and values whose product underflows code 0, and a group with NaN gets a NaN scale (nan_max) while
    its neighbours code as the reference does; in one-pass groups (16, 64 rows) and a group found in a first pass
    (128)."""
    monkeypatch.setattr(launch, "sign_from_x", lambda pv_fp8, rope, carried, arch=0: sign_from_x)
    x = inputs(1, 2, 2, 300, 300, 64, torch.float32, seed=19)[1]
    ties = [2.5, -3.5, 0.5, -0.5, 126.5, -126.5, 1e-30, -1e-30, -0.0, 0.0, -1.5, 1.5]
    x[0, 0, :3] = 0.0
    x[0, 0, 0, 0] = 127.0
    x[0, 0, 1, :len(ties)] = torch.tensor(ties)
    x[0, 1, 130, 7] = float("nan")
    codes, scales = launch.quantize_int8(x, group, 64)
    ref_codes, ref_rows = quantize_int8_groups(x.float(), group)
    assert codes[0, 0, 1, :len(ties)].tolist() == [3, -4, 1, -1, 127, -127, 0, 0, 0, 0, -2, 2]
    assert scales[0, 0, 0].item() == 1.0
    nan_group = torch.arange(300) // group == 130 // group
    assert torch.isnan(scales[0, 1]).tolist() == [g == 130 // group for g in range(scales.shape[-1])]
    finite = torch.ones(1, 2, 300, dtype=torch.bool)
    finite[0, 1] = ~nan_group
    assert torch.equal(codes.float()[finite], ref_codes[finite])
    rows = scales.repeat_interleave(group, -1)[..., :300]
    torch.testing.assert_close(rows[finite], ref_rows[finite], rtol=1e-6, atol=0)


def test_fp8_v_in_the_hopper_key_order_is_a_permutation_within_every_32_keys():
    # position (h q u t) of every 32 holds key (h u q t): what the Gluon kernel's P operand multiplies
    q, k, v = inputs(1, 2, 2, 64, 200, 64, torch.bfloat16, seed=5)
    args = dict(q_group=16, k_group=64, block_d=64, q_multiplier=0.1, smooth_k=True, smooth_v=True, pv_fp8=True)
    plain = launch.quantize_qkv(q, k, v, **args)
    ordered = launch.quantize_qkv(q, k, v, **args, pv_key_order=True)
    s = torch.arange(plain["v_padded"])
    source = (s & ~15) | (((s >> 1) & 1) << 3) | (((s >> 2) & 3) << 1) | (s & 1)
    assert sorted(source.tolist()) == s.tolist()
    assert not torch.equal(source, s)
    assert torch.equal(ordered["v8"].float(), plain["v8"][..., source].float())
    assert torch.equal(ordered["v_scale"], plain["v_scale"])
    # the sums of dequantized codes cover the same keys per program, in another order
    torch.testing.assert_close(ordered["v_code_sums"], plain["v_code_sums"], rtol=1e-5, atol=1e-5)


def test_v_quantization_split_over_channels_codes_the_same(monkeypatch):
    # V's quantization runs launch.V_CHANNELS channels per program (a whole 128-channel tile spilled): every
    # split codes the same FP8 values with the same scales and mean, bit for bit in the interpreter; on the GPU
    # each split sums the mean over the statistics chunks in its own order, so a code may differ in its last bit
    q, k, v = inputs(1, 2, 2, 16, 200, 128, torch.bfloat16, seed=29)
    args = dict(q_group=16, k_group=64, block_d=128, q_multiplier=0.1, smooth_k=True, smooth_v=True, pv_fp8=True,
                pv_key_order=True)
    runs = {}
    for channels in (128, 64, 32):
        monkeypatch.setattr(launch, "V_CHANNELS", channels)
        runs[channels] = launch.quantize_qkv(q, k, v, **args)
    exact_bits = DEVICE == "cpu"
    for channels in (64, 32):
        codes, whole = runs[channels]["v8"].float(), runs[128]["v8"].float()
        if exact_bits:
            assert torch.equal(codes, whole)
        else:
            assert (codes != whole).float().mean().item() < 1e-3
        for name in ("v_scale", "v_mean"):
            torch.testing.assert_close(runs[channels][name], runs[128][name], rtol=0 if exact_bits else 1e-6, atol=0)
        torch.testing.assert_close(runs[channels]["v_code_sums"], runs[128]["v_code_sums"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("smooth_k,smooth_v,pv_fp8,sites", [
    (True, True, True, ["quantize_stats_q", "quantize_k_v"]),
    (False, True, False, ["quantize_stats_q", "quantize_k_v"]),
    (True, False, False, ["quantize_stats_q", "quantize_k"]),
    (False, False, False, ["quantize_q_k"]),
])
def test_quantization_takes_two_launches_and_codes_what_three_did(smooth_k, smooth_v, pv_fp8, sites):
    """The statistics share a launch with Q's codes (which do not need them) and K's and V's codes share the next;
    with nothing to smooth, Q's and K's codes are one launch. Every role writes what the reference quantization
    gives: Q's and K's INT8 codes and scales, K's mean, V's FP8 codes, scales and mean."""
    q, k, v = inputs(1, 4, 2, 150, 333, 64, torch.bfloat16, seed=41)
    k = k + 0.5  # a mean for K's smoothing to take off
    launched = []

    def run(site, fn, grid, args, kwargs):
        launched.append(site)
        launch.launch_now(site, fn, grid, args, kwargs)

    qz = launch.quantize_qkv(q, k, v, q_group=16, k_group=64, block_d=64, q_multiplier=0.1, smooth_k=smooth_k,
                             smooth_v=smooth_v, pv_fp8=pv_fp8, run=run)
    assert launched == sites
    q_codes, q_scales = launch.quantize_int8(q, 16, 64, multiplier=0.1)
    assert torch.equal(qz["q8"].view_as(q_codes), q_codes) and torch.equal(qz["q_scale"].view_as(q_scales), q_scales)
    k_mean = k.float().mean(dim=2, keepdim=True) if smooth_k else torch.zeros_like(k[:, :, :1]).float()
    k_codes, k_scales = launch.quantize_int8(k.float() - k_mean, 64, 64)
    assert (qz["k8"].view_as(k_codes).int() - k_codes.int()).abs().max() <= 1
    torch.testing.assert_close(qz["k_scale"].view_as(k_scales), k_scales, rtol=1e-5, atol=0)
    if smooth_k:
        torch.testing.assert_close(qz["k_mean"].view(1, 2, 1, 64), k_mean, rtol=1e-5, atol=1e-6)
    if smooth_v or pv_fp8:
        torch.testing.assert_close(qz["v_mean"].view(1, 2, 1, 64), v.float().mean(dim=2, keepdim=True), rtol=1e-5,
                                   atol=1e-6)
    if pv_fp8:
        centred = v.float() - v.float().mean(dim=2, keepdim=True)
        scale = centred.abs().amax(dim=2) / launch.FP8_E4M3_MAX
        torch.testing.assert_close(qz["v_scale"].view_as(scale), scale, rtol=1e-5, atol=0)
        decoded = qz["v8"][..., :333].float().view(1, 2, 64, 333).transpose(-1, -2) * scale.unsqueeze(2)
        torch.testing.assert_close(decoded, centred, rtol=0.07, atol=scale.max().item())


def test_statistics_count_every_key_once_across_chunk_and_tile_edges():
    """The statistics loop loads its next tile while it adds up this one, and Q's and K's slices load one step
    ahead: spikes on the rows at every chunk's and tile's edges (and the last key) must each count once, in K's
    mean and in V's range, and a prefetch past a chunk's end must add nothing."""
    n = 333
    chunks, rows = launch.stats_chunks(n)
    assert chunks > 2 and n % rows and rows % launch.STATS_TILE == 0
    q, k, v = inputs(1, 2, 2, 40, n, 64, torch.bfloat16, seed=43)
    edges = sorted({0, n - 1, *(c * rows + d for c in range(1, chunks) for d in (-1, 0)),
                    launch.STATS_TILE - 1, launch.STATS_TILE, rows - launch.STATS_TILE})
    for i, row in enumerate(edges):
        k[:, :, row, i % 64] += 40.0 + i
        v[:, :, row, (i + 7) % 64] = -(30.0 + i) if i % 2 else 30.0 + i
    qz = launch.quantize_qkv(q, k, v, q_group=16, k_group=64, block_d=64, q_multiplier=0.1, smooth_k=True,
                             smooth_v=True, pv_fp8=True)
    torch.testing.assert_close(qz["k_mean"].view(1, 2, 1, 64), k.float().mean(dim=2, keepdim=True), rtol=1e-5,
                               atol=1e-6)
    centred = v.float() - v.float().mean(dim=2, keepdim=True)
    scale = centred.abs().amax(dim=2) / launch.FP8_E4M3_MAX
    torch.testing.assert_close(qz["v_scale"].view_as(scale), scale, rtol=1e-5, atol=0)
    # codes against the PyTorch reference (sage_core/reference.py), not against another launch of the same loops
    k_codes, k_rows = quantize_int8_groups(k.float() - k.float().mean(dim=2, keepdim=True), 64)
    assert (qz["k8"].view(1, 2, n, 64).int() - k_codes.int()).abs().max() <= 1
    torch.testing.assert_close(qz["k_scale"].view(1, 2, -1).repeat_interleave(64, -1)[..., :n], k_rows, rtol=1e-5,
                               atol=0)
    q_codes, q_rows = quantize_int8_groups(q.float() * 0.1, 16)
    assert torch.equal(qz["q8"].view(1, 2, 40, 64).float(), q_codes)
    torch.testing.assert_close(qz["q_scale"].view(1, 2, -1).repeat_interleave(16, -1)[..., :40], q_rows, rtol=1e-6,
                               atol=0)


def test_k_mean_comes_from_a_sample_of_the_keys_and_v_statistics_from_every_key():
    """From 1024 keys on, K's mean (for its smoothing) is the mean of every `every`-th tile of keys; V's mean and
    range, which bound its FP8 codes and which the in-place accumulator needs exact, still cover every key, and
    K's codes are the reference's codes of K minus the sample's mean."""
    n = 1500
    every = launch.stats_every(n)
    sample = sampled_keys(n, every, launch.STATS_TILE).to(DEVICE)
    assert every == 2 and int(sample.sum()) == launch.sampled_key_count(n, every) < n
    assert launch.stats_chunks(n, every)[1] % (launch.STATS_TILE * every) == 0
    q, k, v = inputs(1, 2, 2, 40, n, 64, torch.bfloat16, seed=47)
    k[:, :, 20, 3] += 60.0  # a spike in tile 1, which the sample leaves out: its own group's scale codes it
    v = v + 2.0
    qz = launch.quantize_qkv(q, k, v, q_group=16, k_group=64, block_d=64, q_multiplier=0.1, smooth_k=True,
                             smooth_v=True, pv_fp8=True)
    kf, vf = k.float(), v.float()
    k_mean = kf[:, :, sample].mean(dim=2, keepdim=True)
    torch.testing.assert_close(qz["k_mean"].view(1, 2, 1, 64), k_mean, rtol=1e-5, atol=1e-6)
    assert (k_mean - kf.mean(dim=2, keepdim=True)).abs().max() > 1e-2  # a sample's mean, not the whole one's
    k_codes, k_rows = quantize_int8_groups(kf - k_mean, 64)
    assert (qz["k8"].view(1, 2, n, 64).int() - k_codes.int()).abs().max() <= 1
    torch.testing.assert_close(qz["k_scale"].view(1, 2, -1).repeat_interleave(64, -1)[..., :n], k_rows, rtol=1e-5,
                               atol=0)
    v_mean = vf.mean(dim=2, keepdim=True)
    torch.testing.assert_close(qz["v_mean"].view(1, 2, 1, 64), v_mean, rtol=1e-5, atol=1e-6)
    scale = (vf - v_mean).abs().amax(dim=2) / launch.FP8_E4M3_MAX
    torch.testing.assert_close(qz["v_scale"].view_as(scale), scale, rtol=1e-5, atol=0)


def test_a_call_with_k_mean_from_a_sample_matches_the_reference_and_keeps_its_lse():
    """The whole FP8 call, K's mean from a sample, against the reference with the same sample; the LSE is still
    the true one (the correction adds back q·mean with the mean the scores lost)."""
    cfg = SageConfig(kernel="int8_fp8", smooth_v=True)
    n = 1100
    q, k, v = inputs(1, 2, 2, 70, n, 64, torch.float32, seed=59)
    out, lse, bad = run_kernel(q, k, v, cfg, return_lse=True)
    assert int(bad.sum()) == 0 and launch.stats_every(n) == 2
    ref = sage_reference(q, k, v, q_group=cfg.q_group_rows,
                         k_group=cfg.k_group_rows or tuning.INTERPRETER_CONFIG.block_n,
                         block_m=tuning.INTERPRETER_CONFIG.block_m, pv_fp8=True, smooth_k=True, smooth_v=True,
                         k_stats_every=launch.stats_every(n))
    # 1100 keys: the kernel and the reference part by 0.022 here with every key read too (P's FP8 rounding per
    # tile against the reference's one row maximum), above SAME_ALGO_TOL's figure for the short cases
    assert rel_diff(out, ref) < 0.025
    err = attention_error(out, exact(q, k, v))
    assert err["cosine"] >= EXACT_BOUNDS["int8_fp8"][0] and err["rel_l1"] <= EXACT_BOUNDS["int8_fp8"][1], err
    true_lse = torch.logsumexp((q.double() @ k.double().transpose(-1, -2)) * 64 ** -0.5, dim=-1)
    # had the correction used the whole mean instead of the sample's, rows would be off by q·(difference)
    sample = sampled_keys(n, launch.stats_every(n)).to(DEVICE)
    shift = k.double()[:, :, sample].mean(2) - k.double().mean(2)
    off = (q.double() @ shift.unsqueeze(-1)).squeeze(-1) * 64 ** -0.5
    assert off.abs().max() > 0.03
    assert (lse.double() - true_lse).abs().max().item() < 0.01  # the INT8 scores' own error


@pytest.mark.parametrize("case", ["v_beyond_fp16", "products_beyond_fp16"])
@pytest.mark.parametrize("kernel", ["int8_fp16", "int8_fp8"])
def test_bf16_values_beyond_fp16s_range_stay_finite_and_accurate(kernel, case):
    """Black renders in other integrations come from BF16 activations that FP16 cannot hold (a V cast to FP16
    becomes inf; Q·Kᵀ summed in FP16 overflows). Here V reaches ~4e5, or the raw products ~1e6 under a small
    sm_scale: the call stays on the Sage kernel, finite, as accurate as on ordinary inputs, and nothing is
    recomputed."""
    from sage_attention_pack.sage_core import sageattn
    from sage_attention_pack.sage_core.dispatch import DispatchStats

    q, k, v = inputs(1, 2, 2, 200, 200, 64, torch.float32, seed=29)
    scale = 64 ** -0.5
    if case == "v_beyond_fp16":
        v = v * 1e5 + 2e5
    else:
        q, k, scale = q * 100, k * 100, scale * 1e-4
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    largest = v.float().abs().max() if case == "v_beyond_fp16" else (q.float() @ k.float().mT).abs().max()
    assert largest > 65504  # FP16's largest finite value
    stats = DispatchStats()
    out = sageattn(q, k, v, sm_scale=scale, kernel=kernel, stats=stats)
    err = attention_error(out, F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale))
    assert torch.isfinite(out).all()
    assert err["cosine"] >= EXACT_BOUNDS[kernel][0] and err["rel_l1"] <= EXACT_BOUNDS[kernel][1], err
    snap = stats.snapshot()
    assert sum(snap["sage"].values()) == 1 and not snap["fallback"] and snap["recomputed"] == 0, snap


def test_nan_input_is_flagged_not_hidden():
    cfg = SageConfig(kernel="int8_fp16")
    q, k, v = inputs(1, 2, 2, 64, 64, 64, torch.float16, seed=19)
    q[0, 1, 5, 3] = float("nan")
    out, _, bad = run_kernel(q, k, v, cfg)
    assert int(bad.sum()) > 0  # the dispatcher recomputes such calls exactly


@pytest.mark.parametrize("head_dim", [64, 256])  # 256: the largest FP32 slices of the repair
@pytest.mark.parametrize("kernel", ["int8_fp16", "int8_fp8"])
def test_flagged_tiles_are_recomputed_exactly_on_device(kernel, head_dim):
    cfg = SageConfig(kernel=kernel)
    q, k, v = inputs(1, 2, 2, 150, 90, head_dim, torch.float32, seed=23)
    q[0, 1, 5, 3] = float("nan")  # poisons row 5's INT8 scale group, so the whole first tile of head 1
    counter = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    out, lse, bad = run_kernel(q, k, v, cfg, return_lse=True, repair_counter=counter)
    ref = exact(q, k, v)
    flagged = bad.view(2, 150).nonzero().tolist()  # (head, row) of every row flagged non-finite
    assert [0, 0] not in flagged and [1, 5] in flagged and all(h == 1 and r < 64 for h, r in flagged), flagged
    assert int(counter.item()) == 1  # one tile recomputed
    assert torch.equal(torch.isnan(out).any(-1), torch.isnan(ref).any(-1))  # only row 5 of head 1, like SDPA
    finite = ~torch.isnan(ref).any(-1)
    # the repaired tile (head 1, rows 0..63) is exact attention in FP32, the rest the 8-bit kernel
    torch.testing.assert_close(out[0, 1, 6:64].double(), ref[0, 1, 6:64], rtol=1e-4, atol=1e-5)
    assert attention_error(out[finite], ref[finite])["cosine"] >= EXACT_BOUNDS[kernel][0]
    true_lse = torch.logsumexp((q.double() @ k.double().transpose(-1, -2)) * head_dim ** -0.5, dim=-1)
    torch.testing.assert_close(lse[0, 1, 6:64].double(), true_lse[0, 1, 6:64], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("tiles", [2, 4, 16])
def test_repair_programs_of_several_tiles_repair_the_same_tiles(monkeypatch, tiles):
    """launch.REPAIR_TILES: repair programs that each look at several query tiles (2 and 4 of the call's 6, every
    third and every second; all of them in one program's 16) repair the same flagged tiles (two, in different heads
    and tiles) to the same bits, each counted once."""
    cfg = SageConfig(kernel="int8_fp8")
    q, k, v = inputs(1, 2, 2, 150, 90, 64, torch.float32, seed=23)
    q[0, 1, 5, 3] = float("nan")
    q[0, 0, 70, 1] = float("inf")
    results = {}
    for n in (1, tiles):
        monkeypatch.setattr(launch, "REPAIR_TILES", n)
        PLANS.clear()
        counter = torch.zeros(1, dtype=torch.int32, device=DEVICE)
        out, lse, _ = run_kernel(q, k, v, cfg, return_lse=True, repair_counter=counter)
        assert int(counter.item()) == 2
        results[n] = (out, lse)
    PLANS.clear()
    assert torch.equal(results[1][0].nan_to_num(), results[tiles][0].nan_to_num())
    assert torch.equal(results[1][1].nan_to_num(), results[tiles][1].nan_to_num())
    repaired = results[tiles][0][0, 0, 64:128]  # head 0's second tile, exact: finite but for row 70 itself
    assert torch.isfinite(torch.cat((repaired[:6], repaired[7:]))).all()


def test_the_repair_takes_three_tf32_products_on_hopper_and_ieee_dots_elsewhere():
    """launch.repair_constants: the tensor cores' three TF32 products where they were measured (sm90), IEEE FP32 dots
    on every other target (and in the interpreter, arch 0); one program per row slice of a tile."""
    def precision(arch):
        return launch.repair_constants(64, 128, is_causal=False, has_bias=False, return_lse=False, rope=False,
                                       arch=arch)["DOT_PRECISION"]

    assert precision(90) == "tf32x3" and {precision(a) for a in (0, 80, 86, 89, 100, 120)} == {"ieee"}
    assert launch.repair_grid(72 * 24, 64) == (-(-72 * 24 // launch.REPAIR_TILES), 64 // launch.REPAIR_ROWS)
    assert launch.device_arch(torch.device("cpu")) == 0


def test_a_causal_tile_is_repaired_in_row_slices_exactly():
    """The repair recomputes a flagged tile launch.REPAIR_ROWS rows at a time, each slice over the keys up to the
    tile's last row with the causal mask per row: a NaN in row 70 flags the second 64-row tile of head 1, whose other
    rows (four slices of 16) come out as exact causal attention, with their LSE; one tile counted."""
    cfg = SageConfig(kernel="int8_fp8")
    q, k, v = inputs(1, 2, 2, 150, 150, 64, torch.float32, seed=29)
    q[0, 1, 70, 3] = float("nan")
    counter = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    out, lse, _ = run_kernel(q, k, v, cfg, is_causal=True, return_lse=True, repair_counter=counter)
    assert int(counter.item()) == 1 and launch.repair_rows(64) == launch.REPAIR_ROWS < 64
    ref = exact(q, k, v, is_causal=True)
    rows = [r for r in range(64, 128) if r != 70]
    torch.testing.assert_close(out[0, 1, rows].double(), ref[0, 1, rows], rtol=1e-4, atol=1e-5)
    assert torch.isnan(out[0, 1, 70]).all()
    scores = (q.double() @ k.double().transpose(-1, -2)) * 64 ** -0.5
    scores = scores.masked_fill(torch.ones(150, 150, dtype=torch.bool, device=DEVICE).triu(1), float("-inf"))
    torch.testing.assert_close(lse[0, 1, rows].double(), torch.logsumexp(scores, dim=-1)[0, 1, rows], rtol=1e-5,
                               atol=1e-4)


@pytest.mark.parametrize("kernel,flags", [("int8_fp16", {"magic_convert": True}), ("int8_fp8", {"magic_convert": True}),
                                          ("int8_fp8", {"pv_direct": True}),
                                          ("int8_fp8", {"magic_convert": True, "pv_direct": True}),
                                          ("int8_fp8", {"fp16_tiles": True}),
                                          ("int8_fp8", {"magic_convert": True, "fp16_tiles": True})])
def test_kernel_flags_compute_the_same_attention(kernel, flags):
    """The tuning flags (FP32 bit-trick score conversion, FP8 P·V accumulated in place or per key tile in FP16)
    change how the kernel computes, not what: same reference, same bounds against exact attention, on ragged
    lengths."""
    cfg = SageConfig(kernel=kernel)
    q, k, v = inputs(1, 2, 2, 150, 130, 128, torch.float16, seed=31)
    lc = dataclasses.replace(tuning.INTERPRETER_CONFIG, **flags)
    out, _, bad = run_kernel(q, k, v, cfg, launch_cfg=lc)
    assert torch.isfinite(out).all() and int(bad.sum()) == 0
    # in-place FP8 accumulation always runs with V smoothing (kernels/launch.py says why)
    ref_cfg = dataclasses.replace(cfg, smooth_v=True) if flags.get("pv_direct") else cfg
    fp16_tile_keys = lc.block_n if flags.get("fp16_tiles") else 0
    assert rel_diff(out, reference_for(q, k, v, ref_cfg, fp16_tile_keys=fp16_tile_keys)) < SAME_ALGO_TOL[kernel]
    err = attention_error(out, exact(q, k, v))
    assert err["cosine"] >= EXACT_BOUNDS[kernel][0] and err["rel_l1"] <= EXACT_BOUNDS[kernel][1], err


@pytest.mark.parametrize("key", ["m64n64w4s1pd", "m64n64w4s1ft", "m64n128w4s3mcpdgp", "m64n128w4s4mcpdgppp",
                                 "m64n128w4s3mcgp", "m64n128w4s4mcgppp", "m64n128w4s4mcpdgpppps",
                                 "m64n128w4s4mcpdgpppnt"])
def test_fp8_accumulation_survives_a_v_offset(key):
    """V with a large per-channel offset (a projection's bias): FP8 P·V accumulated in place lost 0.26 relative
    L1 on an H200 before V smoothing was made part of that path; the error must stay at two-level levels, and
    the FP16 tile accumulators (the Hopper kernel's gp without pd, the portable kernel's ft) must neither overflow
    nor lose the offset."""
    lc = tuning.LaunchConfig.from_key(key)
    if lc.pipelined and not HOPPER:
        pytest.skip(NO_HOPPER)
    if DEVICE == "cpu":
        lc = dataclasses.replace(lc, block_n=64, num_stages=1)
    nk = 2048 if DEVICE == "cuda" else 192
    q, k, v = inputs(1, 2, 2, 128, nk, 128, torch.bfloat16, seed=5)
    v = v + 8.0 * torch.randn(1, 2, 1, 128, generator=torch.Generator().manual_seed(6)).to(v)
    out, _, bad = run_kernel(q, k, v, SageConfig(kernel="int8_fp8"), launch_cfg=lc)
    assert int(bad.sum()) == 0
    assert rel_diff(out, exact(q, k, v)) < 0.01


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's FP16 tile, headroom 2
@pytest.mark.parametrize("block_n", [32, 64])
@pytest.mark.parametrize("headroom", [1, 2])
def test_fp16_tile_accumulator_holds_the_largest_tile_sum(monkeypatch, block_n, headroom):
    """The worst case of an FP16 tile: every P at 448 (uniform attention) against every V code at its largest (a
    constant V), block_n × 448 × launch.fp16_tile_v_code_max = 50176, under FP16's 65504: the output is V's value,
    unflagged. With twice that code bound (headroom 2) the same tile overflows, and its rows are flagged."""
    bound = launch.fp16_tile_v_code_max
    monkeypatch.setattr(launch, "fp16_tile_v_code_max", lambda n: headroom * bound(n))
    q = torch.zeros(1, 2, 64, 128, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 192, 128, device=DEVICE).to(torch.bfloat16)
    v = (torch.rand(1, 2, 1, 128, device=DEVICE) + 0.5).expand(1, 2, 192, 128).to(torch.bfloat16)
    lc = tuning.LaunchConfig(64, block_n, 4, 1, fp16_tiles=True)
    out, _, bad = run_kernel(q, k, v, SageConfig(kernel="int8_fp8"), launch_cfg=lc)
    if headroom == 1:
        assert int(bad.sum()) == 0
        torch.testing.assert_close(out.float(), v[:, :, :64].float(), rtol=1e-2, atol=0)
    else:
        assert int(bad.sum()) > 0 and not torch.isfinite(out).all()


@pytest.mark.skipif(not HOPPER, reason=NO_HOPPER)
@pytest.mark.parametrize("kernel", ["int8_fp8", "int8_fp16"])
@pytest.mark.parametrize("key", ["m64n128w4s3mcpdgp", "m64n64w4s3gp", "m64n128w4s4mcpdgppp", "m64n64w4s4mcgppp",
                                 "m64n128w4s3mcgp", "m64n128w4s4mcgppp", "m64n128w4s3r168pdgp",
                                 "m64n128w4s4mcpdgpppps", "m64n128w4s4mcgpppps", "m64n128w4s4mcpdgpppnt",
                                 "m64n128w4s4mcpdgppppsnt", "m64n128w4s4mcpdgppplr", "m64n128w4s4mcpdgpppntlr"])
@pytest.mark.parametrize("b,hq,hk,nq,nk,d,dtype,smooth_v,lse", [
    (1, 2, 2, 200, 200, 64, torch.bfloat16, False, False),
    (2, 4, 4, 1000, 333, 128, torch.float16, False, True),   # ragged, the last key tile partial
    (1, 2, 2, 70, 129, 128, torch.bfloat16, False, False),    # one key in the last tile
    (1, 4, 2, 130, 700, 128, torch.bfloat16, True, True),     # grouped-query, V smoothing
    (1, 2, 2, 64, 4096, 64, torch.float16, False, False),     # many key tiles: every ring slot reused
    # 360 pairs of query tiles, the last one's second tile past the end: a persistent program takes two or three,
    # its ring going on across them (9 key tiles each, the last partial, against 4 slots)
    (2, 24, 8, 960, 1100, 128, torch.bfloat16, True, True),
])
def test_hopper_kernel_matches_portable_kernel(kernel, key, b, hq, hk, nq, nk, d, dtype, smooth_v, lse):
    """The Hopper Gluon kernels (one warpgroup per program, or two in ping-pong; FP8 P·V on V's codes, or FP16
    P·V on the call's own V) compute what the portable kernel computes (same quantization, same algorithm; the
    accumulation order differs), within the same bounds against exact attention, and they are the kernels that
    ran. (FP16 P·V with V smoothing asked for: both kernels multiply the 16-bit V as it is, launch.sage_forward.)"""
    check_hopper_matches_portable(kernel, key, b, hq, hk, nq, nk, d, dtype, smooth_v, lse)


@pytest.mark.skipif(not HOPPER, reason=NO_HOPPER)
@pytest.mark.parametrize("key", ["m64n128w4s3pdgpppntc3", "m64n128w4s4pdgpppntc3", "m64n128w4s4pdgppppsntc3",
                                 "m64n128w4s4pdgpppntlrc3"])
@pytest.mark.parametrize("b,hq,hk,nq,nk,d,dtype,smooth_v,lse", [
    (1, 2, 2, 200, 200, 64, torch.bfloat16, False, False),   # one item, its third tile past the end
    (2, 4, 4, 1000, 333, 64, torch.float16, False, True),    # ragged, the last key tile partial
    (1, 4, 2, 130, 700, 64, torch.bfloat16, True, True),     # grouped-query, V smoothing
    (1, 2, 2, 64, 4096, 64, torch.float16, False, False),    # many key tiles: every ring slot reused
    (2, 24, 8, 960, 1100, 64, torch.bfloat16, True, True),   # 240 items: persistent programs take one or two
])
def test_three_consumer_hopper_kernel_matches_portable_kernel(key, b, hq, hk, nq, nk, d, dtype, smooth_v, lse):
    """The ping-pong kernel with three consumer warpgroups (no turns, head dim 64, FP8 P·V: items of three query
    tiles) computes what the portable kernel computes, as the two-warpgroup one does; FP16 P·V stays with the
    others (hopper_launch.serves)."""
    check_hopper_matches_portable("int8_fp8", key, b, hq, hk, nq, nk, d, dtype, smooth_v, lse)
    q, k, v = inputs(b, hq, hk, nq, nk, d, dtype, seed=1)
    lc = tuning.LaunchConfig.from_key(key)
    assert not launch.runs_hopper_kernel(q, k, v, config=lc, k_group=lc.block_n, pv_fp8=False, is_causal=False,
                                         has_bias=False)


@pytest.mark.skipif(not HOPPER, reason=NO_HOPPER)
@pytest.mark.parametrize("ramp", [0.0, 3.0])
@pytest.mark.parametrize("key,d,kernel", [("m64n128w4s4pdgpppntc3", 64, "int8_fp8"),
                                          ("m64n128w4s4mcpdgppp", 128, "int8_fp8"),
                                          ("m64n128w4s4mcpdgpppnt", 128, "int8_fp8"),
                                          ("m64n128w4s4mcpdgppp", 128, "int8_fp16")])
def test_lazy_rescale_changes_no_bit(key, d, kernel, ramp):
    """A warp that skips the accumulator's rescale when none of its rows moved its max (lazy_rescale) multiplies
    by exactly 1 where it skips: the output is bit for bit the kernel's without it. ramp > 0 scales the keys up
    along the sequence, so that rows keep moving their max in late key tiles (some warps' rows move, others'
    not, within one tile)."""
    q, k, v = inputs(2, 8, 8, 1000, 5000, d, torch.bfloat16, seed=11)
    k = (k.float() * (1 + ramp * torch.linspace(0, 1, k.shape[2], device=k.device)[:, None])).to(k.dtype)
    cfg = SageConfig(kernel=kernel)
    outs = []
    for lazy in (False, True):
        lc = dataclasses.replace(tuning.LaunchConfig.from_key(key), lazy_rescale=lazy)
        assert launch.runs_hopper_kernel(q, k, v, config=lc, k_group=lc.block_n, pv_fp8=kernel == "int8_fp8",
                                         is_causal=False, has_bias=False)
        outs.append(run_kernel(q, k, v, cfg, return_lse=True, launch_cfg=lc)[:2])
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def check_hopper_matches_portable(kernel, key, b, hq, hk, nq, nk, d, dtype, smooth_v, lse):
    """The Hopper kernel of `key` served this call and matched the portable kernel's output (and LSE), with the
    bounds against exact attention."""
    cfg = SageConfig(kernel=kernel, smooth_v=smooth_v)
    lc = tuning.LaunchConfig.from_key(key)
    q, k, v = inputs(b, hq, hk, nq, nk, d, dtype, seed=nq + nk)
    assert launch.runs_hopper_kernel(q, k, v, config=lc, k_group=lc.block_n, pv_fp8=kernel == "int8_fp8",
                                     is_causal=False, has_bias=False)
    out, out_lse, bad = run_kernel(q, k, v, cfg, return_lse=lse, launch_cfg=lc)
    portable = dataclasses.replace(lc, pipelined=False, ping_pong=False, persistent=False, no_turns=False)
    ref, ref_lse, _ = run_kernel(q, k, v, cfg, return_lse=lse, launch_cfg=portable)
    assert torch.isfinite(out).all() and int(bad.sum()) == 0
    # a call whose grid's tail is split (hopper_launch.tail_split) rounds its last items' FP8 P per part, each
    # part at its own running max: a rounding of the size of the kernel's own error against exact attention
    items = hopper_launch.work_items_per_head(lc, nq) * b * hq
    split = hopper_launch.tail_split(lc, items, nk, q.device)[1] > 1
    assert rel_diff(out, ref) < (HOPPER_FP16_TOL if kernel == "int8_fp16" else SPLIT_TAIL_TOL if split
                                 else SAME_ALGO_TOL[kernel])
    err = attention_error(out, exact(q, k, v))
    assert err["cosine"] >= EXACT_BOUNDS[kernel][0] and err["rel_l1"] <= EXACT_BOUNDS[kernel][1], err
    if lse:
        torch.testing.assert_close(out_lse, ref_lse, atol=2e-2, rtol=0)


@pytest.mark.skipif(not HOPPER, reason=NO_HOPPER)
@pytest.mark.parametrize("key", ["m64n128w4s2r168pdgp", "m64n128w4s4mcpdgppp", "m64n128w4s4mcpdgpppnt"])
@pytest.mark.parametrize("layout", ["NHD", "fused_qkv", "HND_sliced_keys"])
def test_hopper_fp16_kernel_reads_the_callers_v_as_it_is(key, layout):
    """FP16 P·V on the Hopper kernel reads the call's V where it lies, by TMA: heads side by side in a row (NHD,
    ComfyUI's), a fused QKV projection's slice, or heads apart with rows between them (keys sliced from a longer
    buffer whose rest is NaN). Two batches and a ragged last key tile: its keys past the end must count for
    nothing, whatever lies in memory there. The same bits as on a contiguous copy of V, and within the FP16
    bounds against exact attention."""
    b, h, n, d = 2, 3, 333, 64 if key.endswith("r168pdgp") else 128
    lc = tuning.LaunchConfig.from_key(key)
    q, k, v = inputs(b, h, h, n, n, d, torch.bfloat16, seed=11)
    if layout == "NHD":
        v_call = v.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "fused_qkv":  # [B, N, 3, H, D] from one projection, V its third part
        v_call = torch.stack([t.transpose(1, 2) for t in (q, k, v)], dim=2).contiguous()[:, :, 2].transpose(1, 2)
    else:
        v_call = torch.cat([v, torch.full_like(v[:, :, :40], float("nan"))], dim=2)[:, :, :n]
    assert torch.equal(v_call, v) and not v_call.is_contiguous()
    assert hopper_launch.v_tiles(v_call, d)
    assert launch.runs_hopper_kernel(q, k, v_call, config=lc, k_group=lc.block_n, pv_fp8=False, is_causal=False,
                                     has_bias=False)
    cfg = SageConfig(kernel="int8_fp16")
    out, _, bad = run_kernel(q, k, v_call, cfg, launch_cfg=lc)
    same, _, _ = run_kernel(q, k, v.contiguous(), cfg, launch_cfg=lc)
    assert int(bad.sum()) == 0 and torch.isfinite(out).all()
    assert torch.equal(out, same)
    err = attention_error(out, exact(q, k, v))
    assert err["cosine"] >= EXACT_BOUNDS["int8_fp16"][0] and err["rel_l1"] <= EXACT_BOUNDS["int8_fp16"][1], err


@pytest.mark.skipif(not HOPPER, reason=NO_HOPPER)
@pytest.mark.parametrize("key", ["m64n128w4s4mcpdgppp", "m64n128w4s4mcgppp"])
@pytest.mark.parametrize("b,hq,hk,nq,nk,d", [(2, 4, 4, 1000, 333, 128), (1, 4, 2, 130, 4096, 64),
                                             (2, 24, 8, 960, 1100, 128)])
def test_ping_pong_without_turns_computes_the_same_bits(key, b, hq, hk, nq, nk, d):
    """The turns only order the two warpgroups' products on the tensor cores; each warpgroup's arithmetic is the
    same, so the outputs and the LSE are the same bits with and without them (in place and with FP16 tiles;
    ragged tiles, grouped-query, a key tile loop that reuses every ring slot)."""
    lc = tuning.LaunchConfig.from_key(key)
    free = dataclasses.replace(lc, no_turns=True)
    q, k, v = inputs(b, hq, hk, nq, nk, d, torch.bfloat16, seed=nq + nk)
    cfg = SageConfig(kernel="int8_fp8", smooth_v=True)
    out, lse, bad = run_kernel(q, k, v, cfg, return_lse=True, launch_cfg=lc)
    out_free, lse_free, bad_free = run_kernel(q, k, v, cfg, return_lse=True, launch_cfg=free)
    assert int(bad.sum()) == 0 and int(bad_free.sum()) == 0
    assert torch.equal(out, out_free) and torch.equal(lse, lse_free)


@pytest.mark.skipif(not HOPPER, reason=NO_HOPPER)
@pytest.mark.parametrize("key,d,kernel", [("m64n128w4s4mcpdgpppnt", 128, "int8_fp8"),
                                          ("m64n128w4s4pdgpppntc3", 64, "int8_fp8"),
                                          ("m64n128w4s3r168pdgp", 64, "int8_fp8"),
                                          ("m64n128w4s4mcpdgppplr", 128, "int8_fp16"),
                                          ("m64n128w4s2r168pdgp", 64, "int8_fp16")])
def test_every_output_store_writes_the_same_bits_and_only_its_rows(monkeypatch, key, d, kernel):
    """The Hopper kernels' three ways of writing the output tile (hopper_launch.out_store: 16-byte stores through
    shared memory, channel pairs, element by element) write the same bits, into an output that is a view of a
    longer buffer: the rows past the last query (a ragged last tile) are never written."""
    b, hq, hk, nq, nk = 2, 4, 2, 1000, 333
    q, k, v = inputs(b, hq, hk, nq, nk, d, torch.bfloat16, seed=7)
    cfg = SageConfig(kernel=kernel)
    lc = tuning.LaunchConfig.from_key(key)
    results = []
    for mode in (2, 1, 0):
        monkeypatch.setattr(hopper_launch, "out_store", lambda *args, mode=mode: mode)
        PLANS.clear()
        buffer = torch.full((b, hq, nq + 64, d), float("nan"), device=DEVICE, dtype=torch.bfloat16)
        out = buffer[:, :, :nq]
        _, lse, bad = run_kernel(q, k, v, cfg, return_lse=True, launch_cfg=lc, out=out)
        assert launch.runs_hopper_kernel(q, k, v, config=lc, k_group=lc.block_n, pv_fp8=kernel == "int8_fp8",
                                         is_causal=False, has_bias=False)
        assert int(bad.sum()) == 0 and torch.isnan(buffer[:, :, nq:]).all(), mode
        results.append((out.clone(), lse.clone()))
    PLANS.clear()
    for out, lse in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(lse, results[0][1])
    err = attention_error(results[0][0], exact(q, k, v))
    assert err["cosine"] >= EXACT_BOUNDS[kernel][0] and err["rel_l1"] <= EXACT_BOUNDS[kernel][1], err


@pytest.mark.skipif(not HOPPER, reason=NO_HOPPER)
@pytest.mark.parametrize("key,d,kernel,shape", [
    ("m64n128w4s4mcpdgpppnt", 128, "int8_fp8", (2, 4, 2, 1000, 333)),
    ("m64n128w4s4mcpdgpppps", 128, "int8_fp8", (2, 4, 2, 1000, 333)),
    ("m64n128w4s4mcpdgppppsnt", 128, "int8_fp8", (2, 24, 8, 960, 1100)),  # programs of two or three items
    ("m64n128w4s4pdgpppntc3", 64, "int8_fp8", (2, 4, 2, 1000, 333)),
    ("m64n128w4s3r168pdgp", 64, "int8_fp8", (2, 4, 2, 1000, 333)),
    ("m64n128w4s4mcpdgppplr", 128, "int8_fp16", (2, 4, 2, 1000, 333)),
    ("m64n128w4s2r168pdgp", 64, "int8_fp16", (2, 4, 2, 1000, 333)),
    ("m64n128w4s4mcpdgpppnt", 64, "int8_fp8", (1, 2, 1, 300, 4000)),  # one wave, every item split in parts
])
def test_hopper_kernels_flag_exactly_the_rows_that_came_out_non_finite(key, d, kernel, shape):
    """A NaN in one query row makes its INT8 scale group's outputs NaN: the Hopper kernels (and the join of a
    split tail) flag exactly the rows whose output is non-finite, and the guard recomputes their one tile, after
    which only the row exact attention makes NaN is NaN."""
    b, hq, hk, nq, nk = shape
    q, k, v = inputs(b, hq, hk, nq, nk, d, torch.bfloat16, seed=11)
    q[b - 1, 1, 250, 3] = float("nan")  # rows 192..255: one tile of 64
    cfg = SageConfig(kernel=kernel)
    lc = tuning.LaunchConfig.from_key(key)
    assert launch.runs_hopper_kernel(q, k, v, config=lc, k_group=lc.block_n, pv_fp8=kernel == "int8_fp8",
                                     is_causal=False, has_bias=False)
    if shape[3] == 300:
        items = hopper_launch.work_items_per_head(lc, nq) * b * hq
        assert hopper_launch.tail_split(lc, items, nk, q.device)[1] > 1, "the shape must split on this GPU"
    PLANS.clear()
    out, _, bad = run_kernel(q, k, v, cfg, launch_cfg=lc)
    flags = bad.view(b, hq, nq)
    assert set(flags.unique().tolist()) <= {0, 1}
    assert torch.equal(flags.bool(), ~torch.isfinite(out).all(-1))
    assert flags[b - 1, 1, 250] and int(flags.sum()) <= 64
    counter = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    out, _, _ = run_kernel(q, k, v, cfg, launch_cfg=lc, repair_counter=counter)
    PLANS.clear()
    assert int(counter.item()) == 1
    nan_rows = torch.isnan(out).any(-1)
    assert nan_rows.sum() == 1 and nan_rows[b - 1, 1, 250]


@pytest.mark.parametrize("smooth_k,pv_fp8", [(True, True), (False, False)])
def test_quantization_leaves_q_to_a_kernel_that_codes_it(smooth_k, pv_fp8):
    """With q_in_kernel (the Hopper ping-pong kernel coding Q itself) no launch codes Q and no memory holds Q's
    codes, and K's and V's codes, scales and statistics are the bits of the full quantization's: with statistics
    the first launch makes only them, without the one launch codes K alone."""
    q, k, v = inputs(1, 4, 2, 300, 200, 64, torch.float16, seed=2)
    common = dict(q_group=16, k_group=64, block_d=64, q_multiplier=0.125, smooth_k=smooth_k, smooth_v=False,
                  pv_fp8=pv_fp8)
    full = launch.quantize_qkv(q, k, v, **common)
    sites = []
    lean = launch.quantize_qkv(q, k, v, **common, q_in_kernel=True,
                               run=lambda site, fn, grid, args, kwargs: (sites.append((site, kwargs)),
                                                                         launch.launch_now(site, fn, grid, args,
                                                                                           kwargs)))
    assert all(kwargs["DO_Q"] == 0 for _, kwargs in sites)
    assert [site for site, _ in sites] == (["quantize_stats", "quantize_k_v"] if pv_fp8 else ["quantize_k"])
    assert lean["q8"].shape == full["q8"].shape and lean["q8"].untyped_storage().nbytes() == 64
    for name in ("k8", "k_scale", "k_mean", "v8", "v_scale", "v_mean"):
        if full[name] is not None:
            assert torch.equal(lean[name], full[name]), name


def test_q_is_coded_in_the_kernel_only_where_it_can_be(monkeypatch):
    """hopper_launch.codes_q_in_kernel: the ping-pong kernel with FP8 P·V, no rotary table, a 16-bit Q that TMA
    reads as it lies (any layout, aligned rows, an unpadded head dim), and the switch on."""
    monkeypatch.setattr(hopper_launch, "Q_IN_KERNEL", True)
    pp = tuning.LaunchConfig.from_key("m64n128w4s4mcpdgpppnt")
    q = torch.empty(1, 4, 256, 128, dtype=torch.bfloat16)
    can = hopper_launch.AVAILABLE

    def codes(q=q, config=pp, block_d=128, pv_fp8=True, rope=False):
        return hopper_launch.codes_q_in_kernel(q, config=config, block_d=block_d, pv_fp8=pv_fp8, rope=rope)

    assert codes() is can and codes(q.transpose(1, 2).contiguous().transpose(1, 2)) is can  # HND, NHD
    assert codes(q.half()) is can
    assert not codes(rope=True) and not codes(pv_fp8=False) and not codes(q.float())
    assert not codes(config=tuning.LaunchConfig.from_key("m64n128w4s3mcpdgp"))  # the one-warpgroup kernel
    assert not codes(q[..., :80], block_d=128)  # a padded head dim
    assert not codes(torch.empty(4 * 256 * 128 + 1, dtype=torch.bfloat16)[1:].view(1, 4, 256, 128))  # misaligned
    monkeypatch.setattr(hopper_launch, "Q_IN_KERNEL", False)
    assert not codes()


def test_a_call_plan_counts_the_memory_its_buffers_hold():
    """An expanded stand-in (Q's codes where the kernel codes Q) holds one row, not the shape it shows."""
    from sage_attention_pack.kernels.call_plan import CallPlan

    stand_in = torch.empty(1, 1, 128, dtype=torch.int8).expand(8, 1000, 128)
    plan = CallPlan({"q8": stand_in, "k8": torch.empty(8, 100, 128, dtype=torch.int8), "v_padded": 128})
    assert plan.nbytes == 128 + 8 * 100 * 128


@pytest.mark.parametrize("n", [200, 1100, 4700])
def test_statistics_loaded_two_tiles_ahead_give_the_same_bits(monkeypatch, n):
    """The statistics' loop loading two tiles ahead (launch.STATS_AHEAD 2), or pipelined by Triton in 4 stages
    (launch.STATS_STAGES), adds up the same tiles in the same order: every code, scale and mean is the one
    tile-ahead loop's, bit for bit (K sampled every 1, 2 or 8 tiles: 200, 1100 and 4700 keys; ragged last
    tiles)."""
    q, k, v = inputs(1, 2, 2, 130, n, 64, torch.bfloat16, seed=n)
    common = dict(q_group=16, k_group=64, block_d=64, q_multiplier=0.125, smooth_k=True, smooth_v=True, pv_fp8=True)
    outs = []
    for ahead, stages in ((1, 0), (2, 0), (1, 4)):
        monkeypatch.setattr(launch, "STATS_AHEAD", ahead)
        monkeypatch.setattr(launch, "STATS_STAGES", stages)
        outs.append(launch.quantize_qkv(q, k, v, **common))
    assert launch.stats_every(n) == {200: 1, 1100: 2, 4700: 8}[n]
    assert_quantizations_share_bits(outs)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors hold the same bits (NaN included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))
    return torch.equal(a, b)


def assert_quantizations_share_bits(outs: list) -> None:
    """Every quantize_qkv output of outs[1:] holds outs[0]'s bits (the scratch only carried calls write left out)."""
    for other in outs[1:]:
        for name, value in outs[0].items():
            if torch.is_tensor(value) and name not in launch.CARRY_SCRATCH:
                assert same_bits(value, other[name]), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,d", [(300, 128), (1000, 64)])
def test_the_range_pass_and_inline_ptx_give_the_same_bits(monkeypatch, dtype, n, d):
    """A two-pass INT8 group's maximum from its elementwise range (launch.RANGE_PASS: quant_kernels.group_amax),
    the coding loops' inline PTX (launch.INLINE_PTX: BF16 widened by a shift and a mask, 16-bit ranges two
    elements an instruction, four INT8 codes packed by saturating packs; on the GPU only, the interpreter runs no
    PTX) and the rounding's sign taken from the coded value (launch.SIGN_FROM_X) give every code, scale, mean and
    sum of the plain forms, bit for bit: K groups of 128 rows (two passes, smoothed) and Q's (unshifted) in ragged
    last programs, a Q row holding NaN (its group's scale NaN), one holding an infinity, and K rows of -0, in every
    input dtype."""
    q, k, v = inputs(1, 2, 2, 300, n, d, dtype, seed=n + d)
    q[0, 0, 5, 3] = float("nan")
    q[0, 1, 290, 1] = float("-inf")
    k[0, 1, 140] = -0.0
    common = dict(q_group=128, k_group=128, block_d=d, q_multiplier=0.3, smooth_k=True, smooth_v=True, pv_fp8=True)
    outs = []
    for range_pass, inline_ptx, sign_from_x in ((False, False, False), (True, False, False), (True, True, False),
                                                (False, False, True), (True, True, True)):
        monkeypatch.setattr(launch, "RANGE_PASS", range_pass)
        monkeypatch.setattr(launch, "INLINE_PTX", inline_ptx)
        monkeypatch.setattr(launch, "SIGN_FROM_X", sign_from_x)
        outs.append(launch.quantize_qkv(q, k, v, **common))
    q_scale = outs[0]["q_scale"].view(2, -1)
    assert torch.isnan(q_scale[0]).tolist() == [True, False, False]
    assert torch.isinf(q_scale[1]).tolist() == [False, False, True]
    assert_quantizations_share_bits(outs)


@pytest.mark.parametrize("n,d", [(300, 128), (1000, 64)])
def test_the_lean_carried_launch_gives_the_full_forms_bits(monkeypatch, n, d):
    """A carried launch that keeps its site's K mean (launch.CARRY_K_MEAN off) in the plain launches' leaner forms
    (launch.LEAN_CARRIED: the rounding's sign from x, and on the GPU the inline PTX under the register cap) gives the
    same codes, scales, shift and carried statistics as without them, bit for bit, a Q row holding NaN included."""
    q, k, v = inputs(1, 2, 2, 300, n, d, torch.bfloat16, seed=n * d)
    q[0, 1, 7, 2] = float("nan")
    common = dict(q_group=64, k_group=128, block_d=d, q_multiplier=0.3, smooth_k=True, smooth_v=True, pv_fp8=True,
                  pv_key_order=True)
    monkeypatch.setattr(launch, "CARRY_K_MEAN", False)
    first = launch.quantize_qkv(q, k, v, v_shift=torch.empty(2, d, device=DEVICE), **common)
    site = carried_stats.CarriedSite(2, d, DEVICE)  # primed as the dispatcher primes a site from its first call
    site.prime(first["k_mean"], first["v_mean"], first["v_scale"], launch.CARRY_MARGIN)
    start = site.values
    outs = []
    for lean in (False, True):
        monkeypatch.setattr(launch, "LEAN_CARRIED", lean)
        assert launch.lean_launch(False, True) == lean
        assert launch.sign_from_x(True, False, True) == lean
        shift, carry = torch.empty(2, d, device=DEVICE), start.clone()
        out = launch.quantize_qkv(q, k, 1.1 * v, v_shift=shift, carry=carry, **common)
        outs.append({**out, "shift": shift, "carry": carry})
        del outs[-1]["parts"]  # the statistics' partial sums: no carried launch writes them
    assert_quantizations_share_bits(outs)
    assert torch.equal(outs[0]["carry"][:, 0], start[:, 0])  # the site's K mean kept


def q_layouts(q, layout):
    """The same Q values laid out as a caller may give them: HND contiguous, NHD (ComfyUI's), a fused QKV
    projection's first slice, or rows of a longer buffer whose rest is NaN."""
    if layout == "HND":
        return q
    if layout == "NHD":
        return q.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "fused_qkv":
        return torch.stack([q.transpose(1, 2)] * 3, dim=2).contiguous()[:, :, 0].transpose(1, 2)
    return torch.cat([q, torch.full_like(q[:, :, :40], float("nan"))], dim=2)[:, :, :q.shape[2]]


# (key, head dim, Q's layout): every kind of ping-pong kernel on a contiguous Q, and Q's other layouts on one
Q_CODED = [(key, d, "HND") for key, d in (("m64n128w4s4mcpdgpppnt", 128), ("m64n128w4s4mcpdgppp", 128),
                                          ("m64n128w4s4mcpdgpppps", 128), ("m64n128w4s4mcpdgpppntlr", 128),
                                          ("m64n128w4s4mcgppp", 64), ("m64n128w4s4pdgpppntc3", 64))] + [
    ("m64n128w4s4mcpdgpppnt", 128, layout) for layout in ("NHD", "fused_qkv", "rows_apart")]


@pytest.mark.skipif(not HOPPER, reason=NO_HOPPER)
@pytest.mark.parametrize("key,d,layout", Q_CODED)
@pytest.mark.parametrize("b,hq,hk,nq,nk,granularity", [
    (2, 4, 2, 1000, 333, "per_warp"),     # ragged query and key tiles, grouped-query
    (1, 4, 4, 130, 700, "per_block"),     # one scale per query tile (per-token K scales run the portable kernel)
    (2, 24, 8, 960, 1100, "per_block"),   # persistent programs of two or three items; Q groups of a whole tile
])
def test_q_coded_in_the_kernel_gives_the_pass_codes_bits(monkeypatch, key, d, layout, b, hq, hk, nq, nk,
                                                         granularity):
    """The ping-pong kernel coding the call's BF16 Q itself (hopper_attention_kernel.quantize_q, read by TMA where it
    lies) gives the output and LSE of the same call with Q coded by the quantization pass, bit for bit, with Q's
    scales per warp and per tile, its codes read from shared memory or registers, and the call plan says it took
    that path."""
    lc = tuning.LaunchConfig.from_key(key)
    q, k, v = inputs(b, hq, hk, nq, nk, d, torch.bfloat16, seed=nq + nk)
    q_call = q_layouts(q, layout)
    assert torch.equal(q_call, q) and (layout == "HND") == q_call.is_contiguous()
    cfg = SageConfig(kernel="int8_fp8", qk_granularity=granularity)
    monkeypatch.setattr(hopper_launch, "Q_IN_KERNEL", True)
    assert hopper_launch.codes_q_in_kernel(q_call, config=lc, block_d=d, pv_fp8=True, rope=False)
    results = []
    for in_kernel, registers in ((False, False), (True, False), (True, True)):
        monkeypatch.setattr(hopper_launch, "Q_IN_KERNEL", in_kernel)
        monkeypatch.setattr(hopper_launch, "IN_KERNEL_Q_REGISTERS", registers)
        PLANS.clear()
        out, lse, bad = run_kernel(q_call, k, v, cfg, return_lse=True, launch_cfg=lc)
        assert [plan.buffers["q_in_kernel"] for plan in PLANS.plans.values()] == [in_kernel]
        assert int(bad.sum()) == 0 and torch.isfinite(out).all()
        results.append((out, lse))
    PLANS.clear()
    for out, lse in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(lse, results[0][1])
    err = attention_error(results[0][0], exact(q, k, v))
    assert err["cosine"] >= EXACT_BOUNDS["int8_fp8"][0] and err["rel_l1"] <= EXACT_BOUNDS["int8_fp8"][1], err


@pytest.mark.skipif(not HOPPER, reason=NO_HOPPER)
@pytest.mark.parametrize("key,d", [("m64n128w4s4mcpdgpppnt", 128), ("m64n128w4s4mcpdgpppps", 128),
                                   ("m64n128w4s4pdgpppntc3", 64)])
def test_q_coded_in_the_kernel_flags_and_repairs_a_nan_row(monkeypatch, key, d):
    """A NaN in one row of the call's Q, coded inside the kernel: its scale group's outputs come out NaN and are
    flagged, and the guard recomputes the tile, after which only the row exact attention makes NaN is NaN."""
    monkeypatch.setattr(hopper_launch, "Q_IN_KERNEL", True)
    lc = tuning.LaunchConfig.from_key(key)
    q, k, v = inputs(2, 4, 2, 1000, 333, d, torch.bfloat16, seed=11)
    q[1, 1, 250, 3] = float("nan")
    cfg = SageConfig(kernel="int8_fp8")
    PLANS.clear()
    out, _, bad = run_kernel(q, k, v, cfg, launch_cfg=lc)
    assert [plan.buffers["q_in_kernel"] for plan in PLANS.plans.values()] == [True]
    flags = bad.view(2, 4, 1000)
    assert torch.equal(flags.bool(), ~torch.isfinite(out).all(-1)) and flags[1, 1, 250]
    assert int(flags.sum()) == cfg.q_group_rows  # the row's scale group
    counter = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    out, _, _ = run_kernel(q, k, v, cfg, launch_cfg=lc, repair_counter=counter)
    PLANS.clear()
    assert int(counter.item()) == 1
    nan_rows = torch.isnan(out).any(-1)
    assert nan_rows.sum() == 1 and nan_rows[1, 1, 250]


def test_direct_launch_keys_what_triton_specialises_on():
    from sage_attention_pack.kernels.direct_launch import NotKeyable, argument_key, arguments_key

    x = torch.zeros(64, dtype=torch.bfloat16)
    assert argument_key(x) == (torch.bfloat16, True)
    assert argument_key(x[1:]) == (torch.bfloat16, False)  # 2 bytes in: no longer 16-byte aligned
    assert argument_key(x.float()) != argument_key(x)
    assert argument_key(1) != argument_key(True) and argument_key(16) != argument_key(17)
    assert argument_key(0.5) == argument_key(2.0)  # floats are not specialised by value
    assert argument_key("ieee") != argument_key("tf32x3")  # a word's value is compiled in (the repair's precision)
    with pytest.raises(NotKeyable):
        argument_key(object())
    values = (x, x[1:], 1, True, 16, 0.5, None)
    assert arguments_key(values) == tuple(argument_key(a) for a in values)  # the inline path keys alike


@pytest.mark.skipif(DEVICE != "cuda", reason="direct launches exist on the GPU only (the interpreter runs "
                                             "every launch through Triton)")
@pytest.mark.parametrize("key", [None, "m64n128w4s4mcpdgppp"])
def test_direct_launches_repeat_the_first_call_bit_for_bit(key):
    from sage_attention_pack.kernels.direct_launch import LAUNCHES

    if key and not HOPPER:
        pytest.skip(NO_HOPPER)
    cfg = SageConfig(kernel="int8_fp8")
    launch_cfg = tuning.LaunchConfig.from_key(key) if key else tuning.INTERPRETER_CONFIG
    q, k, v = inputs(1, 4, 2, 300, 520, 128, torch.bfloat16, seed=3)
    LAUNCHES.compiled.clear()
    PLANS.clear()
    first = run_kernel(q, k, v, cfg, launch_cfg=launch_cfg, repair_counter=torch.zeros(1, dtype=torch.int32,
                                                                                       device=DEVICE))[0]
    hits, reused = LAUNCHES.hits, PLANS.reused
    again = run_kernel(q, k, v, cfg, launch_cfg=launch_cfg, repair_counter=torch.zeros(1, dtype=torch.int32,
                                                                                       device=DEVICE))[0]
    assert LAUNCHES.hits - hits == 4  # quantization (two launches, the second writing the output shift),
    # attention, repair: all direct
    assert PLANS.reused - reused == 1  # through the first call's plan (its buffers and launch slots)
    assert torch.equal(first, again)
    # another length and a query view off the 16-byte grid: new keys, compiled through Triton, still right
    q2 = torch.randn(1, 4, 301 * 128 + 1, device=DEVICE, dtype=torch.bfloat16)[..., 1:].view(1, 4, 301, 128)
    out = run_kernel(q2, k, v, cfg, launch_cfg=launch_cfg)[0]
    assert rel_diff(out, exact(q2, k, v).to(out.dtype)) < EXACT_BOUNDS["int8_fp8"][1]


def test_call_plans_reuse_their_buffers_and_every_call_stays_exact():
    cfg = SageConfig(kernel="int8_fp8")
    PLANS.clear()
    q, k, v = inputs(1, 2, 1, 70, 150, 64, torch.float16, seed=5)
    q2, k2, v2 = inputs(1, 2, 1, 70, 150, 64, torch.float16, seed=6)
    reused = PLANS.reused
    first, lse1, _ = run_kernel(q, k, v, cfg, return_lse=True)
    assert len(PLANS.plans) == 1 and PLANS.reused == reused
    plan = next(iter(PLANS.plans.values()))
    q8_ptr = plan.buffers["q8"].data_ptr()
    second, lse2, _ = run_kernel(q2, k2, v2, cfg, return_lse=True)  # same shape: the same buffers
    assert PLANS.reused == reused + 1 and plan.buffers["q8"].data_ptr() == q8_ptr
    assert lse2.data_ptr() != lse1.data_ptr()  # what the caller keeps is never a plan's
    PLANS.clear()
    fresh, fresh_lse, _ = run_kernel(q2, k2, v2, cfg, return_lse=True)
    assert torch.equal(second, fresh) and torch.equal(lse2, fresh_lse)  # nothing of the first call left in it
    assert not torch.equal(first, second)
    # another key length is another plan; both are kept
    k3, v3 = k[:, :, :100], v[:, :, :100]
    out3, _, _ = run_kernel(q, k3, v3, cfg)
    assert len(PLANS.plans) == 2
    assert rel_diff(out3, exact(q, k3, v3).to(out3.dtype)) < EXACT_BOUNDS["int8_fp8"][1]


def quantize_through(plan, q, k, v):
    """One call's quantization launched through `plan`'s launch slots, its launches worked out anew on each call
    (no `derive`: a switch of the launch module then reaches them)."""
    return launch.quantize_qkv(q, k, v, q_group=16, k_group=64, block_d=64, q_multiplier=0.1, smooth_k=True,
                               smooth_v=True, pv_fp8=True, buffers=plan.buffers, run=plan.run)


def quantize_plan(q, k):
    from sage_attention_pack.kernels import call_plan

    return call_plan.CallPlan(launch.quant_buffers(q, k, q_group=16, k_group=64, block_d=64, smooth_k=True,
                                                   smooth_v=True, pv_fp8=True))


def test_a_launch_asking_its_plan_for_another_kernel_is_refused(monkeypatch):
    """A call plan's launch slots keep what their first launch compiled. A launch at a site that asks for other
    compile-time arguments (here the quantization kernel's warps, changed between two launches that work their
    arguments out anew) would otherwise run the first kernel on: with SAGE_ATTENTION_CHECK_PLANS (set for the
    whole test suite) it is refused, naming the site and the argument; repeats of the same launch pass."""
    from sage_attention_pack.kernels import call_plan

    monkeypatch.setattr(call_plan, "CHECK_LAUNCHES", True)
    q, k, v = inputs(1, 2, 2, 64, 64, 64, torch.float16, seed=23)
    plan = quantize_plan(q, k)
    # (the scratch only carried calls write is left out: uninitialised memory, which may hold a NaN)
    first = {name: t.clone() for name, t in quantize_through(plan, q, k, v).items()
             if isinstance(t, torch.Tensor) and name not in launch.CARRY_SCRATCH}
    again = quantize_through(plan, q, k, v)
    assert all(torch.equal(t, again[name]) for name, t in first.items())
    monkeypatch.setattr(launch, "QUANT_WARPS", 2)
    # the warp count reaches the kernel twice: as num_warps, and as WARPS for V's layout steer (quantize_v_tile)
    with pytest.raises(RuntimeError, match=r"'quantize_stats_q'.*quantize_kernel.*\(WARPS, num_warps\)"):
        quantize_through(plan, q, k, v)


def test_a_launch_whose_integers_triton_would_specialise_otherwise_is_refused(monkeypatch):
    """Triton compiles an integer argument that is 1, or that 16 divides, into the kernel. A plan's launch slot
    keeps its first kernel, so a later launch at the site whose integers specialise otherwise (here K's statistics
    sampling every key at the first launch, every 2nd tile after the launch module's cap was raised) would run
    with the first launch's 1 in it: refused, naming the argument."""
    from sage_attention_pack.kernels import call_plan

    monkeypatch.setattr(call_plan, "CHECK_LAUNCHES", True)
    q, k, v = inputs(1, 1, 1, 16, 1100, 64, torch.float16, seed=29)
    plan = quantize_plan(q, k)
    monkeypatch.setattr(launch, "MAX_STATS_EVERY", 1)
    quantize_through(plan, q, k, v)
    monkeypatch.setattr(launch, "MAX_STATS_EVERY", 16)
    with pytest.raises(RuntimeError, match=r"'quantize_stats_q'.*quantize_kernel.*specialises.*\(k_every\)"):
        quantize_through(plan, q, k, v)
    quantize_through(quantize_plan(q, k), q, k, v)  # a fresh plan compiles for what it is given


def test_a_plan_keeps_what_its_first_call_worked_out(monkeypatch):
    """sage_forward works the quantization's launches and the attention's and repair's compile-time arguments out
    once per call plan (CallPlan.derive): a switch of the launch module changed later reaches new plans only, so a
    kept plan never mixes its first kernel with other arguments, and gives the same bits."""
    from sage_attention_pack.kernels import call_plan

    monkeypatch.setattr(call_plan, "CHECK_LAUNCHES", True)
    PLANS.clear()
    cfg = SageConfig(kernel="int8_fp8")
    q, k, v = inputs(1, 2, 2, 64, 64, 64, torch.float16, seed=23)
    first, _, _ = run_kernel(q, k, v, cfg)
    plan = next(iter(PLANS.plans.values()))
    assert {"quant_launches", "attention_launch"} <= set(plan.derived)
    shipped = launch.QUANT_WARPS
    monkeypatch.setattr(launch, "QUANT_WARPS", shipped // 2)
    kept, _, _ = run_kernel(q, k, v, cfg)
    assert torch.equal(kept, first) and plan.derived["quant_launches"][2][0][2]["num_warps"] == shipped
    PLANS.clear()
    fresh, _, _ = run_kernel(q, k, v, cfg)  # a new plan takes the switch: the warps steer only the layout
    assert torch.equal(fresh, first)
    assert next(iter(PLANS.plans.values())).derived["quant_launches"][2][0][2]["num_warps"] == shipped // 2
    PLANS.clear()


def test_call_plans_stay_within_their_memory_bounds_per_thread():
    import threading

    def buffers(n):
        return lambda: {"x": torch.empty(n, dtype=torch.uint8), "count": n}

    cpu = torch.device("cpu")
    plans = CallPlans(max_bytes=1000, plan_max_bytes=600)
    a = plans.plan(cpu, ("a",), buffers(400))
    assert plans.plan(cpu, ("a",), buffers(400)) is a and plans.reused == 1 and plans.nbytes == 400
    plans.plan(cpu, ("b",), buffers(500))
    assert plans.nbytes == 900
    plans.plan(cpu, ("c",), buffers(300))  # over 1000 bytes: the least recently used plan ("a") goes
    assert [key[-1] for key in plans.plans] == [("b",), ("c",)] and plans.nbytes == 800
    big = plans.plan(cpu, ("d",), buffers(700))  # larger than one plan may be: served, not kept
    assert big.nbytes == 700 and len(plans.plans) == 2 and plans.plan(cpu, ("d",), buffers(700)) is not big
    seen = []
    worker = threading.Thread(target=lambda: seen.append(plans.plan(cpu, ("b",), buffers(500))))
    worker.start()
    worker.join()
    assert seen[0] is not plans.plan(cpu, ("b",), buffers(500))  # another thread: its own buffers
    plans.clear()
    assert not plans.plans and plans.nbytes == 0


@pytest.mark.skipif(DEVICE != "cuda", reason="streams and CUDA graphs exist on the GPU only")
def test_call_plans_give_each_stream_and_a_graph_capture_their_own_buffers():
    cfg = SageConfig(kernel="int8_fp8")
    key = "m64n128w4s4mcpdgppp" if HOPPER else None
    launch_cfg = tuning.LaunchConfig.from_key(key) if key else tuning.INTERPRETER_CONFIG
    q, k, v = inputs(1, 4, 2, 300, 520, 128, torch.bfloat16, seed=7)
    PLANS.clear()
    eager = run_kernel(q, k, v, cfg, launch_cfg=launch_cfg)[0]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = run_kernel(q, k, v, cfg, launch_cfg=launch_cfg)[0]
    torch.cuda.current_stream().wait_stream(side)
    assert len(PLANS.plans) == 2 and torch.equal(on_side, eager)
    # a graph captured after the eager calls: it keeps fresh buffers, and replays on new inputs exactly
    static = [t.clone() for t in (q, k, v)]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run_kernel(*static, cfg, launch_cfg=launch_cfg)[0]
    assert len(PLANS.plans) == 2
    q2, k2, v2 = inputs(1, 4, 2, 300, 520, 128, torch.bfloat16, seed=8)
    for dst, src in zip(static, (q2, k2, v2)):
        dst.copy_(src)
    run_kernel(q, k, v, cfg, launch_cfg=launch_cfg)  # the eager plan in between: must not disturb the graph
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, run_kernel(q2, k2, v2, cfg, launch_cfg=launch_cfg)[0])


@pytest.mark.parametrize("nk,d", [(333, 128), (4700, 64)])
def test_v_range_folds_in_by_atomics_and_is_set_back_after_every_call(nk, d):
    """V's range (the FP8 codes' per-channel scales) comes from the statistics' atomic maximum and minimum into one
    row per head: after every call that row is back at (-inf, inf), with or without a buffer for the output shift,
    so a call on a V a hundred times smaller, on the same buffers, codes exactly as on fresh ones (no stale range
    survives), and the scales are the reference's: V's maximum deviation from its mean over every key."""
    q, k, v = inputs(1, 4, 2, 64, nk, d, torch.bfloat16, seed=nk + d)
    args = dict(q_group=16, k_group=128, block_d=d, smooth_k=True, smooth_v=True, pv_fp8=True, q_multiplier=1.0)
    buffers = launch.quant_buffers(q, k, **{a: args[a] for a in args if a != "q_multiplier"})
    reset = torch.tensor([float("-inf"), float("inf")], device=DEVICE).repeat_interleave(d).view(2, d)
    small = (v.float() / 100).to(v.dtype)
    for shift in (torch.empty((2, d), device=DEVICE), None):
        launch.quantize_qkv(q, k, v, buffers=buffers, v_shift=shift, **args)
        assert torch.equal(buffers["v_range"], reset.expand_as(buffers["v_range"]))
        reused = {name: t.clone() for name, t in launch.quantize_qkv(q, k, small, buffers=buffers, v_shift=shift,
                                                                      **args).items() if torch.is_tensor(t)}
        assert torch.equal(buffers["v_range"], reset.expand_as(buffers["v_range"]))
        fresh = launch.quantize_qkv(q, k, small, v_shift=None if shift is None else torch.empty_like(shift), **args)
        for name in ("v8", "v_scale", "v_mean"):
            assert torch.equal(reused[name].float(), fresh[name].float()), name
    vf = small.float().reshape(2, nk, d)
    mean = vf.mean(1, keepdim=True)
    expected = (vf - mean).abs().amax(1) / launch.FP8_E4M3_MAX
    torch.testing.assert_close(fresh["v_scale"], expected, rtol=1e-5, atol=0)


def test_quantization_buffers_are_made_without_host_data(monkeypatch):
    """A call whose plan is too large to keep (call_plan.PLAN_MAX_BYTES) makes its buffers on every call: a tensor
    copied from host memory there (a pageable copy) would make the host wait for the GPU each time, leaving the GPU
    idle between calls (0.3-0.5 ms a call at 16k keys on an H100). quant_buffers builds everything on the device."""
    q, k, _ = inputs(1, 4, 2, 64, 300, 64, torch.bfloat16)

    def host_data(*args, **kwargs):
        raise AssertionError("quant_buffers copied a tensor from host data")

    monkeypatch.setattr(torch, "tensor", host_data)
    monkeypatch.setattr(torch, "as_tensor", host_data)
    buffers = launch.quant_buffers(q, k, q_group=16, k_group=64, block_d=64, smooth_k=True, smooth_v=True,
                                   pv_fp8=True)
    assert torch.isneginf(buffers["v_range"][:, 0]).all() and torch.isposinf(buffers["v_range"][:, 1]).all()


@pytest.mark.parametrize("nk,d", [(333, 128), (4700, 128), (1000, 64)])
def test_quantization_writes_the_output_shift_when_its_last_v_program_is_in(nk, d):
    """Given where to write it, the quantization's second launch writes the output shift itself: the last V
    program of each head and channel block to count in on its ticket adds up every program's code sums (37 V
    programs a head at 4700 keys, no multiple of the sum's step of 32; channel blocks of 64 and of 32 at head dim
    64; grouped-query heads). V's mean minus the mean of its dequantized codes, to FP32 precision; the tickets back
    at 0 after the call; the same bits again on the next call (a fixed order: a render repeats exactly); and a
    call without a buffer for the shift leaves no ticket counted."""
    q, k, v = inputs(1, 4, 2, 64, nk, d, torch.bfloat16, seed=nk)
    args = dict(q_group=16, k_group=128, block_d=d, smooth_k=True, smooth_v=True, pv_fp8=True)
    buffers = launch.quant_buffers(q, k, **args)
    shifts = []
    for _ in range(2):  # the second call on the same buffers, as a call plan's
        shift = torch.full((2, d), float("nan"), device=DEVICE)
        qz = launch.quantize_qkv(q, k, v, q_multiplier=1.0, buffers=buffers, v_shift=shift, **args)
        assert (buffers["v_tickets"] == 0).all()
        shifts.append(shift)
    sums = qz["v_code_sums"]
    assert sums.shape[1] == -(-nk // launch.V_ROWS)
    expected = qz["v_mean"].double() - sums.double().sum(1) / nk
    torch.testing.assert_close(shifts[0].double(), expected, rtol=0, atol=2e-6)
    assert torch.equal(shifts[0], shifts[1])
    launch.quantize_qkv(q, k, v, q_multiplier=1.0, buffers=buffers, **args)
    assert (buffers["v_tickets"] == 0).all()
