"""The bridge from sage_core to the Triton kernels: can this device run them, and with which launch.

Triton is imported lazily: importing sage_core never compiles or even loads it.
"""
from __future__ import annotations

import functools

import torch

from ..kernels import tuning  # triton-free: importing it loads no Triton
from ..kernels.tuning import cuda_capability, interpreting
from .config import SageConfig

LOG2E = 1.4426950408889634
# Triton compiles the INT8 tensor-core dot from Ampere on: for Turing (sm75) its pass pipeline rejects the INT8
# product (Triton 3.6 and 3.9; tests/test_arch_codegen.py compiles every other architecture's configurations)
MIN_CAPABILITY = (8, 0)
MIN_TUNED_LENGTH = 2048  # shorter lengths never borrow a longer bucket's tuned tiles


@functools.lru_cache(maxsize=None)
def triton_error() -> str | None:
    """None if Triton imports, else why not (one line)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # an ImportError, or a broken install raising anything
        return f"Triton not importable ({type(e).__name__}: {e})".splitlines()[0][:160]
    return None


def release_buffers() -> None:
    """Return the work buffers the kernels keep for repeated call shapes (kernels/call_plan.py), the call sites'
    carried statistics (kernels/carried_stats.py) and the rotary table kept for a forward's calls
    (rope.HANDED_TABLES) to PyTorch's allocator: at the end of a sampling run, so that what runs next (a VAE
    decode, another model) has them, and the next run's first calls measure their own statistics. Nothing to do,
    and nothing imported, where no kernel has run in this process."""
    import sys

    kernels = __package__.rsplit(".", 1)[0] + ".kernels"
    plans = sys.modules.get(kernels + ".call_plan")
    if plans is not None:
        plans.PLANS.clear()
    sites = sys.modules.get(kernels + ".carried_stats")
    if sites is not None:
        sites.SITES.clear()
    tables = sys.modules.get(__package__ + ".rope")
    if tables is not None:
        tables.HANDED_TABLES.clear()


def device_refusal(device: torch.device) -> str | None:
    """Why the kernels cannot run on this device (None if they can)."""
    err = triton_error()
    if device.type == "cpu":
        if not interpreting():
            return "CPU tensors (set TRITON_INTERPRET=1 to run the kernels through Triton's interpreter)"
        return err
    if device.type != "cuda":
        return f"{device.type} device"
    if torch.version.hip:
        return "ROCm GPU (kernels are tuned and tested for NVIDIA only)"
    if err:
        return err
    cap = cuda_capability(device)
    if cap < MIN_CAPABILITY:
        return f"GPU sm{cap[0]}{cap[1]} is older than Ampere (sm80): Triton cannot compile the INT8 product for it"
    return None


def supports_fp8(device: torch.device) -> bool:
    """FP8 e4m3 tensor-core dots exist from Ada (sm89) on; the interpreter emulates them."""
    if device.type == "cpu":
        return interpreting()
    cap = cuda_capability(device)
    return cap is not None and cap >= (8, 9)


def arch_family(device: torch.device) -> str:
    return tuning.arch_family(None if interpreting() and device.type == "cpu" else cuda_capability(device))


@functools.cache
def kernel_launch():
    """kernels.launch, imported on its first call (it loads Triton) and kept: an import statement in the functions
    below cost about 2 µs of host time per attention call."""
    from ..kernels import launch

    return launch


def run(q, k, v, *, layout: str, sm_scale: float, is_causal: bool, bias, config: SageConfig, pv_fp8: bool,
        return_lse: bool, launch_config=None, repair_counter=None, rope=None, carry_key=None):
    """Run the Triton path on HND views; returns (output in the caller's layout, lse or None, bad flags). rope: a
    rotary table Q and K are rotated by inside the quantization (launch.quantize_qkv). carry_key: the call site
    whose statistics carry to its next call (launch.sage_forward, kernels/carried_stats.py)."""
    B, H, NQ, D = q.shape
    cfg = launch_config or call_config(q, k, config=config, pv_fp8=pv_fp8, is_causal=is_causal)
    # output allocated contiguous in the caller's layout, handed to the kernel as an HND view
    out = torch.empty((B, NQ, H, D) if layout == "NHD" else (B, H, NQ, D), device=q.device, dtype=q.dtype)
    out_hnd = out.transpose(1, 2) if layout == "NHD" else out
    lse, bad = kernel_launch().sage_forward(
        q, k, v, out_hnd, sm_scale=sm_scale, is_causal=is_causal, bias=bias, q_group=config.q_group_rows,
        k_group=config.k_group_rows, pv_fp8=pv_fp8, smooth_k=config.smooth_k, smooth_v=config.smooth_v,
        return_lse=return_lse, config=cfg, repair_counter=repair_counter, rope=rope, carry_key=carry_key)
    return out, lse, bad


def call_config(q, k, *, config: SageConfig, pv_fp8: bool, is_causal: bool):
    """The launch configuration `run` takes for these HND inputs when none is given (tuning_for, with the Q tile
    pinned where per-block Q quantization needs it)."""
    pinned_m = config.quant_block if config.qk_granularity == "per_block" else None
    return tuning_for(q.device, "fp8" if pv_fp8 else "fp16", kernel_launch().padded_head_dim(q.shape[-1]), pinned_m,
                      q.shape[2], k.shape[2], str(q.dtype), is_causal)


def tuning_for(device, pv: str, block_d: int, pinned_m, nq: int, nk: int, dtype: str, is_causal: bool):
    """The launch configuration: an autotuned one from the disk cache if present, else the arch table's. Looked up
    once per distinct call (its key strings and the arch family cost microseconds of host time on every call); a
    new entry in the launch cache (`tune`) starts the answers over."""
    return tuned_config(device, pv, block_d, pinned_m, nq, nk, dtype, is_causal, tuning.interpreting(),
                        launch_cache().generation)


@functools.lru_cache(maxsize=4096)
def tuned_config(device, pv: str, block_d: int, pinned_m, nq: int, nk: int, dtype: str, is_causal: bool,
                 interpreting: bool, generation: int):
    """tuning_for's lookup itself, cached by its arguments, the interpreter switch (which sets the arch family) and
    the launch cache's generation."""
    family = arch_family(device)
    if family != "cpu":
        # the tuned entry for this length bucket, else the nearest shorter tuned one (a longer sequence runs
        # best on the tiles that won at the longest length measured)
        while True:
            hit = launch_cache().get(tuning_key(device, pv, block_d, pinned_m, nq, nk, dtype, is_causal))
            if hit:
                return tuning.LaunchConfig(**hit)
            if nq <= MIN_TUNED_LENGTH or nk <= MIN_TUNED_LENGTH:
                break
            nq, nk = nq // 2, nk // 2
    return tuning.default_config(family, pv, block_d, pinned_m)


def tuning_key(device, pv, block_d, pinned_m, nq, nk, dtype, is_causal) -> str:
    return (f"{pv}|d{block_d}|m{pinned_m or 'any'}|nq{tuning.seq_bucket(nq)}|nk{tuning.seq_bucket(nk)}|"
            f"{dtype.replace('torch.', '')}|{'causal' if is_causal else 'full'}")


@functools.lru_cache(maxsize=None)
def launch_cache():
    family = arch_family(torch.device("cuda")) if torch.cuda.is_available() else None
    return tuning.TuningCache(f"launch-{device_tag()}.json", tuning.shipped_table(gpu_name(), "launch", family))


@functools.lru_cache(maxsize=None)
def gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


@functools.lru_cache(maxsize=None)
def device_tag() -> str:
    """Cache files are per GPU model and Triton version: a driver or Triton update retunes."""
    import triton

    return f"{gpu_name().replace(' ', '_')}-triton{triton.__version__}"
