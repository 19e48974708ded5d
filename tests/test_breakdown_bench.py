"""bench/breakdown.py's accounting of the quantization launches: the bytes it credits each launch are the
bytes of the tensors that launch reads and the buffers it writes (sized by the launcher itself), and each launch's
bandwidth pairs its own device time with its own bytes."""
import pytest
import torch

import bench_script
from sage_attention_pack.kernels import launch
from sage_attention_pack.sage_core.config import SageConfig


def breakdown():
    return bench_script.load("breakdown")


def written(shape, config: SageConfig, pv_fp8: bool) -> dict:
    """The launcher's own buffers for one call, on the meta device (sizes only)."""
    b, h, n, d = shape
    q = torch.empty(shape, device="meta", dtype=torch.bfloat16)
    return launch.quant_buffers(q, q, q_group=64, k_group=128, block_d=launch.padded_head_dim(d),
                                smooth_k=config.smooth_k, smooth_v=config.smooth_v, pv_fp8=pv_fp8)


@pytest.mark.parametrize("shape", [(1, 24, 4608, 128), (2, 10, 4096, 64), (1, 2, 1000, 80)])
def test_fp8_launch_bytes_are_the_tensors_each_launch_reads_and_writes(shape):
    config = SageConfig(kernel="int8_fp8")
    b, h, n, d = shape
    head_bytes = b * h * n * d * 2  # one bf16 input
    buffers = written(shape, config, pv_fp8=True)
    sampled = launch.sampled_key_count(n, launch.stats_every(n))
    assert sampled <= n and (n < 1024 or sampled < n)
    first, second = breakdown().quantize_launch_bytes(shape, "fp8", config, 64, 128)
    # Q read and coded, K's sampled keys and all of V read for the statistics
    assert first == head_bytes + buffers["q8"].nbytes + b * h * sampled * d * 2 + head_bytes
    # K and V read and coded
    assert second == 2 * head_bytes + buffers["k8"].nbytes + buffers["v8"].nbytes


def test_q_coded_in_the_kernel_leaves_the_first_launch_the_statistics():
    shape = (1, 24, 4608, 128)
    config = SageConfig(kernel="int8_fp8")
    head_bytes = 24 * 4608 * 128 * 2
    sampled = launch.sampled_key_count(4608, launch.stats_every(4608))
    full = breakdown().quantize_launch_bytes(shape, "fp8", config, 16, 128)
    lean = breakdown().quantize_launch_bytes(shape, "fp8", config, 16, 128, q_in_kernel=True)
    assert lean == [24 * sampled * 128 * 2 + head_bytes, full[1]]
    assert full[0] - lean[0] == head_bytes + written(shape, config, pv_fp8=True)["q8"].nbytes


def test_fp16_path_reads_v_nowhere_and_unsmoothed_calls_take_one_launch():
    shape = (1, 24, 4608, 128)
    head_bytes = 24 * 4608 * 128 * 2
    config = SageConfig(kernel="int8_fp16")
    buffers = written(shape, config, pv_fp8=False)
    sampled = launch.sampled_key_count(4608, launch.stats_every(4608))
    first, second = breakdown().quantize_launch_bytes(shape, "fp16", config, 16, 64)
    assert first == head_bytes + buffers["q8"].nbytes + 24 * sampled * 128 * 2
    assert second == head_bytes + buffers["k8"].nbytes
    plain = SageConfig(kernel="int8_fp16", smooth_k=False)
    assert breakdown().quantize_launch_bytes(shape, "fp16", plain, 16, 64) == [first - 24 * sampled * 128 * 2 + second]


def test_each_launch_gets_its_own_time_and_a_mismatch_reports_nothing():
    module = breakdown()
    per_kernel = {"sage_fwd_sm90_pingpong_kernel": 0.343, "quantize_kernel [2/2]": 0.040,
                  "quantize_kernel [1/2]": 0.030, "sage_fwd_tail_merge_kernel": 0.002}
    rows = module.quantize_launches(per_kernel, [60_000_000, 100_000_000])
    assert [r["launch"] for r in rows] == ["quantize_kernel [1/2]", "quantize_kernel [2/2]"]
    assert rows[0]["tb_per_s"] == pytest.approx(2.0) and rows[1]["tb_per_s"] == pytest.approx(2.5)
    assert module.quantize_launches(per_kernel, [1]) == []
    assert module.quantize_launches({"quantize_kernel": 0.05}, [100_000_000])[0]["tb_per_s"] == pytest.approx(2.0)


def test_the_bandwidth_reference_pairs_each_operation_with_its_own_bytes(monkeypatch):
    module = breakdown()
    timed = []

    def fake_kernel_ms(call):
        out = call()  # the operation itself runs (on the CPU here)
        timed.append(out.clone())  # both operations write the same buffer
        return {"elementwise_kernel": 0.010}

    monkeypatch.setattr(module, "kernel_ms", fake_kernel_ms)
    q = torch.randn(1, 2, 64, 32, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 64, 32, dtype=torch.bfloat16)
    ref = module.bandwidth_reference(q, k)
    assert set(ref) == {"copy", "add"}
    assert ref["copy"]["bytes"] == 2 * q.nbytes and ref["add"]["bytes"] == 3 * q.nbytes
    assert ref["add"]["tb_per_s"] == pytest.approx(3 * q.nbytes / (0.010 * 1e9))
    assert torch.equal(timed[0], q) and torch.equal(timed[1], q + k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the profiler times its kernels)")
def test_the_bandwidth_reference_measures_on_the_gpu():
    q = torch.randn(1, 8, 2048, 128, device="cuda", dtype=torch.bfloat16)
    ref = breakdown().bandwidth_reference(q, torch.randn_like(q))
    for entry in ref.values():
        assert entry["ms"] > 0 and 0 < entry["tb_per_s"] < 20
