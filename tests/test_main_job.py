"""The README's main job, `python -m sage_attention_pack selfcheck`, and the report it feeds, run for real."""
import json
import os
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not CUDA,
                                reason="needs a GPU or TRITON_INTERPRET=1")


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "sage_attention_pack", *args], capture_output=True, text=True,
                          timeout=900, cwd=cwd)


def test_selfcheck_reports_device_accuracy_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    shapes = ["flux_1024px"] if CUDA else ["tiny_d64"]
    r = run_cli("selfcheck", "--shapes", *shapes, "--no-peers", "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "serving:" in r.stdout and r.stdout.count("ok  ") == 10 and "FAIL" not in r.stdout
    assert r.stdout.count("Flux's rotary table inside the quantization") == 2
    result = json.loads(out.read_text())
    assert set(result["environment"]) >= {"torch", "triton", "device"}
    # the JSON keeps what was checked, not only what was timed: the same ten rows the command printed
    assert result["serving"].startswith("Sage INT8-QK") and result["serving"] in r.stdout
    checked = result["selfcheck"]
    assert len(checked) == 10 and all(row["ok"] for row in checked)
    assert {row["kernel"] for row in checked} == {"int8_fp16", "int8_fp8"}
    assert sum(row["rotary"] for row in checked) == 2 and all(0.999 <= row["cosine"] <= 1 for row in checked)
    rows = result["shapes"][shapes[0]]["methods"]
    assert rows["sage_int8_fp16"]["cosine"] >= 0.9999 and rows["sage_int8_fp8"]["cosine"] >= 0.999
    assert rows["sage_int8_fp16"]["rel_l1"] < rows["sage_int8_fp16_no_smooth_k"]["rel_l1"]  # smoothing helps
    if not CUDA:  # FP8 P·V's key tiles accumulated in FP16 (SageAttention2++) and in FP32, side by side
        fp16_tiles, fp32_tiles = rows["sage_int8_fp8_fp16_tiles"], rows["sage_int8_fp8_fp32_tiles"]
        assert fp16_tiles["cosine"] >= 0.999 and fp32_tiles["cosine"] >= 0.999
        assert abs(fp16_tiles["rel_l1"] - fp32_tiles["rel_l1"]) < 0.05 * fp32_tiles["rel_l1"]
    report = run_cli("report", "--json", str(out), cwd=tmp_path)
    assert report.returncode == 0 and f"| {shapes[0]} " in report.stdout and "sage_int8_fp8" in report.stdout


def test_bad_shape_name_is_refused_with_the_known_ones(tmp_path):
    r = run_cli("bench", "--shapes", "no_such_shape", "--no-peers", "--out", str(tmp_path / "x.json"), cwd=tmp_path)
    assert r.returncode != 0 and "unknown shape(s) ['no_such_shape']" in (r.stdout + r.stderr)


def test_a_run_cut_short_keeps_the_self_check(tmp_path, monkeypatch):
    """The JSON is written before the first shape is timed, so a benchmark stopped there still holds the self-check."""
    from sage_attention_pack.sage_core import bench

    out = tmp_path / "bench.json"
    on_disk = []

    def stopped(*args, **kwargs):  # the first shape's timing, interrupted as by Ctrl-C
        on_disk.append(json.loads(out.read_text()))
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "bench_shape", stopped)
    rows = [{"case": [1, 2, 130, 130, 64, False], "kernel": "int8_fp8", "ok": True}]
    with pytest.raises(KeyboardInterrupt):
        bench.run(shapes=["flux_1024px" if CUDA else "tiny_d64"], with_peers=False, out_path=str(out),
                  extra={"serving": "Sage", "selfcheck": rows})
    assert len(on_disk) == 1 and on_disk[0]["selfcheck"] == rows and on_disk[0]["shapes"] == {}
    assert json.loads(out.read_text())["serving"] == "Sage"
