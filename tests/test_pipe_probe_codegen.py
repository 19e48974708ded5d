"""bench/pipe_probe.py measures what it names: compiled for sm90 without a GPU, each case's loop step is exactly its
operations, one MUFU.EX2 per exponential, one F2FP and one PRMT per conversion, one FMUL per multiply, for each of a
thread's 8 elements per chain, and nothing else of those kinds (a compiler that folded a chain or merged the
conversions would make the probe's timings mean something else). Compiled in its own process, outside the
interpreter that the rest of the suite may run."""
from pathlib import Path

import bench_script
import pytest

triton = pytest.importorskip("triton")
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
pytestmark = pytest.mark.skipif(not (BIN / "cuobjdump").exists(),
                                reason="this Triton has no NVIDIA backend binaries (cuobjdump): nothing to compile to")


def test_each_case_compiles_to_its_operations_alone():
    pipe_probe = bench_script.load("pipe_probe")
    mixes = bench_script.json_report("pipe_probe", "--sass", "--json")
    assert set(mixes) == set(pipe_probe.CASES)
    for case, (a, b, kind_a, kind_b) in pipe_probe.CASES.items():
        per_kind = {"ex2": 0, "cvt": 0, "fmul": 0}
        per_kind[kind_a] += a * pipe_probe.PER_THREAD
        per_kind[kind_b] += b * pipe_probe.PER_THREAD
        mix = mixes[case]
        count = lambda prefix: sum(n for op, n in mix.items() if op.startswith(prefix))  # noqa: E731
        assert count("MUFU.EX2") == per_kind["ex2"], (case, mix)
        assert count("F2FP") == per_kind["cvt"] and count("PRMT") == per_kind["cvt"], (case, mix)
        assert count("FMUL") == per_kind["fmul"], (case, mix)
