"""The quantization launches' code generation, checked without a GPU (bench/inspect_sass.py --quant): on sm90 with FP8
P·V each launch fits 4 programs of 4 warps per multiprocessor (at most 128 registers per thread), elsewhere it
compiles within 192, and none spills more than a few bytes. The loops load their next tile before they use this
one, so a tile's registers are live twice: with 32-row statistics steps that took 253 registers, and the
statistics with Q's codes ran at 168 before the loads moved ahead (bench/NOTES.md, "Loads issued ahead"). A change
of tile or of the loops' order that costs occupancy changes no output value, so only this test would notice; nor
does one that makes V's FP8 codes cross shared memory a byte or two at a time again (the last test). Each
compilation runs in its own process, outside the interpreter, once per target and head dim."""
import functools
import re

import bench_script
import pytest


@functools.lru_cache(maxsize=None)
def quant_report(launch: str, head_dim: int, arch: int, pv: str, rope: bool = False, *overrides: str) -> dict:
    """inspect_sass's report of a quantization launch; overrides: launch constants set for it ("NAME=VALUE")."""
    return bench_script.json_report("inspect_sass", "--quant", launch, "--d", str(head_dim), "--arch", str(arch),
                                    "--pv", pv, "--json", *(["--rope"] if rope else []), *overrides)


def registers_and_spills(report: dict) -> tuple[int, int]:
    """A report's registers per thread and bytes of spill stores."""
    registers = int(re.search(r"Used (\d+) registers", report["resources"]).group(1))
    return registers, int(re.search(r"(\d+) bytes spill stores", report["resources"]).group(1))


# (arch, P·V): the H200's FP8 path, measured; Ampere's and Ada's FP16 path, Ada's and Blackwell's FP8 path, compiled
# only (no such GPU was at hand): the kernels must build there, and a blow-up like the 253 registers of 32-row
# statistics steps must not go unnoticed
TARGETS = [(90, "fp8", 128), (90, "fp16", 192), (80, "fp16", 192), (89, "fp8", 192), (100, "fp8", 192),
           (120, "fp8", 192)]


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("launch", ["stats_q", "k_v"])
@pytest.mark.parametrize("arch,pv,max_registers", TARGETS, ids=[f"sm{a}-{pv}" for a, pv, _ in TARGETS])
def test_quantization_launch_fits_its_register_budget(launch, head_dim, arch, pv, max_registers):
    report = quant_report(launch, head_dim, arch, pv)
    registers, spilled = registers_and_spills(report)
    assert registers <= max_registers, report
    # a few bytes of spill are cheap in a kernel bound by DRAM (Triton 3.9's ptxas spills 4 bytes in K's and V's
    # launch at head dim 128, Triton 3.6's none); a tile too large for the registers spills hundreds
    assert spilled <= 16, report
    # the statistics loop (the launch's shortest loop with loads) and the slices' loops are there to be checked
    assert report["load_loops"] and all(loop["loads"] > 0 for loop in report["load_loops"]), report


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("arch", [a for a, pv, _ in TARGETS if pv == "fp8"])
def test_v_codes_cross_shared_memory_in_whole_words(head_dim, arch):
    """V's FP8 codes reach their transposed store through shared memory. quantize_v_tile steers Triton's layouts so
    that they cross it in 4- and 16-byte accesses, where before single bytes or byte pairs were stored (32 STS.U8 or
    STS.U16 per thread; the steering took 2-3% off the quantization on the H200). It changes no output value, so
    only this test would notice if a change of tile or of Triton lost it."""
    accesses = quant_report("k_v", head_dim, arch, "fp8")["shared_accesses"]
    narrow = {op: n for op, n in accesses.items() if re.search(r"\.[US](8|16)\b", op)}
    assert accesses and not narrow, accesses


# With a rotary table (Flux's head dim 128) a slice holds four FP32 tiles: the values, their partners and two
# coefficients. With the table's strides at run time its address arithmetic per element took 255 registers and
# spilled; with 64-row slices, 219 (kernels/rotary.py, launch.slice_rows); with the table read in pe's own layout
# 176 and 152 at 16-row slices, 157 and 110 in the tile's layout, 167 and 164 there at 64-row slices (the ones
# measured fastest). At most 168 keeps three programs of 4 warps on a multiprocessor (65536 / (168 * 128) = 3.05).
ROPE_TARGETS = [(90, "fp8", 168), (90, "fp16", 168), (80, "fp16", 168), (89, "fp8", 168), (120, "fp8", 168)]


@pytest.mark.parametrize("launch", ["stats_q", "k_v"])
@pytest.mark.parametrize("arch,pv,max_registers", ROPE_TARGETS, ids=[f"sm{a}-{pv}" for a, pv, _ in ROPE_TARGETS])
def test_rotating_quantization_compiles_without_spilling(launch, arch, pv, max_registers):
    report = quant_report(launch, 128, arch, pv, rope=True)
    registers, spilled = registers_and_spills(report)
    assert registers <= max_registers and spilled <= 16, report


@pytest.mark.parametrize("launch", ["stats_q", "k_v"])
@pytest.mark.parametrize("arch,pv", [(90, "fp8"), (89, "fp8"), (80, "fp16")], ids=["sm90-fp8", "sm89-fp8", "sm80-fp16"])
def test_rotating_quantization_reads_in_vectors(launch, arch, pv):
    """The rotary table is read in the tile's layout (launch.rope_table) and each channel's partner comes from the
    tile in registers: every global load of the rotating launches is an 8- or 16-byte vector. Read in pe's own
    layout, each channel took two 4-byte gathers and a 2-byte reload of its partner, and the launches were bound in
    L1/TEX on an H100 (bench/NOTES.md, "The rotary hand-off measured"); the outputs are the same bits either way,
    so only this test would notice such loads coming back."""
    loads = quant_report(launch, 128, arch, pv, rope=True)["global_loads"]
    narrow = {op: n for op, n in loads.items() if not re.search(r"\.(64|128)\b", op)}
    assert loads and not narrow, loads


