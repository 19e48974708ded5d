"""A call's heads in groups (kernels/head_groups.py): which calls split, and a split call's outputs, row flags,
repairs and plans against the whole call's. On the CPU the groups run one after another through Triton's
interpreter (head_groups.ANY_PATH); on an H100 on streams of their own through the Hopper kernel."""
import pytest
import torch

from sage_attention_pack.kernels import head_groups, tuning
from sage_attention_pack.kernels.call_plan import PLANS, held_bytes
from sage_attention_pack.sage_core.config import SageConfig

from test_kernels import DEVICE, HOPPER, NO_HOPPER, exact, inputs, rel_diff, run_kernel

FP8 = SageConfig(kernel="int8_fp8")


def meta(*shape):
    return torch.empty(*shape, device="meta")


def split_bounds(q, k, **overrides):
    switches = dict(pipelined=True, ping_pong=True, pv_fp8=True, return_lse=False, has_bias=False, is_causal=False,
                    rope=None)
    return head_groups.bounds(q, k, **{**switches, **overrides})


def test_bounds_take_whole_kv_head_groups_and_refuse_what_a_group_cannot_take(monkeypatch):
    monkeypatch.setattr(head_groups, "ANY_PATH", True)
    monkeypatch.setattr(head_groups, "GROUPS", 2)
    q, k = meta(1, 8, 100, 64), meta(1, 4, 100, 64)  # two query heads per K/V head
    assert split_bounds(q, k) == [(0, 4, 0, 2), (4, 8, 2, 4)]
    monkeypatch.setattr(head_groups, "GROUPS", 4)
    assert split_bounds(q, k) == [(0, 2, 0, 1), (2, 4, 1, 2), (4, 6, 2, 3), (6, 8, 3, 4)]
    monkeypatch.setattr(head_groups, "GROUPS", 2)
    refused = [dict(return_lse=True), dict(has_bias=True), dict(is_causal=True), dict(pv_fp8=False),
               dict(rope=meta(1, 8, 100, 2, 64))]  # a table per head
    for overrides in refused:
        assert split_bounds(q, k, **overrides) is None, overrides
    assert split_bounds(q, k, rope=meta(1, 1, 100, 2, 64)) is not None  # one table for every head
    assert split_bounds(meta(2, 8, 100, 64), meta(2, 4, 100, 64)) is None  # two batches: flags not contiguous
    assert split_bounds(q, meta(1, 3, 100, 64)) is None  # K/V heads in no two equal groups
    monkeypatch.setattr(head_groups, "GROUPS", 1)
    assert split_bounds(q, k) is None


def test_without_the_switch_only_a_long_enough_hopper_call_on_the_gpu_splits(monkeypatch):
    q, k = meta(1, 24, 4608, 128), meta(1, 24, 4608, 128)  # Flux's shape, but not on a GPU
    assert head_groups.GROUPS == 1  # as shipped: no call splits
    monkeypatch.setattr(head_groups, "GROUPS", 2)
    assert split_bounds(q, k) is None
    if torch.cuda.is_available():
        cuda = dict(device="cuda")
        flux = torch.empty(1, 24, 4608, 128, **cuda)
        assert split_bounds(flux, flux) == [(0, 12, 0, 12), (12, 24, 12, 24)]
        assert split_bounds(flux, flux, pipelined=False) is None
        assert split_bounds(flux, flux, ping_pong=False) is None
        short = torch.empty(1, 24, 1024, 128, **cuda)  # under MIN_WORK
        assert split_bounds(short, short) is None
        long_keys = torch.empty(1, 24, head_groups.MAX_KEYS + 128, 128, **cuda)
        assert split_bounds(flux, long_keys) is None
        monkeypatch.setattr(head_groups, "GROUPS", 1)
        assert split_bounds(flux, flux) is None


