"""The official `sageattention` package's other entry points, served by the bundled kernels (sage_core/api.py):
`sageattn_varlen` on packed sequences of different lengths, and the names that pick a kernel. Run through the
real kernels (TRITON_INTERPRET=1 on the CPU, or a GPU) and checked against exact attention per sequence."""
import inspect

import pytest
import torch

from sage_attention_pack.sage_core import (DispatchStats, sageattn, sageattn_qk_int8_pv_fp8_cuda,
                                           sageattn_qk_int8_pv_fp8_cuda_sm90, sageattn_qk_int8_pv_fp16_cuda,
                                           sageattn_qk_int8_pv_fp16_triton, sageattn_varlen)
from sage_attention_pack.sage_core.metrics import attention_error
from test_dispatch import DEVICE, needs_kernels, qkv, sdpa_ref

# the official package's parameters, in order, as its sageattention/core.py declares them (SageAttention 2.2):
# a call written for it, positional or by keyword, reaches the same parameter here
OFFICIAL_PARAMETERS = {
    sageattn_varlen: ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "is_causal",
                      "sm_scale", "smooth_k", "kwargs"],
    sageattn_qk_int8_pv_fp16_triton: ["q", "k", "v", "tensor_layout", "quantization_backend", "is_causal",
                                      "attn_mask", "sm_scale", "smooth_k", "return_lse", "kwargs"],
    sageattn_qk_int8_pv_fp16_cuda: ["q", "k", "v", "tensor_layout", "is_causal", "qk_quant_gran", "sm_scale",
                                    "pv_accum_dtype", "smooth_k", "smooth_v", "return_lse", "kwargs"],
    sageattn_qk_int8_pv_fp8_cuda: ["q", "k", "v", "tensor_layout", "is_causal", "qk_quant_gran", "sm_scale",
                                   "pv_accum_dtype", "smooth_k", "smooth_v", "return_lse", "kwargs"],
    sageattn_qk_int8_pv_fp8_cuda_sm90: ["q", "k", "v", "tensor_layout", "is_causal", "qk_quant_gran", "sm_scale",
                                        "pv_accum_dtype", "smooth_k", "return_lse", "kwargs"],
}


@pytest.mark.parametrize("function", list(OFFICIAL_PARAMETERS), ids=lambda f: f.__name__)
def test_parameters_in_the_official_order(function):
    assert list(inspect.signature(function).parameters) == OFFICIAL_PARAMETERS[function]


