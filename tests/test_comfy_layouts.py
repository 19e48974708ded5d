"""Every call convention ComfyUI's attention functions use (skip_reshape, skip_output_reshape, 2-D/3-D/4-D,
boolean and additive masks), through the patch node's override, against ComfyUI's own attention_pytorch; and the
keywords newer ComfyUI releases add (scale, enable_gqa, low_precision_attention), against a stand-in for their
attention_pytorch."""
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


def newer_comfy_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                          skip_output_reshape=False, **kwargs):
    """What newer ComfyUI releases' attention_pytorch computes: PyTorch's SDPA with the call's `scale` and
    `enable_gqa` (K/V heads following from their width), the mask given batch and head axes; other keywords
    ignored."""
    d = q.shape[-1] if skip_reshape else q.shape[-1] // heads
    if not skip_reshape:
        q = q.view(q.shape[0], -1, heads, d).transpose(1, 2)
        k, v = (t.view(t.shape[0], -1, t.shape[-1] // d, d).transpose(1, 2) for t in (k, v))
    if mask is not None and mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask is not None and mask.ndim == 3:
        mask = mask.unsqueeze(1)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=kwargs.get("scale"), enable_gqa=kwargs.get("enable_gqa", False))
    if skip_output_reshape:
        return out
    return out.transpose(1, 2).reshape(out.shape[0], -1, heads * d)


def grouped(skip_reshape, kv_heads, seed=3):
    """Q with H heads, K and V with kv_heads, in the layout skip_reshape names."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H * 2, NQ, D, generator=g)
    k, v = (torch.randn(B, kv_heads, NK, D, generator=g) for _ in range(2))
    if not skip_reshape:
        q, k, v = (t.transpose(1, 2).reshape(B, t.shape[2], -1) for t in (q, k, v))
    return q, k, v


@pytest.mark.parametrize("skip_reshape", [False, True])
@pytest.mark.parametrize("scale,kv_heads", [(0.3, 4), (None, 2), (0.3, 1)])
def test_override_honours_newer_comfyuis_scale_and_grouped_query_keywords(comfyui, skip_reshape, scale, kv_heads):
    """`scale` and `enable_gqa` change what the call computes: served by Sage, the result is the one ComfyUI's
    own attention gives (4 query heads here, on 4, 2 or 1 K/V heads), K and V not repeated on the way."""
    from sage_attention_pack.nodes.override import SageOverride
    from sage_attention_pack.sage_core.config import SageConfig

    q, k, v = grouped(skip_reshape, kv_heads)
    kwargs = dict(skip_reshape=skip_reshape, transformer_options={}, enable_gqa=kv_heads < 2 * H)
    if scale is not None:
        kwargs["scale"] = scale
    ref = newer_comfy_attention(q, k, v, 2 * H, **kwargs)
    override = SageOverride(SageConfig(kernel="int8_fp16"))
    out = override(newer_comfy_attention, q, k, v, 2 * H, **kwargs)
    assert out.shape == ref.shape
    assert override.stats.snapshot()["sage"] == {"int8_fp16": 1}
    assert cosine(out, ref) > 0.9995  # (scale 0.3 against the default 0.125 makes the softmax sharper)
    if scale is not None:  # the default scale gives another attention: the keyword is what made them agree
        assert cosine(out, newer_comfy_attention(q, k, v, 2 * H, **{**kwargs, "scale": D ** -0.5})) < 0.9


def test_a_call_the_model_wants_in_full_precision_runs_comfyuis_attention(comfyui):
    """low_precision_attention=False (newer ComfyUI's models pass it where 8-bit attention fails them): ComfyUI's
    own attention, bit for bit, with every keyword handed on (the wrapper's own among them), counted as exact."""
    from sage_attention_pack.nodes.override import SageOverride
    from sage_attention_pack.sage_core.config import SageConfig

    q, k, v = make(False, seed=4)
    seen = []

    def comfy_attention(*args, **kwargs):
        seen.append(dict(kwargs))
        return newer_comfy_attention(*args, **kwargs)

    kwargs = dict(transformer_options={}, low_precision_attention=False, _inside_attn_wrapper=True)
    override = SageOverride(SageConfig(kernel="int8_fp16"))
    out = override(comfy_attention, q, k, v, H, **kwargs)
    assert torch.equal(out, newer_comfy_attention(q, k, v, H, **kwargs))
    assert override.stats.snapshot()["exact"] == {"model asks for full precision": 1}
    assert seen[0]["low_precision_attention"] is False and seen[0]["_inside_attn_wrapper"] is True
    served = override(comfy_attention, q, k, v, H, transformer_options={}, _inside_attn_wrapper=True)
    assert override.stats.snapshot()["sage"] == {"int8_fp16": 1} and len(seen) == 1
    assert cosine(served, out) > 0.9999


def test_the_compiled_path_takes_the_scale_too():
    """The custom op that compiled models call carries the softmax scale to the dispatcher."""
    from sage_attention_pack.sage_core.config import SageConfig
    from sage_attention_pack.sage_core.custom_op import sage_attention_op

    q, k, v = grouped(True, 2)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3, enable_gqa=True)
    out = sage_attention_op(q, k, v, None, "HND", SageConfig(kernel="int8_fp16"), sm_scale=0.3)
    assert cosine(out, ref) > 0.9995
