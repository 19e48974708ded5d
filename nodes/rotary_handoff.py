"""Attention calls handed to Sage before their rotary embedding: Flux-family blocks, Wan's self-attention, Qwen-Image's
joint attention, Lumina 2's attention, LTX-Video's self-attention and HiDream's attention.

ComfyUI rotates Q and K in eager PyTorch right before the attention hook: Flux's layers (and Chroma's, HunyuanVideo's
and Hunyuan3D's, which reuse them) call `attention(q, k, v, pe, mask, transformer_options)` from
comfy/ldm/flux/math.py, which rotates them (a cast to FP32, two products, a sum and a cast back per tensor: 10
kernels and about 1 GB of memory traffic per call at Flux.1's 1024 px shape); Wan's self-attention rotates them with
`apply_rope1` inside its own `forward`, Qwen-Image's, Lumina 2's and LTX-Video's with their own `apply_rotary_emb`
(in the model's dtype; Lumina 2 then repeats its 8 K/V heads for its 24 query heads; LTX-Video's cos and sin span all
heads, each head rotated by frequencies of its own, so its table has one slice per head), HiDream's attention
processor with Flux's `apply_rope` (all of each head as ComfyUI detects HiDream-I1, half of it on the class's default
axes). Where the Sage override of the model serves the call, the hand-off gives it Q, K and the table instead, and
the quantization rotates them in the pass that reads them anyway (kernels/rotary.py). Every other call (no Sage
override on top, no table, a compiling graph) runs ComfyUI's own code, untouched, and so does every call the override
sends to exact attention.

Installed when a Sage node patches a model, once, and only over ComfyUI's own code: Flux's `attention` where a caller
module still holds ComfyUI's function (another extension's replacement is left alone) with the parameters this
hand-off knows; a `forward` method (Wan's, Qwen-Image's, Lumina 2's, LTX-Video's) or HiDream's processor's `__call__`
where its source is the one this hand-off restates (its projections, then ComfyUI's rotation and attention call on
the exact paths), so that a ComfyUI that changed it keeps its own. SAGE_ATTENTION_ROTARY_HANDOFF=0 in the environment
keeps the hand-off out.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import logging
import os
import sys
import textwrap
from dataclasses import dataclass
from typing import Callable

import torch

from ..sage_core import rope as rotary
from .override import OVERRIDE_KEY

log = logging.getLogger("sage_attention_pack")
SWITCH = "SAGE_ATTENTION_ROTARY_HANDOFF"
FLUX_SOURCE = "comfy.ldm.flux.math"
FLUX_CALLERS = ("comfy.ldm.flux.layers", "comfy.ldm.chroma.layers")  # modules calling FLUX_SOURCE's attention by name
FLUX_PARAMETERS = ["q", "k", "v", "pe", "mask", "transformer_options"]


def takes_rotary(transformer_options) -> bool:
    """Whether the call's attention override takes calls before their rotation (the Sage override, or the compare
    node's timer above one), outside a compiling graph."""
    override = transformer_options.get(OVERRIDE_KEY) if transformer_options else None
    return bool(getattr(override, "takes_rotary", False)) and not torch.compiler.is_compiling()


def flux_hand_off(attention_fn):
    """`attention_fn` (ComfyUI's Flux attention) with the rotation given to the override where it takes it."""

    @functools.wraps(attention_fn)
    def attention(q, k, v, pe, mask=None, transformer_options={}):  # noqa: B006 - ComfyUI's own signature
        if pe is None or not takes_rotary(transformer_options):
            return attention_fn(q, k, v, pe, mask=mask, transformer_options=transformer_options)
        return transformer_options[OVERRIDE_KEY].attend_rotary(
            (q, k, v, q.shape[1]), {"mask": mask, "skip_reshape": True, "transformer_options": transformer_options},
            rotary.handed_pe(pe),
            lambda options: attention_fn(q, k, v, pe, mask=mask, transformer_options=options))

    attention.sage_original = attention_fn
    return attention


