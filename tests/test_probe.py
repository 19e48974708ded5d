"""Sage Attention Probe: block ranking, and the node inside a real ComfyUI on the small models (CPU)."""
from __future__ import annotations

import math
import os

import pytest
import torch

import comfy_harness as harness

PROBE_ID = "30"
KERNELS_RUN = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
needs_kernels = pytest.mark.skipif(not KERNELS_RUN, reason="no GPU and TRITON_INTERPRET is not 1: the kernels "
                                   "cannot run here")


@pytest.fixture(scope="module")
def probe_mod(comfyui):
    from sage_attention_pack.nodes import probe

    return probe


def _row(block, rel_l1, kind="self"):
    return {"call": 0, "forward": 0, "block": block, "layer": 0, "kind": kind, "shape": [1, 1, 4, 4, 8],
            "served": "int8_fp16", "cosine": 1 - rel_l1, "rel_l1": rel_l1, "rmse": rel_l1, "exact_ms": 1.0,
            "sage_ms": 0.5}


def test_worst_blocks_ranking(probe_mod):
    rows = [_row(0, 0.01), _row(0, 0.05, "cross"), _row(1, 0.02), _row(2, 0.04), _row(3, 0.0), _row(4, 0.001)]
    assert probe_mod.worst_blocks(rows, 1) == [0]  # block 0's worst call (0.05) is the worst overall
    assert probe_mod.worst_blocks(rows, 2) == [0, 2]
    assert probe_mod.worst_blocks(rows, 0, limit=0.015) == [0, 1, 2]
    assert probe_mod.worst_blocks(rows, 1, limit=0.03) == [0, 2]
    # blocks with no error (all exact already) are never suggested
    assert probe_mod.worst_blocks(rows, 10) == [0, 1, 2, 4]
    assert probe_mod.worst_blocks([_row(0, 0.0)], 3) == []
    assert probe_mod.worst_blocks([_row(5, math.nan)], 1) == [5]


def test_format_table(probe_mod):
    rows = [_row(0, 0.01), _row(1, 0.02, "cross")]
    text = probe_mod.format_table(rows, "1", "header line")
    lines = text.splitlines()
    assert lines[0] == "header line" and "rel L1" in lines[1]
    assert len(lines) == 2 + len(rows) + 2
    assert "cross" in lines[3] and "1,1,4,4,8" in lines[2]
    assert lines[-1] == "suggested exact_blocks: 1"


def probe_prompt(family, models, *, kernel="int8_fp16", keep_exact=1, steps=4, step=0, patch=None, seed=3):
    p = harness.workflow_api(family, models, model_patch=patch, steps=steps, output=None)
    ks = p.pop(harness.NODE_IDS["sampler"])
    p.pop(harness.NODE_IDS["decode"])
    i = ks["inputs"]
    p[PROBE_ID] = {"class_type": "SageAttentionProbe", "inputs": {
        "model": i["model"], "positive": i["positive"], "negative": i["negative"], "latent_image": i["latent_image"],
        "seed": seed, "steps": steps, "step": step, "cfg": i["cfg"], "scheduler": i["scheduler"], "denoise": 1.0,
        "kernel": kernel, "smooth_k": True, "smooth_v": False, "qk_granularity": "per_warp", "quant_block": "128",
        "keep_exact": keep_exact, "error_limit": 0.0}}
    return p


def _outputs(run):
    return [o[0] if isinstance(o, list) and len(o) == 1 else o for o in run.outputs[PROBE_ID]]


