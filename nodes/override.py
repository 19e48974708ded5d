"""SageOverride: the callable ComfyUI's per-model attention hook invokes for every attention call.

It imports nothing of ComfyUI (ComfyUI hands it plain tensors), so benchmarks can drive real ComfyUI
models through it without the node machinery.
"""
from __future__ import annotations

import logging

import torch

from ..sage_core.config import SageConfig
from ..sage_core.custom_op import register_stats, sage_attention_op
from ..sage_core.dispatch import DispatchStats, ExactPreferred, UnsupportedInput, attention
from . import comfy_attention, routing

log = logging.getLogger("sage_attention_pack")
OVERRIDE_KEY = "optimized_attention_override"  # ComfyUI's per-model attention hook in transformer_options


class SageOverride:
    """The callable ComfyUI invokes for every attention call of a patched model."""

    def __init__(self, config: SageConfig, exact_blocks=frozenset(), sigma_start=float("inf"), sigma_end=0.0,
                 previous=None, node_id=None):
        if isinstance(previous, SageOverride):  # a second Sage node replaces the first, never stacks on it
            previous = previous.previous
        self.config = config
        # what run_sage takes, made once: deriving it on every call cost ~1.5 µs of host time
        self.strict_config = config.with_(on_unsupported="raise")
        self.exact_blocks = frozenset(exact_blocks)
        self.sigma_start, self.sigma_end = sigma_start, sigma_end
        self.previous = previous
        self.node_id = node_id
        self.stats = DispatchStats()
        self.stats_id = register_stats(self.stats)  # lets compiled graphs count into self.stats
        self._warned = set()

    def __deepcopy__(self, memo):
        # ModelPatcher.clone() deep-copies model_options: every clone shares this one override (and its
        # counters); the settings never change after construction.
        return self

    def exact(self, func, args, kwargs):
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    def __call__(self, func, *args, **kwargs):
        if self.config.kernel == "off":
            self.stats.record_exact("kernel off")
            return self.exact(func, args, kwargs)
        return self.serve(comfy_attention.parse(args, kwargs), lambda: self.exact(func, args, kwargs))

    takes_rotary = True  # nodes/rotary_handoff.py hands calls over before their rotation (RESTATED_FORWARDS, Flux)

    def attend_rotary(self, args: tuple, kwargs: dict, rope, exact_with):
        """An attention call handed over before its rotation (nodes/rotary_handoff.py): `args` and `kwargs` as
        ComfyUI's attention functions take them, with Q and K not yet rotated; `rope` the rotary table in [B, H, N,
        ...] order, or a function of no arguments that makes it (a table that costs a pass to make is made only
        where Sage runs the call). Sage rotates Q and K inside its quantization; every exact path calls
        exact_with(options), ComfyUI's own rotation and attention, with transformer_options holding the override
        that was there before ours."""
        def unpatched():
            return exact_with(self.options_below(kwargs.get("transformer_options") or {}))

        if self.config.kernel == "off":
            self.stats.record_exact("kernel off")
            return unpatched()
        return self.serve(comfy_attention.parse(args, kwargs), unpatched, rope=rope)

    def options_below(self, transformer_options: dict) -> dict:
        """A copy of transformer_options whose attention override is the one this override replaced (none if
        none)."""
        options = dict(transformer_options)
        if self.previous is None:
            options.pop(OVERRIDE_KEY, None)
        else:
            options[OVERRIDE_KEY] = self.previous
        return options

    def serve(self, call: comfy_attention.AttentionCall, exact, rope=None):
        """One call through Sage, or through `exact` (ComfyUI's attention for this call, no arguments) where the
        block list, the step range, `auto` or a failure sends it there."""
        counter = routing.forward_counter(call.transformer_options)
        block, index = counter.next_call(call.is_self_attention)
        if block in self.exact_blocks:
            self.stats.record_exact("block kept exact")
            return exact()
        if not counter.steps_active:
            self.stats.record_exact("outside step range")
            return exact()
        if not call.low_precision:  # as ComfyUI's own Sage path does for such calls
            self.stats.record_exact("model asks for full precision")
            return exact()
        try:
            out = run_sage(call, self.strict_config, self.stats, self.stats_id, host_exact=exact,
                           rope=rope() if callable(rope) else rope,
                           carry_key=self.carry_key(counter, index, call.transformer_options))
        except ExactPreferred:  # `auto` measured exact attention fastest here: ComfyUI's own, as unpatched
            return exact()
        except UnsupportedInput as e:
            if self.config.on_unsupported == "raise":
                raise
            return self.fallback(str(e).split(": ", 1)[-1], exact)
        except (ValueError, TypeError):
            raise  # malformed input is a bug to surface, not to hide
        except Exception as e:  # a kernel failure (compile error, out of memory) must not crash a render
            if self.config.on_unsupported == "raise":
                raise
            return self.fallback(f"kernel error: {type(e).__name__}", exact, detail=str(e))
        return call.finish(out)

    def carry_key(self, counter: routing.ForwardCounter, call_index: int, transformer_options: dict):
        """The call site whose statistics carry from one sampling step to the next (kernels/carried_stats.py): this
        node, the call's place in the forward, the blocks the forward's options replace (a skip layer guidance pass
        makes its calls at other places than the plain pass of the same batch) and which of cond and uncond the
        batch holds (the dispatcher drops it where SageConfig.carry_stats is off). None for calls whose place is
        unknown (routing.ForwardCounter.placed): outside a sampler forward every call would count as its forward's
        first and share one site, each block then coding with another block's statistics."""
        if not counter.placed:
            return None
        if counter.variant is None:
            counter.variant = routing.replaced_blocks(transformer_options)
        return self.stats_id, call_index, counter.variant, tuple(transformer_options.get("cond_or_uncond") or ())

    def fallback(self, reason, exact, detail=""):
        self.stats.record_fallback(reason)
        if reason not in self._warned:  # once per reason, not once per call
            self._warned.add(reason)
            log.warning("Sage Attention: %s; using ComfyUI's attention for such calls%s", reason,
                        f" ({detail.splitlines()[0][:200]})" if detail else "")
        return exact()


def run_sage(call: comfy_attention.AttentionCall, config: SageConfig, stats: DispatchStats,
             stats_id: int = 0, host_exact=None, rope=None, carry_key=None) -> torch.Tensor:
    """Sage attention for one ComfyUI call; raises UnsupportedInput where the kernels cannot serve, and
    ExactPreferred where `auto` measured the exact attention ComfyUI runs instead (host_exact, this call through
    it) fastest. rope: the call's rotary table, not yet applied to Q and K (SageOverride.attend_rotary; never
    while compiling: the hand-off steps aside there). carry_key: the call's site (SageOverride.carry_key), whose
    statistics carry to its next call; not while compiling."""
    strict = config if config.on_unsupported == "raise" else config.with_(on_unsupported="raise")
    if rope is not None:
        return attention(call.q, call.k, call.v, tensor_layout=call.layout, sm_scale=call.scale, attn_mask=call.mask,
                         config=strict, stats=stats, defer_exact=True, host_exact=host_exact, rope=rope,
                         carry_key=carry_key)
    if torch.compiler.is_compiling():
        return sage_attention_op(call.q, call.k, call.v, call.mask, call.layout, strict, stats_id,
                                 sm_scale=call.scale)
    return attention(call.q, call.k, call.v, tensor_layout=call.layout, sm_scale=call.scale, attn_mask=call.mask,
                     config=strict, stats=stats, defer_exact=True, host_exact=host_exact, carry_key=carry_key)
