"""Rotary tables handed to the attention (ComfyUI's Flux `pe`): the kernels rotate Q and K inside their
quantization (kernels/rotary.py), the exact paths rotate them as ComfyUI does (sage_core/rope.py). Run for real:
through Triton's interpreter on the CPU, natively on a GPU."""
import functools
import os

import pytest
import torch
import torch.nn.functional as F

from sage_attention_pack.kernels import launch, tuning
from sage_attention_pack.sage_core import backend
from sage_attention_pack.sage_core import rope as rotary
from sage_attention_pack.sage_core.config import SageConfig
from sage_attention_pack.sage_core.dispatch import DispatchStats, attention
from sage_attention_pack.sage_core.metrics import attention_error
from sage_attention_pack.sage_core.reference import sage_reference
from test_kernels import DEVICE, SAME_ALGO_TOL, exact, inputs, rel_diff

pytestmark = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="no GPU and TRITON_INTERPRET is not 1: the kernels cannot run here")


def flux_pe(n: int, d: int, batch: int = 1, heads: int = 1, theta: float = 10000.0, offset: int = 0):
    """A one-axis rotary table as ComfyUI's flux/math.rope builds it (sage_core/rope.axis_table), positions
    offset + 0..n-1 (offset per batch entry when batch > 1, so that the entries differ), broadcast over heads."""
    pos = torch.arange(n, dtype=torch.float32)[None, :] + offset + 37.0 * torch.arange(batch)[:, None]
    pe = rotary.axis_table(pos, d, theta).unsqueeze(1)
    return pe.expand(batch, heads, n, d // 2, 2, 2).contiguous().to(DEVICE)


def rotated_fp32(x, pe):
    """x rotated by pe in FP32, not rounded back to x's dtype: what the fused rotation codes."""
    return rotary.rotate(x.float(), pe)


def test_rotation_is_comfyuis_own():
    """sage_core/rope.rotate computes what ComfyUI's Flux attention computes (comfy/ldm/flux/math.py, restated here
    so that the test does not need ComfyUI), bit for bit, in q's dtype."""
    q = inputs(2, 3, 3, 50, 50, 64, torch.bfloat16, seed=1)[0]
    pe = flux_pe(50, 64, batch=2)
    pairs = q.to(dtype=pe.dtype).reshape(*q.shape[:-1], -1, 1, 2)
    comfy = (pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]).reshape(*q.shape).type_as(q)
    assert torch.equal(rotary.rotate(q, pe), comfy) and rotary.rotate(q, pe).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # Flux's table, Qwen-Image's and Lumina 2's
def test_the_kernels_table_holds_each_channels_own_and_partner_coefficient(dtype):
    """launch.rope_table re-lays pe as the kernels read it (kernels/rotary.py): own coefficient times the channel plus
    partner coefficient times its pair partner is ComfyUI's rotation, bit for bit in FP32; a model-dtype table is
    widened exactly; a table already in that layout is taken as it is, and pe's own layout is refused by the
    launch arguments with a message that names the layout they take."""
    pe = flux_pe(7, 16, batch=2, heads=3).to(dtype)
    table = launch.rope_table(pe.transpose(-1, -2).contiguous().transpose(-1, -2))  # any strides
    assert table.shape == (2, 3, 7, 2, 16) and table.dtype == torch.float32 and table.is_contiguous()
    x = torch.randn(2, 3, 7, 16, device=pe.device)
    partner = x.unflatten(-1, (8, 2)).flip(-1).flatten(-2)
    assert torch.equal(table[..., 0, :] * x + table[..., 1, :] * partner, rotary.rotate(x, pe.float()))
    assert launch.rope_table(table) is table and launch.rope_table(None) is None
    assert launch.rope_strides(table[:, :1]) == (table.stride(0), 0, 32)
    with pytest.raises(ValueError, match=r"\[B, H, N, 2, D\]"):
        launch.rope_strides(pe.float())


