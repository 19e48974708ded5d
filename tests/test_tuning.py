"""Launch configurations: keys, the candidates autotuning tries per architecture, and which calls the Hopper
Gluon kernel serves. No GPU needed."""
import dataclasses
import os

import pytest
import torch

from sage_attention_pack.kernels import hopper_launch, tuning


@pytest.mark.parametrize("key", ["m64n128w4s3", "m128n64w8s2r168mc", "m64n128w4s3mcpdgp", "m64n128w4s4mcpdgppp",
                                 "m64n128w4s4mcpdgpppps", "m64n128w4s4mcpdgpppnt", "m128n64w8s2ft"])
def test_key_round_trip(key):
    assert tuning.LaunchConfig.from_key(key).key() == key


@pytest.mark.parametrize("family", tuning.FP16_TILE_FAMILIES)
def test_ada_and_consumer_blackwell_run_fp8_pv_with_fp16_tiles_and_autotuning_tries_both(family):
    """Where mma.sync has FP8 operands into an FP16 accumulator, the table's FP8 entries take it (SageAttention2++'s
    accumulation, the official kernels' default there), a pinned Q block keeps it, FP16 P·V never has it, and
    autotuning times the tile with it and without; the two accumulations exclude each other."""
    for d in (64, 128, 256):
        assert tuning.default_config(family, "fp8", d).fp16_tiles
        assert tuning.default_config(family, "fp8", d, block_m=64).fp16_tiles
        assert not tuning.default_config(family, "fp16", d).fp16_tiles
    table = tuning.default_config(family, "fp8", 128)
    flips = tuning.flag_flips(table, True, family)
    assert dataclasses.replace(table, fp16_tiles=False) in flips
    assert dataclasses.replace(table, pv_direct=True, fp16_tiles=False) in flips
    plain = tuning.LaunchConfig(64, 64, 4, 2)
    assert dataclasses.replace(plain, fp16_tiles=True) in tuning.flag_flips(plain, True, family)
    assert not any(c.fp16_tiles for c in tuning.flag_flips(plain, False, family))  # FP16 P·V: no such flag


def test_fp16_tiles_stay_where_the_instruction_is():
    """Other families keep FP32 tiles: Ampere has no FP8, Hopper's Gluon kernels have FP16 tiles of their own
    (two-level without pd) and its portable kernel no FP16 tile flag in the table, data-centre Blackwell none."""
    for family in ("sm80", "sm86", "sm90", "sm100"):
        for pv in ("fp16", "fp8"):
            assert not tuning.default_config(family, pv, 128).fp16_tiles
        assert not any(c.fp16_tiles for c in tuning.flag_flips(tuning.default_config(family, "fp8", 128), True,
                                                                family))


def test_bad_key_names_the_problem():
    with pytest.raises(ValueError, match="m64x"):
        tuning.LaunchConfig.from_key("m64x")


def test_hopper_candidates_only_on_sm90_for_served_head_dims():
    hopper = [c for c in tuning.candidates(128, None, "sm90") if c.pipelined]
    assert {c.key() for c in hopper} >= {"m64n128w4s3mcgp", "m64n128w4s3mcpdgp", "m64n128w4s4mcgppp",
                                         "m64n128w4s4mcpdgppp", "m64n128w4s4mcpdgpppps", "m64n128w4s4mcpdgpppnt"}
    assert all(c.ping_pong for c in hopper if c.persistent or c.no_turns)
    assert all(c.block_m == hopper_launch.WARPGROUP_ROWS and c.num_warps == 4 for c in hopper)
    # at head dim 64 also one warpgroup capped for three programs per multiprocessor (measured ahead there), with
    # two stages too (FP16 P·V's larger V tiles fit three programs' shared memory so)
    capped = {c.key() for c in tuning.candidates(64, None, "sm90") if c.pipelined and c.max_registers}
    assert capped == {"m64n128w4s3r168mcpdgp", "m64n128w4s3r168pdgp", "m64n128w4s2r168mcpdgp", "m64n128w4s2r168pdgp"}
    assert not any(c.max_registers for c in hopper)
    assert not any(c.pipelined for c in tuning.candidates(128, None, "sm89"))
    assert not any(c.pipelined for c in tuning.candidates(256, None, "sm90"))
    assert not any(c.pipelined for c in tuning.candidates(128, 128, "sm90"))  # a pinned Q block