def wan_hand_off(forward_fn, module):
    """`forward_fn` (ComfyUI's WanSelfAttention.forward) with the rotation given to the override where it takes it.
    The projections are ComfyUI's; on the exact paths the rest is too: `module`'s apply_rope1 and
    optimized_attention, looked up at the call as ComfyUI's forward looks them up."""

    @functools.wraps(forward_fn)
    def forward(self, x, freqs, transformer_options={}):  # noqa: B006 - ComfyUI's own signature
        if freqs is None or not takes_rotary(transformer_options):
            return forward_fn(self, x, freqs, transformer_options=transformer_options)
        b, s, n, d = *x.shape[:2], self.num_heads, self.head_dim
        q = self.norm_q(self.q(x)).view(b, s, n * d)
        k = self.norm_k(self.k(x)).view(b, s, n * d)
        v = self.v(x).view(b, s, n * d)

        def exact_with(options):
            rotate = module.apply_rope1
            return module.optimized_attention(rotate(q.view(b, s, n, d), freqs).view(b, s, n * d),
                                              rotate(k.view(b, s, n, d), freqs).view(b, s, n * d), v,
                                              heads=n, transformer_options=options)

        # Wan's table is [B, N, 1, D/2, 2, 2] (tokens before heads): the hand-off takes [B, H, N, ...]
        out = transformer_options[OVERRIDE_KEY].attend_rotary(
            (q, k, v, n), {"transformer_options": transformer_options},
            rotary.handed_pe(freqs, tokens_first=True), exact_with)
        return self.o(out)

    forward.sage_original = forward_fn
    return forward


def qwen_image_hand_off(forward_fn, module):
    """`forward_fn` (ComfyUI's Qwen-Image Attention.forward) with the rotation given to the override where it takes
    it. The projections, norms and joins are ComfyUI's; on the exact paths the rest is too: `module`'s
    apply_rotary_emb and optimized_attention_masked, looked up at the call as ComfyUI's forward looks them up."""

    @functools.wraps(forward_fn)
    def forward(self, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                attention_mask=None, image_rotary_emb=None, transformer_options={}):  # noqa: B006 - ComfyUI's own
        if image_rotary_emb is None or attention_mask is not None or not takes_rotary(transformer_options):
            return forward_fn(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, attention_mask,
                              image_rotary_emb, transformer_options=transformer_options)
        seq_txt = encoder_hidden_states.shape[1]

        def heads_of(projection, tokens):
            return projection(tokens).unflatten(-1, (self.heads, -1))

        # [B, N, H, D], the text's tokens first
        query = torch.cat([self.norm_added_q(heads_of(self.add_q_proj, encoder_hidden_states)),
                           self.norm_q(heads_of(self.to_q, hidden_states))], dim=1)
        key = torch.cat([self.norm_added_k(heads_of(self.add_k_proj, encoder_hidden_states)),
                         self.norm_k(heads_of(self.to_k, hidden_states))], dim=1)
        value = torch.cat([heads_of(self.add_v_proj, encoder_hidden_states),
                           heads_of(self.to_v, hidden_states)], dim=1)

        def exact_with(options):
            def rotated(x):
                return module.apply_rotary_emb(x, image_rotary_emb).flatten(start_dim=2)

            return module.optimized_attention_masked(rotated(query), rotated(key), value.flatten(start_dim=2),
                                                     self.heads, attention_mask, transformer_options=options)

        # Qwen-Image's table is [B, N, 1, D/2, 2, 2] in the model's dtype (tokens before heads)
        out = transformer_options[OVERRIDE_KEY].attend_rotary(
            (query.flatten(start_dim=2), key.flatten(start_dim=2), value.flatten(start_dim=2), self.heads),
            {"mask": attention_mask, "transformer_options": transformer_options},
            rotary.handed_pe(image_rotary_emb, tokens_first=True), exact_with)
        image_out = self.to_out[1](self.to_out[0](out[:, seq_txt:, :]))
        return image_out, self.to_add_out(out[:, :seq_txt, :])

    forward.sage_original = forward_fn
    return forward


