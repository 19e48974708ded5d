"""The Hopper launcher's arguments, checked without a GPU: each launch hands its kernel one value per parameter, in
the kernel's order (the output, the LSE and the flags where the kernel reads them, the plan's buffers in their
places, the grid's split where the ping-pong kernel and the join take it), and a call plan's later calls reuse what
their first worked out (hopper_launch.launch_parts) while taking their own output, LSE and V. A wrong order would
launch on the GPU without an error and write the wrong memory; only sm90 runs these kernels, so this is where a
machine without one sees it."""
import dataclasses

import pytest
import torch

from sage_attention_pack.kernels import hopper_launch, launch, tuning
from sage_attention_pack.kernels.call_plan import CallPlan

pytestmark = pytest.mark.skipif(not hopper_launch.AVAILABLE,
                                reason="this Triton has no Gluon Hopper API: the Gluon kernels never run with it")

PING_PONG = [c for c in tuning.candidates(128, None, "sm90") if c.pipelined and c.ping_pong and not c.persistent][0]
ONE_WARPGROUP = [c for c in tuning.candidates(128, None, "sm90") if c.pipelined and not c.ping_pong][0]
OPTIONS = ("num_warps", "maxnreg")  # compiler options, not kernel parameters


class Recorder:
    """A call plan's `run` that records each launch as {parameter name: value}, checking that the launch names
    every parameter of its kernel once."""

    def __init__(self):
        self.launches = []

    def __call__(self, site, fn, grid, args, kwargs):
        names = fn.arg_names
        constants = {k: v for k, v in kwargs.items() if k not in OPTIONS}
        assert len(args) + len(constants) == len(names), (site, len(args), len(constants), names)
        assert sorted(constants) == sorted(names[len(args):]), (site, list(constants))
        self.launches.append((site, fn, grid, {**dict(zip(names, args)), **constants}))


def buffers(b, h, hk, nq, nk, d, config, *, pv_fp8=True, split=None, q_in_kernel=False):
    """quantize_qkv's buffers of one call (CPU tensors: nothing is launched), with the tail split `split`
    ((whole, splits) or None) and its parts' buffers as hopper_launch.tail_buffers makes them; q_in_kernel: as
    sage_forward's plan has them where the kernel codes Q itself."""
    q = torch.empty(b, h, nq, d, dtype=torch.bfloat16)
    k = torch.empty(b, hk, nk, d, dtype=torch.bfloat16)
    qz = launch.quant_buffers(q, k, q_group=64, k_group=config.block_n, block_d=d, smooth_k=True, smooth_v=False,
                              pv_fp8=pv_fp8, q_in_kernel=q_in_kernel)
    qz["tail_split"], qz["q_in_kernel"] = split, q_in_kernel
    if split is not None:
        items = hopper_launch.work_items_per_head(config, nq) * b * h
        rows = (items - split[0]) * split[1] * config.consumers * config.block_m
        qz["tail_o"], qz["tail_lse"] = torch.empty(rows, d), torch.empty(rows)
    return qz


def call(qz, config, *, b, h, hk, nq, d, return_lse, derive, v=None, v_shift=None, q=None, q_multiplier=1.0):
    """One call's launches (its own output, LSE and flags; its Q where the kernel codes it), as sage_forward makes
    them."""
    rec = Recorder()
    out = torch.empty(b, nq, h, d, dtype=torch.bfloat16).transpose(1, 2)  # ComfyUI's [B, N, H, D], seen as HND
    lse = torch.empty(b, h, nq) if return_lse else qz["k_scale"]
    bad = torch.empty(b * h * nq, dtype=torch.int8)
    tma = hopper_launch.descriptors(qz, config)
    hopper_launch.launch(qz, out, lse, bad, heads=h, kv_heads=hk, q_group=64, v_shift=v_shift,
                         return_lse=return_lse, config=config, run=rec, tma=tma, v=v, derive=derive, q=q,
                         q_multiplier=q_multiplier)
    return rec.launches, out, lse, bad, tma


@pytest.mark.parametrize("config,pv_fp8,split,return_lse,q_in_kernel", [
    (PING_PONG, True, None, False, False), (PING_PONG, True, (40, 3), True, False),
    (PING_PONG, False, None, True, False), (ONE_WARPGROUP, True, None, False, False),
    (dataclasses.replace(PING_PONG, persistent=True), True, None, False, False), (PING_PONG, True, None, True, True),
    (PING_PONG, True, (40, 3), False, True)],
    ids=["ping-pong", "ping-pong-tail-split", "ping-pong-fp16-pv", "one-warpgroup", "persistent", "q-in-kernel",
         "q-in-kernel-tail-split"])