def test_shipped_table_loads_and_its_in_place_entries_are_the_measured_ones():
    """Every shipped entry is a valid configuration. FP8 P·V accumulated in place (always with V smoothing, see
    launch.sage_forward) is shipped only where it was measured within the FP8 bound: head dim 128 at 8k (Flux's
    4608 tokens), 16k, 32k and 128k tokens on the H200, in the ping-pong kernel (without its turns except at
    Wan2.1's 32k, where only the turns measured faster), and at 2k in the one-warpgroup kernel; head dim 64 at 4k
    (SDXL's 4096) in the one-warpgroup kernel capped at 168 registers (bench/results/h200_fp8_gluon_short_ab.json),
    at 8k and 16k in the ping-pong kernel with three consumer warpgroups and no turns
    (bench/results/h200_d64_three_consumers_ab.json). At 32k and 128k tokens and head dim 128 a warp skips the
    accumulator's rescale when none of its rows moved its max (bench/results/h200_lazy_rescale_d128_ab.json), and
    with FP16 P·V at 16k and 32k (h200_lazy_rescale_fp16_ab.json).
    FP16 P·V runs the Hopper kernels where they measured ahead
    of the portable kernel (bench/results/h200_fp16_pv_ab.json): head dim 64 at 8k and 16k tokens (one
    warpgroup, two stages), head dim 128 at 2k to 32k (ping-pong); at SDXL's 4096 tokens and head dim 64 the
    portable kernel stays. The H100 ships the same entries: there they measured ahead of the portable tiles its
    earlier table held at every shape compared (bench/results/h100_launch_table_ab.json), except FP8 P·V at head
    dim 128 from 4097 to 8192 keys, where it skips small rescales as at 128k
    (bench/results/h100_ping_pong_variants_flux_bucket.json)."""
    table = tuning.shipped_table("NVIDIA H200", "launch")
    h100 = tuning.shipped_table("NVIDIA H100 80GB HBM3", "launch")
    flux_bucket = "fp8|d128|many|nq8192|nk8192|bfloat16|full"
    assert tuning.LaunchConfig(**h100.pop(flux_bucket)).key() == "m64n128w4s4mcpdgpppntlr"
    assert table and h100 == {key: value for key, value in table.items() if key != flux_bucket}
    in_place, fp16_hopper = {}, {}
    for key, value in table.items():
        config = tuning.LaunchConfig(**value)
        assert tuning.LaunchConfig.from_key(config.key()) == config
        if key.startswith("fp8") and config.pv_direct:
            in_place[key] = config.key()
        if key.startswith("fp16") and config.pipelined:
            fp16_hopper[key] = config.key()
    assert fp16_hopper == {"fp16|d64|many|nq8192|nk8192|bfloat16|full": "m64n128w4s2r168mcpdgp",
                           "fp16|d64|many|nq16384|nk16384|bfloat16|full": "m64n128w4s2r168pdgp",
                           **{f"fp16|d128|many|nq{n}|nk{n}|bfloat16|full": "m64n128w4s4mcpdgppp"
                              for n in (2048, 8192)},
                           "fp16|d128|many|nq16384|nk16384|bfloat16|full": "m64n128w4s4mcpdgppplr",
                           "fp16|d128|many|nq32768|nk32768|bfloat16|full": "m64n128w4s3mcpdgppplr"}
    assert in_place == {**{f"fp8|d128|many|nq{n}|nk{n}|bfloat16|full": "m64n128w4s4mcpdgpppnt"
                           for n in (8192, 16384)},
                        "fp8|d128|many|nq131072|nk131072|bfloat16|full": "m64n128w4s4mcpdgpppntlr",
                        "fp8|d128|many|nq32768|nk32768|bfloat16|full": "m64n128w4s4mcpdgppplr",
                        "fp8|d128|many|nq2048|nk2048|bfloat16|full": "m64n128w4s3mcpdgp",
                        "fp8|d64|many|nq4096|nk4096|bfloat16|full": "m64n128w4s3r168pdgp",
                        **{f"fp8|d64|many|nq{n}|nk{n}|bfloat16|full": "m64n128w4s4pdgpppntc3" for n in (8192, 16384)}}


