"""bench/settings_ab.py: its arms name settings of the launchers that exist, bad arguments are refused before any
work, and on a GPU a short run writes every arm (Q coded by the pass, and inside the kernel from shared memory and
from registers), whether they gave the first arm's bits, and each arm's kernels, leaving the settings as shipped."""
import json

import pytest
import torch

import bench_script


def ab():
    return bench_script.load("settings_ab")


def test_arms_name_settings_that_exist():
    module = ab()
    assert module.parse_arm("two:launch.STATS_AHEAD=2,hopper_launch.TAIL_SPLIT=off") == (
        "two", {("launch", "STATS_AHEAD"): 2, ("hopper_launch", "TAIL_SPLIT"): "off"})
    for bad in ("noarm", "x:launch.NOT_A_SETTING=1", "x:tuning.STATS_AHEAD=1", "x:launch.STATS_AHEAD",
                "x:launch.padded_head_dim=1"):
        with pytest.raises(ValueError):
            module.parse_arm(bad)


def test_settings_switch_and_come_back():
    from sage_attention_pack.kernels import hopper_launch, launch

    module = ab()
    arms = dict(module.parse_arm(text) for text in ("a:launch.STATS_AHEAD=2", "b:hopper_launch.Q_IN_KERNEL=1"))
    settings = module.Settings(arms)
    seen = []
    calls = {name: settings.bind(arm, lambda: seen.append((launch.STATS_AHEAD, hopper_launch.Q_IN_KERNEL)))
             for name, arm in arms.items()}
    calls["a"](), calls["b"](), calls["a"]()
    assert seen == [(2, False), (1, True), (2, False)]  # each arm's own settings, the others' as shipped
    settings.restore()
    assert (launch.STATS_AHEAD, hopper_launch.Q_IN_KERNEL) == (1, False)


def test_bad_arguments_are_named_before_any_work(capsys):
    for argv, said in ((["--shapes", "flux"], "flux"), (["--rounds", "0"], "at least 1"),
                       (["--arms", "x:launch.NOPE=1"], "NOPE"), (["--arms", "x:head_groups.NOPE=1"], "head_groups"),
                       (["--config", "m64"], "m64")):
        with pytest.raises(SystemExit) as hit:
            ab().main(argv)
        assert hit.value.code == 2 and said in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the command would measure")
def test_no_gpu_is_refused_with_the_reason():
    with pytest.raises(SystemExit, match="CUDA GPU"):
        ab().main(["--shapes", "flux_1024px"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_short_run_writes_every_arm(tmp_path):
    from sage_attention_pack.kernels import hopper_launch

    out = tmp_path / "ab.json"
    assert ab().main(["--shapes", "1x4x4608x128", "--rounds", "1", "--out", str(out)]) == 0
    row = json.loads(out.read_text())["shapes"]["1x4x4608x128"]
    for arm in ("pass", "in_kernel", "in_kernel_regs"):
        assert row[arm] > 0 and row[f"rel_l1_{arm}"] < 0.045 and row[f"kernels_{arm}"] and row[f"host_ms_{arm}"] > 0
    assert row["sdpa"] > 0 and not row["q_in_kernel_pass"]
    assert hopper_launch.Q_IN_KERNEL is False  # left as shipped
    if torch.cuda.get_device_capability() == (9, 0) and hopper_launch.AVAILABLE:
        assert row["q_in_kernel_in_kernel"] and row["q_in_kernel_in_kernel_regs"] and row["same_bits"]
        # still two quantization launches, the first making the statistics alone
        assert len([k for k in row["kernels_in_kernel"] if k.startswith("quantize")]) == 2