@pytest.mark.skipif(DEVICE == "cuda", reason="the portable path's split, run in Triton's interpreter")
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_a_split_call_gives_the_whole_calls_bits_flags_and_repairs(monkeypatch, heads, kv_heads):
    """Two groups, one after another: per head the same quantization and attention as the whole call, so the same
    bits; the row flags land at the whole call's rows of the call's one flag buffer, and a flagged tile in each
    group is repaired exactly and counted once."""
    q, k, v = inputs(1, heads, kv_heads, 150, 130, 64, torch.float32, seed=31)
    q[0, 0, 5, 3] = float("nan")  # the first group's first tile
    q[0, heads - 1, 70, 1] = float("inf")  # the second group's second tile
    results = {}
    for groups in (1, 2):
        monkeypatch.setattr(head_groups, "GROUPS", groups)
        monkeypatch.setattr(head_groups, "ANY_PATH", groups > 1)
        PLANS.clear()
        counter = torch.zeros(1, dtype=torch.int32, device=DEVICE)
        unrepaired = run_kernel(q, k, v, FP8)[2].clone()
        out, lse, bad = run_kernel(q, k, v, FP8, repair_counter=counter)
        # two plans: the call with the guard and the one without
        assert ["head_groups" in plan.buffers for plan in PLANS.plans.values()] == [groups > 1] * 2
        assert lse is None and int(counter.item()) == 2
        results[groups] = out, unrepaired
    PLANS.clear()
    assert torch.equal(results[1][0].nan_to_num(), results[2][0].nan_to_num())
    assert torch.equal(results[1][1], results[2][1])
    flagged = results[2][1].view(heads, 150).nonzero().tolist()
    assert [0, 5] in flagged and [heads - 1, 70] in flagged and all(h in (0, heads - 1) for h, _ in flagged)
    ref = exact(q, k, v)
    torch.testing.assert_close(results[2][0][0, 0, 6:64].double(), ref[0, 0, 6:64], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(DEVICE == "cuda", reason="the portable path's split, run in Triton's interpreter")
def test_a_split_calls_plan_holds_each_groups_plan_and_is_reused(monkeypatch):
    monkeypatch.setattr(head_groups, "ANY_PATH", True)
    monkeypatch.setattr(head_groups, "GROUPS", 2)
    q, k, v = inputs(1, 4, 2, 96, 80, 64, torch.float32, seed=5)
    PLANS.clear()
    first = run_kernel(q, k, v, FP8)[0]
    (plan,) = PLANS.plans.values()
    groups = plan.buffers["head_groups"]
    assert [g[:4] for g in groups] == [(0, 2, 0, 1), (2, 4, 1, 2)]
    assert all(g[4].buffers["tail_split"] is None for g in groups)  # the other group fills the tail
    assert plan.nbytes == held_bytes(g[4] for g in groups) > 0  # the flags' buffer is shared, counted once
    reused = PLANS.reused
    again = run_kernel(q, k, v, FP8)[0]
    assert PLANS.reused - reused == 1 and len(PLANS.plans) == 1
    PLANS.clear()
    assert torch.equal(first, again)


@pytest.mark.skipif(not HOPPER, reason=NO_HOPPER)
def test_flux_split_on_streams_gives_the_whole_calls_bits_on_the_hopper_kernel(monkeypatch):
    """Flux's shape on the H100, the split switched on: two groups on two streams through the Hopper kernel, against
    the whole call (whose grid splits no tail there): the same bits, repeatable, and exact attention's accuracy
    bound."""
    shape = (1, 24, 4608, 128)
    q, k, v = inputs(*shape[:2], shape[1], shape[2], shape[2], shape[3], torch.bfloat16, seed=7)
    config = tuning.LaunchConfig.from_key("m64n128w4s4mcpdgpppnt")
    outs = {}
    for groups in (1, 2):
        monkeypatch.setattr(head_groups, "GROUPS", groups)
        PLANS.clear()
        counter = torch.zeros(1, dtype=torch.int32, device=DEVICE)
        outs[groups] = [run_kernel(q, k, v, FP8, launch_cfg=config, repair_counter=counter)[0] for _ in range(3)]
        split = ["head_groups" in plan.buffers for plan in PLANS.plans.values()]
        assert split == [groups > 1] and int(counter.item()) == 0
    PLANS.clear()
    torch.cuda.synchronize()
    assert all(torch.equal(out, outs[2][0]) for out in outs[2])
    assert torch.equal(outs[1][0], outs[2][0])
    heads = slice(20, 24)
    assert rel_diff(outs[2][0][:, heads], exact(q[:, heads], k[:, heads], v[:, heads]).to(q.dtype)) < 0.045
