"""Launch configurations per GPU architecture, and the on-disk cache of autotuned choices.

A configuration is (BLOCK_M, BLOCK_N, num_warps, num_stages). The table gives a measured or
conservative default per architecture, P·V precision and padded head dim; `candidates()` lists what
autotuning tries; results are stored per device and Triton version so a second run never retunes.
"""
from __future__ import annotations

import functools
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    warp_specialize: bool = False
    magic_convert: bool = False  # scores converted from INT32 by the FP32 bit trick rather than I2F
    pv_direct: bool = False  # FP8 P·V accumulated in the output registers (no per-tile FP32 promotion)
    max_registers: int | None = None  # a cap per thread: fewer registers, more programs per multiprocessor
    pipelined: bool = False  # Hopper: the Gluon kernel (TMA ring, asynchronous wgmma, softmax under P·V)
    ping_pong: bool = False  # with `pipelined`: warpgroups per program taking turns at the tensor cores (see consumers)
    persistent: bool = False  # with `ping_pong`: one program per multiprocessor, looping over query tiles
    no_turns: bool = False  # with `ping_pong`: the warpgroups issue their products without taking turns
    consumers: int = 2  # with `ping_pong`: consumer warpgroups sharing the ring (3 only with `no_turns`)
    lazy_rescale: bool = False  # with `ping_pong`: a warp skips the accumulator's rescale when none of its rows moved
    fp16_tiles: bool = False  # portable kernel, FP8 P·V: each key tile's product in an FP16 accumulator (see below)

    def key(self) -> str:
        flags = "".join(tag for on, tag in ((self.warp_specialize, "ws"), (self.magic_convert, "mc"),
                                            (self.pv_direct, "pd"), (self.pipelined, "gp"),
                                            (self.ping_pong, "pp"), (self.persistent, "ps"),
                                            (self.no_turns, "nt"), (self.lazy_rescale, "lr"),
                                            (self.fp16_tiles, "ft"), (self.consumers != 2, f"c{self.consumers}"))
                        if on)
        regs = f"r{self.max_registers}" if self.max_registers else ""
        return f"m{self.block_m}n{self.block_n}w{self.num_warps}s{self.num_stages}{regs}{flags}"

    @classmethod
    def from_key(cls, key: str) -> "LaunchConfig":
        """The inverse of key(): "m64n128w4s3r168mcpdgp" -> LaunchConfig."""
        hit = re.fullmatch(r"m(\d+)n(\d+)w(\d+)s(\d+)(?:r(\d+))?((?:ws|mc|pd|gp|pp|ps|nt|lr|ft|c\d)*)", key)
        if not hit:
            raise ValueError(f"not a launch configuration key: {key!r}")
        m, n, w, s, r, flags = hit.groups()
        tags = {flags[i:i + 2] for i in range(0, len(flags), 2)}
        consumers = next((int(t[1]) for t in tags if t[0] == "c"), 2)
        return cls(int(m), int(n), int(w), int(s), "ws" in tags, "mc" in tags, "pd" in tags,
                   int(r) if r else None, "gp" in tags, "pp" in tags, "ps" in tags, "nt" in tags, consumers,
                   "lr" in tags, "ft" in tags)


def _c(m, n, w, s, **flags):
    return LaunchConfig(m, n, w, s, **flags)


# Families whose mma.sync takes FP8 operands into an FP16 accumulator (QMMA.16832.F16.E4M3 in their SASS): Ada and
# consumer Blackwell. There, on the RTX 4090 and 5090, that product runs at twice the rate of the one into FP32
# (SageAttention2++, arXiv 2505.21136), so their FP8 P·V takes SageAttention2++'s accumulation: each key tile's
# product in FP16, added to the FP32 output (fp16_tiles), as the official kernels do by default on sm89 and sm120.
# Not measured here: no such GPU was at hand (bench/NOTES.md, Next); autotuning tries it both ways.
FP16_TILE_FAMILIES = ("sm89", "sm120")


