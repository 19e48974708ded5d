"""Peer attention implementations for side-by-side benchmarks.

Every peer is wrapped into one uniform callable::

    fn(q, k, v, is_causal=False) -> out

with ``q`` ``[B, Hq, Nq, D]`` and ``k``/``v`` ``[B, Hkv, Nkv, D]`` (HND layout), fp16 or bf16, on one CUDA
device; ``out`` has the shape and dtype of ``q``. ``Hq`` must be a multiple of ``Hkv`` and the last
dimension must be contiguous. ``is_causal`` assumes ``Nq == Nkv`` (top-left aligned mask).

Peers
-----
``sa1_triton``
    Official SageAttention 1.x (``sageattention==1.0.6``, pure Triton): ``sageattn`` with INT8 Q/K
    (per-block) and FP16 P·V. Head dims 64, 96, 128 only; a bf16 V is cast to fp16 inside.
    The package subtracts the key mean in place (``k -= mean``); the adapter does the same smoothing
    out of place and calls with ``smooth_k=False``, so the caller's ``k`` is never modified.
``sa2_fp8_sm90``
    Official SageAttention 2.x CUDA kernel for Hopper: ``sageattn_qk_int8_pv_fp8_cuda_sm90`` with
    ``qk_quant_gran="per_thread"`` and ``pv_accum_dtype="fp32+fp32"`` (what ``sageattn`` itself picks on
    sm90). Needs a build containing ``_qattn_sm90`` and ``_fused`` and a compute capability 9.0 GPU.
``sa2_fp16_cuda``
    Official SageAttention 2.x ``sageattn_qk_int8_pv_fp16_cuda`` (INT8 Q/K, FP16 P·V) with
    ``qk_quant_gran="per_thread"`` and its default ``pv_accum_dtype="fp32"``. Needs ``_qattn_sm80``.
``sa2_fp16_cuda_fp16acc``
    The same kernel with ``pv_accum_dtype="fp16+fp32"`` (FP16 accumulation flushed into an FP32 buffer).
``ck_int8``
    comfy-kitchen ``comfy_kitchen.int8_attention`` (prebuilt CUDA extension, INT8 Q/K/V and unsigned
    INT8 P, block-Hadamard rotated Q/K). Head dims 1..256 (padded to 64/128/256). It has no causal
    mode: the adapter raises ``NotImplementedError`` for ``is_causal=True``.

The three SageAttention 2 peers pad ``D < 64`` to 64 and ``64 < D < 128`` to 128 and reject ``D > 128``.

Where the peers come from
-------------------------
``SAGE_PEER_SA1_SITE``
    Directory containing the SageAttention 1.x ``sageattention`` package (for instance the target of
    ``pip install --target DIR sageattention==1.0.6``). The package folder itself is accepted too.
``SAGE_PEER_SA2_SITE``
    Directory containing a SageAttention 2.x ``sageattention`` package with its compiled extensions
    (``_fused``, ``_qattn_sm90``, ``_qattn_sm80``), for instance the target of
    ``pip install --no-build-isolation --target DIR <SageAttention checkout>``.
``SAGE_PEER_CK_SITE``
    Directory containing the ``comfy_kitchen`` package (package folder plus dist-info). The directory is
    appended to ``sys.path`` so that comfy-kitchen's own dependencies (it imports ``packaging``) may sit
    beside it; installed packages still take precedence.

Without the variable, the normally importable package is used: an importable ``sageattention`` serves
as SA1 or SA2 depending on which generation it is, ``comfy_kitchen`` as the comfy-kitchen peer.

Both SageAttention generations are packaged as ``sageattention``; each is loaded under its own module
name (``_sage_peer_sa1`` / ``_sage_peer_sa2``) so both live in one process. Their code uses only relative
imports and compiled extension modules initialise by their last name component, so the alias is
transparent. comfy-kitchen refers to itself by absolute name, so it is always loaded as
``comfy_kitchen`` (from ``SAGE_PEER_CK_SITE`` when set).

``available_peers()`` never raises: it returns a ``dict`` of the usable peers whose ``missing``
attribute maps every unusable peer to the reason. ``python bench/peers.py`` prints the report;
``--smoke`` also runs each peer once on a CUDA device against ``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable

ENV_SA1 = "SAGE_PEER_SA1_SITE"
ENV_SA2 = "SAGE_PEER_SA2_SITE"
ENV_CK = "SAGE_PEER_CK_SITE"

SA1_ALIAS = "_sage_peer_sa1"
SA2_ALIAS = "_sage_peer_sa2"

PEER_NAMES = ("sa1_triton", "sa2_fp8_sm90", "sa2_fp16_cuda", "sa2_fp16_cuda_fp16acc", "ck_int8")


def _sa2(kernel: str, min_cc: tuple[int, int]) -> dict:
    """A SageAttention 2.x CUDA kernel: head dims up to 128 (padded to 64/128), causal supported."""
    return {"desc": f"SageAttention 2.x {kernel}", "head_dims": "<=128 (padded to 64/128)", "causal": True,
            "min_cc": min_cc}


# What each peer accepts: head dims (None = any in the range noted), causal support, min compute capability.
PEER_INFO: dict[str, dict] = {
    "sa1_triton": {
        "desc": "SageAttention 1.x sageattn (Triton, INT8 QK / FP16 PV)",
        "head_dims": (64, 96, 128),
        "causal": True,
        "min_cc": (8, 0),
    },
    "sa2_fp8_sm90": _sa2("sageattn_qk_int8_pv_fp8_cuda_sm90 (per_thread, fp32+fp32)", (9, 0)),
    "sa2_fp16_cuda": _sa2("sageattn_qk_int8_pv_fp16_cuda (per_thread, fp32 accumulation)", (8, 0)),
    "sa2_fp16_cuda_fp16acc": _sa2("sageattn_qk_int8_pv_fp16_cuda (per_thread, fp16+fp32 accumulation)", (8, 0)),
    "ck_int8": {
        "desc": "comfy-kitchen int8_attention (CUDA extension, INT8 QK / INT8 PV)",
        "head_dims": "1..256 (padded to 64/128/256)",
        "causal": False,
        "min_cc": (7, 5),
    },
}


class PeerSet(dict):
    """``name -> fn`` for the usable peers; ``missing`` maps each unusable peer to the reason."""

    def __init__(self) -> None:
        super().__init__()
        self.missing: dict[str, str] = {}
        self.sources: dict[str, str] = {}

    def versions(self) -> dict[str, str]:
        """Each usable peer's package version, as its source line names it: what a result file records (the
        source lines hold paths of the machine, the versions do not)."""
        found = {name: re.search(r"\(version ([^)]+)\)", self.sources.get(name, "")) for name in self}
        return {name: hit.group(1) for name, hit in found.items() if hit}


# --------------------------------------------------------------------------------------------------
# Locating and loading packages
# --------------------------------------------------------------------------------------------------


def _err(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _package_dir_from_env(var: str, package: str) -> tuple[Path | None, str | None]:
    """Resolve ``$var`` to the folder of ``package``; (None, reason) when unset or wrong."""
    raw = os.environ.get(var, "").strip()
    if not raw:
        return None, None
    base = Path(raw).expanduser()
    if (base / package / "__init__.py").is_file():
        return (base / package).resolve(), None
    if base.name == package and (base / "__init__.py").is_file():
        return base.resolve(), None
    return None, f"{var}={raw} holds no {package}/__init__.py"


def _package_dir_from_path(package: str) -> tuple[Path | None, str | None]:
    """Folder of the normally importable ``package``, without importing it."""
    mod = sys.modules.get(package)
    if mod is not None and getattr(mod, "__file__", None):
        return Path(mod.__file__).resolve().parent, None
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError) as exc:
        return None, _err(exc)
    if spec is None or not spec.submodule_search_locations:
        return None, f"no importable '{package}' package"
    return Path(next(iter(spec.submodule_search_locations))).resolve(), None


def _sage_generation(pkg_dir: Path) -> int:
    """2 for a SageAttention 2.x source layout (compiled-kernel wrappers), else 1."""
    return 2 if (pkg_dir / "quant.py").is_file() and (pkg_dir / "core.py").is_file() else 1


def _dist_version(pkg_dir: Path, dist: str) -> str:
    for info in sorted(pkg_dir.parent.glob(f"{dist}-*.dist-info")):
        return info.name[len(dist) + 1 : -len(".dist-info")]
    return "?"


def _load_package_as(alias: str, pkg_dir: Path) -> ModuleType:
    """Import the package in ``pkg_dir`` under the top-level name ``alias`` (cached in sys.modules)."""
    mod = sys.modules.get(alias)
    if mod is not None:
        loaded = Path(getattr(mod, "__file__", "") or "").resolve().parent
        if loaded == pkg_dir:
            return mod
        raise ImportError(f"{alias} is already loaded from {loaded}, not {pkg_dir}")
    # The same folder may already be imported under its real name (e.g. plain ``import sageattention``):
    # reuse it, since a second copy of a SageAttention 2 package would re-register its torch custom ops.
    for name in ("sageattention",):
        other = sys.modules.get(name)
        if other is not None and Path(getattr(other, "__file__", "") or "").resolve().parent == pkg_dir:
            sys.modules[alias] = other
            return other
    spec = importlib.util.spec_from_file_location(
        alias, pkg_dir / "__init__.py", submodule_search_locations=[str(pkg_dir)]
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot build an import spec for {pkg_dir}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[alias] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        for key in [k for k in sys.modules if k == alias or k.startswith(alias + ".")]:
            del sys.modules[key]
        raise
    return mod


def _locate_sage(env: str, want_gen: int) -> tuple[Path | None, str, str | None]:
    """(package dir, where it came from, reason when unusable) for SageAttention generation ``want_gen``."""
    pkg_dir, reason = _package_dir_from_env(env, "sageattention")
    source = f"${env}"
    if reason:
        return None, source, reason
    if pkg_dir is None:
        source = "sys.path"
        pkg_dir, reason = _package_dir_from_path("sageattention")
        if pkg_dir is None:
            return None, source, f"{env} is not set and {reason}"
    gen = _sage_generation(pkg_dir)
    if gen != want_gen:
        return None, source, f"sageattention at {pkg_dir} is SageAttention {gen}.x, not {want_gen}.x (set {env})"
    return pkg_dir, f"{source}: {pkg_dir} (version {_dist_version(pkg_dir, 'sageattention')})", None


# --------------------------------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------------------------------


def _tag(fn: Callable, name: str) -> Callable:
    fn.__name__ = name
    fn.peer_name = name
    fn.supports_causal = PEER_INFO[name]["causal"]
    fn.head_dims = PEER_INFO[name]["head_dims"]
    fn.min_cc = PEER_INFO[name]["min_cc"]
    return fn


def _make_sa1(mod: ModuleType) -> Callable:
    sageattn = mod.sageattn

    def sa1_triton(q, k, v, is_causal=False):
        # 1.0.x smooths K with ``k -= k.mean(seq)`` on the caller's tensor; same arithmetic, out of place.
        k = k - k.mean(dim=2, keepdim=True)
        return sageattn(q, k, v, tensor_layout="HND", is_causal=is_causal, smooth_k=False)

    return _tag(sa1_triton, "sa1_triton")


def _make_sa2_fp8_sm90(mod: ModuleType) -> Callable:
    kernel = mod.sageattn_qk_int8_pv_fp8_cuda_sm90

    def sa2_fp8_sm90(q, k, v, is_causal=False):
        return kernel(
            q, k, v, tensor_layout="HND", is_causal=is_causal, qk_quant_gran="per_thread", pv_accum_dtype="fp32+fp32"
        )

    return _tag(sa2_fp8_sm90, "sa2_fp8_sm90")


def _make_sa2_fp16(mod: ModuleType, name: str, pv_accum_dtype: str) -> Callable:
    kernel = mod.sageattn_qk_int8_pv_fp16_cuda

    def sa2_fp16_cuda(q, k, v, is_causal=False):
        return kernel(
            q, k, v, tensor_layout="HND", is_causal=is_causal, qk_quant_gran="per_thread", pv_accum_dtype=pv_accum_dtype
        )

    return _tag(sa2_fp16_cuda, name)


def _make_ck(mod: ModuleType) -> Callable:
    int8_attention = mod.int8_attention

    def ck_int8(q, k, v, is_causal=False):
        if is_causal:
            raise NotImplementedError("comfy-kitchen int8_attention has no causal mode")
        return int8_attention(q, k, v)

    return _tag(ck_int8, "ck_int8")


def _sa2_extension_reason(mod: ModuleType, ext: str) -> str:
    """Why ``core`` of a SageAttention 2 package reports a compiled module as disabled."""
    try:
        importlib.import_module(f"{mod.__name__}.{ext}")
    except BaseException as exc:  # any failure is the reason
        return f"{ext} does not import ({_err(exc)})"
    return f"{ext} imports but its torch custom ops failed to register (another SageAttention 2 copy loaded?)"


# --------------------------------------------------------------------------------------------------
# Probing
# --------------------------------------------------------------------------------------------------


def _probe_sa1(peers: PeerSet) -> None:
    pkg_dir, source, reason = _locate_sage(ENV_SA1, 1)
    if reason:
        peers.missing["sa1_triton"] = reason
        return
    try:
        mod = _load_package_as(SA1_ALIAS, pkg_dir)
        peers["sa1_triton"] = _make_sa1(mod)
        peers.sources["sa1_triton"] = source
    except BaseException as exc:
        peers.missing["sa1_triton"] = f"import of {pkg_dir} failed: {_err(exc)}"


def _probe_sa2(peers: PeerSet) -> None:
    names = ("sa2_fp8_sm90", "sa2_fp16_cuda", "sa2_fp16_cuda_fp16acc")
    pkg_dir, source, reason = _locate_sage(ENV_SA2, 2)
    if reason:
        for name in names:
            peers.missing[name] = reason
        return
    try:
        mod = _load_package_as(SA2_ALIAS, pkg_dir)
        core = importlib.import_module(f"{mod.__name__}.core")
    except BaseException as exc:
        for name in names:
            peers.missing[name] = f"import of {pkg_dir} failed: {_err(exc)}"
        return
    if getattr(core, "SM90_ENABLED", False):
        peers["sa2_fp8_sm90"] = _make_sa2_fp8_sm90(mod)
        peers.sources["sa2_fp8_sm90"] = source
    else:
        peers.missing["sa2_fp8_sm90"] = _sa2_extension_reason(mod, "_qattn_sm90")
    if getattr(core, "SM80_ENABLED", False):
        peers["sa2_fp16_cuda"] = _make_sa2_fp16(mod, "sa2_fp16_cuda", "fp32")
        peers["sa2_fp16_cuda_fp16acc"] = _make_sa2_fp16(mod, "sa2_fp16_cuda_fp16acc", "fp16+fp32")
        peers.sources["sa2_fp16_cuda"] = peers.sources["sa2_fp16_cuda_fp16acc"] = source
    else:
        reason = _sa2_extension_reason(mod, "_qattn_sm80")
        peers.missing["sa2_fp16_cuda"] = peers.missing["sa2_fp16_cuda_fp16acc"] = reason


def _probe_ck(peers: PeerSet) -> None:
    pkg_dir, reason = _package_dir_from_env(ENV_CK, "comfy_kitchen")
    source = f"${ENV_CK}"
    if reason:
        peers.missing["ck_int8"] = reason
        return
    try:
        loaded = sys.modules.get("comfy_kitchen")
        if pkg_dir is None or loaded is not None:
            # comfy_kitchen imports itself by absolute name: at most one copy per process.
            if loaded is not None and pkg_dir is not None:
                here = Path(loaded.__file__).resolve().parent
                if here != pkg_dir:
                    peers.missing["ck_int8"] = f"comfy_kitchen already imported from {here}, not ${ENV_CK}"
                    return
            source = "sys.path" if pkg_dir is None else source
            mod = importlib.import_module("comfy_kitchen")
        else:
            # Let comfy_kitchen's own dependencies (e.g. ``packaging``) resolve from beside it, after
            # anything already installed.
            if str(pkg_dir.parent) not in sys.path:
                sys.path.append(str(pkg_dir.parent))
            spec = importlib.util.spec_from_file_location(
                "comfy_kitchen", pkg_dir / "__init__.py", submodule_search_locations=[str(pkg_dir)]
            )
            mod = importlib.util.module_from_spec(spec)
            sys.modules["comfy_kitchen"] = mod
            try:
                spec.loader.exec_module(mod)
            except BaseException:
                for key in [k for k in sys.modules if k == "comfy_kitchen" or k.startswith("comfy_kitchen.")]:
                    del sys.modules[key]
                raise
    except BaseException as exc:
        where = pkg_dir if pkg_dir is not None else "sys.path"
        peers.missing["ck_int8"] = f"import of comfy_kitchen from {where} failed: {_err(exc)}"
        return
    if not hasattr(mod, "int8_attention"):
        peers.missing["ck_int8"] = f"comfy_kitchen {getattr(mod, '__file__', '')} has no int8_attention (too old)"
        return
    cuda_backend = sys.modules.get("comfy_kitchen.backends.cuda")
    if cuda_backend is not None and not getattr(cuda_backend, "_EXT_AVAILABLE", True):
        err = getattr(cuda_backend, "_EXT_ERROR", None) or "unknown error"
        peers.missing["ck_int8"] = f"comfy_kitchen CUDA extension did not load: {err}"
        return
    peers["ck_int8"] = _make_ck(mod)
    here = Path(mod.__file__).resolve().parent
    peers.sources["ck_int8"] = f"{source}: {here} (version {_dist_version(here, 'comfy_kitchen')})"


def _device_reason(name: str, device) -> str | None:
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    cc = torch.cuda.get_device_capability(device)
    need = PEER_INFO[name]["min_cc"]
    if name == "sa2_fp8_sm90" and cc != (9, 0):
        return f"needs compute capability 9.0, device has {cc[0]}.{cc[1]}"
    if cc < need:
        return f"needs compute capability >= {need[0]}.{need[1]}, device has {cc[0]}.{cc[1]}"
    return None


def available_peers(check_device: bool = False, device=None) -> PeerSet:
    """Usable peers as ``{name: fn}``; ``result.missing`` gives ``{name: reason}`` for the others.

    Never raises. With ``check_device`` a peer also needs a CUDA device of a suitable compute capability
    (``device`` defaults to the current one); without it only the imports are checked.
    """
    peers = PeerSet()
    for probe in (_probe_sa1, _probe_sa2, _probe_ck):
        try:
            probe(peers)
        except BaseException as exc:  # never let a peer break the caller
            peers.missing[probe.__name__.replace("_probe_", "")] = f"unexpected: {_err(exc)}"
    if check_device:
        for name in list(peers):
            try:
                reason = _device_reason(name, device)
            except BaseException as exc:
                reason = f"device check failed: {_err(exc)}"
            if reason:
                peers.missing[name] = reason
                del peers[name]
    return peers


def report(peers: PeerSet | None = None) -> str:
    peers = available_peers() if peers is None else peers
    lines = []
    for name in PEER_NAMES:
        if name in peers:
            lines.append(f"  ok       {name:22s} {PEER_INFO[name]['desc']}  [{peers.sources.get(name, '')}]")
        else:
            lines.append(f"  missing  {name:22s} {peers.missing.get(name, 'not probed')}")
    return "\n".join(lines)


def _smoke(peers: PeerSet) -> int:
    import torch
    import torch.nn.functional as F

    failures = 0
    torch.manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        for causal in (False, True):
            q, k, v = (torch.randn(1, 8, 1024, 128, device="cuda", dtype=dtype) for _ in range(3))
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
            for name, fn in peers.items():
                if causal and not fn.supports_causal:
                    continue
                try:
                    out = fn(q, k, v, is_causal=causal)
                    torch.cuda.synchronize()
                    cos = F.cosine_similarity(out.float().flatten(), ref.flatten(), dim=0).item()
                    err = (out.float() - ref).abs().max().item()
                    status = "ok" if cos > 0.99 else "BAD"
                    failures += status != "ok"
                    case = f"{name:22s} {str(dtype):15s} causal={causal!s:5s}"
                    print(f"  {status:4s} {case} cos={cos:.5f} max_err={err:.4f}")
                except Exception as exc:
                    failures += 1
                    print(f"  FAIL {name:22s} {str(dtype):15s} causal={causal!s:5s} {_err(exc)}")
    return failures


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    peers = available_peers(check_device="--smoke" in argv)
    print(report(peers))
    if "--smoke" in argv:
        return 1 if _smoke(peers) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
