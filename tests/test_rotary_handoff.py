"""Attention calls handed to Sage before their rotary embedding (nodes/rotary_handoff.py), in a real ComfyUI:
ComfyUI's own Flux model class at a small width (2 heads of 128, one double and one single block, random weights),
sampled through ComfyUI's sampler with the patch node's model patch and called directly with the override, and its
Wan2.1 and Qwen-Image classes (2 heads of 128, two blocks each), its Lumina 2 class (4 query heads of 96 on 2 K/V
heads), the last two also sampled through the patch node, its LTX-Video class (2 heads of 64, a table per head),
its HiDream class (2 heads of 64, the table over all or half of each head), the last two also sampled through the
patch node, and its Chroma and HunyuanVideo classes, whose blocks call Flux's attention, called directly."""
import os

import pytest
import torch

pytestmark = [pytest.mark.comfy,
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="TRITON_INTERPRET=1 is needed to run the kernels on the CPU")]
FLUX = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64, hidden_size=256,
            mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56], theta=10000,
            patch_size=2, qkv_bias=True, guidance_embed=False)
CALLS = 2  # attention calls per forward: the double block's joint one and the single block's


def randomized(model, seed):
    """Random weights scaled to keep activations near unit size, norms' scales at 1; returns the generator to draw
    the inputs from."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif "scale" in name or "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return g


def cosine(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return (a @ b / (a.norm() * b.norm())).item()


@pytest.fixture(scope="module")
def flux(comfyui):
    """(ModelPatcher of a small Flux built by ComfyUI's own classes, the forward's inputs, a sampling run)."""
    import comfy.model_patcher
    import comfy.sample
    import comfy.supported_models

    config = comfy.supported_models.Flux(dict(FLUX))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device="cpu")
    g = randomized(model.diffusion_model, seed=0)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    x = torch.randn(1, 16, 16, 16, generator=g)
    ctx, y = torch.randn(1, 16, 64, generator=g), torch.randn(1, 32, generator=g)
    cond = [[ctx, {"pooled_output": y}]]

    def sample(m):
        return comfy.sample.sample(m, x, 2, 1.0, "euler", "simple", cond, cond, torch.zeros_like(x), seed=1)

    def forward(options, counted=True):
        """One forward with `options` and, as the patch node's model wrapper puts there, a fresh call counter
        (not if not `counted`: the model called outside a sampler)."""
        from sage_attention_pack.nodes.routing import ForwardCounter

        counter = {ForwardCounter.KEY: ForwardCounter()} if counted else {}
        with torch.no_grad():
            return model.diffusion_model(x, torch.full((1,), 0.5), ctx, y=y, transformer_options={**options, **counter})

    return patcher, forward, sample


@pytest.fixture
def installed(flux):
    from sage_attention_pack.nodes import rotary_handoff

    assert rotary_handoff.install() == ["comfy.ldm.flux.layers", "comfy.ldm.chroma.layers",
                                        "comfy.ldm.wan.model.WanSelfAttention",
                                        "comfy.ldm.qwen_image.model.Attention",
                                        "comfy.ldm.lumina.model.JointAttention",
                                        "comfy.ldm.lightricks.model.CrossAttention",
                                        "comfy.ldm.hidream.model.HiDreamAttnProcessor_flashattn"]
    yield rotary_handoff
    rotary_handoff.uninstall()


def test_the_patch_node_samples_flux_with_the_rotation_inside_the_quantization(flux):
    """The patch node's model patch installs the hand-off: every attention call of a Flux sampling run is served by
    Sage with its rotation applied inside the quantization, and the result stays close to ComfyUI's own."""
    patcher, _, sample = flux
    assert_the_patch_node_samples_fused(patcher, sample, CALLS)


def assert_the_patch_node_samples_fused(patcher, sample, calls, rotated=None):
    """A two-step sampling run (`sample(model)`) through the patch node's model patch serves each of the `calls`
    attention calls per step with Sage, the `rotated` of them (all by default) with the rotation fused, close to the
    unpatched run, which stays untouched."""
    from sage_attention_pack.nodes import rotary_handoff
    from sage_attention_pack.nodes.patch import apply_sage, get_sage_override
    from sage_attention_pack.sage_core.config import SageConfig

    reference = sample(patcher)
    patched = apply_sage(patcher, SageConfig(kernel="int8_fp16"))
    try:
        out = sample(patched)
        snap = get_sage_override(patched).stats.snapshot()
        assert snap["sage"] == {"int8_fp16": 2 * calls}, snap
        assert snap["rotary_fused"] == 2 * (calls if rotated is None else rotated), snap
        assert cosine(out, reference) > 0.9999
        assert torch.equal(sample(patcher), reference)  # the unpatched model is untouched by the hand-off
    finally:
        rotary_handoff.uninstall()


def test_the_fused_rotation_gives_what_comfyuis_rotation_gives(flux, installed):
    """The same override with and without the hand-off: the rotation in the quantization (in FP32, without the
    round to the model's dtype) and ComfyUI's rotation before the hook give the same attention to within the
    8-bit codes' rounding."""
    from sage_attention_pack.nodes.override import SageOverride
    from sage_attention_pack.sage_core.config import SageConfig

    _, forward, _ = flux
    fused = SageOverride(SageConfig(kernel="int8_fp8"))
    out = forward({"optimized_attention_override": fused})
    installed.uninstall()
    first = SageOverride(SageConfig(kernel="int8_fp8"))
    out_first = forward({"optimized_attention_override": first})
    assert fused.stats.rotary_fused == CALLS and first.stats.rotary_fused == 0
    assert first.stats.snapshot()["sage"] == fused.stats.snapshot()["sage"] == {"int8_fp8": CALLS}
    assert cosine(out, out_first) > 0.9999
    assert cosine(out, forward({})) > 0.999


