"""The dispatcher as a torch custom op, so `torch.compile`d models treat Sage attention as one opaque call
instead of breaking their graph on its Python-side decisions (fallbacks, counters, the NaN guard)."""
from __future__ import annotations

import itertools
import sys
import types
import weakref

import torch

from .config import SageConfig
from .dispatch import DispatchStats, attention

# ComfyUI imports the pack under a path-derived module name, and tools may import it again as
# sage_attention_pack: the op is registered once per process, so both copies share its counter registry.
_REGISTRY = "_sage_attention_pack_op_registry"
_SHARED = sys.modules.setdefault(_REGISTRY, types.ModuleType(_REGISTRY))
if not hasattr(_SHARED, "stats"):
    _SHARED.stats = weakref.WeakValueDictionary()
    _SHARED.ids = itertools.count(1)
    _SHARED.op = None
_STATS = _SHARED.stats


def _attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, layout: str,
                  kernel: str, smooth_k: bool, smooth_v: bool, granularity: str, quant_block: int,
                  on_unsupported: str, stats_id: int, sm_scale: float | None = None) -> torch.Tensor:
    config = SageConfig(kernel=kernel, smooth_k=smooth_k, smooth_v=smooth_v, qk_granularity=granularity,
                        quant_block=quant_block, on_unsupported=on_unsupported)
    return attention(q, k, v, tensor_layout=layout, sm_scale=sm_scale, attn_mask=mask, config=config,
                     stats=_STATS.get(stats_id))


def _fake(q, k, v, mask, layout, kernel, smooth_k, smooth_v, granularity, quant_block, on_unsupported, stats_id,
          sm_scale=None):
    return q.new_empty(q.shape).contiguous()


if _SHARED.op is None:
    _SHARED.op = torch.library.custom_op("sage_attention_pack::attention", mutates_args=())(_attention_impl)
    _SHARED.op.register_fake(_fake)
_attention_op = _SHARED.op


def register_stats(stats: DispatchStats) -> int:
    """An id the op can carry for these counters (call it outside compiled code, once per counters)."""
    stats_id = next(_SHARED.ids)
    _STATS[stats_id] = stats
    return stats_id


def sage_attention_op(q, k, v, mask, layout: str, config: SageConfig, stats_id: int = 0, sm_scale=None):
    """Call the dispatcher through the custom op (same result as `attention`, output contiguous);
    stats_id from register_stats (0: the global counters)."""
    return _attention_op(q, k, v, mask, layout, config.kernel, config.smooth_k, config.smooth_v,
                         config.qk_granularity, config.quant_block, config.on_unsupported, stats_id, sm_scale)
