"""bench/host_time.py: host and wall time per call of Sage (with the table handed over, and on Q and K already
rotated) and of SDPA; on the CPU through Triton's interpreter at a small size, on a GPU at the model's size."""
import json
import os

import pytest
import torch

import bench_script

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="no GPU and TRITON_INTERPRET is not 1: the kernels cannot run here")


def host_time():
    return bench_script.load("host_time")


def test_every_way_is_timed_and_every_sage_call_counted(tmp_path):
    out = tmp_path / "host.json"
    assert host_time().main(["--shapes", "ltxv_768x512_97f", "lumina2_1024px", "--calls", "2", "--rounds", "2",
                             "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["calls_per_sample"] == 2 and result["rounds"] == 2 and result["environment"]["torch"]
    for shape in ("ltxv_768x512_97f", "lumina2_1024px"):
        row = result["shapes"][shape]
        for way in ("sage_rotation_fused", "sage_prerotated", "sdpa"):
            assert 0 < row[way]["host_us"] <= row[way]["wall_us"], (shape, way, row[way])
        # two warm-up calls and two rounds of two calls per Sage way, each served by Sage, half with the table
        assert sum(row["calls"]["sage"].values()) == 2 * (2 + 2 * 2) and row["calls"]["rotary_fused"] == 2 + 2 * 2
        assert row["calls"]["fallback"] == {} and row["calls"]["exact"] == {}


def test_bad_arguments_are_named_before_any_work(capsys):
    for bad in (["--calls", "0"], ["--rounds", "0"], ["--shapes", "sdxl"]):
        with pytest.raises(SystemExit) as hit:
            host_time().main(bad)
        assert hit.value.code == 2 and "at least 1" in capsys.readouterr().err