@pytest.mark.parametrize("family", harness.FAMILIES)
def test_probe_lists_every_attention_call(comfy_inprocess, small_models, family):
    run = comfy_inprocess.run_prompt(probe_prompt(family, small_models))
    table, plot, suggestion = _outputs(run)
    rows = run.ui[PROBE_ID]["sage_probe"][0]["rows"]
    per_forward = harness.ATTENTION_CALLS_PER_RUN[family] // 4  # CFG is batched: one forward per step
    assert len(rows) == per_forward
    assert [r["call"] for r in rows] == list(range(per_forward))
    # blocks are numbered as the patch node numbers them: each self-attention call opens the next block
    blocks = [r["block"] for r in rows]
    assert blocks[0] == 0 and blocks == sorted(blocks)
    assert blocks[-1] == sum(r["kind"] == "self" for r in rows) - 1
    for r in rows:
        assert r["kind"] in ("self", "cross") and len(r["shape"]) == 5 and r["shape"][0] == 2  # cond + uncond
        assert r["exact_ms"] > 0 and r["sage_ms"] > 0
        assert isinstance(r["cosine"], float) and isinstance(r["rel_l1"], float)
    if family == "sd15":
        assert {r["kind"] for r in rows} == {"self", "cross"}
        assert all(r["layer"] == (0 if r["kind"] == "self" else 1) for r in rows)
    # the table and the plot
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows) + 2 and lines[-1].startswith("suggested exact_blocks:")
    assert plot.ndim == 4 and plot.shape[0] == 1 and plot.shape[-1] == 3
    if KERNELS_RUN:
        assert all(r["served"] == "int8_fp16" for r in rows)
        assert all(0.99 < r["cosine"] < 1.0 and 0 < r["rel_l1"] < 0.05 for r in rows)
        assert suggestion != ""
    else:  # every call falls back (and says why): Sage output is the exact output
        assert all(r["served"].startswith("fallback: CPU tensors") for r in rows)
        assert all(r["rel_l1"] == 0.0 for r in rows) and suggestion == ""


def test_probe_suggestion_feeds_the_patch_node(comfy_inprocess, small_models):
    """Probe -> the patch node's exact_blocks (a link) -> KSampler: the suggested blocks run exactly."""
    steps = 2
    p = probe_prompt("sd3", small_models, keep_exact=1, seed=4)
    patch_id = "40"
    p[patch_id] = {"class_type": "SageAttention", "inputs": {
        "model": p[PROBE_ID]["inputs"]["model"], "kernel": "int8_fp16", "smooth_k": True, "smooth_v": False,
        "qk_granularity": "per_warp", "quant_block": "128", "exact_blocks": [PROBE_ID, 2], "start_percent": 0.0,
        "end_percent": 1.0, "on_unsupported": "fallback"}}
    full = harness.workflow_api("sd3", small_models, steps=steps, output="PreviewImage")
    for nid in (harness.NODE_IDS["sampler"], harness.NODE_IDS["decode"], harness.NODE_IDS["save"]):
        p[nid] = full[nid]
    p[harness.NODE_IDS["sampler"]]["inputs"]["model"] = [patch_id, 0]
    run = comfy_inprocess.run_prompt(p)
    suggestion = _outputs(run)[2]
    rows = run.ui[PROBE_ID]["sage_probe"][0]["rows"]
    stats = [d for d in run.events("sage_attention.stats") if d.get("node") == patch_id][-1]
    from sage_attention_pack.nodes import routing

    kept = routing.parse_blocks(suggestion)
    exact_calls = sum(r["block"] in kept for r in rows) * steps
    assert stats["exact"].get("block kept exact", 0) == exact_calls
    assert stats["total"] == len(rows) * steps
    if KERNELS_RUN:
        assert len(kept) == 1 and exact_calls > 0
        assert sum(stats["sage"].values()) == stats["total"] - exact_calls


@needs_kernels
def test_probe_from_model_uses_the_patch_settings(comfy_inprocess, small_models):
    patch = ("SageAttention", {"kernel": "int8_fp16", "smooth_k": False, "smooth_v": False,
                               "qk_granularity": "per_block", "quant_block": "64", "exact_blocks": "0",
                               "start_percent": 0.0, "end_percent": 1.0, "on_unsupported": "fallback"})
    run = comfy_inprocess.run_prompt(probe_prompt("sd3", small_models, kernel="from model", patch=patch, seed=8))
    table, _, _ = _outputs(run)
    rows = run.ui[PROBE_ID]["sage_probe"][0]["rows"]
    assert "int8_fp16, per_block, block 64" in table.splitlines()[0] and "smooth K" not in table.splitlines()[0]
    # the probe measures Sage in every block, also those the patch keeps exact
    assert all(r["served"] == "int8_fp16" for r in rows) and len(rows) == 2