def test_kernel_off_block_list_and_an_earlier_override_run_comfyuis_own_rotation(flux, installed):
    """Calls the override sends to exact attention run ComfyUI's Flux attention itself (its rotation, then its
    attention through the override that was there before Sage's), bit for bit as unpatched."""
    from sage_attention_pack.nodes.override import SageOverride
    from sage_attention_pack.sage_core.config import SageConfig

    _, forward, _ = flux
    reference = forward({})
    off = SageOverride(SageConfig(kernel="off"))
    assert torch.equal(forward({"optimized_attention_override": off}), reference)
    assert off.stats.exact["kernel off"] == CALLS

    seen = []

    def earlier(func, *args, **kwargs):  # another extension's override, below Sage's
        seen.append(args[0].shape)
        return func(*args, **kwargs)

    blocks = SageOverride(SageConfig(kernel="int8_fp16"), exact_blocks={0, 1}, previous=earlier)
    assert torch.equal(forward({"optimized_attention_override": blocks}), reference)
    assert blocks.stats.exact["block kept exact"] == CALLS and len(seen) == CALLS
    assert blocks.stats.rotary_fused == 0

    one = SageOverride(SageConfig(kernel="int8_fp16"), exact_blocks={0})
    forward({"optimized_attention_override": one})
    assert one.stats.snapshot()["sage"] == {"int8_fp16": 1} and one.stats.rotary_fused == 1
    assert one.stats.exact["block kept exact"] == 1


def test_a_forwards_table_is_made_once_for_all_its_calls(flux, installed):
    """The blocks of a forward share the model's pe: its kernels' layout is made on the first call Sage runs and
    kept for the others (rope.HANDED_TABLES), made anew by the next forward (a new pe), and dropped at the end of a
    sampling run (backend.release_buffers)."""
    from sage_attention_pack.nodes.override import SageOverride
    from sage_attention_pack.sage_core import backend, rope
    from sage_attention_pack.sage_core.config import SageConfig

    _, forward, _ = flux
    made = rope.HANDED_TABLES.made
    sage = SageOverride(SageConfig(kernel="int8_fp16"))
    forward({"optimized_attention_override": sage})
    assert sage.stats.rotary_fused == CALLS > 1 and rope.HANDED_TABLES.made == made + 1
    forward({"optimized_attention_override": sage})
    assert sage.stats.rotary_fused == 2 * CALLS and rope.HANDED_TABLES.made == made + 2
    assert rope.HANDED_TABLES.entry is not None
    backend.release_buffers()
    assert rope.HANDED_TABLES.entry is None


def test_statistics_carry_only_where_a_calls_place_in_its_forward_is_known(flux, installed):
    """A call's site is its place in the forward, which the patch node's model wrapper counts
    (routing.ForwardCounter). A model called outside a sampler, as a benchmark or another node may call it, has no
    counter: every call would count as its forward's first and share one site, so that each block coded with the
    statistics of the first block (on an H100, Flux.1's forward read 0.54× ComfyUI's time, 108 tiles a call
    repaired and PSNR 51 dB against 63). Such calls take no carried statistics and prime no site; counted, each
    call primes a site of its own and the next forward carries them, its output as close to exact attention."""
    from sage_attention_pack.kernels import carried_stats
    from sage_attention_pack.nodes.override import SageOverride
    from sage_attention_pack.sage_core import backend
    from sage_attention_pack.sage_core.config import SageConfig

    _, forward, _ = flux
    backend.release_buffers()
    sage = SageOverride(SageConfig(kernel="int8_fp8"))
    exact = forward({})
    uncounted = [forward({"optimized_attention_override": sage}, counted=False) for _ in range(2)]
    assert len(carried_stats.SITES) == 0 and torch.equal(uncounted[0], uncounted[1])
    counted = [forward({"optimized_attention_override": sage}) for _ in range(2)]
    assert len(carried_stats.SITES) == CALLS
    assert torch.equal(counted[0], uncounted[0])  # the first counted forward measures its own statistics
    assert cosine(counted[1], exact) > 0.999 and sage.stats.snapshot()["sage"] == {"int8_fp8": 4 * CALLS}
    backend.release_buffers()
    assert len(carried_stats.SITES) == 0


def test_another_override_on_top_keeps_comfyuis_path(flux, installed):
    """An override that is not Sage's (or does not take rotations) on top: the call goes the way ComfyUI sends it,
    rotated first, through that override."""
    from sage_attention_pack.nodes.override import SageOverride
    from sage_attention_pack.sage_core.config import SageConfig

    _, forward, _ = flux
    sage = SageOverride(SageConfig(kernel="int8_fp16"))
    seen = []

    def on_top(func, *args, **kwargs):
        seen.append(1)
        return sage(func, *args, **kwargs)

    forward({"optimized_attention_override": on_top})
    assert len(seen) == CALLS and sage.stats.snapshot()["sage"] == {"int8_fp16": CALLS}
    assert sage.stats.rotary_fused == 0


def test_the_compare_nodes_timer_times_the_handed_over_call(flux, installed):
    """The compare node's attention timer above the Sage override passes the hand-off through and times it."""
    from sage_attention_pack.nodes.compare import AttentionTimer
    from sage_attention_pack.nodes.override import SageOverride
    from sage_attention_pack.sage_core.config import SageConfig

    _, forward, _ = flux
    sage = SageOverride(SageConfig(kernel="int8_fp16"))
    timer = AttentionTimer(sage)
    forward({"optimized_attention_override": timer})
    assert timer.calls == CALLS and timer.total_seconds() > 0
    assert sage.stats.rotary_fused == CALLS
    plain = AttentionTimer(None)  # nothing below it takes rotations: ComfyUI's path, timed
    forward({"optimized_attention_override": plain})
    assert plain.calls == CALLS and not plain.takes_rotary