def test_a_hopper_gpu_without_a_table_takes_the_h100s_launch_entries_and_no_auto_choices():
    """An H100 PCIe, an H800 or a GH200 ships no table of its own: its launch entries are the H100's (the Hopper
    kernels; the arch table's portable tiles lost to them at every shape on the H100), its `auto` section stays
    empty (auto measures on first use: the choice weighs SDPA's speed on that card). Other families without a
    table keep the arch table."""
    h100 = tuning.shipped_table("NVIDIA H100 80GB HBM3", "launch")
    assert h100 and all(tuning.LaunchConfig(**v).pipelined for k, v in h100.items() if "|d128|" in k)
    for name in ("NVIDIA H100 PCIe", "NVIDIA H800", "NVIDIA GH200 480GB"):
        assert tuning.shipped_table(name, "launch", "sm90") == h100, name
        assert tuning.shipped_table(name, "auto", "sm90") == {}, name
    assert tuning.shipped_table("NVIDIA H100 PCIe", "launch") == {}
    assert tuning.shipped_table("NVIDIA GeForce RTX 4090", "launch", "sm89") == {}
    assert tuning.shipped_table("NVIDIA H200", "launch", "sm90") == tuning.shipped_table("NVIDIA H200", "launch")


def test_the_startup_line_says_whose_measured_table_serves():
    """The pack's startup line (and the main job's) names the tuning that serves: this GPU model's own table, its
    family's reference GPU's, or the arch defaults with the command that measures this GPU."""
    from sage_attention_pack.sage_core.selfcheck import tuning_line

    assert tuning_line("NVIDIA H200", "sm90") == "sm90 tuning, measured on this GPU model"
    assert tuning_line("NVIDIA H800", "sm90") == "sm90 tuning, measured on the NVIDIA H100 80GB HBM3"
    assert tuning.launch_table_source("NVIDIA H800", "sm90") == "NVIDIA H100 80GB HBM3"
    assert tuning.launch_table_source("NVIDIA GeForce RTX 4090", "sm89") is None
    line = tuning_line("NVIDIA GeForce RTX 4090", "sm89")
    assert line.startswith("sm89 tuning, defaults") and "python -m sage_attention_pack tune" in line


def test_auto_keys_tell_batch_heads_apart_and_the_shipped_ones_are_in_that_form():
    """One length bucket, two answers: at 8k tokens, Flux's 24 heads (a short call, where SDPA can win) and 64
    batch·heads (the FP8 kernel's case) must not share an `auto` entry. Every shipped entry is a key choice_key
    gives, so that the table is found."""
    from sage_attention_pack.sage_core import autoselect
    from sage_attention_pack.sage_core.config import SageConfig

    def key(b, h, n, d):
        q = torch.empty(b, h, n, d, dtype=torch.bfloat16)
        return autoselect.choice_key(q, q, False, False, SageConfig())

    flux, sweep = key(1, 24, 4608, 128), key(2, 32, 8192, 128)
    assert flux != sweep and "|bh32|" in flux and "|bh64|" in sweep
    assert key(1, 40, 32760, 128) == key(2, 32, 32768, 128)  # 40 and 64 batch·heads share a bucket
    for gpu in ("NVIDIA H200", "NVIDIA H100 80GB HBM3"):
        table = tuning.shipped_table(gpu, "auto")
        # measured at Flux's shape: the FP8 kernel won on the H200 once the output shift took one launch (bench/
        # NOTES.md, round "Chained launches, and the output shift in one launch"), on the H100 once its table
        # took the Hopper kernels (round "The H100 on the Hopper kernels")
        assert table[flux]["variant"] == "int8_fp8"
        for shipped in table:
            # every entry is what auto decides from its own timings: the fastest of them
            assert table[shipped]["variant"] == min(table[shipped]["ms"], key=table[shipped]["ms"].get), shipped
            d, bh, nq, nk = (int(part[2:] if part.startswith(("bh", "nq", "nk")) else part[1:])
                             for part in shipped.split("|")[:4])
            assert shipped == key(bh, 1, nq, d).replace(f"|nk{nq}|", f"|nk{nk}|"), shipped


