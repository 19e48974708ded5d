"""bench/rope_call.py: Flux.1's call with its table, the ways ComfyUI can run it; on the CPU its pieces through
Triton's interpreter at a small size, on a GPU a short run."""
import json
import os

import pytest
import torch

import bench_script


def rope_call():
    return bench_script.load("rope_call")


def test_the_inputs_are_each_models_with_its_table():
    flux = rope_call().call_inputs("flux_1024px", "cpu", heads=2)
    assert flux.layout == "HND" and flux.q.shape == (1, 2, 512 + 64 * 64, 128)
    assert flux.pe.shape == (1, 1, 512 + 64 * 64, 64, 2, 2) and flux.pe.dtype == torch.float32
    wan = rope_call().call_inputs("wan21_480p_81f", "cpu", heads=2, grid=(2, 3, 4))
    assert wan.layout == "NHD" and wan.q.shape == (1, 24, 2, 128) and wan.q.is_contiguous()
    assert wan.pe.shape == (1, 1, 24, 64, 2, 2)
    qwen = rope_call().call_inputs("qwen_image_1328px", "cpu", heads=2, grid=(5, 3, 4))
    assert qwen.layout == "NHD" and qwen.q.shape == (1, 17, 2, 128) and qwen.q.is_contiguous()
    assert qwen.pe.shape == (1, 1, 17, 64, 2, 2) and qwen.pe.dtype == torch.bfloat16
    lumina = rope_call().call_inputs("lumina2_1024px", "cpu", heads=6, grid=(5, 3, 4))
    assert lumina.q.shape == (1, 17, 6, 96) and lumina.k.shape == lumina.v.shape == (1, 17, 2, 96)
    assert lumina.group == 3 and lumina.pe.shape == (1, 1, 17, 48, 2, 2) and lumina.pe.dtype == torch.bfloat16
    q, k, v = lumina.comfy_inputs()  # as ComfyUI hands them on: K and V repeated per query head
    assert k.shape == v.shape == (1, 17, 6, 96) and torch.equal(v[:, :, 3], lumina.v[:, :, 1])
    ltxv = rope_call().call_inputs("ltxv_768x512_97f", "cpu", heads=2, grid=(2, 3, 4))
    assert ltxv.layout == "NHD" and ltxv.q.shape == (1, 24, 2, 64)
    assert ltxv.pe.shape == (1, 2, 24, 32, 2, 2) and ltxv.pe.dtype == torch.bfloat16  # a table per head
    assert not torch.equal(ltxv.pe[:, 0], ltxv.pe[:, 1])
    hidream = rope_call().call_inputs("hidream_1024px", "cpu", heads=2, grid=(5, 3, 4))
    assert hidream.layout == "NHD" and hidream.q.shape == (1, 17, 2, 128) and hidream.pe.shape == (1, 1, 17, 64, 2, 2)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="no GPU and TRITON_INTERPRET is not 1: the kernels cannot run here")
def test_every_way_computes_the_same_attention():
    """The methods timed are the same attention: Sage with the table handed over and Sage after ComfyUI's rotation
    agree closely, and both are close to ComfyUI's rotation then SDPA; the quantization's two forms code alike."""
    from sage_attention_pack.sage_core.config import SageConfig
    from sage_attention_pack.sage_core.dispatch import DispatchStats

    device = "cuda" if torch.cuda.is_available() else "cpu"
    module = rope_call()
    for shape, grid in (("flux_1024px", (16, 4, 4)), ("wan21_480p_81f", (2, 4, 4)), ("qwen_image_1328px", (9, 5, 5)),
                        ("lumina2_1024px", (9, 5, 5)), ("ltxv_768x512_97f", (2, 4, 4)),
                        ("hidream_1024px", (9, 5, 5))):
        # more heads than errors() takes (ERROR_HEADS) where tables or K/V heads must be cut to its heads
        c = module.call_inputs(shape, device, heads=6 if shape.startswith(("lumina2", "ltxv")) else 4, grid=grid)
        stats = DispatchStats()
        ways = module.methods(c, SageConfig(kernel="int8_fp8"), stats)
        exact = ways["comfyui_rotation_sdpa"]().double()
        outs = {name: c.hnd(ways[name]()) for name in ("comfyui_rotation_sage", "sage_rotation_fused")}
        # the carried call's site is this model's own: its first call measures its own statistics, as the call
        # without a site does (the same bits; qwen_image's and hidream's calls here have one shape, and a shared
        # site gave hidream's qwen_image's statistics), and the second takes the first's
        outs["carried_first"] = c.hnd(ways["sage_rotation_fused_carried"]())
        assert torch.equal(outs["carried_first"], outs["sage_rotation_fused"]), shape
        outs["carried_second"] = c.hnd(ways["sage_rotation_fused_carried"]())
        for name, out in outs.items():
            out = out.double()
            assert ((out - exact).abs().sum() / exact.abs().sum()).item() < 0.045, (shape, name)
        assert stats.rotary_fused == 3 and stats.recomputed == 0
        assert (ways["quantize_rotation_fused"]()["k_scale"] != ways["quantize_prerotated"]()["k_scale"]).any()
        errors = module.errors(c, SageConfig(kernel="int8_fp8"))
        assert set(errors) == {"sage_rotation_fused", "sage_rotation_fused_carried", "comfyui_rotation_sage"}
        assert all(e["cosine"] > 0.999 for e in errors.values()), (shape, errors)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="no GPU and TRITON_INTERPRET is not 1: the kernels cannot run here")