def test_the_benchmarks_flux_table_is_comfyuis(comfyui):
    """sage_core/rope.flux_table (for benchmarks without ComfyUI) is the table ComfyUI's Flux embeds its position
    ids into (EmbedND over text ids 0 and image ids (0, row, column)), bit for bit."""
    from comfy.ldm.flux.layers import EmbedND

    from sage_attention_pack.sage_core.rope import flux_table

    rows, cols = torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij")
    image = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    ids = torch.cat([torch.zeros(5, 3, dtype=image.dtype), image])[None].float()
    assert torch.equal(flux_table(5, 3, 4), EmbedND(dim=128, theta=10000, axes_dim=[16, 56, 56])(ids))


def test_the_environment_can_keep_the_hand_off_out(flux, monkeypatch):
    import comfy.ldm.flux.layers
    import comfy.ldm.flux.math
    import comfy.ldm.qwen_image.model
    import comfy.ldm.wan.model

    from sage_attention_pack.nodes import rotary_handoff

    monkeypatch.setenv("SAGE_ATTENTION_ROTARY_HANDOFF", "0")
    assert rotary_handoff.install() == []
    assert comfy.ldm.flux.layers.attention is comfy.ldm.flux.math.attention
    assert not hasattr(comfy.ldm.wan.model.WanSelfAttention.forward, "sage_original")
    assert not hasattr(comfy.ldm.qwen_image.model.Attention.forward, "sage_original")
    assert not hasattr(comfy.ldm.lumina.model.JointAttention.forward, "sage_original")


def test_install_is_idempotent_and_leaves_another_extensions_replacement_alone(flux, installed):
    import comfy.ldm.chroma.layers
    import comfy.ldm.flux.layers
    import comfy.ldm.flux.math

    original = comfy.ldm.flux.math.attention
    wrapped = comfy.ldm.flux.layers.attention
    assert wrapped is not original and wrapped.sage_original is original
    assert comfy.ldm.chroma.layers.attention is wrapped
    assert installed.install_flux() == ["comfy.ldm.flux.layers", "comfy.ldm.chroma.layers"]
    assert comfy.ldm.flux.layers.attention is wrapped  # not wrapped twice
    installed.uninstall()
    assert comfy.ldm.flux.layers.attention is original and comfy.ldm.chroma.layers.attention is original

    def theirs(q, k, v, pe, mask=None, transformer_options={}):  # noqa: B006
        return original(q, k, v, pe, mask=mask, transformer_options=transformer_options)

    comfy.ldm.flux.layers.attention = theirs
    try:
        assert installed.install_flux() == ["comfy.ldm.chroma.layers"]
        assert comfy.ldm.flux.layers.attention is theirs
    finally:
        comfy.ldm.flux.layers.attention = original


WAN_LAYERS = 2  # a self-attention call (rotated) and a cross-attention call (not) per block


@pytest.fixture(scope="module")
def wan(comfyui):
    """A forward of ComfyUI's own Wan2.1 class at a small width (2 heads of 128), random weights."""
    import comfy.ldm.wan.model
    import comfy.ops

    model = comfy.ldm.wan.model.WanModel(model_type="t2v", dim=256, ffn_dim=512, num_heads=2, num_layers=WAN_LAYERS,
                                         in_dim=16, out_dim=16, text_dim=64, text_len=16, device="cpu",
                                         dtype=torch.float32, operations=comfy.ops.disable_weight_init)
    g = randomized(model, seed=5)
    x = torch.randn(1, 16, 3, 8, 8, generator=g)  # 3 latent frames of 8x8: 48 tokens
    ctx = torch.randn(1, 16, 64, generator=g)

    def forward(options):
        from sage_attention_pack.nodes.routing import ForwardCounter

        with torch.no_grad():
            return model(x, torch.full((1,), 500.0), ctx,
                         transformer_options={**options, ForwardCounter.KEY: ForwardCounter()})

    return forward


def test_wan_self_attention_rotates_inside_the_quantization(wan, installed):
    """Wan's self-attention calls hand their rotation over (its cross-attention calls have none), and the forward
    stays as close to ComfyUI's own as with ComfyUI's rotation before the hook."""
    assert_self_attention_fused(wan, installed, 2 * WAN_LAYERS, WAN_LAYERS)


def test_a_pass_that_skips_blocks_has_call_sites_of_its_own(wan, installed):
    """Skip layer guidance runs a pass of the same batch with blocks replaced (patches_replace "dit"): its i-th call
    is another block's than the plain pass's i-th (here block 1's self-attention comes first, with block 0's plan).
    Its calls get sites of their own (the forward's replaced blocks are part of the site), so that neither pass
    codes with the other's statistics; a plain pass after it carries the plain pass's sites."""
    from sage_attention_pack.kernels import carried_stats
    from sage_attention_pack.nodes.override import SageOverride
    from sage_attention_pack.sage_core import backend
    from sage_attention_pack.sage_core.config import SageConfig

    def skip(args, extra_args):  # as ComfyUI's skip layer guidance skips a block
        return args

    backend.release_buffers()
    sage = SageOverride(SageConfig(kernel="int8_fp8"))
    plain = wan({"optimized_attention_override": sage})
    assert len(carried_stats.SITES) == WAN_LAYERS  # the self-attention calls (cross-attention has no table)
    wan({"optimized_attention_override": sage, "patches_replace": {"dit": {("double_block", 0): skip}}})
    assert len(carried_stats.SITES) == WAN_LAYERS + 1
    assert cosine(wan({"optimized_attention_override": sage}), plain) > 0.9999
    snap = sage.stats.snapshot()
    assert snap["sage"] == {"int8_fp8": 2 * (2 * WAN_LAYERS) + 2} and snap["recomputed"] == 0, snap
    backend.release_buffers()


