"""The Hopper Gluon kernels' code generation, checked without a GPU: every configuration autotuning may pick
compiles for sm90 with the installed Triton, spills nothing, and keeps its softmax between the wait for the
scores and the wait for P·V. ptxas serialising the wgmma, hoisting a wait or spilling in the loop would each make
the kernel slower without changing a single output value, so no other test would notice. (Replacing the
always-taken branch before the P·V wait with `if True:` makes this test fail: ptxas then hoists the wait.)"""
import importlib.util
from pathlib import Path

import pytest

from sage_attention_pack.kernels import hopper_launch, tuning

pytestmark = pytest.mark.skipif(not hopper_launch.AVAILABLE,
                                reason="this Triton has no Gluon Hopper API: the Gluon kernels never run with it")


def inspect_tool():
    path = Path(__file__).resolve().parent.parent / "bench" / "inspect_sass.py"
    spec = importlib.util.spec_from_file_location("inspect_sass", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CANDIDATES = [c for c in tuning.candidates(128, None, "sm90") if c.pipelined]


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("config", CANDIDATES, ids=[c.key() for c in CANDIDATES])
def test_gluon_kernel_overlaps_softmax_with_pv_and_does_not_spill(config, head_dim):
    tool = inspect_tool()
    kernel = hopper_launch.compile_for_sm90(config, head_dim)
    report = tool.resource_report(kernel, 90)
    assert "serialized" not in report, report
    sass = tool.sass_of(kernel)
    assert sass, "no SASS: cuobjdump missing from this Triton"
    loop = tool.main_loop(sass)
    assert loop, "no loop issuing wgmma found"
    opcodes = [line.split()[0] for line in loop]
    assert not any(op.startswith(("STL", "LDL")) for op in opcodes), "the main loop spills to local memory"
    # the scores' wait leaves P·V in flight (≤ 1 group outstanding); the softmax's exp2s come before the wait
    # for P·V (0 outstanding): one per score of a thread's share of the tile
    first = next(i for i, line in enumerate(loop) if line.startswith("WARPGROUP.DEPBAR") and line.endswith("0x1"))
    second = next(i for i, line in enumerate(loop) if i > first and line.startswith("WARPGROUP.DEPBAR"))
    assert loop[second].endswith("0x0")
    exp2s = sum(op.startswith("MUFU.EX2") for op in opcodes[first:second])
    assert exp2s >= config.block_m * config.block_n // 128, (exp2s, config.key())
