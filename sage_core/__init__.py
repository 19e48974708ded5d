"""PyTorch-level API of the pack: `sageattn`, the dispatcher and its fallbacks, the reference
implementation, metrics and benchmarks. It never imports ComfyUI, and importing it loads no Triton."""
from .api import sageattn
from .config import SageConfig
from .dispatch import GLOBAL_STATS, DispatchStats, UnsupportedInput, attention
from .metrics import attention_error

__all__ = ["sageattn", "SageConfig", "attention", "DispatchStats", "GLOBAL_STATS", "UnsupportedInput",
           "attention_error"]
