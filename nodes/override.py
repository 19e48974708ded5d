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


class SageOverride:
    """The callable ComfyUI invokes for every attention call of a patched model."""

    def __init__(self, config: SageConfig, exact_blocks=frozenset(), sigma_start=float("inf"), sigma_end=0.0,
                 previous=None, node_id=None):
        if isinstance(previous, SageOverride):  # a second Sage node replaces the first, never stacks on it
            previous = previous.previous
        self.config = config
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
        call = comfy_attention.parse(args, kwargs)
        counter = routing.forward_counter(call.transformer_options)
        block, _ = counter.next_call(call.is_self_attention)
        if block in self.exact_blocks:
            self.stats.record_exact("block kept exact")
            return self.exact(func, args, kwargs)
        if not counter.steps_active:
            self.stats.record_exact("outside step range")
            return self.exact(func, args, kwargs)
        try:
            out = run_sage(call, self.config, self.stats, self.stats_id,
                           host_exact=lambda: self.exact(func, args, kwargs))
        except ExactPreferred:  # `auto` measured exact attention fastest here: ComfyUI's own, as unpatched
            return self.exact(func, args, kwargs)
        except UnsupportedInput as e:
            if self.config.on_unsupported == "raise":
                raise
            return self.fallback(str(e).split(": ", 1)[-1], func, args, kwargs)
        except (ValueError, TypeError):
            raise  # malformed input is a bug to surface, not to hide
        except Exception as e:  # a kernel failure (compile error, out of memory) must not crash a render
            if self.config.on_unsupported == "raise":
                raise
            return self.fallback(f"kernel error: {type(e).__name__}", func, args, kwargs, detail=str(e))
        return call.finish(out)

    def fallback(self, reason, func, args, kwargs, detail=""):
        self.stats.record_fallback(reason)
        if reason not in self._warned:  # once per reason, not once per call
            self._warned.add(reason)
            log.warning("Sage Attention: %s; using ComfyUI's attention for such calls%s", reason,
                        f" ({detail.splitlines()[0][:200]})" if detail else "")
        return self.exact(func, args, kwargs)


def run_sage(call: comfy_attention.AttentionCall, config: SageConfig, stats: DispatchStats,
             stats_id: int = 0, host_exact=None) -> torch.Tensor:
    """Sage attention for one ComfyUI call; raises UnsupportedInput where the kernels cannot serve, and
    ExactPreferred where `auto` measured the exact attention ComfyUI runs instead (host_exact, this call through
    it) fastest."""
    strict = config.with_(on_unsupported="raise")
    if torch.compiler.is_compiling():
        return sage_attention_op(call.q, call.k, call.v, call.mask, call.layout, strict, stats_id)
    return attention(call.q, call.k, call.v, tensor_layout=call.layout, attn_mask=call.mask, config=strict,
                     stats=stats, defer_exact=True, host_exact=host_exact)
