"""bench/program_cost.py: the line it fits through a configuration's time per wave, and the waves and shares it
reports, from rows whose answer is known."""
import pytest
import torch

import bench_script


def program_cost():
    return bench_script.load("program_cost")


def test_the_fit_recovers_a_line_and_its_intercept():
    fixed, per_tile = program_cost().fit_line([9, 18, 36, 72], [5.0 + 1.2 * t for t in (9, 18, 36, 72)])
    assert fixed == pytest.approx(5.0) and per_tile == pytest.approx(1.2)
    # noise around the line: least squares, not the first and last point
    fixed, per_tile = program_cost().fit_line([0, 1, 2, 3], [1.0, 3.5, 4.5, 7.0])
    assert per_tile == pytest.approx(1.9) and fixed == pytest.approx(1.15)


def rows(key, per_wave_us, waves, rounds=(1.0, 1.02, 0.98)):
    """Calls of one configuration whose attention kernel takes per_wave_us(tiles) per wave, three rounds apart by the
    given factors."""
    out = []
    for rnd, factor in enumerate(rounds):
        for keys in (1152, 2304, 4608, 9216):
            tiles = keys // 128
            out.append({"round": rnd, "config": key, "keys": keys, "attention_ms": factor * waves * per_wave_us(tiles)
                        / 1e3, "sdpa_ms": 0.01 * keys / 1152})
    return out


def test_summary_takes_medians_and_prices_a_program():
    # Flux's 4608 query rows at 22 heads: 36 ping-pong programs per head, 792 in all, six waves of 132
    summary = program_cost().summarize(rows("m64n128w4s4mcpdgpppnt", lambda t: 7.0 + 1.2 * t, 6), 4608, 132, 22)
    entry = summary["configs"]["m64n128w4s4mcpdgpppnt"]
    assert entry["programs"] == 792 and entry["waves"] == 6
    assert entry["keys"][4608]["attention_ms"] == pytest.approx(6 * (7.0 + 1.2 * 36) / 1e3)  # the median round
    assert entry["keys"][4608]["us_per_wave"] == pytest.approx(7.0 + 1.2 * 36)
    assert entry["fixed_us"] == pytest.approx(7.0) and entry["per_tile_us"] == pytest.approx(1.2)
    assert entry["fixed_share_at_nq"] == pytest.approx(7.0 / (7.0 + 1.2 * 36))
    assert summary["sdpa_ms"][2304] == pytest.approx(0.02)


def test_each_configuration_counts_its_own_programs():
    # the one-warpgroup kernel: a program per 64-row tile, 72 per head, 1584 in all, twelve waves
    data = rows("m64n128w4s4mcpdgpppnt", lambda t: 7.0 + 1.2 * t, 6) + rows("m64n128w4s3mcpdgp",
                                                                           lambda t: 3.0 + 0.7 * t, 12)
    summary = program_cost().summarize(data, 4608, 132, 22)
    one = summary["configs"]["m64n128w4s3mcpdgp"]
    assert one["programs"] == 1584 and one["waves"] == 12
    assert one["fixed_us"] == pytest.approx(3.0) and one["per_tile_us"] == pytest.approx(0.7)
    assert list(summary["configs"]) == ["m64n128w4s4mcpdgpppnt", "m64n128w4s3mcpdgp"]


def test_bad_arguments_are_named_before_any_work(capsys):
    for argv, words in ((["--shape", "flux_2048px"], "flux_2048px"), (["--keys", "4608"], "two key lengths"),
                        (["--heads", "0"], "at least 1")):
        with pytest.raises(SystemExit) as hit:
            program_cost().main(argv)
        assert hit.value.code == 2 and words in capsys.readouterr().err
    with pytest.raises(ValueError, match="not a launch configuration key"):
        program_cost().main(["--configs", "m64x128"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the command would measure")
def test_no_gpu_is_refused_with_the_reason():
    with pytest.raises(SystemExit, match="CUDA GPU"):
        program_cost().main([])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the profiler times its kernels)")
def test_a_short_sweep_writes_its_fit(tmp_path):
    out = tmp_path / "cost.json"
    assert program_cost().main(["--heads", "2", "--keys", "1152", "2304", "--rounds", "1", "--out", str(out)]) == 0
    import json
    result = json.loads(out.read_text())
    (entry,) = result["configs"].values()
    assert set(entry["keys"]) == {"1152", "2304"}
    assert all(e["attention_ms"] > 0 for e in entry["keys"].values())
    assert entry["per_tile_us"] > 0
    assert len(result["calls"]) == 2 and all(c["sdpa_ms"] > 0 for c in result["calls"])