def assert_self_attention_fused(forward, installed, calls, rotated):
    """All `calls` attention calls of `forward(options)` served by Sage, the `rotated` of them with the rotation
    fused; the output as close to ComfyUI's own as with ComfyUI's rotation before the hook (`installed` taken out)."""
    from sage_attention_pack.nodes.override import SageOverride
    from sage_attention_pack.sage_core.config import SageConfig

    reference = forward({})
    fused = SageOverride(SageConfig(kernel="int8_fp16"))
    out = forward({"optimized_attention_override": fused})
    assert fused.stats.snapshot()["sage"] == {"int8_fp16": calls}, fused.stats.snapshot()
    assert fused.stats.rotary_fused == rotated
    installed.uninstall()
    first = SageOverride(SageConfig(kernel="int8_fp16"))
    out_first = forward({"optimized_attention_override": first})
    assert first.stats.rotary_fused == 0
    assert cosine(out, out_first) > 0.9999 and cosine(out, reference) > 0.999


def test_wan_calls_sent_to_exact_attention_run_comfyuis_own_code(wan, installed):
    """kernel `off` and the block list: the rest of ComfyUI's forward (its rotation, its attention call, through the
    override that was there before Sage's), bit for bit as unpatched."""
    assert_exact_paths_give_comfyuis_bits(wan, 2 * WAN_LAYERS, WAN_LAYERS)


def assert_exact_paths_give_comfyuis_bits(forward, calls, blocks):
    """With kernel `off`, and with every one of `blocks` blocks kept exact under an earlier override, the `calls`
    attention calls of `forward(options)` run ComfyUI's own code (through that override), bit for bit as unpatched."""
    from sage_attention_pack.nodes.override import SageOverride
    from sage_attention_pack.sage_core.config import SageConfig

    reference = forward({})
    off = SageOverride(SageConfig(kernel="off"))
    assert torch.equal(forward({"optimized_attention_override": off}), reference)
    assert off.stats.exact["kernel off"] == calls
    seen = []

    def earlier(func, *args, **kwargs):
        seen.append(1)
        return func(*args, **kwargs)

    kept = SageOverride(SageConfig(kernel="int8_fp16"), exact_blocks=set(range(blocks)), previous=earlier)
    assert torch.equal(forward({"optimized_attention_override": kept}), reference)
    assert kept.stats.exact["block kept exact"] == calls and len(seen) == calls


def test_the_benchmarks_wan_table_is_comfyuis(comfyui):
    """sage_core/rope.wan_table is the table ComfyUI's Wan2.1 rotates by (WanModel.rope_encode), in [B, H, N, ...]
    order, bit for bit."""
    import comfy.ldm.wan.model
    import comfy.ops

    from sage_attention_pack.sage_core.rope import wan_table

    model = comfy.ldm.wan.model.WanModel(dim=256, ffn_dim=512, num_heads=2, num_layers=1, text_dim=64, device="meta",
                                         operations=comfy.ops.disable_weight_init)
    freqs = model.rope_encode(3, 10, 12, device="cpu", dtype=torch.float32)  # latent frames, height, width
    assert torch.equal(wan_table(3, 5, 6), freqs.transpose(1, 2))


@pytest.mark.parametrize("name", ["comfy.ldm.wan.model.WanSelfAttention", "comfy.ldm.qwen_image.model.Attention",
                                  "comfy.ldm.lumina.model.JointAttention", "comfy.ldm.lightricks.model.CrossAttention",
                                  "comfy.ldm.hidream.model.HiDreamAttnProcessor_flashattn"])
def test_a_changed_forward_is_left_alone(comfyui, name):
    """Where this ComfyUI's forward is not the source the hand-off restates, the model keeps its own."""
    import dataclasses
    import importlib

    from sage_attention_pack.nodes import rotary_handoff

    rotary_handoff.uninstall()
    restated = next(r for r in rotary_handoff.RESTATED_FORWARDS if r.name == name)
    cls = getattr(importlib.import_module(restated.module), restated.cls)
    original = getattr(cls, restated.method)
    assert rotary_handoff.source_digest(original) == restated.sha256  # the checkout tested against
    assert rotary_handoff.install_forward(dataclasses.replace(restated, sha256="0" * 64)) == []
    assert getattr(cls, restated.method) is original
    assert rotary_handoff.install_forward(restated) == [name]
    assert getattr(cls, restated.method).sage_original is original
    rotary_handoff.uninstall()
    assert getattr(cls, restated.method) is original


QWEN_LAYERS = 2  # one joint attention call per block, rotated


@pytest.fixture(scope="module")
def qwen_image(comfyui):
    """A forward of ComfyUI's own Qwen-Image class at a small width (2 heads of 128), random weights, in `dtype`
    (its rotary table comes in the model's dtype)."""
    import comfy.ldm.qwen_image.model
    import comfy.ops

    def build(dtype):
        model = comfy.ldm.qwen_image.model.QwenImageTransformer2DModel(
            in_channels=64, out_channels=16, num_layers=QWEN_LAYERS, attention_head_dim=128, num_attention_heads=2,
            joint_attention_dim=64, dtype=dtype, device="cpu", operations=comfy.ops.disable_weight_init)
        g = randomized(model, seed=7)
        x = torch.randn(1, 16, 1, 12, 10, generator=g).to(dtype)  # 6x5 patches: 30 image tokens
        ctx = torch.randn(1, 9, 64, generator=g).to(dtype)

        def forward(options):
            from sage_attention_pack.nodes.routing import ForwardCounter

            with torch.no_grad():
                return model(x, torch.full((1,), 0.5), ctx,
                             transformer_options={**options, ForwardCounter.KEY: ForwardCounter()}).float()

        return forward

    return build


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qwen_image_joint_attention_rotates_inside_the_quantization(qwen_image, installed, dtype):
    """Qwen-Image's joint attention calls hand their rotation (a table in the model's dtype) over, and the forward
    stays as close to ComfyUI's own as with ComfyUI's rotation before the hook."""
    from sage_attention_pack.nodes.override import SageOverride
    from sage_attention_pack.sage_core.config import SageConfig

    forward = qwen_image(dtype)
    reference = forward({})
    fused = SageOverride(SageConfig(kernel="int8_fp16"))
    out = forward({"optimized_attention_override": fused})
    assert fused.stats.snapshot()["sage"] == {"int8_fp16": QWEN_LAYERS} and fused.stats.rotary_fused == QWEN_LAYERS
    installed.uninstall()
    first = SageOverride(SageConfig(kernel="int8_fp16"))
    out_first = forward({"optimized_attention_override": first})
    assert first.stats.snapshot()["sage"] == {"int8_fp16": QWEN_LAYERS} and first.stats.rotary_fused == 0
    # in BF16 ComfyUI's rotation rounds Q and K to the model's dtype, the quantization's does not
    assert cosine(out, out_first) > 0.9999 and cosine(out, reference) > 0.9999


