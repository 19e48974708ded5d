"""bench/energy.py's command line refuses what it cannot measure before doing any work: an unknown method by name,
and a machine without an NVIDIA GPU (nvidia-smi samples the power it reports)."""
import pytest
import torch

import bench_script


def energy_module():
    return bench_script.load("energy")


def test_an_unknown_method_is_named_before_any_work(capsys):
    with pytest.raises(SystemExit) as hit:
        energy_module().main(["--methods", "sdpa_default", "sage_int9", "--out", "/nonexistent/energy.json"])
    assert hit.value.code == 2
    err = capsys.readouterr().err
    assert "sage_int9" in err and "sage_int8_fp8" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the command would measure")
def test_no_gpu_is_refused_with_the_reason():
    with pytest.raises(SystemExit, match="NVIDIA GPU"):
        energy_module().main(["--shapes", "flux_1024px"])


def test_the_named_methods_reach_the_measurement_as_callables(monkeypatch, tmp_path):
    """main hands the measurement the callables of exactly the methods named, from the one table it validated them
    against (a name the measurement then looked up again by calling a shadowed table was the bug this guards)."""
    module = energy_module()
    seen = {}

    def fake_measure(shapes, fns, seconds, rounds):
        seen.update(shapes=shapes, fns=fns)
        return {"shapes": {}}

    monkeypatch.setattr(module, "measure", fake_measure)
    monkeypatch.setattr(module.torch.cuda, "is_available", lambda: True)
    assert module.main(["--shapes", "flux_1024px", "--methods", "sdpa_default", "sage_int8_fp8",
                        "--out", str(tmp_path / "energy.json")]) == 0
    assert seen["shapes"] == ["flux_1024px"]
    assert list(seen["fns"]) == ["sdpa_default", "sage_int8_fp8"] and all(callable(f) for f in seen["fns"].values())