@pytest.mark.parametrize("b,hq,hk,n,d,pe_batch,pe_heads,layout", [
    (1, 2, 2, 333, 64, 1, 1, "HND"),      # chunk and tile edges, every key in K's statistics
    (2, 4, 2, 150, 40, 2, 1, "NHD"),      # grouped-query, a table per batch entry, a padded head dim, strided views
    (1, 2, 2, 1500, 128, 1, 2, "HND"),    # K's mean from a sample of the keys; a table per head
])
def test_quantization_codes_q_and_k_rotated_by_the_table(b, hq, hk, n, d, pe_batch, pe_heads, layout):
    """Q's and K's codes, scales and K's mean with the table fused are those of Q and K rotated first in FP32 (the
    codes within one step: the kernel may fuse the rotation's multiply and add); V's are untouched."""
    q, k, v = inputs(b, hq, hk, n, n, d, torch.bfloat16, seed=n)
    if layout == "NHD":  # [B, N, H, D] storage seen as [B, H, N, D] views
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    pe = flux_pe(n, d, batch=pe_batch, heads=pe_heads)
    block_d = launch.padded_head_dim(d)
    args = dict(q_group=64, k_group=128, block_d=block_d, q_multiplier=0.1275, smooth_k=True, smooth_v=True,
                pv_fp8=True)
    fused = launch.quantize_qkv(q, k, v, rope=pe, **args)
    first = launch.quantize_qkv(rotated_fp32(q, pe), rotated_fp32(k, pe), v, **args)
    for codes in ("q8", "k8"):
        assert (fused[codes].int() - first[codes].int()).abs().max() <= 1, codes
        assert (fused[codes] != first[codes]).float().mean() < 1e-3, codes
    for name in ("q_scale", "k_scale", "k_mean"):
        torch.testing.assert_close(fused[name], first[name], rtol=1e-5, atol=1e-6)
    for name in ("v8", "v_scale", "v_mean"):
        assert torch.equal(fused[name].float(), first[name].float()), name


def test_the_rotating_quantization_keeps_the_look_ahead_loop_and_pipelined_gives_the_same_bits(monkeypatch):
    """With the table inside, the statistics' loop is the look-ahead one (launch.ROPE_STATS_STAGES, measured faster
    there than the pipelined loop that plain calls take); pipelined in 4 stages it adds up the same tiles in the
    same order: every code, scale and mean the same bits (K's mean from a sample: 1100 keys)."""
    q, k, v = inputs(1, 2, 2, 1100, 1100, 64, torch.bfloat16, seed=4)
    pe = flux_pe(1100, 64)
    args = dict(q_group=64, k_group=128, block_d=64, smooth_k=True, smooth_v=True, pv_fp8=True)
    for rope, stages in ((False, launch.STATS_STAGES), (True, 0)):
        launches = launch.quant_launches(q, k, **args, pv_key_order=False, finish_shift=True, rope=rope,
                                         v_padded=1152)[2]
        assert {kwargs["STATS_STAGES"] for _, _, kwargs in launches} == {stages}
    outs = []
    for stages in (0, 4):
        monkeypatch.setattr(launch, "ROPE_STATS_STAGES", stages)
        outs.append(launch.quantize_qkv(q, k, v, rope=pe, q_multiplier=0.125, **args))
    for name, value in outs[0].items():
        if torch.is_tensor(value) and name not in launch.CARRY_SCRATCH:
            assert torch.equal(value.float(), outs[1][name].float()), name


@pytest.mark.parametrize("kernel", ["int8_fp16", "int8_fp8"])
@pytest.mark.parametrize("b,hq,hk,n,d", [(1, 2, 2, 200, 64), (2, 4, 2, 130, 128)])
def test_a_call_with_a_table_matches_the_reference_and_exact_attention(kernel, b, hq, hk, n, d):
    """The whole call with the table handed over: the reference of the same algorithm on the rotated Q and K, in the
    tiles the call ran with, and against exact attention on Q and K rotated as ComfyUI rotates them, as close as the
    same call on Q and K that ComfyUI rotated first (the rotation turns K's channel offset with the position, which
    K's smoothing then takes off less well: that costs both the same)."""
    q, k, v = inputs(b, hq, hk, n, n, d, torch.bfloat16, seed=d + n)
    pe = flux_pe(n, d, batch=b)
    cfg = SageConfig(kernel=kernel)
    stats = DispatchStats()
    out = attention(q, k, v, config=cfg, stats=stats, rope=pe)
    assert stats.sage[kernel] == 1 and not stats.fallback
    # the reference quantizes in the tiles the call ran with: this device's tuned configuration (or the interpreter's)
    lc = backend.call_config(q, k, config=cfg, pv_fp8=kernel == "int8_fp8", is_causal=False)
    q_group, k_group = launch.quant_groups(cfg.q_group_rows, cfg.k_group_rows, lc)
    ref = sage_reference(q, k, v, q_group=q_group, k_group=k_group, block_m=lc.block_m, pv_fp8=kernel == "int8_fp8",
                         smooth_k=cfg.smooth_k, smooth_v=cfg.smooth_v, rope=pe, k_stats_every=launch.stats_every(n))
    assert rel_diff(out, ref) < 4 * SAME_ALGO_TOL[kernel]
    qr, kr = rotary.rotate(q, pe), rotary.rotate(k, pe)
    fused = attention_error(out, exact(qr, kr, v))
    first = attention_error(attention(qr, kr, v, config=cfg), exact(qr, kr, v))
    assert fused["rel_l1"] <= first["rel_l1"] * 1.1 + 1e-4 and fused["cosine"] >= first["cosine"] - 1e-4, (fused,
                                                                                                         first)
    assert fused["cosine"] >= 0.999 and fused["rel_l1"] <= 0.05, fused


