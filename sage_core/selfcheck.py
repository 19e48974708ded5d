"""The self-check: which device and kernels serve here, and does every variant match exact attention."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backend
from . import rope as rotary
from .bench import BOUNDS, model_shaped_inputs
from .config import SageConfig
from .dispatch import DispatchStats, attention
from .metrics import attention_error
from .progress import progress

CASES = [  # (B, H, Nq, Nk, D, causal): ragged lengths, odd head dims, both PV precisions
    (1, 2, 130, 130, 64, False), (1, 2, 100, 77, 128, False), (1, 2, 96, 96, 40, True), (2, 2, 64, 200, 80, False),
]
# with Flux.1's rotary table handed over (the rotation inside the quantization): (B, H, text tokens, patch rows,
# patch columns) at its head dim 128. The rotation turns K's channel offset with the position, which K's smoothing
# then takes off less well, so the bound there is the same kernel's error on Q and K rotated first (what ComfyUI's
# own rotation before the hook gives): within ROTARY_SLACK of it
ROTARY_CASES = [(1, 2, 16, 8, 8)]
ROTARY_SLACK = 1.1


def describe() -> dict:
    """One line's worth of facts: device, Triton, which kernels serve and why not."""
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    refusal = backend.device_refusal(dev)
    info = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
            "triton": backend.triton_error() or _triton_version()}
    if refusal:
        info["serving"] = f"exact attention (SDPA) only: {refusal}"
    else:
        pv = "FP8 or FP16 P·V" if backend.supports_fp8(dev) else "FP16 P·V"
        how = "through Triton's interpreter" if dev.type == "cpu" else \
            f"({tuning_line(info['device'], backend.arch_family(dev))})"
        info["serving"] = f"Sage INT8-QK with {pv} {how}"
    return info


def tuning_line(device_name: str, family: str) -> str:
    """Which tuning serves a GPU of this name and architecture family: whose measured table, or the arch
    defaults, which `tune` replaces with this GPU's own measurements."""
    from ..kernels import tuning

    source = tuning.launch_table_source(device_name, family)
    if source == device_name:
        return f"{family} tuning, measured on this GPU model"
    if source:
        return f"{family} tuning, measured on the {source}"
    return f"{family} tuning, defaults: `python -m sage_attention_pack tune` measures this GPU"


def _triton_version():
    import triton

    return triton.__version__


def check(dtype=torch.float16) -> list[dict]:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for case in progress(CASES, desc="self-check", unit="case"):
        b, h, nq, nk, d, causal = case
        q = model_shaped_inputs(b, h, nq, d, dtype, dev, seed=1)[0]
        _, k, v = model_shaped_inputs(b, h, nk, d, dtype, dev, seed=2)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
        rows += check_variants(q, k, v, ref, case)
    for b, h, text, height, width in ROTARY_CASES:
        n = text + height * width
        q, k, v = model_shaped_inputs(b, h, n, 128, dtype, dev, seed=3)
        pe = rotary.flux_table(text, height, width, device=dev)
        qr, kr = rotary.rotate(q, pe), rotary.rotate(k, pe)
        ref = F.scaled_dot_product_attention(rotary.rotate(q.float(), pe), rotary.rotate(k.float(), pe), v.float())
        rows += check_variants(q, k, v, ref, (b, h, n, n, 128, False), rope=pe, rotated_first=(qr, kr))
    return rows


def check_variants(q, k, v, ref, case: tuple, rope=None, rotated_first=None) -> list[dict]:
    """Both P·V precisions on one case against its exact attention `ref`, each a row; with a rotary table, bounded
    by the same kernel on Q and K rotated first (rotated_first; see ROTARY_CASES)."""
    rows = []
    for kernel, bound in (("int8_fp16", BOUNDS["fp16"]), ("int8_fp8", BOUNDS["fp8"])):
        stats, config = DispatchStats(), SageConfig(kernel=kernel)
        out = attention(q, k, v, is_causal=case[-1], config=config, stats=stats, rope=rope)
        err = attention_error(out, ref)
        served = ", ".join(stats.snapshot()["sage"]) or "fallback: " + ", ".join(stats.snapshot()["fallback"])
        if rope is None:
            ok = err["cosine"] >= bound["cosine"] and err["rel_l1"] <= bound["rel_l1"] * 2
        else:
            first = attention_error(attention(*rotated_first, v, config=config), ref)
            ok = err["rel_l1"] <= first["rel_l1"] * ROTARY_SLACK and err["cosine"] >= BOUNDS["fp8"]["cosine"]
        rows.append({"case": case, "kernel": kernel, "rotary": stats.rotary_fused > 0, "served_by": served, **err,
                     "ok": ok})
    return rows
