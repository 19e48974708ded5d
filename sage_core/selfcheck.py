"""The self-check: which device and kernels serve here, and does every variant match exact attention."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backend
from .bench import BOUNDS, model_shaped_inputs
from .config import SageConfig
from .dispatch import DispatchStats, attention
from .metrics import attention_error
from .progress import progress

CASES = [  # (B, H, Nq, Nk, D, causal): ragged lengths, odd head dims, both PV precisions
    (1, 2, 130, 130, 64, False), (1, 2, 100, 77, 128, False), (1, 2, 96, 96, 40, True), (2, 2, 64, 200, 80, False),
]


def describe() -> dict:
    """One line's worth of facts: device, Triton, which kernels serve and why not."""
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    refusal = backend.device_refusal(dev)
    info = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
            "triton": backend.triton_error() or _triton_version()}
    if refusal:
        info["serving"] = f"exact attention (SDPA) only: {refusal}"
    else:
        info["serving"] = "Sage INT8-QK with " + ("FP8 or FP16 P·V" if backend.supports_fp8(dev) else "FP16 P·V") + \
            (" through Triton's interpreter" if dev.type == "cpu" else f" ({backend.arch_family(dev)} tuning)")
    return info


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
        for kernel, bound in (("int8_fp16", BOUNDS["fp16"]), ("int8_fp8", BOUNDS["fp8"])):
            stats = DispatchStats()
            out = attention(q, k, v, is_causal=causal, config=SageConfig(kernel=kernel), stats=stats)
            err = attention_error(out, ref)
            served = ", ".join(stats.snapshot()["sage"]) or "fallback: " + ", ".join(stats.snapshot()["fallback"])
            ok = err["cosine"] >= bound["cosine"] and err["rel_l1"] <= bound["rel_l1"] * 2
            rows.append({"case": case, "kernel": kernel, "served_by": served, **err, "ok": ok})
    return rows