def test_the_interpreters_tiles_match_the_reference_closely():
    """With the interpreter's own launch configuration (query tiles of its block_m, K groups of its block_n) the
    kernel and the reference quantize identically: only accumulation order differs."""
    q, k, v = inputs(1, 2, 2, 150, 150, 64, torch.float16, seed=5)
    pe = flux_pe(150, 64)
    cfg = tuning.INTERPRETER_CONFIG
    out = torch.full_like(q, float("nan"))
    launch.sage_forward(q, k, v, out, sm_scale=64 ** -0.5, is_causal=False, bias=None, q_group=16, k_group=0,
                        pv_fp8=False, smooth_k=True, smooth_v=False, return_lse=False, config=cfg, rope=pe)
    ref = sage_reference(q, k, v, q_group=16, k_group=cfg.block_n, block_m=cfg.block_m, smooth_k=True, rope=pe)
    assert rel_diff(out, ref) < SAME_ALGO_TOL["int8_fp16"]


@pytest.mark.parametrize("kernel", ["int8_fp16", "int8_fp8"])
def test_flagged_tiles_are_recomputed_with_q_and_k_rotated(kernel):
    """A NaN in Q flags its tile; the repair recomputes it exactly from the caller's Q and K rotated by the table
    (in FP32), so its rows are exact attention on the rotated inputs, not on the raw ones."""
    q, k, v = inputs(1, 2, 2, 150, 150, 64, torch.float32, seed=23)
    q[0, 1, 5, 3] = float("nan")
    pe = flux_pe(150, 64)
    stats = DispatchStats()
    out = attention(q, k, v, config=SageConfig(kernel=kernel), stats=stats, rope=pe)
    ref = exact(rotary.rotate(q, pe), rotary.rotate(k, pe), v)
    assert stats.recomputed >= 1
    assert torch.equal(torch.isnan(out).any(-1), torch.isnan(ref).any(-1))  # only row 5 of head 1, like SDPA
    torch.testing.assert_close(out[0, 1, 6:32].double(), ref[0, 1, 6:32], rtol=1e-4, atol=1e-5)
    unrotated = exact(q, k, v)
    assert (out[0, 1, 6:32].double() - unrotated[0, 1, 6:32]).abs().max() > 1e-2  # the rotation mattered


def test_exact_paths_rotate_as_comfyui_does():
    """Every call served exactly rotates Q and K first with ComfyUI's arithmetic: with the kernels off, the output
    is PyTorch's attention on ComfyUI's rotated Q and K, bit for bit; so is a fallback's."""
    q, k, v = inputs(1, 2, 2, 90, 90, 64, torch.bfloat16, seed=3)
    pe = flux_pe(90, 64)
    want = F.scaled_dot_product_attention(rotary.rotate(q, pe), rotary.rotate(k, pe), v)
    stats = DispatchStats()
    assert torch.equal(attention(q, k, v, config=SageConfig(kernel="off"), stats=stats, rope=pe), want)
    causal = torch.ones(90, 90, dtype=torch.bool, device=DEVICE).tril()  # per query: served exactly
    assert torch.equal(attention(q, k, v, config=SageConfig(kernel="int8_fp16"), stats=stats, rope=pe,
                                 attn_mask=causal),
                       F.scaled_dot_product_attention(rotary.rotate(q, pe), rotary.rotate(k, pe), v, attn_mask=causal))
    assert stats.exact["kernel off"] == 1 and stats.fallback["per-query mask"] == 1


