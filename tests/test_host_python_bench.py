"""bench/host_python.py: the pack's own Python per call, its launches left out (the first call compiles and runs for
real: on the CPU through Triton's interpreter)."""
import json
import os

import pytest
import torch

import bench_script

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="no GPU and TRITON_INTERPRET is not 1: the kernels cannot run here")


@pytest.mark.parametrize("through", ["dispatch", "dispatch_rope", "override"])
def test_the_calls_are_timed_and_the_launch_sites_given_back(tmp_path, through):
    from sage_attention_pack.kernels import call_plan

    module = bench_script.load("host_python")
    real_run = call_plan.CallPlan.run
    out = tmp_path / "host.json"
    assert module.main(["--shape", "1", "64", "2", "64", "--calls", "20", "--repeats", "2", "--through", through,
                        "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["through"] == through
    assert 0 < result["min_us"] <= result["median_us"] and len(result["samples_us"]) == 2
    # the first call and every timed one went through Sage's dispatcher
    assert sum(result["served"].values()) == 1 + 2 * 20 and result["environment"]["torch"]
    assert result["rotary_fused"] == (1 + 2 * 20 if through == "dispatch_rope" else 0)  # the table reached Sage
    assert call_plan.CallPlan.run is real_run


def test_bad_arguments_are_named_before_any_work(capsys):
    module = bench_script.load("host_python")
    for bad in (["--calls", "0"], ["--repeats", "0"], ["--shape", "1", "0", "2", "64"]):
        with pytest.raises(SystemExit) as hit:
            module.main(bad)
        assert hit.value.code == 2 and "at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as hit:
        module.main(["--through", "comfyui"])
    assert hit.value.code == 2 and "invalid choice" in capsys.readouterr().err
