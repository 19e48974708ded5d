"""bench/head_groups.py: its arms and shapes are parsed or refused before any work, its hooks leave the launchers as
they were, and on a GPU a short run writes every arm with its bits compared."""
import json

import pytest
import torch

import bench_script
from sage_attention_pack.kernels import head_groups as library_groups
from sage_attention_pack.kernels import hopper_launch
from sage_attention_pack.kernels.call_plan import PLANS


def groups():
    return bench_script.load("head_groups")


def test_arms_parse_and_bad_ones_are_named():
    g = groups()
    assert g.parse_arm("g2") == ("g", 2, False, None)
    assert g.parse_arm("g3c-first") == ("g", 3, True, "first")
    assert g.parse_arm("s4-hi") == ("s", 4, True) and g.parse_arm("s2") == ("s", 2, False)
    for bad in ("g1", "s1", "x2", "g2-hi", "s2c", "g"):
        with pytest.raises(ValueError, match="at least 2 groups"):
            g.parse_arm(bad)


def test_head_bounds_cover_every_head_once():
    g = groups()
    assert g.head_bounds(24, 2) == [(0, 12), (12, 24)] and g.head_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert g.head_bounds(2, 4) == [(0, 1), (1, 2)]  # never an empty group


def test_bad_arguments_are_named_before_any_work(capsys):
    for argv, said in ((["--arms", "g1"], "g1"), (["--shapes", "1x2x3"], "1x2x3"), (["--rounds", "0"], "at least 1")):
        with pytest.raises(SystemExit) as hit:
            groups().main(argv)
        assert hit.value.code == 2 and said in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the command would measure")
def test_no_gpu_is_refused_with_the_reason():
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        groups().main(["--shapes", "flux_1024px"])


def test_the_hooks_are_pass_throughs_and_are_taken_back():
    g = groups()
    launch_before, limits = hopper_launch.launch, (PLANS.max_bytes, PLANS.plan_max_bytes)
    groups_before = library_groups.GROUPS
    with g.hooks():
        assert hopper_launch.launch is g.recording_launch and PLANS.plan is g.tagged_plan
        assert PLANS.max_bytes > limits[0] and PLANS.plan_max_bytes > limits[1]
        assert g.TAG[0] is None  # no arm running: the plain look-up, and the plan kept
        assert library_groups.GROUPS == 1  # the plain call whole
        made = PLANS.plan(torch.device("cpu"), ("head_groups test",), lambda: {"x": torch.zeros(4)})
        assert PLANS.plan(torch.device("cpu"), ("head_groups test",), dict) is made
    assert hopper_launch.launch is launch_before and (PLANS.max_bytes, PLANS.plan_max_bytes) == limits
    assert "plan" not in vars(PLANS) and not PLANS.plans and library_groups.GROUPS == groups_before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_short_run_writes_every_arm(tmp_path):
    out = tmp_path / "groups.json"
    assert groups().main(["--shapes", "1x16x2048x128", "--arms", "g2", "s2", "--rounds", "1", "--out",
                          str(out)]) == 0
    row = json.loads(out.read_text())["shapes"]["1x16x2048x128"]
    assert row["plain"] > 0 and row["g2"] > 0 and row["s2"] > 0 and row["sdpa"] > 0
    for arm in ("g2", "s2"):
        assert row[f"same_bits_{arm}"] or row[f"rel_l1_{arm}"] < 0.045