def test_a_call_asking_for_the_lse_rotates_first_and_keeps_it_exact():
    """The LSE's correction for K's smoothing needs the rotated Q: such a call rotates Q and K first (ComfyUI's
    arithmetic) and its LSE is that of the rotated scores."""
    q, k, v = inputs(1, 2, 2, 130, 130, 64, torch.float32, seed=9)
    pe = flux_pe(130, 64)
    cfg = SageConfig(kernel="int8_fp16")
    out, lse = attention(q, k, v, config=cfg, rope=pe, return_lse=True)
    qr, kr = rotary.rotate(q, pe), rotary.rotate(k, pe)
    first_out, first_lse = attention(qr, kr, v, config=cfg, return_lse=True)
    assert torch.equal(out, first_out) and torch.equal(lse, first_lse)
    true_lse = torch.logsumexp((qr.double() @ kr.double().transpose(-1, -2)) * 64 ** -0.5, dim=-1)
    assert (lse.double() - true_lse).abs().max() < 0.1  # the 8-bit scores' own error, not a missing correction


def test_a_table_laid_out_otherwise_is_read_the_same():
    """The kernels read the table re-laid in their own layout (launch.rope_table), whatever pe's strides: a table
    whose 2x2 matrices are not contiguous (a transposed view) gives the same output as its contiguous copy."""
    q, k, v = inputs(1, 2, 2, 100, 100, 64, torch.bfloat16, seed=4)
    pe = flux_pe(100, 64)
    odd = pe.transpose(-1, -2).contiguous().transpose(-1, -2)  # the same values, columns outermost
    assert odd.stride()[3:] != (4, 2, 1) and torch.equal(odd, pe)
    cfg = SageConfig(kernel="int8_fp8")
    assert torch.equal(attention(q, k, v, config=cfg, rope=odd), attention(q, k, v, config=cfg, rope=pe))


