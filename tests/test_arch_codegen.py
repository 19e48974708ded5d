"""The portable attention kernel's own configuration for every architecture family it ships one for
(kernels/tuning.ARCH_TABLE: Ampere sm80/sm86, Ada sm89, Hopper sm90, Blackwell sm100/sm120; FP16 and, from Ada on,
FP8 P·V; head dims 64/128/256) compiles for that architecture with the installed Triton, without a GPU: within its
shared memory per block, and spilling at most a few bytes; and so does the exact repair of flagged tiles that runs
after it. No Ampere, Ada or Blackwell GPU was at hand to measure on (bench/NOTES.md), so this is what keeps a change
of the kernel or of a table entry from breaking those cards unnoticed. Each compilation runs in its own process,
outside the interpreter that the rest of the suite may run."""
import re
from pathlib import Path

import bench_script
import pytest

from sage_attention_pack.kernels import tuning

triton = pytest.importorskip("triton")
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
pytestmark = pytest.mark.skipif(not (BIN / "cuobjdump").exists(),
                                reason="this Triton has no NVIDIA backend binaries (cuobjdump): nothing to compile to")

# the most dynamic shared memory one block may opt into, per family (CUDA's table by compute capability)
SHARED_PER_BLOCK = {"sm80": 166912, "sm86": 101376, "sm89": 101376, "sm90": 232448, "sm100": 232448,
                    "sm120": 101376}
# at most this much spilled: Triton 3.9 spills 28 bytes outside the loop for sm120, FP16 P·V, head dim 64
MAX_SPILL_BYTES = 64
CASES = [(family, pv, d, cfg) for (family, pv), table in tuning.ARCH_TABLE.items() for d, cfg in table.items()]


@pytest.mark.parametrize("family,pv,head_dim,config", CASES,
                         ids=[f"{f}-{pv}-d{d}-{c.key()}" for f, pv, d, c in CASES])
def test_table_configuration_compiles_for_its_architecture(family, pv, head_dim, config):
    # the table's entries convert the scores with I2F (no magic seeds), as the launcher runs them
    assert not config.magic_convert and not config.pipelined
    report = bench_script.json_report("inspect_sass", "--arch", family[2:], "--pv", pv, "--d", str(head_dim),
                                      "--m", str(config.block_m), "--n", str(config.block_n),
                                      "--warps", str(config.num_warps), "--stages", str(config.num_stages), "--i2f",
                                      *(["--fp16-tiles"] if config.fp16_tiles else []), "--json")
    spilled = re.search(r"(\d+) bytes spill stores", report["resources"])
    assert spilled and int(spilled.group(1)) <= MAX_SPILL_BYTES, report["resources"]
    assert report["shared"] <= SHARED_PER_BLOCK[family], report
    # FP16 tiles (Ada, consumer Blackwell): P·V's products are FP8 into an FP16 accumulator, none into FP32
    fp8_products = {op for op in report["tensor_core_ops"] if op.startswith("QMMA")}
    if config.fp16_tiles:
        assert fp8_products == {"QMMA.16832.F16.E4M3.E4M3"}, report["tensor_core_ops"]
    elif family in tuning.FP16_TILE_FAMILIES and pv == "fp8":
        assert fp8_products == {"QMMA.16832.F32.E4M3.E4M3"}, report["tensor_core_ops"]


# the repair depends on the query tile and the head dim, not on P·V's precision
REPAIR_CASES = sorted({(family, cfg.block_m, d) for family, _, d, cfg in CASES})


@pytest.mark.parametrize("family,block_m,head_dim", REPAIR_CASES, ids=[f"{f}-m{m}-d{d}" for f, m, d in REPAIR_CASES])
def test_repair_after_table_configuration_fits_shared_memory(family, block_m, head_dim):
    """The exact repair runs after every call (a program with a clean tile returns at once): if it cannot launch
    on a card, no call of that kind is served. With 32 keys a step it took ~105 KB at head dim 256, over consumer
    Ampere's, Ada's and Blackwell's 99 KB; the launcher takes 16 keys (launch.REPAIR_KEYS)."""
    report = bench_script.json_report("inspect_sass", "--repair", "--arch", family[2:], "--m", str(block_m),
                                      "--d", str(head_dim), "--json")
    assert report["shared"] <= SHARED_PER_BLOCK[family], report


@pytest.mark.parametrize("arch,block_m,head_dim", [(90, 64, 128), (90, 128, 128), (90, 64, 64), (89, 64, 128),
                                                    (80, 128, 128), (120, 64, 128)])
def test_the_repair_keeps_its_fp32_rows_in_registers(arch, block_m, head_dim):
    """The repair recomputes a flagged tile launch.REPAIR_ROWS rows at a time: with the whole 64-row tile at head
    dim 128 ptxas fell back to 32 registers and a 12.5 KB stack per thread on sm90 (17 KB of spill stores). Without
    a rotary table it now spills at most a few bytes on every family."""
    report = bench_script.json_report("inspect_sass", "--repair", "--arch", str(arch), "--m", str(block_m),
                                      "--d", str(head_dim), "--json")
    spilled = int(re.search(r"(\d+) bytes spill stores", report["resources"]).group(1))
    assert spilled <= 64, report


def test_every_family_from_ampere_on_has_a_table_entry_and_turing_is_refused():
    """Every family arch_family names from Ampere on has its own FP16 configuration (and FP8 from Ada on); older
    GPUs are refused before any table is read (Triton does not compile the INT8 product for Turing)."""
    from sage_attention_pack.sage_core import backend

    families = {tuning.arch_family(cap) for cap in [(8, 0), (8, 6), (8, 7), (8, 9), (9, 0), (10, 0), (12, 0)]}
    assert families == set(SHARED_PER_BLOCK)
    for family in families:
        assert (family, "fp16") in tuning.ARCH_TABLE
        if family not in ("sm80", "sm86"):
            assert (family, "fp8") in tuning.ARCH_TABLE
    assert backend.MIN_CAPABILITY == (8, 0) and tuning.arch_family((7, 5)) not in families
