"""Programmatic dependent launch (kernels/grid_dependency.py): which launches of a call chain, with what options,
and on the GPU that chained calls give the same bits as unchained ones. The instructions themselves are checked
in the compiled code (tests/test_quant_codegen.py, tests/test_hopper_codegen.py)."""
import json

import pytest
import torch

import bench_script
from sage_attention_pack.kernels import grid_dependency, hopper_launch, launch, tuning
from sage_attention_pack.kernels.call_plan import PLANS
from sage_attention_pack.sage_core.config import SageConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SM90 = DEVICE == "cuda" and torch.cuda.get_device_capability()[0] >= 9


def test_only_cuda_gpus_from_sm90_on_chain_and_never_in_the_interpreter(monkeypatch):
    assert not grid_dependency.chains_launches(torch.device("cpu"))
    assert grid_dependency.chained_launch(True) == {"launch_pdl": True}
    assert grid_dependency.chained_launch(False) == {}
    monkeypatch.setattr(grid_dependency, "chains_launches", lambda device: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not grid_dependency.grid_dependency(torch.device("cuda"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert grid_dependency.grid_dependency(torch.device("cuda"))
    monkeypatch.setattr(grid_dependency, "ENABLED", False)
    assert not grid_dependency.grid_dependency(torch.device("cuda"))


def recorded_launches(monkeypatch, chained: bool, **args) -> list[tuple[str, dict]]:
    """The quantization's launches (site, compile-time arguments and options) for small CPU inputs, recorded
    instead of run, with chaining decided as `chained`."""
    monkeypatch.setattr(launch, "grid_dependency", lambda device: chained)
    q, k, v = (torch.randn(1, 2, 300, 64) for _ in range(3))
    seen = []
    launch.quantize_qkv(q, k, v, q_group=16, k_group=64, block_d=64, q_multiplier=1.0,
                        run=lambda site, fn, grid, a, kwargs: seen.append((site, kwargs)), **args)
    return seen


@pytest.mark.parametrize("pv_fp8,smooth_k", [(True, True), (True, False), (False, True)])
def test_the_second_quantization_launch_chains_on_the_first(monkeypatch, pv_fp8, smooth_k):
    """Chained: both launches let the next start under their last wave, and only the second starts that way and
    waits (it reads the first's statistics); unchained: no instruction and no launch option."""
    args = dict(smooth_k=smooth_k, smooth_v=pv_fp8, pv_fp8=pv_fp8)
    first, second = recorded_launches(monkeypatch, True, **args)
    assert first[0] == "quantize_stats_q" and second[0].startswith("quantize_k")
    assert first[1]["GRID_TRIGGER"] and not first[1]["GRID_WAIT"] and "launch_pdl" not in first[1]
    assert second[1]["GRID_TRIGGER"] and second[1]["GRID_WAIT"] and second[1]["launch_pdl"] is True
    for _, kwargs in recorded_launches(monkeypatch, False, **args):
        assert not kwargs["GRID_TRIGGER"] and not kwargs["GRID_WAIT"] and "launch_pdl" not in kwargs


def test_a_single_quantization_launch_does_not_chain_on_what_came_before(monkeypatch):
    """With nothing to smooth, Q's and K's codes are one launch: the launch before it is the caller's (which may
    still be writing Q, K or V), so it starts as usual and waits for nothing."""
    (site, kwargs), = recorded_launches(monkeypatch, True, smooth_k=False, smooth_v=False, pv_fp8=False)
    assert site == "quantize_q_k" and kwargs["GRID_TRIGGER"] and not kwargs["GRID_WAIT"] and "launch_pdl" not in kwargs


@pytest.mark.skipif(not SM90 or not hopper_launch.AVAILABLE, reason="chained launches run on sm90 GPUs and later")
@pytest.mark.parametrize("shape,kernel", [((1, 26, 4608, 128), "int8_fp8"), ((2, 4, 1000, 64), "int8_fp8"),
                                          ((1, 8, 2000, 128), "int8_fp16")],
                         ids=["26-heads-split-tail", "d64", "fp16-pv"])
def test_chained_calls_give_the_bits_of_unchained_ones(shape, kernel):
    """Whole calls through the dispatcher's launch configuration, chained and not, three times each in turn (a
    read of a result before its launch had finished would show as a difference, at random): the same output
    bits every time. 26 heads at Flux's length split the grid's tail, so its join runs after the chained kernel."""
    from sage_attention_pack.sage_core import backend

    b, h, n, d = shape
    g = torch.Generator().manual_seed(n)
    q, k, v = ((torch.randn(b, h, n, d, generator=g) + 2 * torch.randn(1, h, 1, d, generator=g)).to("cuda",
                                                                                                  torch.bfloat16)
               for _ in range(3))
    pv = "fp8" if kernel == "int8_fp8" else "fp16"
    config = backend.tuning_for(q.device, pv, launch.padded_head_dim(d), None, n, n, str(q.dtype), False)
    assert config.pipelined, config  # the Hopper kernel, chained on the quantization
    cfg = SageConfig(kernel=kernel)
    shipped = grid_dependency.ENABLED
    outs = {True: [], False: []}
    try:
        for _ in range(3):
            for chained in (True, False):
                grid_dependency.ENABLED = chained
                PLANS.clear()
                out = torch.full_like(q, float("nan"))
                repairs = torch.zeros(1, device="cuda", dtype=torch.int32)
                launch.sage_forward(q, k, v, out, sm_scale=d ** -0.5, is_causal=False, bias=None,
                                    q_group=cfg.q_group_rows, k_group=cfg.k_group_rows, pv_fp8=pv == "fp8",
                                    smooth_k=cfg.smooth_k, smooth_v=cfg.smooth_v, return_lse=False, config=config,
                                    repair_counter=repairs)
                outs[chained].append(out)
                assert repairs.item() == 0
    finally:
        grid_dependency.ENABLED = shipped
        PLANS.clear()
    torch.cuda.synchronize()
    first = outs[False][0]
    assert torch.isfinite(first).all()
    for out in outs[True] + outs[False]:
        assert torch.equal(out, first)


def ab():
    return bench_script.load("grid_dependency_ab")


def test_ab_script_refuses_bad_arguments_before_any_work(capsys):
    with pytest.raises(SystemExit) as hit:
        ab().main(["--shapes", "1x26x4608"])
    assert hit.value.code == 2 and "1x26x4608" in capsys.readouterr().err
    with pytest.raises(SystemExit) as hit:
        ab().main(["--rounds", "0"])
    assert hit.value.code == 2 and "at least 1" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the command would measure")
def test_ab_script_refuses_a_machine_without_gpu():
    with pytest.raises(SystemExit, match="CUDA GPU"):
        ab().main(["--shapes", "flux_1024px"])


@pytest.mark.skipif(not SM90 or not hopper_launch.AVAILABLE, reason="chained launches run on sm90 GPUs and later")
def test_ab_script_short_run_writes_both_arms(tmp_path):
    shipped = grid_dependency.ENABLED
    out = tmp_path / "ab.json"
    assert ab().main(["--shapes", "1x4x4608x128", "--rounds", "1", "--out", str(out)]) == 0
    row = json.loads(out.read_text())["shapes"]["1x4x4608x128"]
    assert row["chained"] > 0 and row["unchained"] > 0 and row["sdpa"] > 0
    assert row["identical_output"] and row["repairs"] == 0
    assert grid_dependency.ENABLED == shipped  # left as it was
    assert tuning.LaunchConfig.from_key(row["launch_config"]).pipelined