def test_fp16_pv_reads_the_callers_v_in_the_layouts_tma_takes():
    """FP16 P·V on the Hopper kernel reads the call's V by TMA as it lies (hopper_launch.v_tiles): HND, NHD
    (ComfyUI's), a fused QKV projection's slice, keys sliced from a longer buffer, one batch or head whatever its
    stride; not FP32 V, not a head dim the kernel pads, not channels strided, not rows off 16 bytes."""
    b, h, n, d = 2, 3, 40, 64
    v = torch.randn(b, h, n, d, dtype=torch.bfloat16)
    fused = torch.randn(b, n, 3, h, d, dtype=torch.float16)
    good = {"HND": v, "NHD": v.transpose(1, 2).contiguous().transpose(1, 2), "fused": fused[:, :, 2].transpose(1, 2),
            "sliced keys": torch.cat([v, v], dim=2)[:, :, :n], "one batch": v[:1].transpose(0, 1)[:, :1]}
    for name, t in good.items():
        assert hopper_launch.v_tiles(t, d), name
    bad = {"fp32": v.float(), "padded head dim": v[..., :48], "strided channels": v.transpose(2, 3).contiguous()
           .transpose(2, 3), "rows off 16 bytes": torch.randn(b, h, n, d + 1, dtype=torch.bfloat16)[..., :d],
           "start off 16 bytes": torch.randn(b * h * n * d + 1, dtype=torch.bfloat16)[1:].view(b, h, n, d)}
    for name, t in bad.items():
        assert not hopper_launch.v_tiles(t, d), name


def test_output_store_follows_the_configuration_and_what_the_output_allows():
    """How the Hopper kernels write their output tile (hopper_launch.out_store): 16-byte stores through shared
    memory, channel pairs with three consumer warpgroups and in the one-warpgroup kernel with FP16 P·V, and
    element by element wherever the output is not 16-bit with contiguous channels and 16-byte aligned rows (the
    vector stores' hints would otherwise promise the compiler what is not so)."""
    two, three, one = (tuning.LaunchConfig.from_key(k) for k in
                       ("m64n128w4s4mcpdgpppnt", "m64n128w4s4pdgpppntc3", "m64n128w4s3r168pdgp"))
    assert [hopper_launch.out_store(c, True) for c in (two, three, one)] == [2, 1, 2]
    assert [hopper_launch.out_store(c, False) for c in (two, three, one)] == [2, 1, 1]
    b, h, n, d = 2, 3, 40, 64
    out = torch.empty(b, h, n, d, dtype=torch.bfloat16)
    good = {"HND": out, "NHD view": torch.empty(b, n, h, d, dtype=torch.float16).transpose(1, 2),
            "rows of a longer buffer": torch.empty(b, h, n + 5, d, dtype=torch.bfloat16)[:, :, :n],
            "one batch, any stride": torch.empty(h, 1, n, d, dtype=torch.bfloat16).transpose(0, 1)}
    for name, t in good.items():
        assert hopper_launch.out_store(two, True, t) == 2, name
    bad = {"fp32": out.float(), "strided channels": torch.empty(b, h, n, 2 * d, dtype=torch.bfloat16)[..., ::2],
           "rows off 16 bytes": torch.empty(b, h, n, d + 1, dtype=torch.bfloat16)[..., :d],
           "start off 16 bytes": torch.empty(b * h * n * d + 1, dtype=torch.bfloat16)[1:].view(b, h, n, d)}
    for name, t in bad.items():
        assert hopper_launch.out_store(two, True, t) == 0 and hopper_launch.out_store(three, True, t) == 0, name


@pytest.mark.skipif(not hopper_launch.AVAILABLE, reason="this Triton has no Gluon Hopper API")
def test_fp16_pv_descriptor_covers_the_callers_v_head_by_head():
    """The 4-D TMA descriptor of the call's V (hopper_launch.v_descriptor): V's own shape and strides, so that each
    head's keys end at the descriptor's bound (a ragged last tile reads zeros past them), a valid 16-byte stride for
    a dimension of size 1, one head's key tile per load, and the 128-byte swizzle of the ring's 2-D slots."""
    config = tuning.LaunchConfig.from_key("m64n128w4s4mcpdgppp")
    v = torch.randn(1, 200, 3, 128, dtype=torch.bfloat16).transpose(1, 2)  # NHD, one batch
    desc = hopper_launch.v_descriptor(v, config)
    assert list(desc.shape) == [1, 3, 200, 128]
    assert list(desc.strides) == [8, 128, 384, 1]
    assert list(desc.block_shape) == [1, 1, config.block_n, 128]
    assert desc.layout.swizzle_byte_width == 128 and desc.layout.element_bitwidth == 16 and desc.layout.rank == 4


