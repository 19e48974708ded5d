"""Launch-configuration autotuning: time every candidate tile shape on model-shaped inputs and store the
fastest per (P·V precision, head dim, length bucket, dtype, causal) in the on-disk cache that the
dispatcher reads, so later runs (and ComfyUI) use it without retuning.

Kernel flags are then tried on the winning tile: the score conversion (FP32 bit trick or I2F) and, for FP8 P·V,
accumulating straight into the output registers and (Ada, consumer Blackwell) each key tile's product in FP16
(tuning.FP16_TILE_FAMILIES). A flag is kept only where it is faster and its error against FP32 attention stays
within the variant's bounds and no more than 5% above the plain tile's.
"""
from __future__ import annotations

import functools

import torch

from . import backend
from .bench import BOUNDS, model_shaped_inputs, reference
from .config import SageConfig
from .metrics import attention_error
from .progress import progress
from .timing import interleaved_median_ms


def tune_shape(shape, dtype=torch.bfloat16, pv: str = "fp8", config: SageConfig | None = None,
               is_causal: bool = False, tiles: bool = True) -> dict:
    """Time each candidate for one shape (tiles=False: only the flags, on the tile in use); cache and return
    {"key", "best", "ms": {candidate: ms}, "rel_l1": {candidate: error}}."""
    from ..kernels import launch, tuning

    config = config or SageConfig(kernel="int8_fp8" if pv == "fp8" else "int8_fp16")
    b, h, n, d = shape
    q, k, v = model_shaped_inputs(b, h, n, d, dtype, "cuda")
    block_d = launch.padded_head_dim(d)
    pinned_m = config.quant_block if config.qk_granularity == "per_block" else None

    def call(cand):
        return backend.run(q, k, v, layout="HND", sm_scale=d ** -0.5, is_causal=is_causal, bias=None, config=config,
                           pv_fp8=pv == "fp8", return_lse=False, launch_config=cand)[0]

    def measure(cands):
        # in interleaved rounds, so that the candidates compared with each other share the machine's drift; a
        # tile that does not fit this GPU's shared memory is skipped
        timed = interleaved_median_ms({c: functools.partial(call, c) for c in cands}, rounds=5, per_round=1)
        timings.update({c: ms for c, ms in timed.items() if not isinstance(ms, str)})

    timings = {}
    if tiles:
        measure(tuning.candidates(block_d, pinned_m, backend.arch_family(q.device)))
        tile = min(timings, key=timings.get)
    else:
        tile = backend.tuning_for(q.device, pv, block_d, pinned_m, n, n, str(dtype), is_causal)
        measure([tile])
    flips = tuning.flag_flips(tile, pv == "fp8", backend.arch_family(q.device))
    measure([tile] + flips)  # the chosen tile again, beside its flags flipped
    ref = reference(q, k, v)
    errors = {c: attention_error(call(c)[:, :ref.shape[1]], ref)["rel_l1"] for c in [tile] + flips if c in timings}
    bound = BOUNDS[pv]["rel_l1"]
    allowed = [c for c in errors if errors[c] <= min(bound, errors[tile] * 1.05)] or [tile]
    best = min(allowed, key=timings.get)
    key = backend.tuning_key(q.device, pv, block_d, pinned_m, n, n, str(dtype), is_causal)
    backend.launch_cache().put(key, best)
    return {"key": key, "best": best.key(), "ms": {c.key(): t for c, t in timings.items()},
            "rel_l1": {c.key(): e for c, e in errors.items()}}


def tune(shapes: dict, dtype=torch.bfloat16, tiles: bool = True) -> dict:
    results = {}
    for name in progress(list(shapes), desc="autotune", unit="shape"):
        for pv in ("fp8", "fp16"):
            if pv == "fp8" and not backend.supports_fp8(torch.device("cuda")):
                continue
            results[f"{name}|{pv}"] = tune_shape(shapes[name], dtype, pv, tiles=tiles)
            torch.cuda.empty_cache()
    return results
