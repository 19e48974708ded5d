"""Every call convention ComfyUI's attention functions use (skip_reshape, skip_output_reshape, 2-D/3-D/4-D,
boolean and additive masks), through the patch node's override, against ComfyUI's own attention_pytorch."""
import itertools
import os

import pytest
import torch

pytestmark = [pytest.mark.comfy,
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="TRITON_INTERPRET=1 is needed to run the kernels on the CPU")]
B, H, D, NQ, NK = 2, 2, 64, 48, 40


def cosine(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return (a @ b / (a.norm() * b.norm())).item()


def make(skip_reshape, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (NQ, NK, NK))
    k = k + 2.0
    if not skip_reshape:
        q, k, v = (t.transpose(1, 2).reshape(B, t.shape[2], H * D) for t in (q, k, v))
    return q, k, v


def key_mask(kind):
    keep = torch.ones(B, NK, dtype=torch.bool)
    keep[0, 30:] = False
    if kind == "none":
        return None
    if kind == "bool_4d":
        return keep[:, None, None, :]
    if kind == "additive_3d":  # [B, 1, Nk]: broadcast over queries, as text encoders' padding masks are
        return torch.zeros(B, 1, NK).masked_fill(~keep[:, None, :], float("-inf"))
    if kind == "additive_2d":  # [Nq, Nk] with identical rows
        return torch.zeros(NQ, NK).masked_fill(~keep[0][None, :], float("-inf"))
    raise ValueError(kind)


@pytest.mark.parametrize("skip_reshape,skip_output_reshape,mask_kind", list(itertools.product(
    [False, True], [False, True], ["none", "bool_4d", "additive_3d", "additive_2d"])))
def test_override_matches_comfy_attention_in_every_convention(comfyui, skip_reshape, skip_output_reshape,
                                                              mask_kind):
    from comfy.ldm.modules.attention import attention_pytorch

    from sage_attention_pack.nodes.override import SageOverride
    from sage_attention_pack.sage_core.config import SageConfig

    q, k, v = make(skip_reshape)
    mask = key_mask(mask_kind)
    kwargs = dict(mask=mask, skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape,
                  transformer_options={})
    ref = attention_pytorch(q, k, v, H, **kwargs)
    override = SageOverride(SageConfig(kernel="int8_fp16"))
    out = override(attention_pytorch, q, k, v, H, **kwargs)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert override.stats.snapshot()["sage"] == {"int8_fp16": 1}  # served by the kernel, mask included
    assert cosine(out, ref) > 0.9999


def test_per_query_mask_falls_back_to_comfy_attention_exactly(comfyui):
    from comfy.ldm.modules.attention import attention_pytorch

    from sage_attention_pack.nodes.override import SageOverride
    from sage_attention_pack.sage_core.config import SageConfig

    q, k, v = make(False, seed=1)
    mask = torch.rand(NQ, NK, generator=torch.Generator().manual_seed(2)) > 0.2  # differs per query
    kwargs = dict(mask=mask, transformer_options={})
    override = SageOverride(SageConfig(kernel="int8_fp16"))
    out = override(attention_pytorch, q, k, v, H, **kwargs)
    assert torch.equal(out, attention_pytorch(q, k, v, H, **kwargs))
    assert override.stats.snapshot()["fallback"] == {"per-query mask": 1}