# (arch family, pv) -> {padded head dim: config}. Families: sm80 (A100), sm86/sm89
# (consumer Ampere/Ada, ~100 KB shared memory), sm90 (Hopper), sm100/sm120 (Blackwell).
ARCH_TABLE = {
    ("sm80", "fp16"): {64: _c(128, 64, 4, 3), 128: _c(128, 64, 8, 3), 256: _c(64, 32, 8, 2)},
    ("sm86", "fp16"): {64: _c(128, 64, 4, 2), 128: _c(64, 64, 4, 2), 256: _c(64, 32, 8, 1)},
    ("sm89", "fp16"): {64: _c(128, 64, 4, 2), 128: _c(64, 64, 4, 2), 256: _c(64, 32, 8, 1)},
    ("sm89", "fp8"): {64: _c(128, 64, 4, 2, fp16_tiles=True), 128: _c(128, 64, 8, 2, fp16_tiles=True),
                      256: _c(64, 32, 8, 1, fp16_tiles=True)},
    ("sm90", "fp16"): {64: _c(128, 128, 8, 3), 128: _c(128, 128, 8, 3), 256: _c(64, 64, 8, 2)},
    ("sm90", "fp8"): {64: _c(128, 128, 8, 3), 128: _c(128, 128, 8, 3), 256: _c(64, 64, 8, 2)},
    ("sm100", "fp16"): {64: _c(128, 128, 8, 3), 128: _c(128, 128, 8, 3), 256: _c(64, 64, 8, 2)},
    ("sm100", "fp8"): {64: _c(128, 128, 8, 3), 128: _c(128, 128, 8, 3), 256: _c(64, 64, 8, 2)},
    ("sm120", "fp16"): {64: _c(128, 64, 4, 2), 128: _c(64, 64, 4, 2), 256: _c(64, 32, 8, 1)},
    ("sm120", "fp8"): {64: _c(128, 64, 4, 2, fp16_tiles=True), 128: _c(128, 64, 8, 2, fp16_tiles=True),
                       256: _c(64, 32, 8, 1, fp16_tiles=True)},
}
# A call asks `interpreting` once per launch and a few times besides: os.environ.get reaches the value through two
# codec calls (~0.8 µs each time on a CPU machine), so the switch is read from os.environ's own mapping, which
# os.environ's writes (and pytest's monkeypatch.setenv) keep current. Elsewhere, os.environ.get.
_ENVIRON_DATA = getattr(os.environ, "_data", None)
_INTERPRET_KEY = os.environ.encodekey("TRITON_INTERPRET") if isinstance(_ENVIRON_DATA, dict) and \
    hasattr(os.environ, "encodekey") else None
_SWITCHED_OFF = ("", "0", b"", b"0")


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    if _INTERPRET_KEY is None:
        return os.environ.get("TRITON_INTERPRET", "0") not in _SWITCHED_OFF
    value = _ENVIRON_DATA.get(_INTERPRET_KEY)
    return value is not None and value not in _SWITCHED_OFF


@functools.lru_cache(maxsize=None)
def capability(device_index: int) -> tuple[int, int]:
    """A GPU's compute capability, asked once (PyTorch's query costs microseconds, and calls ask per call)."""
    import torch

    return torch.cuda.get_device_capability(device_index)


def cuda_capability(device) -> tuple[int, int] | None:
    """The compute capability of a torch.device, None off CUDA."""
    if device.type != "cuda":
        return None
    import torch

    return capability(device.index if device.index is not None else torch.cuda.current_device())


# The CPU interpreter: fewer, larger programs run faster there.
INTERPRETER_CONFIG = _c(64, 64, 4, 1)


def arch_family(capability: tuple[int, int] | None) -> str:
    if capability is None:
        return "cpu"
    major, minor = capability
    if major >= 12:
        return "sm120"
    if major >= 10:
        return "sm100"
    if major == 9:
        return "sm90"
    if (major, minor) >= (8, 9):
        return "sm89"
    if (major, minor) >= (8, 6):
        return "sm86"
    if major == 8:
        return "sm80"
    return f"sm{major}{minor}"  # older than Ampere: refused (sage_core.backend.device_refusal), no table


def default_config(family: str, pv: str, block_d: int, block_m: int | None = None) -> LaunchConfig:
    """The table's configuration; `block_m` pins the Q tile (per-block Q quantization needs it)."""
    if family == "cpu":
        cfg = INTERPRETER_CONFIG
    else:
        table = ARCH_TABLE.get((family, pv)) or ARCH_TABLE[(family, "fp16")]
        cfg = table[min(256, max(64, block_d))]
    if block_m is not None and cfg.block_m != block_m:
        cfg = replace(cfg, block_m=block_m)
    return cfg


