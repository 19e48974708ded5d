"""PyTorch-level API of the pack: `sageattn`, the dispatcher and its fallbacks, the reference
implementation, metrics and benchmarks. It never imports ComfyUI, and importing it loads no Triton."""
from .api import (sageattn, sageattn_qk_int8_pv_fp8_cuda, sageattn_qk_int8_pv_fp8_cuda_sm90,
                  sageattn_qk_int8_pv_fp16_cuda, sageattn_qk_int8_pv_fp16_triton, sageattn_varlen)
from .config import SageConfig
from .dispatch import GLOBAL_STATS, DispatchStats, UnsupportedInput, attention
from .metrics import attention_error

__all__ = ["sageattn", "sageattn_varlen", "sageattn_qk_int8_pv_fp16_triton", "sageattn_qk_int8_pv_fp16_cuda",
           "sageattn_qk_int8_pv_fp8_cuda", "sageattn_qk_int8_pv_fp8_cuda_sm90", "SageConfig", "attention",
           "DispatchStats", "GLOBAL_STATS", "UnsupportedInput", "attention_error"]
