"""The ping-pong grid's tail split: the policy (which calls split their last wave, in how many parts), the join
of the parts (kernels/tail_merge_kernel.py, run for real: Triton's interpreter on the CPU, natively on a GPU),
and on an sm90 GPU the split calls of the Gluon kernel against the same calls unsplit."""
import heapq
import math
import os

import pytest
import torch

from sage_attention_pack.kernels import hopper_launch, tuning
from sage_attention_pack.kernels.hopper_launch import MAX_TAIL_SPLITS, MIN_TAIL_MS, MIN_TAIL_TILES, \
    WAVE_MS_PER_KEY, split_last_wave

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS_RUN = DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
NO_KERNELS = "no GPU and TRITON_INTERPRET is not 1: the kernels cannot run here"
LOG2_FP8_MAX = math.log2(448.0)


def finish_time(items: int, slots: int, whole: int, splits: int) -> float:
    """When a grid of `whole` programs of unit work, then (items - whole)·splits programs of 1/splits, ends
    on `slots` places that each take the next program in grid order as soon as they are free."""
    free = [0.0] * slots  # a heap of the times the places come free
    for d in [1.0] * whole + [1.0 / splits] * ((items - whole) * splits):
        heapq.heapreplace(free, free[0] + d)
    return max(free)


@pytest.mark.parametrize("items,slots,kv_len,expected", [
    (864, 132, 4608, (864, 1)),     # Flux 1024px: thirds would save a third of a 0.05 ms wave, what the join costs
    (936, 132, 4608, (924, 4)),     # 26 heads at Flux's length: the 8th wave's 12 items in quarters
    (1728, 132, 4608, (1716, 4)),   # Flux at batch 2: 12 items in the 14th wave
    (36, 132, 4608, (0, 3)),        # Flux's rows, one head: a lone part-full wave in thirds (quarters: 2 waves)
    (10240, 132, 32760, (10164, 3)),  # Wan2.1 480p: a third of a 0.32 ms wave
    (8192, 132, 16384, (8184, 4)),  # B2 H32 N16384: 8 items in the 63rd wave, in quarters
    (792, 132, 4608, (792, 1)),     # whole waves
    (864, 132, 896, (864, 1)),      # 7 key tiles: too few for parts of MIN_TAIL_TILES
    (864, 132, 1024, (864, 1)),     # halves only: 144 halves on 132 places still take a wave
    (12, 132, 4096, (0, 4)),        # one short wave of 12 items in quarters: 0.033 ms saved
    (12, 132, 1024, (12, 1)),       # halves at 1024 keys: 0.0055 ms, less than the join costs
])
def test_split_last_wave_on_known_shapes(items, slots, kv_len, expected):
    assert split_last_wave(items, slots, kv_len, -(-kv_len // 128)) == expected


@pytest.mark.parametrize("slots", [7, 78, 132])
def test_a_split_always_ends_the_grid_sooner_by_what_it_promised(slots):
    """For every grid up to 12 waves: a split grid ends sooner when its programs take the places in grid order,
    by at least MIN_TAIL_MS at the policy's time per wave, with parts of at least MIN_TAIL_TILES key tiles; and
    where no split is chosen, none of the allowed ones would have saved that much."""
    for items in range(1, 12 * slots + 1):
        for key_tiles in (4, 8, 12, 36, 256):
            kv_len = 128 * key_tiles
            wave_ms = kv_len * WAVE_MS_PER_KEY
            whole, splits = split_last_wave(items, slots, kv_len, key_tiles)
            plain = finish_time(items, slots, items, 1)
            assert plain == math.ceil(items / slots)
            if splits == 1:
                assert whole == items
                for s in range(2, min(MAX_TAIL_SPLITS, key_tiles // MIN_TAIL_TILES) + 1):
                    saved = plain - finish_time(items, slots, items - items % slots, s)
                    assert saved * wave_ms < MIN_TAIL_MS + 1e-12
                continue
            assert whole == items - items % slots and 2 <= splits <= MAX_TAIL_SPLITS
            assert key_tiles // splits >= MIN_TAIL_TILES
            saved = plain - finish_time(items, slots, whole, splits)
            assert saved * wave_ms >= MIN_TAIL_MS - 1e-12, (items, key_tiles)


def test_forced_splits_wherever_the_grid_ends_sooner():
    """The benchmarks' "forced" setting drops the threshold, not the search: Flux's shape in thirds."""
    assert split_last_wave(864, 132, 4608, 36, forced=True) == (792, 3)
    assert split_last_wave(12, 132, 512, 4, forced=True) == (12, 1)  # parts of 4 tiles at least: no split
    assert split_last_wave(12, 132, 1024, 8, forced=True) == (0, 2)
    assert split_last_wave(792, 132, 4608, 36, forced=True) == (792, 1)  # whole waves: nothing to gain
    assert split_last_wave(864, 132, 1024, 8, forced=True) == (864, 1)  # halves end no sooner


def test_persistent_and_one_warpgroup_grids_are_never_split():
    cpu = torch.device("cpu")
    for key in ("m64n128w4s4mcpdgpppps", "m64n128w4s3mcpdgp"):
        assert hopper_launch.tail_split(tuning.LaunchConfig.from_key(key), 864, 4608, cpu) == (864, 1)


def split_parts(scores: torch.Tensor, v: torch.Tensor, splits: int):
    """Each key range's normalised output and base-2 LSE, as the Gluon kernel's parts hold them (scores in
    base-2 units, offset by log2(448) as the kernel's exp2 is)."""
    outs, lses = [], []
    for keys in torch.tensor_split(torch.arange(scores.shape[-1]), splits):
        s = scores[..., keys]
        m = s.amax(-1, keepdim=True)
        p = torch.exp2(s - m + LOG2_FP8_MAX)
        outs.append(p @ v[keys] / p.sum(-1, keepdim=True))
        lses.append(m.squeeze(-1) + torch.log2(p.sum(-1)))
    return outs, lses


def merge(part_o, part_lse, out, lse, bad, *, heads, nq, n_items, whole, splits, d, return_lse, tiles=2):
    """The launcher's join launch (hopper_launch.launch), on these buffers; tiles: query tiles per work item."""
    from sage_attention_pack.kernels.hopper_launch import MERGE_ROWS
    from sage_attention_pack.kernels.tail_merge_kernel import sage_fwd_tail_merge_kernel

    split_items = heads * n_items * (out.shape[0]) - whole
    sage_fwd_tail_merge_kernel[(tiles * split_items * 64 // MERGE_ROWS,)](
        part_o, part_lse, out, lse, bad, *out.stride(), heads, nq, n_items, whole,
        SPLITS=splits, TILES=tiles, BLOCK_M=64, ROWS=MERGE_ROWS, BLOCK_D=d, RETURN_LSE=return_lse, num_warps=4)


@pytest.mark.skipif(not KERNELS_RUN, reason=NO_KERNELS)
@pytest.mark.parametrize("d,splits,nq,return_lse,tiles", [(128, 3, 4608, True, 2), (64, 4, 300, False, 2),
                                                           (64, 2, 130, True, 2), (64, 3, 1000, True, 3)])
def test_tail_merge_joins_the_parts_into_the_whole_softmax(d, splits, nq, return_lse, tiles):
    """The join of split items gives what attention over all keys gives (output, LSE, flags), written at each
    item's rows of a [B, N, H, D] output seen as [B, H, N, D] (ComfyUI's layout), and nothing past the rows;
    items of two query tiles (two consumer warpgroups) or three."""
    g = torch.Generator().manual_seed(d + splits)
    b, h, block_m, nk = 2, 3, 64, 384
    q_tiles = -(-nq // block_m)
    n_items = -(-q_tiles // tiles)
    items = b * h * n_items
    whole = items - 5  # the last five items were split
    scores = 4 * torch.randn(items - whole, tiles * block_m, nk, generator=g, dtype=torch.float64)
    v = torch.randn(nk, d, generator=g, dtype=torch.float64)
    outs, lses = split_parts(scores, v, splits)
    # partial (item·splits + s) holds all query tiles of that item's part s
    part_o = torch.stack(outs, 1).reshape(-1, d).float().to(DEVICE)
    part_lse = torch.stack(lses, 1).reshape(-1).float().to(DEVICE)
    out = torch.full((b, nq, h, d), 7.0, dtype=torch.bfloat16, device=DEVICE).transpose(1, 2)
    lse = torch.full((b, h, nq), 7.0, device=DEVICE)
    bad = torch.full((b * h * nq,), -1, dtype=torch.int8, device=DEVICE)  # a flag per query row
    merge(part_o, part_lse, out, lse, bad, heads=h, nq=nq, n_items=n_items, whole=whole,
          splits=splits, d=d, return_lse=return_lse, tiles=tiles)

    full = torch.softmax(scores * math.log(2), -1) @ v  # base-2 scores
    full_lse = torch.logsumexp(scores * math.log(2), -1)
    written = torch.zeros(b, h, nq, dtype=torch.bool)
    for t in range(items - whole):
        item, bh = (whole + t) % n_items, (whole + t) // n_items
        rows = torch.arange(tiles * item * block_m, tiles * (item + 1) * block_m)
        keep = rows < nq
        got = out[bh // h, bh % h, rows[keep]].float().cpu()
        torch.testing.assert_close(got, full[t][keep].float(), atol=2e-2, rtol=1e-2)
        if return_lse:
            torch.testing.assert_close(lse[bh // h, bh % h, rows[keep]].cpu(), full_lse[t][keep].float(),
                                       atol=1e-4, rtol=1e-5)
        written[bh // h, bh % h, rows[keep]] = True
    # rows of items that were not split keep what was there; so do their LSE and their flags; the joined rows
    # are flagged finite
    assert (out.float().cpu()[~written] == 7.0).all()
    if return_lse:
        assert (lse.cpu()[~written] == 7.0).all()
    flags = bad.cpu().view(b, h, nq)
    assert (flags[~written] == -1).all() and (flags[written] == 0).all()


@pytest.mark.skipif(not KERNELS_RUN, reason=NO_KERNELS)
def test_tail_merge_flags_a_part_that_came_out_non_finite():
    """A NaN in one part of one item flags that query row (and no other): the guard then recomputes its tile."""
    g = torch.Generator().manual_seed(3)
    d, splits, block_m, nk, nq = 64, 2, 64, 256, 256
    scores = torch.randn(1, 2 * block_m, nk, generator=g, dtype=torch.float64)
    v = torch.randn(nk, d, generator=g, dtype=torch.float64)
    outs, lses = split_parts(scores, v, splits)
    part_o = torch.stack(outs, 1).reshape(-1, d).float()
    part_o[splits * 2 * block_m - 1, 5] = float("nan")  # the last part's second query tile, its last row
    part_lse = torch.stack(lses, 1).reshape(-1).float()
    out = torch.zeros(1, 1, nq, d, dtype=torch.float16, device=DEVICE)
    bad = torch.full((nq,), -1, dtype=torch.int8, device=DEVICE)
    merge(part_o.to(DEVICE), part_lse.to(DEVICE), out, out, bad, heads=1, nq=nq, n_items=2, whole=1,
          splits=splits, d=d, return_lse=False)
    # item 1 (rows 128..255) joined: one element of its last row non-finite; item 0's rows untouched
    assert bad.tolist() == [-1] * 128 + [0] * 127 + [1]
    assert torch.isnan(out[0, 0, 255, 5]) and torch.isfinite(out[0, 0, :255]).all()


HOPPER = DEVICE == "cuda" and hopper_launch.AVAILABLE and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.skipif(not HOPPER, reason="the Gluon kernel needs an sm90 GPU and Triton's Gluon Hopper API")
@pytest.mark.parametrize("key,b,hq,hk,nq,nk,d,lse", [(key, *case) for key in (
    "m64n128w4s4mcpdgpppnt", "m64n128w4s4mcpdgppp", "m64n128w4s4mcgppp") for case in (
    (1, 26, 26, 4608, 4608, 128, True),    # 26 heads at Flux's length: 12 of 936 items in quarters
    (1, 2, 1, 300, 4000, 64, False),       # one wave of 6 items, each in four parts; the last key tile partial
    (1, 6, 3, 1400, 4000, 128, True),      # 66 items in halves; grouped-query, ragged queries and keys
)] + [
    # three consumer warpgroups (head dim 64): items of three query tiles, the last one's third past the end
    ("m64n128w4s3pdgpppntc3", 1, 2, 1, 300, 4000, 64, False),
    ("m64n128w4s3pdgpppntc3", 1, 40, 8, 1400, 8000, 64, True),
])
def test_split_tail_calls_match_unsplit_ones(monkeypatch, key, b, hq, hk, nq, nk, d, lse):
    """The same call with its grid's tail split and unsplit (hopper_launch.TAIL_SPLIT "off") gives the same output
    and LSE to FP8 P's rounding (each part scales its P by its own running max), no flags, and the same error
    against exact attention."""
    from sage_attention_pack.kernels.call_plan import PLANS
    from sage_attention_pack.sage_core.config import SageConfig
    from sage_attention_pack.sage_core.metrics import attention_error
    from test_kernels import SPLIT_TAIL_TOL, exact, inputs, rel_diff, run_kernel

    lc = tuning.LaunchConfig.from_key(key)
    q, k, v = inputs(b, hq, hk, nq, nk, d, torch.bfloat16, seed=nq + nk)
    items = hopper_launch.work_items_per_head(lc, nq) * b * hq
    whole, splits = hopper_launch.tail_split(lc, items, nk, q.device)
    assert splits > 1, "the shape must split on this GPU"
    cfg = SageConfig(kernel="int8_fp8")
    PLANS.clear()
    out, out_lse, bad = run_kernel(q, k, v, cfg, return_lse=lse, launch_cfg=lc)
    again = [run_kernel(q, k, v, cfg, return_lse=lse, launch_cfg=lc) for _ in range(2)]  # the same plan
    monkeypatch.setattr(hopper_launch, "TAIL_SPLIT", "off")
    PLANS.clear()
    try:
        assert hopper_launch.tail_split(lc, items, nk, q.device) == (items, 1)
        ref, ref_lse, ref_bad = run_kernel(q, k, v, cfg, return_lse=lse, launch_cfg=lc)
    finally:
        monkeypatch.undo()
        PLANS.clear()
    # the join reads the parts in their order, whichever finished last: calls repeat bit for bit (and the
    # tickets were back at zero after each call)
    for out2, lse2, bad2 in again:
        assert torch.equal(out2, out) and int(bad2.sum()) == 0
        if lse:
            assert torch.equal(lse2, out_lse)
    assert int(bad.sum()) == 0 and int(ref_bad.sum()) == 0 and torch.isfinite(out).all()
    # each part scales its FP8 P by its own running max: another rounding of the same size as the kernel's own
    # error against exact attention (0.034 at Flux), so the two differ by about that much
    assert rel_diff(out, ref) < SPLIT_TAIL_TOL
    # the rows of whole items run the same code on the same keys: the same bits
    n_items = items // (b * hq)
    for bh in range(b * hq):
        whole_items = min(max(whole - bh * n_items, 0), n_items)
        rows = slice(0, min(lc.consumers * lc.block_m * whole_items, nq))
        assert torch.equal(out[bh // hq, bh % hq, rows], ref[bh // hq, bh % hq, rows])
    e_split, e_plain = (attention_error(o, exact(q, k, v))["rel_l1"] for o in (out, ref))
    assert e_split <= e_plain * 1.05 + 1e-4
    if lse:
        torch.testing.assert_close(out_lse, ref_lse, atol=2e-2, rtol=0)
