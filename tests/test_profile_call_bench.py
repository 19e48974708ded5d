"""bench/profile_call.py: the calls it makes for a profiler run the configuration it is given, their output is
attention's, and bad input is refused before any call."""
import pytest
import torch

import bench_script

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="the CPU shapes run through Triton's interpreter; a GPU machine runs GPU shapes")


def profile_call():
    return bench_script.load("profile_call")


def test_calls_run_the_given_configuration_and_compute_attention():
    report = profile_call().profile_calls("tiny_d64", "m64n64w4s1pd", calls=2)
    assert report["config"] == "m64n64w4s1pd" and report["calls"] == 2
    assert (report["B"], report["H"], report["N"], report["D"]) == (1, 2, 160, 64)
    assert report["served_by"] == "portable_triton"  # no Hopper GPU here
    assert report["cosine"] > 0.999 and report["rel_l1"] < 0.05, report


@pytest.mark.parametrize("args, message", [
    (("no_such_shape", "m64n64w4s1pd"), "unknown shape 'no_such_shape'"),
    (("tiny_d64", "m64x"), "not a launch configuration key"),
    (("tiny_d64", "m64n64w4s1pd", 0), "calls must be at least 1"),
])
def test_bad_input_is_refused_by_name(args, message):
    with pytest.raises(ValueError, match=message):
        profile_call().profile_calls(*args)