def lumina2_hand_off(forward_fn, module):
    """`forward_fn` (ComfyUI's Lumina 2 JointAttention.forward) with the rotation given to the override where it
    takes it. The projection and norms are ComfyUI's; Sage takes grouped-query K and V as they are (ComfyUI repeats
    each K/V head for its group of Q heads first). On the exact paths the rest is ComfyUI's: `module`'s
    JointAttention.apply_rotary_emb, the repeat and optimized_attention_masked, as its forward does them."""

    @functools.wraps(forward_fn)
    def forward(self, x, x_mask, freqs_cis, transformer_options={}):  # noqa: B006 - ComfyUI's own signature
        if freqs_cis is None or not takes_rotary(transformer_options):
            return forward_fn(self, x, x_mask, freqs_cis, transformer_options=transformer_options)
        bsz, seqlen, _ = x.shape
        heads, kv_heads, d = self.n_local_heads, self.n_local_kv_heads, self.head_dim
        xq, xk, xv = torch.split(self.qkv(x), [heads * d, kv_heads * d, kv_heads * d], dim=-1)
        xq = self.q_norm(xq.view(bsz, seqlen, heads, d))  # [B, N, H, D]
        xk = self.k_norm(xk.view(bsz, seqlen, kv_heads, d))
        xv = xv.view(bsz, seqlen, kv_heads, d)

        def exact_with(options):
            rotate = module.JointAttention.apply_rotary_emb
            q, k = rotate(xq, freqs_cis=freqs_cis), rotate(xk, freqs_cis=freqs_cis)
            k, v = (t.unsqueeze(3).repeat(1, 1, 1, heads // kv_heads, 1).flatten(2, 3) for t in (k, xv))
            return module.optimized_attention_masked(q.movedim(1, 2), k.movedim(1, 2), v.movedim(1, 2), heads, x_mask,
                                                     skip_reshape=True, transformer_options=options)

        # Lumina's table is [B, N, 1, D/2, 2, 2] in the model's dtype (tokens before heads)
        out = transformer_options[OVERRIDE_KEY].attend_rotary(
            (xq.movedim(1, 2), xk.movedim(1, 2), xv.movedim(1, 2), heads),
            {"mask": x_mask, "skip_reshape": True, "transformer_options": transformer_options},
            rotary.handed_pe(freqs_cis, tokens_first=True), exact_with)
        return self.out(out)

    forward.sage_original = forward_fn
    return forward


def ltxv_hand_off(forward_fn, module):
    """`forward_fn` (ComfyUI's LTX-Video CrossAttention.forward) with the rotation given to the override where it
    takes it: the self-attention calls, which carry the table (a cos and a sin per channel of all heads, each head
    its own frequencies). The projections and norms are ComfyUI's; on the exact paths the rest is too: `module`'s
    apply_rotary_emb and ComfyUI's optimized_attention, looked up at the call as ComfyUI's forward looks them up."""

    @functools.wraps(forward_fn)
    def forward(self, x, context=None, mask=None, pe=None, transformer_options={}):  # noqa: B006 - ComfyUI's own
        if pe is None or context is not None or mask is not None or not takes_rotary(transformer_options):
            return forward_fn(self, x, context, mask, pe, transformer_options=transformer_options)
        q, k, v = self.q_norm(self.to_q(x)), self.k_norm(self.to_k(x)), self.to_v(x)  # [B, N, H·D]

        def exact_with(options):
            rotate = module.apply_rotary_emb
            return module.comfy.ldm.modules.attention.optimized_attention(
                rotate(q, pe), rotate(k, pe), v, self.heads, attn_precision=self.attn_precision,
                transformer_options=options)

        out = transformer_options[OVERRIDE_KEY].attend_rotary(
            (q, k, v, self.heads), {"attn_precision": self.attn_precision, "transformer_options": transformer_options},
            rotary.handed_table(tuple(pe), lambda: rotary.kernel_table_from_cos_sin(*pe, self.heads), extra=self.heads),
            exact_with)
        return self.to_out(out)

    forward.sage_original = forward_fn
    return forward


def hidream_hand_off(call_fn, module):
    """`call_fn` (ComfyUI's HiDreamAttnProcessor_flashattn.__call__, which HiDream's attention blocks call) with the
    rotation given to the override where it takes it. Its projections, norms, key mask and joins are ComfyUI's; a
    table rotating only the first half of each head (HiDream's own default axes) gets identity matrices over the
    second half. On the exact paths the rest is ComfyUI's: `module`'s apply_rope and attention."""

    @functools.wraps(call_fn)
    def __call__(self, attn, image_tokens, image_tokens_masks=None, text_tokens=None, rope=None,  # noqa: N807
                 transformer_options={}, *args, **kwargs):  # noqa: B006 - ComfyUI's own signature
        head_dim = attn.inner_dim // attn.heads  # as ComfyUI derives it from its projections
        rotated = 0 if rope is None else rope.shape[-3] * 2  # the channels of each head the table rotates
        # ComfyUI's code rotates all of each head or its first half: any other table is its to refuse
        if rotated not in (head_dim, head_dim // 2) or args or kwargs or not takes_rotary(transformer_options):
            return call_fn(self, attn, image_tokens, image_tokens_masks, text_tokens, rope, transformer_options,
                           *args, **kwargs)
        dtype, b = image_tokens.dtype, image_tokens.shape[0]

        def heads_of(t):  # [B, N, H, D]
            return t.view(b, -1, attn.heads, t.shape[-1] // attn.heads)

        query = heads_of(attn.q_rms_norm(attn.to_q(image_tokens)).to(dtype=dtype))
        key = heads_of(attn.k_rms_norm(attn.to_k(image_tokens)).to(dtype=dtype))
        value = heads_of(attn.to_v(image_tokens))
        if image_tokens_masks is not None:
            key = key * image_tokens_masks.view(b, -1, 1, 1)
        if not attn.single:
            query = torch.cat([query, heads_of(attn.q_rms_norm_t(attn.to_q_t(text_tokens)).to(dtype=dtype))], dim=1)
            key = torch.cat([key, heads_of(attn.k_rms_norm_t(attn.to_k_t(text_tokens)).to(dtype=dtype))], dim=1)
            value = torch.cat([value, heads_of(attn.to_v_t(text_tokens))], dim=1)

        def exact_with(options):
            if head_dim == rotated:
                q, k = module.apply_rope(query, key, rope)
            else:
                (q, q_rest), (k, k_rest) = query.chunk(2, dim=-1), key.chunk(2, dim=-1)
                q, k = module.apply_rope(q, k, rope)
                q, k = torch.cat([q, q_rest], dim=-1), torch.cat([k, k_rest], dim=-1)
            return module.attention(q, k, value, transformer_options=options)

        def table():  # [B, 1, N, D/2, 2, 2] from [B, N, 1, R/2, 2, 2]: the first R channels of each head rotated
            padded = rope
            if rotated < head_dim:
                identity = torch.eye(2, dtype=rope.dtype, device=rope.device)
                padded = torch.cat([rope, identity.expand(*rope.shape[:-3], (head_dim - rotated) // 2, 2, 2)], dim=-3)
            return rotary.kernel_table(padded.transpose(1, 2))

        out = transformer_options[OVERRIDE_KEY].attend_rotary(
            (query.flatten(2), key.flatten(2), value.flatten(2), attn.heads),
            {"transformer_options": transformer_options}, rotary.handed_table((rope,), table, extra=head_dim),
            exact_with)
        if attn.single:
            return attn.to_out(out)
        image_out, text_out = out.split([image_tokens.shape[1], out.shape[1] - image_tokens.shape[1]], dim=1)
        return attn.to_out(image_out), attn.to_out_t(text_out)

    __call__.sage_original = call_fn
    return __call__


@dataclass(frozen=True)
class RestatedForward:
    """A ComfyUI attention class whose `forward` (or another method) a hand-off restates, known by the SHA-256 of
    its dedented source."""
    module: str
    cls: str
    sha256: str
    hand_off: Callable  # (ComfyUI's method, its module) -> the method that hands the rotation over
    method: str = "forward"

    @property
    def name(self) -> str:
        return f"{self.module}.{self.cls}"


RESTATED_FORWARDS = (
    RestatedForward("comfy.ldm.wan.model", "WanSelfAttention",
                    "820985e6e19d88d577444779291a734ceadd77685f006273e050b89fda37c08c", wan_hand_off),
    RestatedForward("comfy.ldm.qwen_image.model", "Attention",
                    "9214cdaf5faf8aa7baae5bc6a43cc87ad97d10a37773098e9ecfb9574590c9f3", qwen_image_hand_off),
    RestatedForward("comfy.ldm.lumina.model", "JointAttention",
                    "a0291bfeafbf21702cccd25c13e8aabc083585d3762a7e60ff37e1d1a0bb9dda", lumina2_hand_off),
    RestatedForward("comfy.ldm.lightricks.model", "CrossAttention",
                    "3494ab4be222dfafd39b5b8bb7d4ac009baa4e7772778024e142252f7c3faf24", ltxv_hand_off),
    RestatedForward("comfy.ldm.hidream.model", "HiDreamAttnProcessor_flashattn",
                    "73b43972b2448fc227aeb9f1b5690dd730e2232244a7169ab5bf386970b9b48a", hidream_hand_off, "__call__"),
)


def source_digest(fn) -> str:
    return hashlib.sha256(textwrap.dedent(inspect.getsource(fn)).encode()).hexdigest()


# Each node run installs the hand-off again (a no-op once it is in): ComfyUI's functions are checked, and a refusal
# said, once per function rather than once per run.
@functools.lru_cache(maxsize=None)
def known_flux_attention(fn) -> bool:
    """Whether `fn` (FLUX_SOURCE's attention) has the parameters the hand-off passes on."""
    parameters = list(inspect.signature(fn).parameters)
    if parameters != FLUX_PARAMETERS:
        log.info("Sage Attention: %s.attention has parameters %s; its rotary embedding stays in ComfyUI", FLUX_SOURCE,
                 parameters)
    return parameters == FLUX_PARAMETERS


@functools.lru_cache(maxsize=None)
def known_forward(fn, restated: RestatedForward) -> bool:
    """Whether `fn` is the method whose source `restated.hand_off` restates."""
    try:
        known = source_digest(fn) == restated.sha256
    except (OSError, TypeError):  # no source to compare: leave ComfyUI's method alone
        known = False
    if not known:
        log.info("Sage Attention: this ComfyUI's %s.%s is not the one the rotary hand-off knows; its rotary "
                 "embedding stays in ComfyUI", restated.name, restated.method)
    return known


def install_flux() -> list[str]:
    try:
        source = importlib.import_module(FLUX_SOURCE)
    except Exception:  # noqa: BLE001 - a ComfyUI without Flux: nothing to hand off
        return []
    original = source.attention
    if not known_flux_attention(original):
        return []
    wrapped, installed = None, []
    for name in FLUX_CALLERS:
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - an older ComfyUI without this model family
            continue
        current = getattr(module, "attention", None)
        if getattr(current, "sage_original", None) is original:
            installed.append(name)
        elif current is original:
            wrapped = wrapped or flux_hand_off(original)
            module.attention = wrapped
            installed.append(name)
    return installed


def install_forward(restated: RestatedForward) -> list[str]:
    try:
        module = importlib.import_module(restated.module)
        cls = getattr(module, restated.cls)
    except Exception:  # noqa: BLE001 - a ComfyUI without this model
        return []
    current = cls.__dict__.get(restated.method)
    if getattr(current, "sage_original", None) is not None:
        return [restated.name]
    if not known_forward(current, restated):
        return []
    setattr(cls, restated.method, restated.hand_off(current, module))
    return [restated.name]


def install() -> list[str]:
    """Put the hand-off over ComfyUI's own code where it is still in place; returns where it now is (idempotent: a
    second call changes nothing); nowhere where the environment switches it off (SWITCH=0)."""
    if os.environ.get(SWITCH, "1").strip() in ("0", ""):
        return []
    return install_flux() + [name for restated in RESTATED_FORWARDS for name in install_forward(restated)]


def uninstall() -> None:
    """Give ComfyUI its own code back."""
    for name in FLUX_CALLERS:
        current = getattr(sys.modules.get(name), "attention", None)
        if getattr(current, "sage_original", None) is not None:
            sys.modules[name].attention = current.sage_original
    for restated in RESTATED_FORWARDS:
        cls = getattr(sys.modules.get(restated.module), restated.cls, None)
        current = cls.__dict__.get(restated.method) if cls is not None else None
        if getattr(current, "sage_original", None) is not None:
            setattr(cls, restated.method, current.sage_original)