def test_qwen_image_calls_sent_to_exact_attention_run_comfyuis_own_code(qwen_image, installed):
    """kernel `off` and the block list: the rest of ComfyUI's forward (its rotation, its attention call, through the
    override that was there before Sage's), bit for bit as unpatched."""
    from sage_attention_pack.nodes.override import SageOverride
    from sage_attention_pack.sage_core.config import SageConfig

    forward = qwen_image(torch.float32)
    reference = forward({})
    off = SageOverride(SageConfig(kernel="off"))
    assert torch.equal(forward({"optimized_attention_override": off}), reference)
    assert off.stats.exact["kernel off"] == QWEN_LAYERS
    seen = []

    def earlier(func, *args, **kwargs):
        seen.append(1)
        return func(*args, **kwargs)

    kept = SageOverride(SageConfig(kernel="int8_fp16"), exact_blocks={0}, previous=earlier)
    forward({"optimized_attention_override": kept})
    assert kept.stats.exact["block kept exact"] == 1 and len(seen) == 1
    assert kept.stats.snapshot()["sage"] == {"int8_fp16": 1} and kept.stats.rotary_fused == 1
    all_kept = SageOverride(SageConfig(kernel="int8_fp16"), exact_blocks=set(range(QWEN_LAYERS)), previous=earlier)
    assert torch.equal(forward({"optimized_attention_override": all_kept}), reference)


def test_the_benchmarks_qwen_image_table_is_comfyuis(comfyui):
    """sage_core/rope.qwen_image_table is the table ComfyUI's Qwen-Image hands its joint attention, in [B, H, N, ...]
    order and the model's dtype, bit for bit (an even and an odd grid: the ids are centred on it)."""
    import comfy.ldm.qwen_image.model
    import comfy.ops

    from sage_attention_pack.sage_core.rope import qwen_image_table

    model = comfy.ldm.qwen_image.model.QwenImageTransformer2DModel(
        in_channels=64, out_channels=16, num_layers=1, attention_head_dim=128, num_attention_heads=2,
        joint_attention_dim=64, dtype=torch.bfloat16, device="cpu", operations=comfy.ops.disable_weight_init)
    randomized(model, seed=1)
    seen = []
    model.transformer_blocks[0].attn.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["image_rotary_emb"]), with_kwargs=True)
    for rows, cols in ((4, 6), (5, 3)):
        x = torch.randn(1, 16, 1, 2 * rows, 2 * cols).bfloat16()
        with torch.no_grad():
            model(x, torch.full((1,), 0.5), torch.randn(1, 7, 64).bfloat16())
        assert torch.equal(qwen_image_table(7, rows, cols), seen[-1].transpose(1, 2))


LUMINA_CALLS = 4  # the context refiner's, the noise refiner's and two main layers' calls, all rotated
LUMINA_TEXT = 7


