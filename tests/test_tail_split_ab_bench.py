"""bench/tail_split_ab.py: its shapes are named or BxHxNxD, bad arguments are refused before any work, and on a
GPU a short run writes both arms, the policy's choice and the errors."""
import json

import pytest
import torch

import bench_script


def ab():
    return bench_script.load("tail_split_ab")


def test_shapes_by_name_or_by_their_four_sizes():
    assert ab().parse_shape("flux_1024px") == (1, 24, 4608, 128)
    assert ab().parse_shape("1x26x4608x128") == (1, 26, 4608, 128)
    for bad in ("1x26x4608", "1x0x4608x128", "flux", "1x2x3xD"):
        with pytest.raises(ValueError, match="BxHxNxD"):
            ab().parse_shape(bad)


def test_bad_arguments_are_named_before_any_work(capsys):
    with pytest.raises(SystemExit) as hit:
        ab().main(["--shapes", "1x26x4608"])
    assert hit.value.code == 2 and "1x26x4608" in capsys.readouterr().err
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
    assert ab().main(["--shapes", "1x2x4608x128", "--rounds", "1", "--out", str(out)]) == 0
    row = json.loads(out.read_text())["shapes"]["1x2x4608x128"]
    assert row["split"] > 0 and row["unsplit"] > 0 and row["sdpa"] > 0
    assert row["rel_l1_split"] < 0.045 and row["rel_l1_unsplit"] < 0.045
    assert hopper_launch.TAIL_SPLIT == "policy"  # left as shipped
    if torch.cuda.get_device_capability() == (9, 0) and hopper_launch.AVAILABLE:
        assert row["forced"][1] > 1  # 72 items, a part-full wave: in thirds
