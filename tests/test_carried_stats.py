"""Carried statistics (kernels/carried_stats.py): a call site's K and V statistics from its call before, one
quantization launch instead of two. Run for real: through Triton's interpreter on the CPU, natively on a GPU."""
import os

import pytest
import torch

from sage_attention_pack.kernels import carried_stats, launch
from sage_attention_pack.kernels.call_plan import PLANS
from sage_attention_pack.sage_core import backend
from sage_attention_pack.sage_core.config import SageConfig
from sage_attention_pack.sage_core.dispatch import DispatchStats, attention
from sage_attention_pack.sage_core.metrics import attention_error
from test_kernels import DEVICE, EXACT_BOUNDS, HOPPER, NO_HOPPER, exact, inputs, rel_diff
from test_rope import flux_pe, rotated_fp32

pytestmark = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="no GPU and TRITON_INTERPRET is not 1: the kernels cannot run here")
FP8 = SageConfig(kernel="int8_fp8")
# a carried call against the same call with its own statistics: the codes' centres and scales differ, so the
# rounding does; the same bound as two FP8 kernels of the same algorithm
CARRIED_TOL = 2e-2


@pytest.fixture(autouse=True)
def fresh_sites(monkeypatch):
    """Cleared sites, and carried statistics for calls without a rotary table too (carried_stats.PLAIN, off as
    shipped): the same kernels serve both, and most tests here need no table."""
    monkeypatch.setattr(carried_stats, "PLAIN", True)
    carried_stats.SITES.clear()
    yield
    carried_stats.SITES.clear()


def test_as_shipped_calls_with_the_rotary_table_carry_and_plain_calls_keep_their_own(monkeypatch):
    """carried_stats.ROTARY on, PLAIN off (measured: bench/NOTES.md, rounds "Statistics carried from step to step,
    …" and "The carried launches measured on the H100, …"): a plain call with a site runs with its own statistics
    and makes no site; one with its table makes one."""
    monkeypatch.setattr(carried_stats, "PLAIN", False)
    q, k, v = inputs(1, 2, 2, 96, 96, 64, torch.bfloat16, seed=4)
    for _ in range(2):
        assert torch.equal(call(q, k, v), attention(q, k, v, config=FP8))
    assert len(carried_stats.SITES) == 0
    call(q, k, v, rope=flux_pe(96, 64))
    assert len(carried_stats.SITES) == 1


def call(q, k, v, key="site", stats=None, config=FP8, **kwargs):
    return attention(q, k, v, config=config, stats=stats or DispatchStats(), carry_key=key, **kwargs)


def only_site() -> carried_stats.CarriedSite:
    assert len(carried_stats.SITES) == 1
    return next(iter(carried_stats.SITES._sites.values()))