def cos_sin(n: int, heads: int, d: int, seed: int = 0):
    """A per-head cos and sin [1, n, heads·d] as LTX-Video hands them (angles of random frequencies)."""
    g = torch.Generator().manual_seed(seed)
    angles = torch.rand(1, n, heads * d // 2, generator=g) * 40.0
    return (angles.cos().repeat_interleave(2, -1).to(DEVICE), angles.sin().repeat_interleave(2, -1).to(DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernels_layout_made_from_cos_and_sin_is_from_cos_sins_table(dtype):
    """rope.kernel_table_from_cos_sin gives the values launch.rope_table makes of from_cos_sin's table, in cos's
    dtype, as a view the kernels read without a copy; rope.rotate with it rotates as with from_cos_sin's, bit for
    bit in the table's dtype, and the attention with either table is the same, bit for bit (a BF16 table's values
    widen exactly in the kernels)."""
    cos, sin = (t.to(dtype) for t in cos_sin(70, 2, 64))
    table = rotary.kernel_table_from_cos_sin(cos, sin, 2)
    pe = rotary.from_cos_sin(cos, sin, 2)
    assert table.shape == (1, 2, 70, 2, 64) and table.dtype == dtype
    assert torch.equal(table.float(), launch.rope_table(pe)) and launch.rope_table(table) is table
    x = inputs(1, 2, 2, 70, 70, 64, dtype, seed=2)[0]
    assert torch.equal(rotary.rotate(x, table), rotary.rotate(x, pe))
    q, k, v = inputs(1, 2, 2, 70, 70, 64, torch.bfloat16, seed=3)
    cfg = SageConfig(kernel="int8_fp8")
    assert torch.equal(attention(q, k, v, config=cfg, rope=table), attention(q, k, v, config=cfg, rope=pe))


def test_a_handed_table_is_made_once_per_source_and_again_where_the_source_changed():
    """rope.HandedTables keeps the kernels' table of the last source: the same tensor object again is a hit; another
    object (even with equal values), an in-place change (outside inference mode), other `extra` or a clear() make it
    anew; under inference mode the same object is a hit."""
    tables = rotary.HandedTables()
    pe = flux_pe(20, 64)
    made = []

    def make():
        made.append(1)
        return rotary.kernel_table(pe)

    first = tables.get((pe,), make)
    assert tables.get((pe,), make) is first and len(made) == 1 and torch.equal(first, launch.rope_table(pe))
    assert tables.get((pe.clone(),), make) is not first and len(made) == 2
    tables.get((pe,), make)
    pe.mul_(1.0)  # an in-place change: the version counter moves
    tables.get((pe,), make)
    assert len(made) == 4
    tables.get((pe,), make, extra=3)
    assert len(made) == 5 and tables.made == 5
    tables.clear()
    tables.get((pe,), make, extra=3)
    assert len(made) == 6
    with torch.inference_mode():
        frozen = flux_pe(20, 64)
        kept = tables.get((frozen,), lambda: rotary.kernel_table(frozen))
        assert tables.get((frozen,), make) is kept and len(made) == 6


def test_a_handed_table_does_not_outlive_its_source_object():
    """The kept entry holds its sources weakly: a source that is gone never matches, even where a new tensor takes
    its address and shape."""
    tables = rotary.HandedTables()
    pe = flux_pe(20, 64)
    tables.get((pe,), functools.partial(rotary.kernel_table, pe))
    refs = tables.entry[0]
    del pe
    assert refs[0]() is None
    again = flux_pe(20, 64)
    tables.get((again,), functools.partial(rotary.kernel_table, again))
    assert tables.made == 2


@pytest.mark.parametrize("bad,message", [
    (lambda t: t.to(torch.float64), r"rope in the kernels' layout must be FP32, FP16 or BF16"),
    (lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2), r"rope in the kernels' layout must be FP32, FP16 "
                                                                   r"or BF16 with its last two axes contiguous"),
    (lambda t: t[..., :32], r"or \[1 or 1, 1 or 2, 90, 2, 64\] \(the kernels' layout\)"),
])
def test_a_table_in_the_kernels_layout_that_does_not_fit_is_refused(bad, message):
    q, k, v = inputs(1, 2, 2, 90, 90, 64, torch.bfloat16, seed=6)
    stats = DispatchStats()
    with pytest.raises((ValueError, TypeError), match=message):
        attention(q, k, v, config=SageConfig(kernel="int8_fp8"), stats=stats,
                  rope=bad(rotary.kernel_table_from_cos_sin(*cos_sin(90, 2, 64), 2)))
    assert stats.total == 0


@pytest.mark.parametrize("bad,message", [
    (lambda pe: pe[..., :31, :, :], r"rope must be a rotary table of shape \[1 or 1, 1 or 2, 90, 32, 2, 2\]"),
    (lambda pe: pe[:, :, :80], r"rope must be a rotary table of shape"),
    (lambda pe: pe.expand(3, 1, 90, 32, 2, 2), r"rope of shape \(3, 1, 90, 32, 2, 2\) does not broadcast"),
    (lambda pe: pe.to(torch.int32), r"rope must be a floating-point table"),
    (lambda pe: pe.flatten(), r"rope must be a rotary table of shape"),
    (lambda pe: "pe", r"rope must be a torch.Tensor"),
])
def test_a_table_that_does_not_fit_is_refused_naming_rope(bad, message):
    """A table that does not fit the call is a caller's bug: a clear error naming `rope`, before any work."""
    q, k, v = inputs(1, 2, 2, 90, 90, 64, torch.bfloat16, seed=6)
    stats = DispatchStats()
    with pytest.raises((ValueError, TypeError), match=message):
        attention(q, k, v, config=SageConfig(kernel="int8_fp8"), stats=stats, rope=bad(flux_pe(90, 64)))
    assert stats.total == 0


def test_a_table_for_other_key_lengths_is_refused():
    q, k, v = inputs(1, 2, 2, 90, 90, 64, torch.bfloat16, seed=6)
    with pytest.raises(ValueError, match="rope needs as many keys as queries"):
        attention(q, k[:, :, :50], v[:, :, :50], config=SageConfig(kernel="int8_fp8"), rope=flux_pe(90, 64))


@pytest.mark.parametrize("return_lse", [False, True])
def test_a_kernel_failure_falls_back_to_attention_on_q_and_k_rotated_once(monkeypatch, return_lse):
    """A kernel that fails on a call with a table: the fallback is exact attention on Q and K rotated once, as
    ComfyUI rotates them (also where the call asked for the LSE and so rotated them before the kernel ran)."""
    from sage_attention_pack.sage_core import backend

    q, k, v = inputs(1, 2, 2, 70, 70, 64, torch.float32, seed=12)
    pe = flux_pe(70, 64)

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel here")

    monkeypatch.setattr(backend, "run", broken)
    stats = DispatchStats()
    got = attention(q, k, v, config=SageConfig(kernel="int8_fp16"), stats=stats, rope=pe, return_lse=return_lse)
    out = got[0] if return_lse else got
    assert torch.equal(out, F.scaled_dot_product_attention(rotary.rotate(q, pe), rotary.rotate(k, pe), v))
    assert stats.fallback == {"kernel error: RuntimeError": 1} and stats.rotary_fused == 0


def test_auto_times_each_candidate_as_it_would_run_the_table(monkeypatch):
    """`auto` decides calls with a table under keys of their own, and times Sage with the table handed over and the
    exact candidate on Q and K rotated first: what each would run."""
    from sage_attention_pack.sage_core import autoselect, backend

    q, k, v = inputs(1, 2, 2, 70, 70, 64, torch.float16, seed=13)
    pe = flux_pe(70, 64)
    cfg = SageConfig(kernel="auto")
    plain = autoselect.choice_key(q, k, False, False, cfg)
    assert autoselect.choice_key(q, k, False, False, cfg, True) == plain + "|rope"
    tables, rotations = [], []
    run, rotate = backend.run, rotary.rotate
    monkeypatch.setattr(backend, "run", lambda *a, **kw: tables.append(kw.get("rope")) or run(*a, **kw))
    monkeypatch.setattr(rotary, "rotate", lambda x, t: rotations.append(t) or rotate(x, t))
    timed = autoselect.time_variants(q, k, v, is_causal=False, bias=None, config=cfg, rope=pe)
    assert "sdpa" in timed and "int8_fp16" in timed
    assert tables and all(t is pe for t in tables)
    assert rotations and all(t is pe for t in rotations)


def test_a_failure_with_a_table_is_remembered_apart_from_calls_without_one(monkeypatch):
    """A kernel that fails to compile with the rotation (remembered for calls of its kind, which then go straight to
    exact attention) leaves calls without a table on the kernels, and the other way round."""
    from sage_attention_pack.sage_core import backend

    q, k, v = inputs(1, 2, 2, 70, 70, 64, torch.float16, seed=14)
    pe = flux_pe(70, 64)
    run = backend.run

    def no_rotation(*args, **kwargs):
        if kwargs.get("rope") is not None:
            raise RuntimeError("the rotating quantization does not compile here")
        return run(*args, **kwargs)

    monkeypatch.setattr(backend, "run", no_rotation)
    stats, cfg = DispatchStats(), SageConfig(kernel="int8_fp16")
    for _ in range(2):
        attention(q, k, v, config=cfg, stats=stats, rope=pe)
    attention(rotary.rotate(q, pe), rotary.rotate(k, pe), v, config=cfg, stats=stats)
    assert stats.fallback == {"kernel error: RuntimeError": 2} and stats.sage == {"int8_fp16": 1}


def test_a_key_padding_mask_and_a_table_are_served_together():
    """HunyuanVideo's blocks hand over a text-padding mask with the table: the kernels take the mask as a key bias and
    rotate Q and K, against exact masked attention on the rotated Q and K."""
    q, k, v = inputs(2, 2, 2, 96, 96, 64, torch.bfloat16, seed=15)
    pe = flux_pe(96, 64, batch=2)
    keep = torch.ones(2, 1, 1, 96, dtype=torch.bool, device=DEVICE)
    keep[1, ..., 70:] = False  # the second prompt's padding
    stats = DispatchStats()
    out = attention(q, k, v, config=SageConfig(kernel="int8_fp8"), stats=stats, rope=pe, attn_mask=keep)
    assert stats.sage == {"int8_fp8": 1} and stats.rotary_fused == 1
    ref = F.scaled_dot_product_attention(rotary.rotate(q, pe).double(), rotary.rotate(k, pe).double(), v.double(),
                                         attn_mask=keep)
    err = attention_error(out, ref)
    assert err["cosine"] >= 0.999 and err["rel_l1"] <= 0.05, err
