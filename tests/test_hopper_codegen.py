"""The Hopper Gluon kernels' code generation, checked without a GPU: every configuration autotuning may pick compiles
for sm90 with the installed Triton, does not spill in its main loop, (ping-pong) waits at no more than two barriers
per key tile, and (ping-pong with turns only) issues Q·Kᵀ with Q's codes in registers. The kernels that take P's row
sums on the tensor cores (ping-pong, and accumulating in place) wait for the scores with P·V and the row sums still
in flight and have no FADD per score; the one-warpgroup two-level kernel, which sums in its softmax, keeps its
exponentials between the wait for the scores and the wait for P·V. ptxas serialising the wgmma, hoisting a wait,
spilling in the loop or a row sum back in the softmax would each make the kernel slower without changing a single
output value, so no other test would notice. (Replacing the always-taken branch before the two-level kernel's P·V
wait with `if True:` makes this test fail: ptxas then hoists the wait.) With the row sums on the tensor cores ptxas
places the P·V wait before the exponentials (the softmax no longer ends in a sum that the wait could depend on),
measured faster all the same (bench/NOTES.md, "Row sums on the tensor cores"). Each compilation runs in its own
process: the Triton interpreter, active in the rest of the suite, patches the language that the compiler would
otherwise see."""
import re

import bench_script
import pytest

from sage_attention_pack.kernels import hopper_launch, tuning

pytestmark = pytest.mark.skipif(not hopper_launch.AVAILABLE,
                                reason="this Triton has no Gluon Hopper API: the Gluon kernels never run with it")

CANDIDATES = [c for c in tuning.candidates(128, None, "sm90") if c.pipelined]
# (configuration, head dim, P·V): every candidate at both head dims and P·V precisions, and those offered at head
# dim 64 alone with FP8 P·V only (three consumer warpgroups: hopper_launch.serves); the capped one-warpgroup keys
# are the next test's
COMPILED = [(c, d, pv) for c in CANDIDATES for d in (64, 128) for pv in ("fp8", "fp16")] + [
    (c, 64, "fp8") for c in tuning.candidates(64, None, "sm90")
    if c.pipelined and not c.max_registers and c not in CANDIDATES]


def sass_report(config, head_dim, pv="fp8") -> dict:
    """inspect_sass's JSON summary of the kernel a launch key compiles to, for sm90 (pv fp16: P·V on a BF16 V)."""
    return bench_script.json_report("inspect_sass", "--config", config.key(), "--d", str(head_dim), "--pv", pv,
                                    "--json")


@pytest.mark.parametrize("config,head_dim,pv", COMPILED, ids=[f"{c.key()}-d{d}-{pv}" for c, d, pv in COMPILED])
def test_gluon_kernel_sums_rows_on_tensor_cores_and_does_not_spill(config, head_dim, pv):
    """pv fp16: the call's BF16 V in P·V, always accumulated in place (two-level keys compile the same kernel),
    P cast to BF16 after P·V's wait: cast while a wgmma was in flight, ptxas serialised every wgmma."""
    report = sass_report(config, head_dim, pv)
    assert "serialized" not in report["resources"], report
    assert report["loop_instructions"], "no loop issuing wgmma found"
    # every sm90 instruction is 16 bytes: the loop's span holds exactly the instructions counted in it
    assert report["loop_bytes"] == 16 * report["loop_instructions"] < report["code_bytes"], report
    assert not report["loop_spills"], report
    assert report["second_wait"].endswith("0x0"), report
    if config.ping_pong or config.pv_direct or pv == "fp16":
        # the scores' wait leaves P·V and the row sums running; the row sums: one m64n8 product per 32 bytes of
        # keys' P (32 FP8 or 16 BF16 keys), and no FADD per score (a thread holds block_n / 2 of them)
        assert report["first_wait"].endswith("0x2"), report
        assert report["row_sum_mmas"] == config.block_n // (32 if pv == "fp8" else 16), report
        assert report["loop_fadds"] < config.block_n // 8, report
    else:
        # the one-warpgroup two-level kernel sums in its softmax: one exp2 per score of a thread's share of the
        # tile between the wait for the scores (P·V running) and the wait for P·V
        assert report["first_wait"].endswith("0x1"), report
        assert report["row_sum_mmas"] == 0, report
        assert report["exp2_between_waits"] >= config.block_m * config.block_n // 128, report
    if config.ping_pong:
        # the consumers hand off on named barriers: per key tile their warps wait at the turn and at most at the
        # one barrier the compiler puts before the tile's mbarrier wait (with mbarrier hand-offs Triton 3.6 made
        # it three: each single-thread arrive got a warpgroup barrier before it)
        assert report["loop_barrier_syncs"] <= 2, report
    # Q's codes: in registers where the warpgroups take turns with FP8 P·V (a shorter turn: Wan2.1 2-4% faster),
    # read by descriptor from shared memory elsewhere (registers measured level or slower there; with FP16 P·V's
    # A operand, twice FP8's registers, Triton 3.9's kernel spilled in its loop)
    turns = config.ping_pong and not config.no_turns
    assert report["scores_a_operand"] == ("registers" if turns and pv == "fp8" else "shared"), report
    # the skipped rescale: one warp vote per key tile, before the branch over the multiplies; none without it
    in_place = not hopper_launch.two_level(config, pv == "fp8")
    assert report["loop_votes"] == (1 if config.lazy_rescale and in_place else 0), report
    check_output_stores(report, config, head_dim, pv)
    assert report["shared"] <= SM90_SHARED_PER_BLOCK, report