# The carried launch (kernels/carried_stats.py: Q's, K's and V's codes in one launch, with the statistics from the call
# before) holds every role's code, and the sums and ranges it takes for the next call: 128 registers on sm90, as each
# of the two launches it replaces (four programs of 4 warps per multiprocessor), with K's sums in its programs' first
# pass and V on 32 channels a program (launch.CARRY_V_CHANNELS); taken in the coding pass and on 64 channels, 168.
# With the rotary table, as measured (the first call's K mean kept, V on 64 channels), 168 with Triton 3.6 and 174 with
# 3.9. sm100 130 with Triton 3.6, sm120 136. As shipped the launch keeps its site's first K mean (launch.CARRY_K_MEAN
# off) and takes the plain launches' lean forms (launch.LEAN_CARRIED): 126 on sm90, 128 on sm100 without the cap.
CARRIED_TARGETS = [(90, 128, False, 128), (90, 64, False, 128), (90, 128, True, 176), (89, 128, False, 128),
                   (100, 128, False, 136), (120, 128, False, 144)]


@pytest.mark.parametrize("arch,head_dim,rope,max_registers", CARRIED_TARGETS,
                         ids=[f"sm{a}-d{d}{'-rope' if r else ''}" for a, d, r, _ in CARRIED_TARGETS])
def test_the_carried_launch_fits_its_register_budget(arch, head_dim, rope, max_registers):
    report = quant_report("carried", head_dim, arch, "fp8", rope)
    registers, spilled = registers_and_spills(report)
    assert registers <= max_registers and spilled <= 16, report


@pytest.mark.parametrize("arch", [89, 90, 100, 120])
def test_the_carried_launch_takes_the_lean_forms_without_spills(arch):
    """The carried launch without the rotary table that keeps its site's K mean takes K's range pass in BF16 pairs and
    the packed INT8 codes (launch.lean_launch; on an H100 it took the launch at Flux's shape from 78.0 to 65.1 µs), in
    fewer instructions than its full form and without spills, capped at 128 registers but on sm100, where ptxas
    spilled under the cap (launch.UNCAPPED_CARRIED_ARCHS)."""
    lean = quant_report("carried", 128, arch, "fp8")
    full = quant_report("carried", 128, arch, "fp8", False, "LEAN_CARRIED=0")
    assert lean["opcodes"].get("HMNMX2", 0) >= 64 and lean["opcodes"].get("F2IP", 0) >= 32, lean["opcodes"]
    assert not full["opcodes"].get("F2IP"), full["opcodes"]  # (its range pass may take pairs by itself)
    assert lean["instructions"] < full["instructions"]
    registers, spilled = registers_and_spills(lean)
    assert registers <= 128 and spilled == 0, lean["resources"]


# The coding loops' lean forms (launch.RANGE_PASS, launch.INLINE_PTX): a two-pass K group's maximum from its range
# in BF16 pairs (HMNMX2, two elements an instruction) and Q's and K's INT8 codes packed by saturating packs (ptxas's
# F2IP, two codes an instruction). On sm90 they took a K program from 2660 instructions to 1704, and Flux's
# quantization from 76.9 to 67.9 µs on an H100 (bench/NOTES.md, round "K's range pass, …"). The outputs are the same
# bits either way (test_kernels.py), so only this test would notice a compiler that dropped them.
@pytest.mark.parametrize("arch", [89, 90, 100, 120])
def test_the_coding_loops_take_pair_ranges_and_packed_codes(arch):
    k_v = quant_report("k_v", 128, arch, "fp8")
    stats_q = quant_report("stats_q", 128, arch, "fp8")
    plain = quant_report("k_v", 128, arch, "fp8", False, "RANGE_PASS=0", "INLINE_PTX=0")
    assert k_v["opcodes"].get("HMNMX2", 0) >= 64 and k_v["opcodes"].get("F2IP", 0) >= 32, k_v["opcodes"]
    assert stats_q["opcodes"].get("F2IP", 0) >= 16, stats_q["opcodes"]
    assert not plain["opcodes"].get("HMNMX2") and not plain["opcodes"].get("F2IP"), plain["opcodes"]


# The INT8 rounding's ±0.5 from the coded value's own sign (launch.SIGN_FROM_X, quant_kernels.int8_codes): the scaled
# value is then only the FMA's, about one instruction fewer per coded element (64 of a Q program's thread and 128 of
# a K program's on sm90; Triton 3.9's ptxas saves 56 of Q's on sm89 and sm120), in the launches the 128-register cap
# holds, without spills. The same bits either way (test_kernels.py).
@pytest.mark.parametrize("arch", [89, 90, 100, 120])
def test_the_rounding_takes_its_sign_from_the_coded_value(arch):
    for launch, fewer in (("stats_q", 48), ("k_v", 96)):
        lean = quant_report(launch, 128, arch, "fp8")
        plain = quant_report(launch, 128, arch, "fp8", False, "SIGN_FROM_X=0")
        assert lean["instructions"] <= plain["instructions"] - fewer, (launch, lean["instructions"],
                                                                       plain["instructions"])
        registers, spilled = registers_and_spills(lean)
        assert registers <= 128 and spilled == 0, lean["resources"]