@pytest.fixture(scope="module")
def lumina2_model(comfyui):
    """ComfyUI's own Lumina 2 class (NextDiT) at a small width (4 query heads of 96 on 2 K/V heads, Lumina 2's
    axes, random weights) and a forward of it; with `masked`, a caption with two padding tokens (additive masks on
    every call)."""
    import comfy.ldm.lumina.model
    import comfy.ops

    model = comfy.ldm.lumina.model.NextDiT(
        patch_size=2, in_channels=16, dim=384, n_layers=2, n_refiner_layers=1, n_heads=4, n_kv_heads=2,
        multiple_of=32, qk_norm=True, cap_feat_dim=64, axes_dims=[32, 32, 32], axes_lens=[300, 512, 512],
        dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
    g = randomized(model, seed=11)
    x = torch.randn(1, 16, 10, 12, generator=g)  # 5x6 patches: 30 image tokens
    ctx = torch.randn(1, LUMINA_TEXT, 64, generator=g)
    caption_mask = torch.ones(1, LUMINA_TEXT, dtype=torch.long)
    caption_mask[:, -2:] = 0

    def forward(options, masked=False):
        from sage_attention_pack.nodes.routing import ForwardCounter

        mask = caption_mask if masked else None
        with torch.no_grad():
            return model(x, torch.full((1,), 0.5), ctx, LUMINA_TEXT - 2 * masked, attention_mask=mask,
                         transformer_options={**options, ForwardCounter.KEY: ForwardCounter()})

    return model, forward


@pytest.fixture(scope="module")
def lumina2(lumina2_model):
    return lumina2_model[1]


@pytest.mark.parametrize("masked", [False, True])
def test_lumina2_attention_rotates_inside_the_quantization(lumina2, installed, masked):
    """Lumina 2's calls hand their rotation over with K and V grouped (not repeated per query head), masked or not,
    and the forward stays as close to ComfyUI's own as with ComfyUI's rotation before the hook."""
    from sage_attention_pack.nodes.override import SageOverride
    from sage_attention_pack.sage_core.config import SageConfig

    reference = lumina2({}, masked)
    fused = SageOverride(SageConfig(kernel="int8_fp16"))
    out = lumina2({"optimized_attention_override": fused}, masked)
    assert fused.stats.snapshot()["sage"] == {"int8_fp16": LUMINA_CALLS}, fused.stats.snapshot()
    assert fused.stats.rotary_fused == LUMINA_CALLS
    installed.uninstall()
    first = SageOverride(SageConfig(kernel="int8_fp16"))
    out_first = lumina2({"optimized_attention_override": first}, masked)
    assert first.stats.snapshot()["sage"] == {"int8_fp16": LUMINA_CALLS} and first.stats.rotary_fused == 0
    assert cosine(out, out_first) > 0.9999 and cosine(out, reference) > 0.9999


def test_lumina2_calls_sent_to_exact_attention_run_comfyuis_own_code(lumina2, installed):
    """kernel `off` and the block list: ComfyUI's rotation, its repeat of K and V and its attention call, through
    the override that was there before Sage's, bit for bit as unpatched."""
    from sage_attention_pack.nodes.override import SageOverride
    from sage_attention_pack.sage_core.config import SageConfig

    reference = lumina2({}, True)
    off = SageOverride(SageConfig(kernel="off"))
    assert torch.equal(lumina2({"optimized_attention_override": off}, True), reference)
    assert off.stats.exact["kernel off"] == LUMINA_CALLS
    seen = []

    def earlier(func, *args, **kwargs):
        seen.append(args[1].shape)  # K as ComfyUI hands it on: repeated per query head
        return func(*args, **kwargs)

    kept = SageOverride(SageConfig(kernel="int8_fp16"), exact_blocks=set(range(LUMINA_CALLS)), previous=earlier)
    assert torch.equal(lumina2({"optimized_attention_override": kept}, True), reference)
    assert kept.stats.exact["block kept exact"] == LUMINA_CALLS and len(seen) == LUMINA_CALLS
    assert all(shape[1] == 4 for shape in seen)


def test_the_benchmarks_lumina2_table_is_comfyuis(lumina2_model):
    """sage_core/rope.lumina2_table is the table ComfyUI's Lumina 2 hands its main layers' attention, in
    [B, H, N, ...] order, bit for bit."""
    from sage_attention_pack.sage_core.rope import lumina2_table

    model, forward = lumina2_model
    seen = []
    hook = model.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[2]))
    try:
        forward({})
    finally:
        hook.remove()
    assert torch.equal(lumina2_table(LUMINA_TEXT, 5, 6, dtype=torch.float32), seen[0].transpose(1, 2))


LTXV_LAYERS = 2  # a self-attention call (rotated) and a cross-attention call (not) per block


@pytest.fixture(scope="module")
def ltxv_model(comfyui):
    """ComfyUI's own LTX-Video class (LTXVModel) at a small width (2 heads of 64, two blocks, random weights) and a
    forward of it on 2 latent frames of 4x5: 40 tokens, each head rotated by its own slice of the frequencies."""
    import comfy.ldm.lightricks.model
    import comfy.ops

    model = comfy.ldm.lightricks.model.LTXVModel(
        in_channels=16, cross_attention_dim=128, attention_head_dim=64, num_attention_heads=2, caption_channels=64,
        num_layers=LTXV_LAYERS, dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
    g = randomized(model, seed=13)
    x = torch.randn(1, 16, 2, 4, 5, generator=g)
    ctx = torch.randn(1, 6, 64, generator=g)

    def forward(options):
        from sage_attention_pack.nodes.routing import ForwardCounter

        with torch.no_grad():
            return model(x, torch.full((1,), 0.5), ctx, None,
                         transformer_options={**options, ForwardCounter.KEY: ForwardCounter()})

    return model, forward


def test_ltxv_self_attention_rotates_inside_the_quantization(ltxv_model, installed):
    """LTX-Video's self-attention calls hand their rotation over with a table per head (its cross-attention calls
    have none), and the forward stays as close to ComfyUI's own as with ComfyUI's rotation before the hook."""
    assert_self_attention_fused(ltxv_model[1], installed, 2 * LTXV_LAYERS, LTXV_LAYERS)


def test_ltxv_calls_sent_to_exact_attention_run_comfyuis_own_code(ltxv_model, installed):
    """kernel `off` and the block list: ComfyUI's rotation and attention call, through the override that was there
    before Sage's, bit for bit as unpatched."""
    assert_exact_paths_give_comfyuis_bits(ltxv_model[1], 2 * LTXV_LAYERS, LTXV_LAYERS)


def test_ltxv_table_is_made_only_for_the_calls_sage_runs(ltxv_model, installed, monkeypatch):
    """LTX-Video's table has a head each (82 MB in FP32 at 768x512, 97 frames, on every self-attention call): the
    hand-off makes it only where Sage runs the call, never for kernel `off` or a block kept exact."""
    from sage_attention_pack.nodes.override import SageOverride
    from sage_attention_pack.sage_core import rope
    from sage_attention_pack.sage_core.config import SageConfig

    made = []
    real = rope.kernel_table_from_cos_sin
    monkeypatch.setattr(rope, "kernel_table_from_cos_sin", lambda *args: made.append(args[0].shape) or real(*args))
    forward = ltxv_model[1]
    off = SageOverride(SageConfig(kernel="off"))
    forward({"optimized_attention_override": off})
    kept = SageOverride(SageConfig(kernel="int8_fp16"), exact_blocks=set(range(LTXV_LAYERS)))
    forward({"optimized_attention_override": kept})
    assert made == [] and off.stats.exact["kernel off"] == 2 * LTXV_LAYERS
    assert kept.stats.exact["block kept exact"] == 2 * LTXV_LAYERS
    one = SageOverride(SageConfig(kernel="int8_fp16"), exact_blocks={0})
    forward({"optimized_attention_override": one})
    assert one.stats.rotary_fused == 1 and made == [(1, 40, 128)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ltxv_cos_and_sin_become_a_table_that_rotates_as_comfyui_does(ltxv_model, dtype):
    """sage_core/rope.ltxv_cos_sin is the cos and sin ComfyUI's LTX-Video hands its self-attention, bit for bit (each
    head its own frequencies, the first channels of the first head unrotated where the width is not a multiple of
    6); rope.from_cos_sin turns them into the table, and rope.rotate with it gives ComfyUI's apply_rotary_emb bit for
    bit, in FP32 and in BF16."""
    import comfy.ldm.lightricks.model as ltxv

    from sage_attention_pack.sage_core import rope

    model, forward = ltxv_model
    seen = []
    hook = model.transformer_blocks[0].attn1.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["pe"]), with_kwargs=True)
    try:
        forward({})
    finally:
        hook.remove()
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(rope.ltxv_cos_sin(2, 4, 5, 128, dtype=torch.float32),
                                                                  seen[0]))  # the benchmark's is ComfyUI's
    cos, sin = (t.to(dtype) for t in seen[0])
    assert cos.shape == (1, 40, 128) and torch.equal(cos[..., :2], torch.ones_like(cos[..., :2]))  # 128 % 6 = 2
    table = rope.from_cos_sin(cos, sin, 2)
    assert table.shape == (1, 2, 40, 32, 2, 2) and table.dtype == dtype
    x = torch.randn(1, 40, 128).to(dtype)
    ours = rope.rotate(x.view(1, 40, 2, 64).transpose(1, 2), table).transpose(1, 2).reshape(1, 40, 128)
    assert torch.equal(ours, ltxv.apply_rotary_emb(x, (cos, sin)))


