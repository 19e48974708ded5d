"""bench/quant_constants.py: its variants name what they change, a bad one is refused before any work, the
constants come back after each variant, and every tunable constant leaves the quantization's outputs as they are
(run here through Triton's interpreter: what the benchmark then times is the same work)."""
import pytest
import torch

import bench_script
from sage_attention_pack.kernels import launch

# the kernels run on the GPU where there is one, else through Triton's interpreter (TRITON_INTERPRET=1)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def quant_constants():
    return bench_script.load("quant_constants")


def test_variants_parse_to_their_overrides():
    module = quant_constants()
    assert module.parse_variant("base") == ("base", {})
    assert module.parse_variant("wide:QUANT_SUB=16,STATS_TILE=64") == ("wide", {"QUANT_SUB": 16, "STATS_TILE": 64})
    for bad, named in (("x:QUANT_SUBS=16", "QUANT_SUBS"), ("x:QUANT_SUB=0", "QUANT_SUB"),
                       ("x:QUANT_SUB=a", "QUANT_SUB"), (":QUANT_SUB=16", "no name")):
        with pytest.raises(ValueError, match=named):
            module.parse_variant(bad)


def test_a_bad_variant_is_refused_before_any_work(capsys):
    with pytest.raises(SystemExit) as hit:
        quant_constants().main(["--variants", "base", "x:V_ROW=64", "--out", "/nonexistent/q.json"])
    assert hit.value.code == 2
    assert "V_ROW" in capsys.readouterr().err
    with pytest.raises(SystemExit) as hit:
        quant_constants().main(["--variants", "a", "a:QUANT_SUB=16"])
    assert hit.value.code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the command would measure")
def test_no_gpu_is_refused_with_the_reason():
    with pytest.raises(SystemExit, match="NVIDIA GPU"):
        quant_constants().main(["--variants", "base"])


def test_constants_are_restored_even_when_the_block_fails():
    module = quant_constants()
    before = launch.QUANT_SUB
    with pytest.raises(RuntimeError):
        with module.constants({"QUANT_SUB": before * 2}):
            assert launch.QUANT_SUB == before * 2
            raise RuntimeError("a variant that failed")
    assert launch.QUANT_SUB == before


@pytest.mark.parametrize("overrides", [{"QUANT_SUB": 16, "STATS_TILE": 16}, {"MAX_STATS_CHUNKS": 32, "STATS_ROWS": 128},
                                       {"V_CHANNELS": 64, "V_ROWS": 64}, {"QUANT_ROWS": 256}])
def test_tunable_constants_leave_the_outputs_as_they_are(overrides):
    module = quant_constants()
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, n, 64, generator=g).to(DEVICE, torch.bfloat16) for n in (150, 333, 333))
    k = k + 0.5
    base = module.quantize(q, k, v)
    with module.constants(overrides):
        other = module.quantize(q, k, v)
    same = module.same_outputs(base, other)
    # the sums of V's codes are kept per program: more or fewer programs split the same sums differently
    if "V_ROWS" in overrides:
        torch.testing.assert_close(base["v_code_sums"].sum(1), other["v_code_sums"].sum(1), rtol=1e-5, atol=1e-5)
        same.pop("v_code_sums")
    # on the GPU the statistics' chunking sets the order in which the means are summed: their last bits may move
    if DEVICE == "cuda" and {"MAX_STATS_CHUNKS", "STATS_ROWS", "STATS_TILE"} & set(overrides):
        for name in ("k_mean", "v_mean"):
            torch.testing.assert_close(base[name], other[name], rtol=1e-6, atol=1e-7)
            same.pop(name)
    assert all(same.values()), same


def test_fp16_path_quantizes_as_an_ampere_fp16_call_does():
    """--path fp16 times what the portable FP16-P·V path quantizes on Ampere and Ada: the default per-warp Q
    groups, one K scale per key tile of those GPUs' head-dim-128 tiles, K smoothed alone, no FP8 V."""
    from sage_attention_pack.kernels import tuning
    from sage_attention_pack.sage_core.config import SageConfig

    module = quant_constants()
    buffer_args = module.PATHS["fp16"]
    for family in ("sm80", "sm86", "sm89"):
        assert buffer_args["k_group"] == tuning.default_config(family, "fp16", 128).block_n
    assert buffer_args["q_group"] == SageConfig().q_group_rows
    assert (buffer_args["smooth_k"], buffer_args["smooth_v"], buffer_args["pv_fp8"]) == (True, False, False)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, n, 128, generator=g).to(DEVICE, torch.bfloat16) for n in (100, 200, 200))
    out = module.quantize(q, k, v, path="fp16")
    assert out["v8"] is None
    assert out["k_scale"].shape[-1] == -(-200 // 64)
    assert out["q_scale"].shape[-1] == -(-100 // 16)
    # the same codes as the launch module gives an FP16 call with these groups
    direct = launch.quantize_qkv(q, k, v, block_d=128, q_multiplier=0.1275, **buffer_args, pv_key_order=False)
    assert all(module.same_outputs(direct, out).values())
