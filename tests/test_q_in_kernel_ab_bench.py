"""bench/q_in_kernel_ab.py: bad arguments are refused before any work, and on a GPU a short run writes both arms
(Q coded in the kernel and by the quantization pass), whether they gave the same bits, and each arm's kernels,
leaving the shipped setting as it was."""
import json

import pytest
import torch

import bench_script


def ab():
    return bench_script.load("q_in_kernel_ab")


def test_bad_arguments_are_named_before_any_work(capsys):
    with pytest.raises(SystemExit) as hit:
        ab().main(["--shapes", "flux"])
    assert hit.value.code == 2 and "flux" in capsys.readouterr().err
    with pytest.raises(SystemExit) as hit:
        ab().main(["--rounds", "0"])
    assert hit.value.code == 2 and "at least 1" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the command would measure")
def test_no_gpu_is_refused_with_the_reason():
    with pytest.raises(SystemExit, match="CUDA GPU"):
        ab().main(["--shapes", "flux_1024px"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_short_run_writes_both_arms(tmp_path):
    from sage_attention_pack.kernels import hopper_launch

    out = tmp_path / "ab.json"
    assert ab().main(["--shapes", "1x4x4608x128", "--rounds", "1", "--out", str(out)]) == 0
    row = json.loads(out.read_text())["shapes"]["1x4x4608x128"]
    assert row["in_kernel"] > 0 and row["pass"] > 0 and row["sdpa"] > 0
    assert row["rel_l1_in_kernel"] < 0.045 and row["rel_l1_pass"] < 0.045
    assert not row["q_in_kernel_pass"] and row["kernels_in_kernel"] and row["kernels_pass"]
    assert hopper_launch.Q_IN_KERNEL is True  # left as shipped
    if torch.cuda.get_device_capability() == (9, 0) and hopper_launch.AVAILABLE:
        assert row["q_in_kernel_in_kernel"] and row["same_bits"]
        # still two quantization launches, the first making the statistics alone
        assert len([k for k in row["kernels_in_kernel"] if k.startswith("quantize")]) == 2