def test_hopper_kernel_declines_what_it_does_not_serve(monkeypatch):
    """Every unserved case runs the portable kernel: the CPU, FP16 P·V on a V that TMA cannot read as it is
    (v_tiles), causal, masks, head dims other than 64/128, K scales finer than a tile, fewer keys than one tile,
    configurations not marked pipelined, a persistent or turnless one-warpgroup configuration (only the
    ping-pong kernel loops over work items or takes turns), three consumer warpgroups anywhere but without
    turns at head dim 64 with FP8 P·V (with turns; at head dim 128, where they spill; with FP16 P·V), and the
    skipped rescale anywhere but in the ping-pong kernel accumulating in place."""
    lc = tuning.LaunchConfig.from_key("m64n128w4s3mcpdgp")
    base = dict(config=lc, pv_fp8=True, is_causal=False, has_bias=False, head_dim=128, block_d=128, k_group=128,
                kv_len=4096)
    cpu = torch.device("cpu")
    assert not hopper_launch.serves(cpu, **base)
    cuda = torch.device("cuda")
    # as on an sm90 GPU outside the interpreter: each configuration below is served as it stands, and each change
    # alone declines it
    monkeypatch.setattr(hopper_launch, "cuda_capability", lambda device: (9, 0))
    monkeypatch.setattr(hopper_launch, "interpreting", lambda: False)
    assert hopper_launch.serves(cuda, **base) == hopper_launch.AVAILABLE
    for change in (dict(pv_fp8=False), dict(is_causal=True), dict(has_bias=True), dict(head_dim=96),
                   dict(block_d=256, head_dim=256), dict(k_group=1), dict(kv_len=100),
                   dict(config=dataclasses.replace(lc, pipelined=False)),
                   dict(config=dataclasses.replace(lc, persistent=True)),
                   dict(config=dataclasses.replace(lc, no_turns=True)),
                   dict(config=dataclasses.replace(lc, lazy_rescale=True))):
        assert not hopper_launch.serves(cuda, **{**base, **change}), change
    # the skipped rescale: in the ping-pong kernel accumulating in place (FP8 codes or a 16-bit V), not on the
    # two-level FP16 tiles
    lazy = tuning.LaunchConfig.from_key("m64n128w4s4mcpdgppplr")
    assert hopper_launch.serves(cuda, **dict(base, config=lazy)) == hopper_launch.AVAILABLE
    assert hopper_launch.serves(cuda, **dict(base, config=lazy, pv_fp8=False, v_tiles=True)) == hopper_launch.AVAILABLE
    assert not hopper_launch.serves(cuda, **dict(base, config=dataclasses.replace(lazy, pv_direct=False)))
    three = tuning.LaunchConfig.from_key("m64n128w4s4pdgpppntc3")
    at_64 = dict(base, config=three, head_dim=64, block_d=64)
    assert hopper_launch.serves(cuda, **at_64) == hopper_launch.AVAILABLE
    for change in (dict(config=dataclasses.replace(three, no_turns=False)), dict(head_dim=128, block_d=128),
                   dict(pv_fp8=False, v_tiles=True)):
        assert not hopper_launch.serves(cuda, **{**at_64, **change}), change


@pytest.mark.parametrize("value,expected", [(None, False), ("1", True), ("0", False), ("", False), ("true", True)])
def test_interpreting_follows_the_environment_as_it_changes(monkeypatch, value, expected):
    """`interpreting` reads os.environ's own mapping (it is asked on every launch): set, cleared and changed
    values through os.environ are seen at once, as os.environ.get sees them."""
    if value is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", value)
    assert tuning.interpreting() is expected
    assert expected == (os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))
