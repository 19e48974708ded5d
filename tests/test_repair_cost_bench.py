"""bench/repair_cost.py: its arguments are refused before any work, its poisoned inputs put the NaN where each case
says, and on a GPU a short run repairs one tile and one head and writes every case."""
import json

import pytest
import torch

import bench_script
from sage_attention_pack.kernels import tuning


def repair_cost():
    return bench_script.load("repair_cost")


def test_bad_arguments_are_named_before_any_work(capsys):
    for argv, said in ((["--shapes", "1x2x3"], "1x2x3"), (["--rounds", "0"], "at least 1"),
                       (["--arms", "x:launch.NOPE=1"], "NOPE"),
                       (["--arms", "a:launch.REPAIR_TILES=2", "a:launch.REPAIR_TILES=4"], "share")):
        with pytest.raises(SystemExit) as hit:
            repair_cost().main(argv)
        assert hit.value.code == 2 and said in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the command would measure")
def test_no_gpu_is_refused_with_the_reason():
    with pytest.raises(SystemExit, match="CUDA GPU"):
        repair_cost().main(["--shapes", "flux_1024px"])


def test_each_case_poisons_only_its_own_copy():
    r = repair_cost()
    q, k = torch.zeros(1, 3, 8, 4), torch.zeros(1, 3, 10, 4)
    for case, (where, row) in {"one_tile": (0, (0, 0, 5)), "one_head": (1, (0, 2, 5))}.items():
        qs, ks = r.poisoned(q, k, case)
        nan = (qs, ks)[where].isnan().any(-1)
        assert nan.sum() == 1 and nan[row] and not (ks, qs)[where].isnan().any()
    assert not any(t.isnan().any() for t in (*r.poisoned(q, k, "clean"), *r.poisoned(q, k, "unguarded"), q, k))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_short_run_repairs_one_tile_and_one_head(tmp_path):
    out = tmp_path / "repair.json"
    assert repair_cost().main(["--shapes", "1x4x1024x128", "--rounds", "1", "--out", str(out)]) == 0
    row = json.loads(out.read_text())["shapes"]["1x4x1024x128"]
    assert row["tiles_repaired_clean"] == 0 and row["tiles_repaired_one_tile"] == 1
    block_m = tuning.LaunchConfig.from_key(row["launch_config"]).block_m
    assert row["tiles_repaired_one_head"] == -(-1024 // block_m)  # every tile of the last head
    assert row["repair_ms_one_head"] > row["repair_ms_clean"] > 0 and row["repaired_max_abs_err_one_tile"] < 2e-2
    # the same clean call without the guard: no repair launch, and its cost per call set beside the guarded one
    assert row["repair_ms_unguarded"] == 0 and 0 < row["device_ms_unguarded"] < row["device_ms_clean"]
    assert row["guard_ms_shipped"] == row["clean"] - row["unguarded"]
    # two arms: each case per arm, the dots in FP32 on the FMA pipe and as three TF32 products
    arms = ["ieee:launch.REPAIR_DOT_PRECISION=ieee", "tf32x3:launch.REPAIR_DOT_PRECISION=tf32x3"]
    assert repair_cost().main(["--shapes", "1x4x1024x128", "--rounds", "1", "--out", str(out), "--arms", *arms]) == 0
    row = json.loads(out.read_text())["shapes"]["1x4x1024x128"]
    for arm in ("ieee", "tf32x3"):
        assert row[f"tiles_repaired_{arm}_one_tile"] == 1 and row[f"repaired_max_abs_err_{arm}_one_tile"] < 2e-2