def packed(q_lengths, k_lengths, hq=2, hk=2, d=64, dtype=torch.float16, seed=0):
    """q [sum q_lengths, hq, d], k and v [sum k_lengths, hk, d] (K with a per-channel offset, as models show), and
    the int32 cumulative bounds."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lengths), hq, d, generator=g)
    k = torch.randn(sum(k_lengths), hk, d, generator=g) + torch.randn(d, generator=g) * 3
    v = torch.randn(sum(k_lengths), hk, d, generator=g)

    def bounds(lengths):
        return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    return [t.to(DEVICE, dtype) for t in (q, k, v)] + [bounds(q_lengths), bounds(k_lengths)]


def exact_per_sequence(q, k, v, cu_q, cu_k, **kw):
    out = []
    for i in range(len(cu_q) - 1):
        rows, keys = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        if rows.start == rows.stop:
            continue
        out.append(sdpa_ref(q[rows].unsqueeze(0), k[keys].unsqueeze(0), v[keys].unsqueeze(0), "NHD", **kw)[0])
    return torch.cat(out)


@needs_kernels
@pytest.mark.parametrize("kernel", ["int8_fp16", "int8_fp8"])
def test_varlen_ragged_sequences_match_exact_attention_per_sequence(kernel):
    # lengths that are no multiple of a block, an empty query sequence, and more keys than queries
    q_lengths, k_lengths = [37, 0, 70], [50, 20, 70]
    q, k, v, cu_q, cu_k = packed(q_lengths, k_lengths, hq=4, hk=2)
    stats = DispatchStats()
    out = sageattn_varlen(q, k, v, cu_q, cu_k, max(q_lengths), max(k_lengths), kernel=kernel, stats=stats)
    assert out.shape == q.shape and out.dtype == q.dtype
    error = attention_error(out, exact_per_sequence(q, k, v, cu_q.tolist(), cu_k.tolist()))
    cosine, l1 = (0.9999, 0.015) if kernel == "int8_fp16" else (0.999, 0.045)  # the bounds of the kernels issue
    assert error["cosine"] >= cosine and error["rel_l1"] <= l1, error
    # each non-empty sequence ran through the kernel, none fell back
    assert stats.snapshot()["sage"] == {kernel: 2} and stats.snapshot()["fallback"] == {}


def test_varlen_with_the_kernel_off_is_exact_attention_per_sequence():
    q, k, v, cu_q, cu_k = packed([5, 0, 19], [7, 3, 0], dtype=torch.float32, seed=4)
    stats = DispatchStats()
    out = sageattn_varlen(q, k, v, cu_q, cu_k, 19, 7, kernel="off", stats=stats)
    assert torch.allclose(out[:5], exact_per_sequence(q[:5], k[:7], v[:7], [0, 5], [0, 7]).float(), atol=1e-5)
    assert not out[5:].any()  # the third sequence has no keys: a weighted sum over no values
    assert stats.snapshot()["exact"] == {"kernel off": 1, "empty input": 1}


@needs_kernels
def test_varlen_causal_with_equal_lengths_per_sequence():
    q, k, v, cu_q, cu_k = packed([33, 80], [33, 80], seed=1)
    out = sageattn_varlen(q, k, v, cu_q, cu_k, 80, 80, is_causal=True, sm_scale=0.2, kernel="int8_fp16")
    ref = exact_per_sequence(q, k, v, cu_q.tolist(), cu_k.tolist(), is_causal=True, scale=0.2)
    assert attention_error(out, ref)["cosine"] >= 0.9999


@needs_kernels
def test_varlen_of_one_length_runs_as_one_batched_call_with_the_same_bits():
    q, k, v, cu_q, cu_k = packed([48, 48, 48], [40, 40, 40], seed=2)
    stats = DispatchStats()
    out = sageattn_varlen(q, k, v, cu_q, cu_k, 48, 40, kernel="int8_fp16", stats=stats)
    assert stats.total == 1  # one call for the three sequences
    for i in range(3):  # each sequence's own call (its own K mean) gives the same bits as its slice of the batch
        alone = sageattn(q[48 * i:48 * (i + 1)].unsqueeze(0), k[40 * i:40 * (i + 1)].unsqueeze(0),
                         v[40 * i:40 * (i + 1)].unsqueeze(0), tensor_layout="NHD", kernel="int8_fp16")[0]
        assert torch.equal(out[48 * i:48 * (i + 1)], alone)


@needs_kernels
def test_varlen_smooths_k_per_sequence():
    """K's offset differs per sequence: each sequence's own mean is removed (the official kernel takes one mean over
    the whole packed batch), so smoothing keeps the INT8 product as accurate as for a single sequence."""
    q, k, v, cu_q, cu_k = packed([64, 64, 32], [64, 96, 32], seed=3)
    k[64:160] += 40.0  # the second sequence's keys sit far from the others'
    ref = exact_per_sequence(q, k, v, cu_q.tolist(), cu_k.tolist())
    smoothed = sageattn_varlen(q, k, v, cu_q, cu_k, 64, 96, kernel="int8_fp16")
    plain = sageattn_varlen(q, k, v, cu_q, cu_k, 64, 96, kernel="int8_fp16", smooth_k=False)
    assert attention_error(smoothed, ref)["rel_l1"] < attention_error(plain, ref)["rel_l1"]
    assert attention_error(smoothed, ref)["cosine"] >= 0.9999


def cu(*bounds, dtype=torch.int32):
    return torch.tensor(bounds, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("change,message", [
    (dict(cu_seqlens_q=cu(1, 20, 40)), "cu_seqlens_q must run from 0 to the 40 tokens of q, got 1 to 40"),
    (dict(cu_seqlens_k=cu(0, 30)), "cu_seqlens_k must run from 0 to the 50 tokens of k, got 0 to 30"),
    (dict(cu_seqlens_q=cu(0, 30, 20, 40)), "cu_seqlens_q must never decrease"),
    (dict(cu_seqlens_q=cu(0, 20, 40, dtype=torch.float32)), "cu_seqlens_q must be int32 or int64, got float32"),
    (dict(cu_seqlens_k=cu(0, 25, 50).view(1, 3)), "cu_seqlens_k must be 1-D [batch + 1], got shape (1, 3)"),
    (dict(cu_seqlens_k=[0, 25, 50]), "cu_seqlens_k must be a torch.Tensor, got list"),
    (dict(max_seqlen_q=19), "max_seqlen_q=19 is shorter than the longest sequence in cu_seqlens_q (20)"),
    (dict(max_seqlen_k=25.0), "max_seqlen_k must be an int, got float"),
    (dict(cu_seqlens_k=cu(0, 10, 25, 50)), "the same number of sequences, got 2 and 3"),
    (dict(q="q"), "q must be a torch.Tensor, got str"),
    (dict(attn_mask=None), "sageattn_varlen() takes no attn_mask="),
    (dict(return_lse=True), "sageattn_varlen() takes no return_lse="),
    (dict(qk_quant_gran="per_row"), "qk_quant_gran='per_row'"),
])
def test_varlen_bad_input_names_the_problem(change, message):
    q, k, v, cu_q, cu_k = packed([20, 20], [25, 25])
    call = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=20, max_seqlen_k=25)
    stats = DispatchStats()
    with pytest.raises((ValueError, TypeError)) as raised:
        sageattn_varlen(**dict(call, **change), stats=stats)
    assert message in str(raised.value)
    assert stats.total == 0


@pytest.mark.parametrize("q_shape,k_shape,message", [
    ((40, 2, 64), (50, 2, 32), "head dims differ"),
    ((40, 3, 64), (50, 2, 64), "multiple of k/v heads"),
    ((40, 2, 64, 1), (50, 2, 64), "q must be 3-D ([total tokens, heads, head dim]), got shape (40, 2, 64, 1)"),
])
def test_varlen_checks_the_shapes_before_any_sequence_runs(q_shape, k_shape, message):
    """Ragged sequences run one call each: a shape error must come before the first of them, not after."""
    q, k = torch.randn(q_shape, device=DEVICE), torch.randn(k_shape, device=DEVICE)
    stats = DispatchStats()
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        sageattn_varlen(q, k, k.clone(), cu(0, 15, 40), cu(0, 20, 50), 25, 30, stats=stats)
    assert stats.total == 0


KERNEL_NAMED = [(sageattn_qk_int8_pv_fp16_triton, "int8_fp16"), (sageattn_qk_int8_pv_fp16_cuda, "int8_fp16"),
                (sageattn_qk_int8_pv_fp8_cuda, "int8_fp8"), (sageattn_qk_int8_pv_fp8_cuda_sm90, "int8_fp8")]


@needs_kernels
@pytest.mark.parametrize("function,kernel", KERNEL_NAMED, ids=[f.__name__ for f, _ in KERNEL_NAMED])
def test_kernel_named_entry_points_run_their_kernel(function, kernel):
    q, k, v = qkv(layout="NHD", n=72, nk=56, h=4, hk=2, dtype=torch.bfloat16)
    stats = DispatchStats()
    out, lse = function(q, k, v, "NHD", is_causal=True, sm_scale=0.11, return_lse=True, stats=stats)
    ref = sdpa_ref(q, k, v, "NHD", is_causal=True, scale=0.11)
    cosine, l1 = (0.9999, 0.015) if kernel == "int8_fp16" else (0.999, 0.045)
    error = attention_error(out, ref)
    assert error["cosine"] >= cosine and error["rel_l1"] <= l1, error
    assert out.dtype == q.dtype and lse.shape == (1, 4, 72)
    assert stats.snapshot()["sage"] == {kernel: 1}


@pytest.mark.parametrize("call,message", [
    (lambda q, k, v: sageattn_qk_int8_pv_fp16_cuda(q, k, v, pv_accum_dtype="fp8"),
     "pv_accum_dtype='fp8' is not one of ['fp32', 'fp16', 'fp16+fp32']"),
    (lambda q, k, v: sageattn_qk_int8_pv_fp8_cuda(q, k, v, pv_accum_dtype="fp16"),
     "pv_accum_dtype='fp16' is not one of ['fp32', 'fp32+fp32', 'fp32+fp16']"),
    (lambda q, k, v: sageattn_qk_int8_pv_fp16_triton(q, k, v, quantization_backend="numpy"),
     "quantization_backend='numpy' is not one of ['triton', 'cuda']"),
    (lambda q, k, v: sageattn_qk_int8_pv_fp8_cuda_sm90(q, k, v, kernel="int8_fp16"),
     "kernel= cannot be given here: this entry point always runs int8_fp8"),
    (lambda q, k, v: sageattn_qk_int8_pv_fp8_cuda(q, k, v, qk_quant_gran="per_row"), "qk_quant_gran='per_row'"),
    (lambda q, k, v: sageattn_qk_int8_pv_fp16_cuda(q[0], k, v), "q must be 4-D"),
])
def test_kernel_named_bad_input_names_the_problem(call, message):
    q, k, v = qkv()
    with pytest.raises((ValueError, TypeError)) as raised:
        call(q, k, v)
    assert message in str(raised.value)
