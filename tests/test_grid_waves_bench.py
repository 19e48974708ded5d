"""bench/grid_waves.py: the programs it counts per head are the attention launcher's grid, its parts add up to the
call's kernels, and its balanced estimate takes the time of a wave from the head counts whose waves are whole."""
import pytest
import torch

import bench_script
from sage_attention_pack.kernels import tuning


def grid_waves():
    return bench_script.load("grid_waves")


@pytest.mark.parametrize("key, rows, expected", [
    ("m64n128w4s4mcpdgppp", 4608, 36),  # the ping-pong kernel: two 64-row tiles per program (Flux: 36 per head)
    ("m64n128w4s4mcpdgppp", 4600, 36),
    ("m64n128w4s4mcpdgppp", 4609, 37),
    ("m64n128w4s4mcpdgp", 4608, 72),  # one warpgroup per 64-row tile
    ("m64n128w4s4mcpdgpppps", 4608, None),  # persistent: one program per multiprocessor
])
def test_programs_per_head_follow_the_launch_configuration(key, rows, expected):
    config = tuning.LaunchConfig.from_key(key)
    assert grid_waves().programs_per_head(config, rows) == expected


def test_kernel_parts_split_a_call_and_lose_nothing():
    per_kernel = {"sage_fwd_sm90_pingpong_kernel": 0.34, "quantize_kernel [1/2]": 0.03, "quantize_kernel [2/2]": 0.04,
                  "vectorized_elementwise_kernel": 0.002, "repair_tiles_kernel": 0.003}
    parts = grid_waves().kernel_parts(per_kernel)
    assert parts["attention_ms"] == pytest.approx(0.34)
    assert parts["quantize_ms"] == pytest.approx(0.07)
    assert parts["other_ms"] == pytest.approx(0.005)
    assert sum(parts.values()) == pytest.approx(sum(per_kernel.values()))
    assert grid_waves().kernel_parts({"sage_attention_fwd_kernel": 1.0})["attention_ms"] == 1.0


def row(heads, rnd, attention, programs_per_head=36):
    return {"round": rnd, "heads": heads, "programs": heads * programs_per_head, "attention_ms": attention,
            "quantize_ms": 0.003 * heads, "other_ms": 0.004, "sdpa_ms": 0.016 * heads}


def test_summary_takes_medians_and_prices_the_tail_from_whole_waves():
    # 132 multiprocessors: 22 heads are 6 whole waves, 33 heads 9; 24 heads 6.55 waves that take 7 waves' time
    rows = [row(22, 0, 0.300), row(22, 1, 0.290), row(22, 2, 0.310),
            row(33, 0, 0.441), row(33, 1, 0.450), row(33, 2, 0.432),
            row(24, 0, 0.350), row(24, 1, 0.343), row(24, 2, 0.341)]
    summary = grid_waves().summarize(rows, 132)
    h24 = summary["heads"][24]
    assert summary["heads"][22]["attention_ms"] == pytest.approx(0.300)
    assert h24["attention_ms"] == pytest.approx(0.343)
    assert h24["waves"] == pytest.approx(864 / 132)
    assert h24["ms_per_wave"] == pytest.approx(0.343 / 7)
    # one wave: the median of 0.300 / 6 and 0.441 / 9
    assert summary["wave_ms"] == pytest.approx((0.05 + 0.049) / 2)
    assert h24["balanced_ms"] == pytest.approx(864 / 132 * summary["wave_ms"])
    assert h24["tail_ms"] == pytest.approx(0.343 - h24["balanced_ms"])
    assert h24["tail_ms"] > 0
    assert summary["heads"][22]["tail_ms"] == pytest.approx(0.300 - 6 * summary["wave_ms"])
    assert h24["attention_us_per_head"] == pytest.approx(1e3 * 0.343 / 24)


def test_summary_sets_each_head_count_split_beside_unsplit():
    """With --unsplit-too the rows of the split-off calls give their own median, and the saving is against the
    calls as shipped (split where the launcher splits)."""
    rows = [dict(row(24, r, t), split=True, splits=3) for r, t in enumerate((0.330, 0.326, 0.327))]
    rows += [dict(row(24, r, t), split=False, splits=1) for r, t in enumerate((0.343, 0.344, 0.340))]
    h24 = grid_waves().summarize(rows, 132)["heads"][24]
    assert h24["attention_ms"] == pytest.approx(0.327) and h24["splits"] == 3
    assert h24["unsplit_attention_ms"] == pytest.approx(0.343)
    assert h24["split_saving_ms"] == pytest.approx(0.016)
    assert "unsplit_attention_ms" not in grid_waves().summarize(rows[:3], 132)["heads"][24]


def test_without_a_whole_wave_there_is_no_balanced_estimate():
    summary = grid_waves().summarize([row(24, 0, 0.343), row(25, 0, 0.344)], 132)
    assert summary["wave_ms"] is None
    assert summary["heads"][24]["balanced_ms"] is None and summary["heads"][25]["tail_ms"] is None


def test_bad_arguments_are_named_before_any_work(capsys):
    with pytest.raises(SystemExit) as hit:
        grid_waves().main(["--shape", "flux_2048px"])
    assert hit.value.code == 2 and "flux_2048px" in capsys.readouterr().err
    with pytest.raises(SystemExit) as hit:
        grid_waves().main(["--heads", "0", "24"])
    assert hit.value.code == 2 and "at least 1" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the command would measure")
def test_no_gpu_is_refused_with_the_reason():
    with pytest.raises(SystemExit, match="CUDA GPU"):
        grid_waves().main(["--heads", "24"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the profiler times its kernels)")
def test_a_short_sweep_writes_its_summary(tmp_path):
    out = tmp_path / "waves.json"
    assert grid_waves().main(["--heads", "1", "3", "--rounds", "1", "--unsplit-too", "--out", str(out)]) == 0
    import json
    result = json.loads(out.read_text())
    assert set(result["heads"]) == {"1", "3"}
    for entry in result["heads"].values():
        assert entry["attention_ms"] > 0 and entry["quantize_ms"] > 0 and entry["sdpa_ms"] > 0
        assert entry["unsplit_attention_ms"] > 0
        assert entry["programs"] % 36 == 0
    assert len(result["calls"]) == 4 and result["launch_config"]
    # Flux's rows at 1 head: 36 programs, one part-full wave, in thirds on a 132-multiprocessor H100/H200 (108
    # programs; quarters would be 144, two waves); at 3 heads 108, which no split of at most 4 parts fits into fewer
    # waves
    if result["multiprocessors"] == 132:
        assert result["heads"]["1"]["splits"] == 3 and result["heads"]["3"]["splits"] == 1