def candidates(block_d: int, block_m: int | None = None, family: str = "sm90") -> list[LaunchConfig]:
    """What autotuning tries: tiles that fit shared memory for this head dim. A 128-row tile takes 8 warps
    (two warpgroups of 64 rows); a 64-row tile 4 (one warpgroup: two programs share a multiprocessor and
    overlap each other's softmax with their matrix products)."""
    ms = [block_m] if block_m else [64, 128]
    ns = [32, 64] if block_d > 128 else [64, 128]
    # deeper pipelines where a stage is small; head dims above 128 leave shared memory for two at most
    stages = {64: (3, 4), 128: (2, 3)} if block_d <= 128 else {32: (1, 2), 64: (1, 2)}
    plain = [_c(m, n, 8 if m == 128 else 4, s) for m in ms for n in ns for s in stages[n]
             if not (block_d > 128 and m > 64)]
    if block_d <= 128:
        # ptxas takes every register it can (~250 per thread), which leaves room for two 4-warp programs per
        # multiprocessor; capped, a 64-row tile fits three or four, and their latencies overlap
        plain += [LaunchConfig(c.block_m, c.block_n, c.num_warps, c.num_stages, max_registers=r)
                  for c in plain if c.num_warps == 4 for r in ((168, 128) if c.block_n == 64 else (168,))]
    if family == "sm90" and block_d in (64, 128) and not block_m:
        # the Gluon kernels (kernels/hopper_attention_kernel.py; FP8 P·V, or FP16 P·V on a V that TMA reads as
        # it is: elsewhere they fall back to the portable kernel): one warpgroup per program, or two in ping-pong
        # with a producer warp, each (FP8 P·V) with two-level accumulation in FP16 tiles or accumulating in place;
        # autotuning's accuracy rule decides.
        plain += [LaunchConfig(64, 128, 4, s, magic_convert=True, pv_direct=direct, pipelined=True, ping_pong=pp)
                  for s, pp in ((3, False), (4, True)) for direct in (False, True)]
        # the ping-pong kernel persistent (a program per multiprocessor looping over query tiles): level or 2%
        # slower on the H200's long shapes (bench/NOTES.md, "Threshold rescale, persistent ping-pong, …"), offered
        # where it may win
        plain.append(LaunchConfig(64, 128, 4, 4, magic_convert=True, pv_direct=True, pipelined=True, ping_pong=True,
                                  persistent=True))
        # ping-pong without the turn-taking: 1-4% faster on the H200 at 4.6k to 16k and at 118k tokens, 3.5% slower
        # at Wan2.1's 32k (bench/NOTES.md, "Ping-pong without turns, …")
        plain.append(LaunchConfig(64, 128, 4, 4, magic_convert=True, pv_direct=True, pipelined=True, ping_pong=True,
                                  no_turns=True))
        if block_d == 128:
            # the accumulator's rescale skipped by a warp none of whose rows moved its max: on the H200 with FP8
            # P·V 2-3% faster with turns at Wan2.1's 32k tokens and 1% without at HunyuanVideo's 118k, 5% slower
            # with turns at 16k; with FP16 P·V 1-3% faster at 16k and 32k (bench/NOTES.md, "The rescale skipped
            # where no row moved, …")
            plain += [LaunchConfig(64, 128, 4, 4, magic_convert=True, pv_direct=True, pipelined=True, ping_pong=True,
                                   no_turns=nt, lazy_rescale=True) for nt in (False, True)]
        if block_d == 64:
            # at head dim 64 one warpgroup capped at 168 registers runs three programs per multiprocessor, and
            # their softmaxes fill each other's tensor-core gaps (bench/NOTES.md, "The rescale after P·V's wait");
            # FP16 P·V's V tiles are twice FP8's: three programs fit shared memory with two stages only
            plain += [LaunchConfig(64, 128, 4, s, max_registers=168, magic_convert=magic, pv_direct=True,
                                   pipelined=True) for s in (2, 3) for magic in (True, False)]
            # three consumer warpgroups sharing one ring (192 query rows per K/V tile read, as FlashAttention-3
            # at head dim 64), without turns
            plain += [LaunchConfig(64, 128, 4, s, pv_direct=True, pipelined=True, ping_pong=True, no_turns=True,
                                   consumers=3) for s in (3, 4)]
    if family not in ("sm100", "sm120"):
        # Triton 3.6's warp-specialisation pass fails on this kernel for sm90 (an MLIR pipeline error,
        # seen on an H100): offer those pipelines only to Blackwell, where that pass is Triton's default path
        return plain
    specialised = [LaunchConfig(c.block_m, c.block_n, c.num_warps, c.num_stages, True) for c in plain
                   if block_d <= 128 and c.num_stages in (2, 3) and c.block_n == 128]
    return plain + specialised


