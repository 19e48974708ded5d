"""Accuracy of an attention output against a full-precision reference."""
from __future__ import annotations

import torch


def attention_error(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """Cosine similarity, relative L1 (Σ|out−ref| / Σ|ref|) and RMSE, computed in FP64 over all elements."""
    o = out.detach().double().flatten()
    r = ref.detach().double().flatten()
    if o.numel() == 0:
        return {"cosine": 1.0, "rel_l1": 0.0, "rmse": 0.0}
    diff = o - r
    denom = (o.norm() * r.norm()).item()
    cosine = (o @ r).item() / denom if denom > 0 else float(torch.equal(o, r))
    l1 = r.abs().sum().item()
    return {
        "cosine": cosine,
        "rel_l1": diff.abs().sum().item() / l1 if l1 > 0 else float(diff.abs().sum().item() > 0),
        "rmse": diff.pow(2).mean().sqrt().item(),
    }