HIDREAM_CALLS = 2  # a double-stream block's joint call and a single-stream block's call, both rotated


@pytest.fixture(scope="module", params=[(32, 16, 16), (16, 8, 8)], ids=["whole_head", "half_head"])
def hidream(comfyui, request):
    """A forward of ComfyUI's own HiDream class (HiDreamImageTransformer2DModel) at a small width (2 heads of 64, one
    double-stream and one single-stream block, 2 experts, random weights): its rotary axes spanning each head (as
    ComfyUI detects HiDream-I1) or half of it (HiDream's own default, which ComfyUI's code rotates by halves)."""
    import comfy.ldm.hidream.model
    import comfy.ops

    model = comfy.ldm.hidream.model.HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=64,
        num_attention_heads=2, caption_channels=[64, 64], text_emb_dim=32, num_routed_experts=2,
        num_activated_experts=1, axes_dims_rope=request.param, max_resolution=(16, 16), llama_layers=[0, 0],
        image_model="hidream", dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
    g = randomized(model, seed=17)
    x = torch.randn(1, 16, 8, 8, generator=g)  # 4x4 patches: 16 image tokens, 5 T5 and 6 Llama text tokens
    y, t5, llama = torch.randn(1, 32, generator=g), torch.randn(1, 5, 64, generator=g), torch.randn(1, 1, 6, 64,
                                                                                                    generator=g)

    def forward(options):
        from sage_attention_pack.nodes.routing import ForwardCounter

        with torch.no_grad():
            return model(x, torch.full((1,), 0.5), y, t5, llama,
                         transformer_options={**options, ForwardCounter.KEY: ForwardCounter()})

    return forward


def test_hidream_attention_rotates_inside_the_quantization(hidream, installed):
    """HiDream's attention calls hand their rotation over, a table over half of each head padded with identity
    matrices, and the forward stays as close to ComfyUI's own as with ComfyUI's rotation before the hook."""
    assert_self_attention_fused(hidream, installed, HIDREAM_CALLS, HIDREAM_CALLS)


def test_hidream_calls_sent_to_exact_attention_run_comfyuis_own_code(hidream, installed):
    """kernel `off` and the block list: ComfyUI's rotation (by halves or whole) and attention call, through the
    override that was there before Sage's, bit for bit as unpatched."""
    assert_exact_paths_give_comfyuis_bits(hidream, HIDREAM_CALLS, HIDREAM_CALLS)


def test_the_benchmarks_hidream_table_is_comfyuis(comfyui):
    """sage_core/rope.hidream_table is the table ComfyUI's HiDream hands its attention (image patches, then the T5
    and twice the Llama text tokens), in [B, H, N, ...] order, bit for bit."""
    import comfy.ldm.hidream.model

    from sage_attention_pack.sage_core.rope import hidream_table

    embed = comfy.ldm.hidream.model.EmbedND(theta=10000, axes_dim=[64, 32, 32])
    rows, cols, text = 3, 5, 7
    ids = torch.zeros(1, rows * cols + text, 3)
    ids[0, :rows * cols, 1] = torch.arange(rows)[:, None].expand(rows, cols).reshape(-1).float()
    ids[0, :rows * cols, 2] = torch.arange(cols)[None, :].expand(rows, cols).reshape(-1).float()
    assert torch.equal(hidream_table(text, rows, cols), embed(ids).transpose(1, 2))


