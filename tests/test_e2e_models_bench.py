"""bench/e2e_models.py: each model forward it times (ComfyUI's own classes, random BF16 weights), built at a few
heads and tokens and run on the CPU through Triton's interpreter with the patch node's override and the rotary
hand-off, as the benchmark runs them at full size on a GPU."""
import os

import pytest
import torch

import bench_script

pytestmark = [pytest.mark.comfy,
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="TRITON_INTERPRET=1 is needed to run the kernels on the CPU")]
CASES = ["wan21_14b_4blocks_480p81f", "flux_dev_2x4blocks_1024px", "qwen_image_4blocks_1328px",
         "lumina2_6blocks_1024px", "ltxv_2b_4blocks_768x512_97f", "hidream_i1_2x4blocks_1024px"]


@pytest.fixture(scope="module")
def e2e_models(comfyui):
    import comfy.ldm.flux.model  # noqa: F401 - the classes the cases build
    import comfy.ldm.hidream.model  # noqa: F401
    import comfy.ldm.lightricks.model  # noqa: F401
    import comfy.ldm.lumina.model  # noqa: F401
    import comfy.ldm.qwen_image.model  # noqa: F401
    import comfy.ldm.wan.model  # noqa: F401
    import comfy.ops  # noqa: F401

    return bench_script.load("e2e_models")


def test_the_benchmark_times_these_forwards(e2e_models):
    assert list(e2e_models.CASES) == CASES


@pytest.mark.parametrize("name", CASES)
def test_each_forward_runs_sage_with_the_rotation_fused(e2e_models, name):
    """Two forwards as a sampler's steps run them (e2e_models.sampler_forward): every rotating call gets a carried
    statistics site of its own, which the second forward codes with, as close to ComfyUI's attention as the first."""
    import comfy

    from sage_attention_pack.kernels import carried_stats
    from sage_attention_pack.nodes import rotary_handoff
    from sage_attention_pack.nodes.override import SageOverride
    from sage_attention_pack.sage_core import backend
    from sage_attention_pack.sage_core.config import SageConfig

    _, forward = e2e_models.CASES[name](comfy, tiny=True, device="cpu")
    rotary_handoff.install()
    backend.release_buffers()
    try:
        with torch.inference_mode():
            reference = forward({})
            override = SageOverride(SageConfig(kernel="int8_fp8"))
            outs = [e2e_models.sampler_forward(forward, override) for _ in range(2)]
        sites = len(carried_stats.SITES)
    finally:
        rotary_handoff.uninstall()
        backend.release_buffers()
    snap = override.stats.snapshot()
    assert snap["sage"].get("int8_fp8", 0) > 0 and not snap["fallback"] and not snap["recomputed"], snap
    assert snap["rotary_fused"] > 0 and sites == snap["rotary_fused"] // 2, (sites, snap)
    assert all(e2e_models.compare(out, reference)["cosine"] > 0.999 for out in outs)