SM90_SHARED_PER_BLOCK = 232448  # 227 KB: what one program may take on an H100 or H200


def check_output_stores(report: dict, config, head_dim: int, pv: str) -> None:
    """The BF16 output tile leaves in 16-byte stores (out_store 2: head_dim / 16 a thread and consumer warpgroup) or
    in 4-byte channel pairs (1): never two bytes at a time, as ptxas wrote it from the accumulator's layout in the
    ping-pong kernel's partitions (~3 µs of a Flux program of ~47, docs/performance.md, "The output's store")."""
    stores = report["global_stores"]
    assert "STG.E.U16" not in stores, report
    warpgroups = config.consumers if config.ping_pong else 1
    # each consumer partition has its epilogue, but ptxas may merge identical ones (Triton 3.9's three-consumer
    # kernel shares one between two partitions): a warpgroup's worth at least, and no more than all of them
    if hopper_launch.out_store(config, pv == "fp8") == 2:
        wide = stores.get("STG.E.128", 0)
        assert wide % (head_dim // 16) == 0 and head_dim // 16 <= wide <= warpgroups * head_dim // 16, report
    else:
        assert stores.get("STG.E", 0) >= head_dim // 4 and "STG.E.128" not in stores, report


CAPPED = [c for c in tuning.candidates(64, None, "sm90") if c.pipelined and c.max_registers]


@pytest.mark.parametrize("config", CAPPED, ids=[c.key() for c in CAPPED])
def test_register_cap_reaches_the_one_warpgroup_kernel(config):
    """A launch key's register cap (r168: three 4-warp programs per multiprocessor) is what the launcher passes as
    maxnreg, and compile_for_sm90 compiles it the same way: at head dim 64 the in-place kernel fits the cap
    without a spill in its main loop, with or without the magic seeds (uncapped, ptxas takes 170 registers with
    Triton 3.6 and 179 with 3.9: two programs only; capped, 3.6 spills nothing and 3.9 12 bytes outside the
    loop)."""
    report = sass_report(config, 64)
    registers = int(re.search(r"Used (\d+) registers", report["resources"]).group(1))
    assert registers <= config.max_registers, report
    assert not report["loop_spills"] and "serialized" not in report["resources"], report
    check_output_stores(report, config, 64, "fp8")


# the ping-pong keys autotuning may pick with FP8 P·V, at the head dims hopper_launch.serves gives them
Q_IN_KERNEL = [(c, d) for c in CANDIDATES + [c for c in tuning.candidates(64, None, "sm90") if c.pipelined]
               for d in (64, 128) if c.ping_pong and (c.consumers == 2 or d == 64)]
Q_IN_KERNEL = list(dict.fromkeys(Q_IN_KERNEL))


@pytest.mark.parametrize("config,head_dim", Q_IN_KERNEL, ids=[f"{c.key()}-d{d}" for c, d in Q_IN_KERNEL])
def test_ping_pong_kernel_coding_q_itself_keeps_its_loop(config, head_dim):
    """Coding a BF16 Q inside the ping-pong kernel (hopper_launch.codes_q_in_kernel) adds a prologue to every work
    item and no shared memory but the compiler's scratch for its layout conversions (within 1 KB: Q's tile
    is loaded straight into registers; staged by TMA it took 33 KB more), and its main loop must stay as it was:
    within 1% of its instructions (ptxas schedules the loop a little differently after another prologue), no
    spill, no serialised wgmma, Q·Kᵀ's A operand where it was, as many barrier waits (ptxas spilling a few bytes
    around the prologue's conversions, outside the loop, is allowed)."""
    plain = sass_report(config, head_dim)
    coded = bench_script.json_report("inspect_sass", "--config", config.key(), "--d", str(head_dim), "--json",
                                     "--q-in-kernel")
    assert coded["shared"] <= SM90_SHARED_PER_BLOCK and abs(coded["shared"] - plain["shared"]) <= 1024, (plain, coded)
    assert "serialized" not in coded["resources"] and not coded["loop_spills"], coded
    assert abs(coded["loop_instructions"] - plain["loop_instructions"]) <= plain["loop_instructions"] // 100, \
        (plain, coded)
    assert coded["scores_a_operand"] == plain["scores_a_operand"], coded
    assert coded["loop_barrier_syncs"] == plain["loop_barrier_syncs"], coded