def check_carried_values(site, k, v, margin=launch.CARRY_MARGIN):
    """The site carries V's mean and V's scale (its range's, about 0: no V smoothing, times the margin), and with
    launch.CARRY_K_MEAN the whole K's mean, per batch entry and KV head (without it the site keeps its first call's
    K mean: test_without_carrying_k_the_site_keeps_its_first_calls_k_mean)."""
    d = k.shape[-1]
    kf, vf = k.float().flatten(0, 1), v.float().flatten(0, 1)
    if launch.CARRY_K_MEAN:
        torch.testing.assert_close(site.values[:, 0, :d], kf.mean(1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(site.values[:, 1, :d], vf.mean(1), rtol=1e-4, atol=1e-5)
    reach = torch.maximum(vf.amax(1), -vf.amin(1))
    torch.testing.assert_close(site.values[:, 2, :d], reach / launch.FP8_E4M3_MAX * margin, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("carry_k", [False, True])
@pytest.mark.parametrize("shape", [(1, 2, 2, 200, 300, 64), (2, 4, 2, 130, 257, 128)])
def test_a_carried_call_stays_within_the_bounds_and_carries_this_calls_statistics(monkeypatch, shape, carry_k):
    """The first call at a site runs as without carrying (the same bits) and primes it; the next, with the
    statistics carried, is as close to FP32 attention as a call with its own, repairs nothing, and carries V's mean
    and V's scale on, and with launch.CARRY_K_MEAN the whole K's mean (not a sample's); without it (as shipped) the
    launch takes the lean forms. GQA, ragged key counts and batch entries too."""
    monkeypatch.setattr(launch, "CARRY_K_MEAN", carry_k)
    assert launch.lean_launch(False, True) == (not carry_k)
    q, k, v = inputs(*shape, torch.bfloat16, seed=3)
    plain = attention(q, k, v, config=FP8)
    stats = DispatchStats()
    first = call(q, k, v, stats=stats)
    assert torch.equal(first, plain)
    second = call(q, k, v, stats=stats)
    want = exact(q, k, v)
    cosine, rel_l1 = EXACT_BOUNDS["int8_fp8"]
    err = attention_error(second, want)
    assert err["cosine"] >= cosine and err["rel_l1"] <= rel_l1, err
    assert rel_diff(second, plain) < CARRIED_TOL
    assert stats.recomputed == 0
    check_carried_values(only_site(), k, v)


def test_the_carried_call_takes_one_quantization_launch():
    """Primed, a site's call launches the quantization once (Q's, K's and V's codes together), where the first
    call launched the statistics and then the codes."""
    q, k, v = inputs(1, 2, 2, 150, 150, 64, torch.bfloat16)
    PLANS.clear()
    call(q, k, v)
    (plan,) = PLANS.plans.values()
    assert {s for s in plan.slots if s.startswith("quantize")} == {"quantize_stats_q", "quantize_k_v"}
    call(q, k, v)
    assert {s for s in plan.slots if s.startswith("quantize")} == {"quantize_stats_q", "quantize_k_v",
                                                                   "quantize_q_k_v_carried"}
    assert launch.quant_launches(q, k, q_group=16, k_group=64, block_d=64, smooth_k=True, smooth_v=False,
                                 pv_fp8=True, pv_key_order=False, finish_shift=True, rope=False, v_padded=256,
                                 carried=True)[2][0][0] == "quantize_q_k_v_carried"


def test_v_outgrowing_the_carried_range_is_repaired_exactly_and_carried_on():
    """One head's V grows past the carried scale's reach (the margin): its codes would saturate, so every output
    row of that head is recomputed exactly (counted), the other head's are not, and the next call carries the grown
    range and repairs nothing."""
    q, k, v = inputs(1, 2, 2, 200, 300, 64, torch.bfloat16, seed=5)
    stats = DispatchStats()
    call(q, k, v, stats=stats)
    grown = v.clone()
    grown[:, 1] *= 3 * launch.CARRY_MARGIN
    out = call(q, k, grown, stats=stats)
    tiles_per_head = -(-q.shape[2] // launch.tuning.INTERPRETER_CONFIG.block_m) if DEVICE == "cpu" else None
    repaired = stats.recomputed
    assert repaired > 0 and (tiles_per_head is None or repaired == tiles_per_head)
    want = exact(q, k, grown)
    assert rel_diff(out[:, 1], want[:, 1]) < 5e-3  # recomputed exactly: the BF16 output's rounding (codes: ~0.03)
    assert attention_error(out[:, 0], want[:, 0])["rel_l1"] <= EXACT_BOUNDS["int8_fp8"][1]
    after = call(q, k, grown, stats=stats)
    assert stats.recomputed == repaired
    assert attention_error(after, want)["rel_l1"] <= EXACT_BOUNDS["int8_fp8"][1]
    check_carried_values(only_site(), k, grown)


def test_a_nan_in_v_is_repaired_and_not_carried():
    """A NaN in V flags its head as without carrying, and the site keeps its finite statistics: the next clean call
    repairs nothing."""
    q, k, v = inputs(1, 2, 2, 130, 200, 64, torch.bfloat16, seed=6)
    stats = DispatchStats()
    call(q, k, v, stats=stats)
    poisoned = v.clone()
    poisoned[0, 0, 17, 5] = float("nan")
    out = call(q, k, poisoned, stats=stats)
    assert stats.recomputed > 0
    assert torch.isnan(out[:, 0]).any() == torch.isnan(exact(q, k, poisoned)[:, 0]).any()
    assert torch.isfinite(only_site().values).all()
    before = stats.recomputed
    clean = call(q, k, v, stats=stats)
    assert stats.recomputed == before
    assert attention_error(clean, exact(q, k, v))["rel_l1"] <= EXACT_BOUNDS["int8_fp8"][1]


def test_sites_are_kept_apart_and_released_with_the_plans():
    """Two sites of the same shape carry their own inputs' statistics; the end of a sampling run
    (backend.release_buffers) drops them, so that the next run's first call measures its own again."""
    a = inputs(1, 2, 2, 100, 160, 64, torch.bfloat16, seed=7)
    b = inputs(1, 2, 2, 100, 160, 64, torch.bfloat16, seed=8)
    for _ in range(2):
        call(*a, key=("block", 0))
        call(*b, key=("block", 1))
    sites = carried_stats.SITES._sites
    assert len(sites) == 2
    (key_a, site_a), (key_b, site_b) = sites.items()
    assert key_a[0] == ("block", 0) and key_b[0] == ("block", 1)
    check_carried_values(site_a, a[1], a[2])
    check_carried_values(site_b, b[1], b[2])
    backend.release_buffers()
    assert len(carried_stats.SITES) == 0


def test_a_carried_run_repeats_bit_for_bit_from_a_cleared_store():
    """Three steps from cleared sites give the same bits twice: what a seed renders does not depend on what ran
    before."""
    steps = [inputs(1, 2, 2, 140, 140, 64, torch.bfloat16, seed=s) for s in (10, 11, 12)]
    runs = []
    for _ in range(2):
        carried_stats.SITES.clear()
        runs.append([call(*step) for step in steps])
    for one, two in zip(*runs):
        assert torch.equal(one, two)


@pytest.mark.parametrize("setting, rope, values", [("CARRY_V_CHANNELS", False, (32, 64)),
                                                   ("ROPE_CARRY_V_CHANNELS", True, (32, 64)),
                                                   ("ROPE_CARRY_SUB", True, (16, 64))])
def test_the_carried_launchs_blocks_change_only_the_order_of_its_sums(monkeypatch, setting, rope, values):
    """A carried launch codes V in blocks of launch.CARRY_V_CHANNELS channels (ROPE_CARRY_V_CHANNELS with the rotary
    table; 32: its registers), where the uncarried launch takes 64 at head dim 128, and with the table rotates Q and
    K ROPE_CARRY_SUB rows a slice. Each channel's codes, sums and range are its own whatever block holds it, and a
    group's codes its own whatever slices it is coded in; only the order in which a program's sums are reduced
    follows the blocks. So the outputs and the carried values agree to rounding, and every ticket is back at 0 for
    the next launch."""
    q, k, v = inputs(1, 2, 2, 160, 160, 128, torch.bfloat16, seed=21)
    pe = flux_pe(160, 128) if rope else None
    monkeypatch.setattr(launch, "ROPE_CARRY_K_MEAN", True)  # the rotated K's sums carried too
    runs = []
    for value in values:
        monkeypatch.setattr(launch, setting, value)
        carried_stats.SITES.clear()
        PLANS.clear()
        outs = [call(q, k, v * scale, rope=pe) for scale in (1.0, 1.05, 1.1)]
        runs.append((outs, only_site().values.clone()))
        (plan,) = PLANS.plans.values()
        tickets = [t for name, t in plan.buffers.items() if name.endswith("tickets")]
        assert len(tickets) == 2 and all((t == 0).all() for t in tickets)
    assert torch.equal(runs[0][0][0], runs[1][0][0])  # the priming call: the uncarried launches, the same bits
    for one, two in zip(runs[0][0][1:], runs[1][0][1:]):
        assert rel_diff(one, two) < 1e-3
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("carry_k", [True, False])
def test_the_rotary_table_carries_the_rotated_k_mean(monkeypatch, carry_k):
    """With the rotation inside the quantization, the K programs sum the rotated K that they code: the site
    carries its mean (launch.ROPE_CARRY_K_MEAN), or keeps the first call's, the mean of the rotated K too."""
    monkeypatch.setattr(launch, "ROPE_CARRY_K_MEAN", carry_k)
    q, k, v = inputs(1, 2, 2, 96, 96, 64, torch.bfloat16, seed=9)
    pe = flux_pe(96, 64)
    for _ in range(3):
        out = call(q, k, v, rope=pe)
    site = only_site()
    torch.testing.assert_close(site.values[:, 0, :64], rotated_fp32(k, pe).flatten(0, 1).mean(1), rtol=1e-4,
                               atol=1e-5)
    want = exact(rotated_fp32(q, pe), rotated_fp32(k, pe), v)
    assert attention_error(out, want)["rel_l1"] <= EXACT_BOUNDS["int8_fp8"][1]


@pytest.mark.parametrize("why", ["no guard", "lse", "fp16 pv"])
def test_calls_that_cannot_carry_keep_their_own_statistics(why):
    """Without the guard a saturated code could not be repaired, the LSE's correction needs the mean the K codes
    took off this call, and FP16 P·V has no V codes: such calls neither use nor make a site."""
    q, k, v = inputs(1, 2, 2, 100, 100, 64, torch.bfloat16)
    config = {"no guard": FP8.with_(nan_guard=False), "lse": FP8,
              "fp16 pv": SageConfig(kernel="int8_fp16")}[why]
    for _ in range(2):
        call(q, k, v, config=config, return_lse=why == "lse")
    assert len(carried_stats.SITES) == 0


def test_an_unhashable_key_is_refused_before_any_work():
    q, k, v = inputs(1, 1, 1, 16, 16, 64, torch.bfloat16)
    with pytest.raises(TypeError, match="carry_key must be hashable"):
        call(q, k, v, key=["block", 0])


def test_the_benchmarks_carried_method_carries_plain_calls_whatever_ships(monkeypatch):
    """sage_core.bench's sage_int8_fp8_carried: with PLAIN off (as shipped) its calls still carry, the first priming
    the site, the timed one a carried launch; PLAIN is back as it was after every call."""
    from sage_attention_pack.sage_core import bench

    monkeypatch.setattr(carried_stats, "PLAIN", False)
    q, k, v = inputs(1, 2, 2, 120, 120, 64, torch.bfloat16, seed=5)
    PLANS.clear()
    method = bench.carried_method(FP8)
    out = method(q, k, v)
    assert carried_stats.PLAIN is False and only_site().primed
    (plan,) = PLANS.plans.values()
    assert "quantize_q_k_v_carried" in plan.slots
    cosine, rel_l1 = EXACT_BOUNDS["int8_fp8"]
    err = attention_error(out, exact(q, k, v))
    assert err["cosine"] >= cosine and err["rel_l1"] <= rel_l1, err


@pytest.mark.skipif(not HOPPER, reason=NO_HOPPER)
def test_flux_shaped_calls_carried_on_the_hopper_kernel():
    """Flux's shape on the Hopper kernel: the carried call is as accurate as the plain one against FP32 attention
    and repairs nothing; two sampler-like steps whose V drifts by 5% carry on without a repair."""
    from sage_attention_pack.sage_core.bench import model_shaped_inputs

    q, k, v = model_shaped_inputs(1, 24, 4608, 128, torch.bfloat16, DEVICE)
    want = torch.nn.functional.scaled_dot_product_attention(q[:, :4].float(), k[:, :4].float(), v[:, :4].float())
    plain = attention(q, k, v, config=FP8)
    stats = DispatchStats()
    call(q, k, v, stats=stats)
    for step in range(3):
        drift = 1 + 0.05 * step
        out = call(q, k, v * drift, stats=stats)
        err = attention_error(out[:, :4], want * drift)
        assert err["cosine"] >= 0.999 and err["rel_l1"] <= EXACT_BOUNDS["int8_fp8"][1], err
    assert stats.recomputed == 0
    assert attention_error(out[:, :4], want * drift)["rel_l1"] <= attention_error(plain[:, :4], want)["rel_l1"] * 1.05


def test_without_carrying_k_the_site_keeps_its_first_calls_k_mean(monkeypatch):
    """launch.CARRY_K_MEAN off: the carried calls code K with the mean the site's first call measured (a sample's),
    carry V's statistics on as before, and stay within the bounds."""
    monkeypatch.setattr(launch, "CARRY_K_MEAN", False)
    q, k, v = inputs(1, 2, 2, 120, 1100, 64, torch.bfloat16, seed=13)
    first = launch.quantize_qkv(q, k, v, q_group=16, k_group=64, block_d=64, q_multiplier=0.125, smooth_k=True,
                                smooth_v=False, pv_fp8=True)["k_mean"].clone()
    call(q, k, v)
    later = [call(q, k, v * 1.1) for _ in range(2)][-1]
    site = only_site()
    torch.testing.assert_close(site.values[:, 0], first)
    assert (first[:, :64] - k.float().flatten(0, 1).mean(1)).abs().max() > 1e-3  # a sample's, not the whole K's
    torch.testing.assert_close(site.values[:, 1, :64], (v * 1.1).float().flatten(0, 1).mean(1), rtol=1e-4, atol=1e-5)
    assert attention_error(later, exact(q, k, v * 1.1))["rel_l1"] <= EXACT_BOUNDS["int8_fp8"][1]