def test_an_arms_carried_call_runs_under_its_settings_and_the_rest_as_shipped():
    """--arms: the carried call once more per arm, under the arm's settings and at a site of its own, as close to
    exact attention as the shipped one; every other method runs as shipped, and the settings are back after."""
    from sage_attention_pack.kernels import carried_stats, launch
    from sage_attention_pack.sage_core.config import SageConfig
    from sage_attention_pack.sage_core.dispatch import DispatchStats

    module = rope_call()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    c = module.call_inputs("flux_1024px", device, heads=4, grid=(16, 4, 4))
    arms = module.settings_ab.parse_arms(["light:launch.ROPE_CARRY_K_MEAN=1,launch.ROPE_CARRY_V_CHANNELS=32,"
                                          "launch.ROPE_CARRY_SUB=16"])
    settings = module.settings_ab.Settings(arms)
    seen = {}

    def note(name):  # the settings each method runs under
        seen[name] = (launch.ROPE_CARRY_K_MEAN, launch.ROPE_CARRY_V_CHANNELS, launch.ROPE_CARRY_SUB)

    config, stats = SageConfig(kernel="int8_fp8"), DispatchStats()
    ways = module.arm_methods(c, config, stats, arms, settings)
    assert set(ways) == set(module.methods(c, config, stats)) | {"sage_rotation_fused_carried@light"}
    exact = ways["comfyui_rotation_sdpa"]().double()
    carried_stats.SITES.clear()
    for name in ("sage_rotation_fused_carried", "sage_rotation_fused_carried@light") * 2:
        out = c.hnd(ways[name]()).double()
        note(name)
        assert ((out - exact).abs().sum() / exact.abs().sum()).item() < 0.045, name
    assert seen["sage_rotation_fused_carried"] == (False, 64, 64)
    assert seen["sage_rotation_fused_carried@light"] == (True, 32, 16)
    assert len(carried_stats.SITES) == 2 and stats.recomputed == 0  # a site per arm
    settings.restore()
    errors = module.errors(c, config, arms, settings)
    assert errors["sage_rotation_fused_carried@light"]["cosine"] > 0.999
    assert (launch.ROPE_CARRY_K_MEAN, launch.ROPE_CARRY_V_CHANNELS, launch.ROPE_CARRY_SUB) == (False, 64, 64)


def test_bad_arguments_are_named_before_any_work(capsys):
    with pytest.raises(SystemExit) as hit:
        rope_call().main(["--rounds", "0"])
    assert hit.value.code == 2 and "at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as hit:
        rope_call().main(["--shapes", "sdxl"])
    assert hit.value.code == 2 and "['sdxl']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as hit:
        rope_call().main(["--arms", "light:launch.NO_SUCH_SETTING=1"])
    assert hit.value.code == 2 and "'launch.NO_SUCH_SETTING' is not a setting" in capsys.readouterr().err
    with pytest.raises(SystemExit) as hit:
        rope_call().main(["--arms", "a:launch.ROPE_CARRY_SUB=16", "a:launch.ROPE_CARRY_SUB=32"])
    assert hit.value.code == 2 and "two arms share a name" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the command would measure")
def test_no_gpu_is_refused_with_the_reason(capsys):
    assert rope_call().main(["--shapes", "flux_1024px"]) == 2
    assert "needs a GPU" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_short_run_writes_every_way(tmp_path):
    out = tmp_path / "rope.json"
    assert rope_call().main(["--shapes", "flux_1024px", "--rounds", "1", "--out", str(out)]) == 0
    row = json.loads(out.read_text())["shapes"]["flux_1024px"]
    assert set(row["ms"]) == {"comfyui_rotation_sdpa", "comfyui_rotation_sage", "sage_rotation_fused",
                              "sage_rotation_fused_carried", "rotation_alone", "sage_prerotated",
                              "quantize_rotation_fused", "quantize_prerotated"}
    assert all(ms > 0 for ms in row["ms"].values()) and row["calls"]["rotary_fused"] > 0
    # the benchmark's inputs carry K offsets that the rotation turns with the position: both forms lose alike
    fused, first = row["errors"]["sage_rotation_fused"], row["errors"]["comfyui_rotation_sage"]
    assert fused["cosine"] >= first["cosine"] - 1e-4 and fused["cosine"] > 0.998, (fused, first)