# ComfyUI's model config class, the unet config, the latent's shape, the conditioning's extras (drawn from the test's
# generator), the attention calls per forward
SAMPLED = {
    "qwen_image": ("QwenImage", dict(image_model="qwen_image", in_channels=64, out_channels=16, num_layers=QWEN_LAYERS,
                                     attention_head_dim=128, num_attention_heads=2, joint_attention_dim=64),
                   # one frame of Qwen-Image's (Wan2.1's) latent
                   (1, 16, 1, 12, 10), lambda g: {}, QWEN_LAYERS, QWEN_LAYERS),
    "lumina2": ("Lumina2", dict(image_model="lumina2", patch_size=2, in_channels=16, dim=384, n_layers=2,
                                n_refiner_layers=1, n_heads=4, n_kv_heads=2, multiple_of=32, qk_norm=True,
                                cap_feat_dim=64, axes_dims=[32, 32, 32], axes_lens=[300, 512, 512]),
                # its text encoder's mask: 7 of the 9 tokens, the caption's padding masked on every call
                (1, 16, 10, 12), lambda g: {"attention_mask": torch.tensor([[1] * 7 + [0] * 2])}, LUMINA_CALLS,
                LUMINA_CALLS),
    # two latent frames of 4x5 in LTX-Video's 128 channels; its cross-attention calls (its text encoder's mask: 7 of
    # the 9 tokens) are served unrotated
    "ltxv": ("LTXV", dict(image_model="ltxv", in_channels=128, cross_attention_dim=128, attention_head_dim=64,
                          num_attention_heads=2, caption_channels=64, num_layers=LTXV_LAYERS),
             (1, 128, 2, 4, 5), lambda g: {"attention_mask": torch.tensor([[1] * 7 + [0] * 2])}, 2 * LTXV_LAYERS,
             LTXV_LAYERS),
    # its pooled text embedding and its Llama's hidden states (one layer of 6 tokens) beside the T5 tokens; one routed
    # expert, because a choice between two flips for a token when its gate's logits tie within the attention's error,
    # and a flipped token moves the run's cosine to ~0.9998 however exact the rest
    "hidream": ("HiDream", dict(image_model="hidream", patch_size=2, in_channels=16, out_channels=16, num_layers=1,
                                num_single_layers=1, attention_head_dim=64, num_attention_heads=2,
                                caption_channels=[64, 64], text_emb_dim=32, num_routed_experts=1,
                                num_activated_experts=1, axes_dims_rope=[32, 16, 16], max_resolution=[16, 16],
                                llama_layers=[0, 0]),
                (1, 16, 8, 8), lambda g: {"pooled_output": torch.randn(1, 32, generator=g),
                                          "conditioning_llama3": torch.randn(1, 1, 6, 64, generator=g)},
                HIDREAM_CALLS, HIDREAM_CALLS),
}


@pytest.mark.parametrize("family", list(SAMPLED))
def test_the_patch_node_samples_with_the_rotation_inside_the_quantization(comfyui, family):
    """The patch node's model patch on ComfyUI's Qwen-Image, Lumina 2, LTX-Video and HiDream models (their model configs
    and sampling): every attention call of the run that has a rotary table rotates inside the quantization, and the
    result stays close to ComfyUI's own."""
    import comfy.model_patcher
    import comfy.sample
    import comfy.supported_models

    config_class, unet_config, latent, extras, calls, rotated = SAMPLED[family]
    config = getattr(comfy.supported_models, config_class)(dict(unet_config))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device="cpu")
    g = randomized(model.diffusion_model, seed=3)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    x = torch.randn(*latent, generator=g)
    cond = [[torch.randn(1, 9, 64, generator=g), extras(g)]]

    def sample(m):
        return comfy.sample.sample(m, x, 2, 1.0, "euler", "simple", cond, cond, torch.zeros_like(x), seed=1)

    assert_the_patch_node_samples_fused(patcher, sample, calls, rotated)


# Flux-family models whose blocks call Flux's attention through their own module or Flux's: ComfyUI's class, its
# arguments at a small width (2 heads of 128, one double and one single block), the latent, the forward's keyword
# arguments, its attention calls and how many of them rotate (HunyuanVideo's token refiner has no rotary table)
FLUX_FAMILY = {
    "chroma": ("comfy.ldm.chroma.model", "Chroma",
               dict(in_channels=64, out_channels=64, context_in_dim=64, hidden_size=256, mlp_ratio=2.0, num_heads=2,
                    depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True,
                    in_dim=64, out_dim=256, hidden_dim=128, n_layers=2, image_model="chroma"),
               (1, 16, 16, 16), lambda g: {"guidance": torch.zeros(1)}, CALLS, CALLS),
    "hunyuan_video": ("comfy.ldm.hunyuan_video.model", "HunyuanVideo",
                      dict(in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64, hidden_size=256,
                           mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56],
                           theta=256, patch_size=[1, 2, 2], qkv_bias=True, guidance_embed=False, byt5=False,
                           meanflow=False, image_model="hunyuan_video"),
                      (1, 16, 2, 8, 8), lambda g: {"y": torch.randn(1, 32, generator=g)}, 2 + CALLS, CALLS),
}


@pytest.mark.parametrize("family", list(FLUX_FAMILY))
def test_flux_family_blocks_rotate_inside_the_quantization(comfyui, installed, family):
    """Chroma's blocks (comfy/ldm/chroma/layers.py) and HunyuanVideo's (Flux's own layers) call Flux's attention:
    a forward of ComfyUI's class hands every rotated call over, and stays close to ComfyUI's own."""
    import importlib

    import comfy.ops

    from sage_attention_pack.nodes.override import SageOverride
    from sage_attention_pack.nodes.routing import ForwardCounter
    from sage_attention_pack.sage_core.config import SageConfig

    module, cls, kwargs, latent, extra, calls, rotated = FLUX_FAMILY[family]
    model = getattr(importlib.import_module(module), cls)(**kwargs, dtype=torch.float32, device="cpu",
                                                           operations=comfy.ops.disable_weight_init)
    g = randomized(model, seed=13)
    x, ctx, more = torch.randn(*latent, generator=g), torch.randn(1, 8, 64, generator=g), extra(g)

    def forward(options):
        with torch.no_grad():
            return model(x, torch.full((1,), 0.5), ctx, **more,
                         transformer_options={**options, ForwardCounter.KEY: ForwardCounter()})

    reference = forward({})
    fused = SageOverride(SageConfig(kernel="int8_fp16"))
    out = forward({"optimized_attention_override": fused})
    assert fused.stats.snapshot()["sage"] == {"int8_fp16": calls} and fused.stats.rotary_fused == rotated
    assert cosine(out, reference) > 0.9999