def flag_flips(tile: LaunchConfig, pv_fp8: bool, family: str) -> list[LaunchConfig]:
    """The configurations autotuning times beside its chosen tile, each with one kernel flag the other way: the
    score conversion; with FP8 P·V, the accumulation in place (pv_direct) and, where the family has the
    instruction (FP16_TILE_FAMILIES) and the portable kernel runs, each key tile's product in FP16 (fp16_tiles).
    The two accumulations exclude each other: turning one on turns the other off."""
    flips = [replace(tile, magic_convert=not tile.magic_convert)]
    if pv_fp8:
        flips.append(replace(tile, pv_direct=not tile.pv_direct, fp16_tiles=False))
        if family in FP16_TILE_FAMILIES and not tile.pipelined:
            flips.append(replace(tile, fp16_tiles=not tile.fp16_tiles, pv_direct=False))
    return flips


def seq_bucket(n: int) -> int:
    """Sequence lengths bucketed to the next power of two, so video lengths share one tuning entry."""
    return 1 << max(0, (max(1, n) - 1).bit_length())


def cache_dir() -> Path:
    root = os.environ.get("SAGE_ATTENTION_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "sage_attention_pack")
    return Path(root)


TUNED_DIR = Path(__file__).resolve().parent / "tuned"


# A GPU of these families without a table of its own takes the launch entries measured on this one: every sm90
# part (H100 PCIe and NVL, H800, H20, GH200) is a GH100 with the same shared memory per multiprocessor, and on the
# H100 the Hopper kernels' entries beat the arch table's portable tiles at every shape compared
# (bench/results/h100_launch_table_ab.json). `auto` entries stay per model: they weigh SDPA's speed on that card.
FAMILY_REFERENCE_GPU = {"sm90": "NVIDIA H100 80GB HBM3"}


def _table_file(device_name: str) -> Path:
    return TUNED_DIR / (re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_") + ".json")


def launch_table_source(device_name: str, family: str | None = None) -> str | None:
    """Which GPU's measured launch entries this GPU takes: its own where the pack ships a table for it, else its
    family's reference GPU's (FAMILY_REFERENCE_GPU), else None (the arch table's defaults)."""
    if _table_file(device_name).is_file():
        return device_name
    reference = FAMILY_REFERENCE_GPU.get(family)
    return reference if reference and _table_file(reference).is_file() else None


def shipped_table(device_name: str, section: str, family: str | None = None) -> dict:
    """Measured choices shipped with the pack for this GPU model (kernels/tuned/<gpu>.json), or, for launch
    entries, its family's reference GPU's (launch_table_source), or {}."""
    source = launch_table_source(device_name, family) if section == "launch" else device_name
    try:
        return json.loads(_table_file(source).read_text()).get(section, {}) if source else {}
    except (OSError, ValueError):
        return {}


class TuningCache:
    """A JSON file of {key: value}; written atomically, read once per process. `defaults` (a shipped
    table) answers keys the file does not hold."""

    def __init__(self, name: str, defaults: dict | None = None):
        self.path = cache_dir() / name
        self.defaults = defaults or {}
        self._data: dict | None = None
        self.generation = 0  # counts put()s: what was read from the cache before one may have changed

    def _load(self) -> dict:
        if self._data is None:
            try:
                self._data = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self._data = {}
        return self._data

    def get(self, key: str):
        hit = self._load().get(key)
        return hit if hit is not None else self.defaults.get(key)

    def put(self, key: str, value) -> None:
        data = self._load()
        data[key] = asdict(value) if isinstance(value, LaunchConfig) else value
        self.generation += 1
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only cache only costs a retune next time