def test_launches_bind_every_parameter_and_later_calls_take_their_own_tensors(config, pv_fp8, split, return_lse,
                                                                              q_in_kernel, monkeypatch):
    b, h, hk, nq, nk, d = 2, 4, 2, 700, 512, 128
    qz = buffers(b, h, hk, nq, nk, d, config, pv_fp8=pv_fp8, split=split, q_in_kernel=q_in_kernel)
    v_shift = torch.empty(b * hk, d) if pv_fp8 else None
    plan = CallPlan({})
    made = []

    def derive(name, make):
        made.append(name)
        return plan.derive(name, make)

    # the persistent grid: one program per multiprocessor, counted on the GPU; an H100 SXM's 132 here
    monkeypatch.setattr(hopper_launch, "multiprocessors", lambda device: 132)
    for _ in range(2):  # the plan's first call, then a later one with new tensors of the same shapes
        v = None if pv_fp8 else torch.empty(b, hk, nk, d, dtype=torch.bfloat16)
        # the call's own Q, in ComfyUI's [B, N, H, D] seen as HND, where the kernel codes it
        q = torch.empty(b, nq, h, d, dtype=torch.bfloat16).transpose(1, 2) if q_in_kernel else None
        launches, out, lse, bad, tma = call(qz, config, b=b, h=h, hk=hk, nq=nq, d=d, return_lse=return_lse,
                                            derive=derive, v=v, v_shift=v_shift, q=q, q_multiplier=0.125)
        site, fn, grid, args = launches[0]
        assert site == "attention"
        assert fn is (hopper_launch.sage_fwd_sm90_pingpong_kernel if config.ping_pong
                      else hopper_launch.sage_fwd_sm90_kernel)
        if q_in_kernel:  # the call's own Q, by pointer and strides; a descriptor over it says its type
            assert tma[0] is None and args["q_desc"].base is q and list(args["q_desc"].shape) == [b, h, nq, d]
            assert args["Q"] is q and (args["stride_qb"], args["stride_qh"], args["stride_qn"]) == q.stride()[:3]
        else:
            assert args["q_desc"] is tma[0]
            if config.ping_pong:  # Q's pointer unused: a buffer of the plan's stands in
                assert args["Q"] is qz["q_scale"] and (args["stride_qb"], args["stride_qh"], args["stride_qn"]) == (
                    0, 0, 0)
        assert args["k_desc"] is tma[1]
        if config.ping_pong:  # the call's multiplier, taken per call (used where the kernel codes Q)
            assert args["q_multiplier"] == 0.125
        if pv_fp8:
            assert args["v_desc"] is tma[2] and args["V_SCALE"] is qz["v_scale"] and args["V_SHIFT"] is v_shift
        else:  # the call's own V, by a descriptor of its own
            assert args["v_desc"].base is v
        assert args["OUT"] is out and args["LSE"] is lse and args["BAD"] is bad
        assert args["Q_SCALE"] is qz["q_scale"] and args["K_SCALE"] is qz["k_scale"]
        assert (args["stride_ob"], args["stride_oh"], args["stride_on"], args["stride_od"]) == out.stride()
        assert (args["H"], args["KV_GROUP"], args["NQ"], args["NK"]) == (h, h // hk, nq, nk)
        assert (args["q_groups"], args["k_groups"]) == (qz["q_scale"].shape[1], qz["k_scale"].shape[1])
        assert args["RETURN_LSE"] is return_lse and args["SHIFT_V"] is (v_shift is not None)
        q_tiles = -(-nq // config.block_m)
        if config.ping_pong:
            items = b * h * hopper_launch.work_items_per_head(config, nq)
            whole, splits = split or (items, 1)
            assert (args["n_q_tiles"], args["BH"], args["whole"], args["splits"]) == (q_tiles, b * h, whole, splits)
            assert grid == ((min(items, 132),) if config.persistent else (whole + (items - whole) * splits,))
        else:
            assert grid == (q_tiles, b * h)
        if split is None:
            assert len(launches) == 1
        else:
            site, fn, grid, join = launches[1]
            assert site == "tail merge" and fn is hopper_launch.sage_fwd_tail_merge_kernel
            assert args["PART_O"] is qz["tail_o"] and join["PART_O"] is qz["tail_o"]
            assert join["PART_LSE"] is qz["tail_lse"] and join["OUT"] is out and join["LSE"] is lse
            assert join["BAD"] is bad and join["SPLITS"] == splits and join["whole"] == whole
            assert grid == (config.consumers * (items - whole) * config.block_m // hopper_launch.MERGE_ROWS,)
    assert made == ["hopper_launch"] * 2 and list(plan.derived) == ["hopper_launch"]  # worked out once
