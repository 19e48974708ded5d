"""Test harness that runs the pack inside a real ComfyUI checkout.

Everything here works on a CPU-only machine with no network access and no downloaded weights:

* :func:`find_comfyui` locates a ComfyUI checkout (``$COMFYUI_PATH``, else ``~/comfy/ComfyUI``).
* :func:`prepare_comfy_imports` makes ComfyUI importable in this process and forces ``--cpu`` before
  ``comfy.model_management`` reads its arguments.
* :func:`build_models` writes tiny random-weight models that ComfyUI's own model detection accepts
  (SD1.5 UNet, Wan2.1 T2V DiT, SD3 MMDiT, a full-size CLIP-L, TAESD-format and Wan2.1 VAEs; on request the
  Wan2.1 I2V DiT and the full-size CLIP vision ViT-H that feeds it).
* :func:`workflow_api` builds API-format prompts (loader -> [model patch] -> KSampler -> VAEDecode -> save).
* :class:`InProcessComfy` executes prompts in this process through ``execution.PromptExecutor``.
* :func:`start_server` / :class:`ComfyServer` run ``main.py`` on loopback and drive it over HTTP + websocket.

The pytest fixtures that wrap these live in ``tests/conftest.py``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import math
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_DIR_NAME = "sage-attention-pack"
COMFYUI_ENV = "COMFYUI_PATH"
DEFAULT_COMFYUI = Path("~/comfy/ComfyUI")
COMFYUI_MISSING = "ComfyUI checkout not found (set COMFYUI_PATH or put one at ~/comfy/ComfyUI)"
# Set to a folder to keep the generated test models between pytest sessions (they are rebuilt only when
# MODELS_VERSION changes); unset, every session builds them into its own temporary folder.
MODELS_DIR_ENV = "SAGE_TEST_MODELS_DIR"
MODELS_VERSION = 2
FAMILIES = ("sd15", "wan", "sd3")

# Attention calls per single-image run of workflow_api(...) with its defaults (4 euler steps, CFG batched
# into one forward per step): SD1.5 UNet 8 per forward, Wan DiT 2, MMDiT 2.
ATTENTION_CALLS_PER_RUN = {"sd15": 32, "wan": 8, "sd3": 8}

# Node ids used by workflow_api (API prompts are keyed by these strings).
NODE_IDS = {
    "model": "1",  # CheckpointLoaderSimple (sd15 checkpoint: also clip + vae) or UNETLoader
    "clip": "2",  # CLIPLoader (absent when the checkpoint provides the CLIP)
    "vae": "3",  # VAELoader (absent when the checkpoint provides the VAE)
    "positive": "4",
    "negative": "5",
    "latent": "6",
    "sampler": "7",  # KSampler
    "decode": "8",  # VAEDecode: IMAGE tensor [frames*batch, H, W, 3]
    "save": "9",  # SaveImage / PreviewImage
    "patch": "10",  # first model patch node; further patches get "11", "12", ...
}

log = logging.getLogger("sage_tests.comfy")


# --------------------------------------------------------------------------------------------------------------
# Locating and importing ComfyUI
# --------------------------------------------------------------------------------------------------------------


def is_comfyui_checkout(path: str | os.PathLike | None) -> bool:
    """True when ``path`` looks like a ComfyUI source checkout (``main.py`` next to a ``comfy/`` package)."""
    if not path:
        return False
    p = Path(path).expanduser()
    return (p / "main.py").is_file() and (p / "comfy").is_dir()


def find_comfyui() -> Path | None:
    """Return the ComfyUI checkout to test against: ``$COMFYUI_PATH`` if it holds one, else ``~/comfy/ComfyUI``."""
    for candidate in (os.environ.get(COMFYUI_ENV), DEFAULT_COMFYUI):
        if candidate and is_comfyui_checkout(candidate):
            return Path(candidate).expanduser().resolve()
    return None


# Top-level module names that ComfyUI owns; if one of them was imported from somewhere else first (the pack's
# own ``nodes/`` folder, for instance, when the repo root is on sys.path), ComfyUI's imports break.
_COMFY_TOP_MODULES = ("nodes", "execution", "server", "folder_paths", "utils", "app", "comfy", "comfy_extras",
                      "comfy_execution", "comfy_api", "node_helpers", "latent_preview", "protocol", "middleware")


def prepare_comfy_imports(comfy_dir: str | os.PathLike | None = None, cpu: bool = True) -> Path:
    """Make ``comfy_dir``'s modules importable here and set ComfyUI's arguments for an in-process run.

    ComfyUI parses ``sys.argv`` only when ``comfy.options.enable_args_parsing()`` was called (main.py does);
    imported as a library, ``comfy.cli_args.args`` holds the defaults. ``comfy.model_management`` reads
    ``args.cpu`` once, at import, so ``--cpu`` must be set on ``args`` before that module is first imported;
    this function does that and raises if it is too late. Idempotent.
    """
    comfy_dir = Path(comfy_dir) if comfy_dir else find_comfyui()
    if comfy_dir is None:
        raise RuntimeError(COMFYUI_MISSING)
    comfy_dir = comfy_dir.resolve()
    for name in _COMFY_TOP_MODULES:
        mod = sys.modules.get(name)
        origin = getattr(mod, "__file__", None) or next(iter(getattr(mod, "__path__", []) or []), None)
        if mod is not None and origin and not Path(origin).resolve().is_relative_to(comfy_dir):
            raise RuntimeError(f"module {name!r} was already imported from {origin}, not from ComfyUI at {comfy_dir}; "
                               "import ComfyUI before anything that shadows its top-level modules")
    with contextlib.suppress(ValueError):
        sys.path.remove(str(comfy_dir))
    sys.path.insert(0, str(comfy_dir))

    already = "comfy.model_management" in sys.modules
    import comfy.options  # noqa: F401  (args parsing stays disabled: argv belongs to pytest)
    from comfy.cli_args import args

    if cpu:
        args.cpu = True
    args.disable_auto_launch = True
    if already and cpu:
        import comfy.model_management as mm

        if mm.cpu_state != mm.CPUState.CPU:
            raise RuntimeError("comfy.model_management was imported before --cpu was set; "
                               "call prepare_comfy_imports() before importing ComfyUI modules")
    # ComfyUI's top-level ``utils`` package must be imported before ``server`` (see main.py), otherwise
    # ``utils`` can resolve to comfy/utils.py.
    import utils.extra_config  # noqa: F401

    return comfy_dir


def write_extra_model_paths(yaml_path: str | os.PathLike, models_dir: str | os.PathLike,
                            custom_nodes_dir: str | os.PathLike | None = None) -> Path:
    """Write an ``--extra-model-paths-config`` YAML that points ComfyUI at ``models_dir`` (ComfyUI's folder
    layout) and, optionally, at an extra ``custom_nodes`` folder. Returns the YAML path."""
    models_dir = Path(models_dir).resolve()
    lines = ["sage_attention_pack_tests:", f"    base_path: {json.dumps(str(models_dir))}"]
    for kind, sub in (("checkpoints", "checkpoints"), ("diffusion_models", "diffusion_models"),
                      ("text_encoders", "text_encoders"), ("vae", "vae"), ("loras", "loras"),
                      ("clip_vision", "clip_vision")):
        lines.append(f"    {kind}: {sub}")
    if custom_nodes_dir is not None:
        lines.append(f"    custom_nodes: {json.dumps(str(Path(custom_nodes_dir).resolve()))}")
    yaml_path = Path(yaml_path)
    yaml_path.parent.mkdir(parents=True, exist_ok=True)
    yaml_path.write_text("\n".join(lines) + "\n")
    return yaml_path


def make_custom_nodes_dir(parent: str | os.PathLike, pack_root: str | os.PathLike = REPO_ROOT,
                          name: str = PACK_DIR_NAME) -> Path:
    """Create ``parent/custom_nodes/<name>`` as a symlink to the pack; returns the ``custom_nodes`` folder."""
    cn = Path(parent) / "custom_nodes"
    cn.mkdir(parents=True, exist_ok=True)
    link = cn / name
    if link.is_symlink() and link.resolve() != Path(pack_root).resolve():
        link.unlink()
    if not link.exists():
        link.symlink_to(Path(pack_root).resolve(), target_is_directory=True)
    return cn


# --------------------------------------------------------------------------------------------------------------
# Tiny random-weight models
# --------------------------------------------------------------------------------------------------------------


class ModelSet(dict):
    """``build_models`` result: ``{family: {role: file name}}`` plus ``.root``, the models folder.

    Roles: ``ckpt`` (checkpoints/), ``unet`` (diffusion_models/), ``clip`` (text_encoders/) with the
    CLIPLoader ``clip_type`` to use, ``vae`` (vae/), ``clip_vision`` (clip_vision/).
    """

    root: Path

    def __init__(self, root: Path, data: dict):
        super().__init__(data)
        self.root = Path(root)

    def path(self, family: str, role: str) -> Path:
        folder = {"ckpt": "checkpoints", "unet": "diffusion_models", "clip": "text_encoders", "vae": "vae",
                  "clip_vision": "clip_vision"}[role]
        return self.root / folder / self[family][role]


def _init_module(module, seed: int, conv_gain: float = 1.0, keep: Iterable[str] = ()):
    """Fill a freshly constructed module's weights in place (ComfyUI's ``disable_weight_init`` ops leave them
    uninitialised), deterministically: matrices/convs ~ N(0, gain^2/fan_in), biases 0, norm scales 1,
    modulation/positional tables ~ N(0, 0.02^2)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    keep = set(keep)
    sd = module.state_dict(keep_vars=True)
    for name in sorted(sd):
        t = sd[name]
        if name in keep or not torch.is_floating_point(t):
            continue
        leaf = name.rsplit(".", 1)[-1]
        with torch.no_grad():
            if leaf == "bias" or leaf.endswith("_bias"):
                t.zero_()
            elif leaf in ("gamma", "scale") or (t.ndim <= 1 and leaf == "weight"):
                t.fill_(1.0)
            elif "modulation" in leaf or "pos_emb" in leaf or (t.ndim == 2 and t.shape[0] > 1024 and "embed" in name):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.02)
            elif t.ndim >= 2:
                fan_in = max(1, t[0].numel())
                gain = conv_gain if t.ndim > 2 else 1.0
                t.copy_(torch.randn(t.shape, generator=gen) * (gain / math.sqrt(fan_in)))
            else:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.02)
    return module


def _calibrate(module, weight_name: str, run, target_std: float, bias: float | None = None):
    """Scale the (linear, bias-free) output layer ``weight_name`` so that ``run(module)`` has std ``target_std``;
    then set that layer's bias to ``bias`` if given. Keeps random models' outputs in a sane range (diffusion
    outputs ~ unit variance, decoded pixels mostly inside [0, 1] instead of clipped)."""
    import torch

    params = dict(module.named_parameters())
    w = params[weight_name]
    with torch.no_grad():
        out = run(module).float()
        std = float(out.std())
        if not math.isfinite(std) or std == 0.0:
            raise RuntimeError(f"calibration of {weight_name}: output std {std}")
        w.mul_(target_std / std)
        if bias is not None:
            params[weight_name.rsplit(".", 1)[0] + ".bias"].fill_(bias)
    return module


def _export(module, dtype=None) -> dict:
    sd = {}
    for k, v in module.state_dict().items():
        v = v.detach()
        if dtype is not None and v.is_floating_point() and v.ndim > 0:
            v = v.to(dtype)
        sd[k] = v.clone().contiguous()
    return sd


def _randn(*shape, seed: int):
    import torch

    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _clip_like_context(batch: int, seed: int):
    """What CLIPLoader(type=sd3) with CLIP-L alone produces: 77 x 768 padded with zeros to 4096, pooled 768 -> 2048."""
    import torch

    ctx = torch.nn.functional.pad(_randn(batch, 77, 768, seed=seed), (0, 4096 - 768))
    pooled = torch.nn.functional.pad(_randn(batch, 768, seed=seed + 1), (0, 2048 - 768))
    return ctx, pooled


def sd15_unet_sd(seed: int = 1501) -> dict:
    """SD1.5-detected UNet (model_channels 320, context 768, 8 heads of 40) shrunk to one level: ~26M params."""
    import torch
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    m = UNetModel(image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[1],
                  channel_mult=[1], transformer_depth=[1], transformer_depth_middle=1, transformer_depth_output=[1, 1],
                  context_dim=768, num_heads=8, num_head_channels=-1, use_spatial_transformer=True,
                  use_linear_in_transformer=False, legacy=False, operations=comfy.ops.disable_weight_init)
    _init_module(m, seed, conv_gain=math.sqrt(2))
    x = _randn(2, 4, 8, 8, seed=seed + 1)
    ctx = _randn(2, 77, 768, seed=seed + 2)
    _calibrate(m, "out.2.weight", lambda m: m(x, torch.tensor([500.0, 500.0]), context=ctx), 1.0)
    return _export(m)


def wan21_sd(model_type: str = "t2v", seed: int = 2101) -> dict:
    """Wan2.1 DiT: dim 256 (2 heads of 128), ffn 512, one block, 16 latent channels, text 4096: ~2.5M params.
    ``i2v``: 36 input channels (the latent, the start image's latent and its mask) and the image embedding
    that projects CLIP vision ViT-H's 257 x 1280 hidden states into the cross-attention's context."""
    import torch
    import comfy.ops
    from comfy.ldm.wan.model import WanModel

    in_dim = 36 if model_type == "i2v" else 16
    m = WanModel(model_type=model_type, dim=256, ffn_dim=512, num_heads=2, num_layers=1, in_dim=in_dim,
                 out_dim=16, text_dim=4096, image_model="wan2.1", operations=comfy.ops.disable_weight_init)
    _init_module(m, seed)
    x = _randn(2, in_dim, 2, 8, 8, seed=seed + 1)
    ctx, _ = _clip_like_context(2, seed + 2)
    extra = {"clip_fea": _randn(2, 257, 1280, seed=seed + 3)} if model_type == "i2v" else {}
    _calibrate(m, "head.head.weight", lambda m: m(x, torch.tensor([0.5, 0.5]), ctx, **extra), 1.0)
    return _export(m)


def clip_vision_h_sd(seed: int = 1401) -> dict:
    """Full-size CLIP vision ViT-H/14 (ComfyUI's clip_vision_config_h.json, ~632M params; detected by its 32
    layers, and Wan2.1 I2V's image embedding takes its 1280-wide hidden states), fp16."""
    import torch
    import comfy.clip_vision

    config = Path(comfy.clip_vision.__file__).with_name("clip_vision_config_h.json")
    m = comfy.clip_vision.ClipVisionModel(str(config))
    _init_module(m.model, seed)
    return _export(m.model, torch.float16)


def sd3_mmdit_sd(seed: int = 3001) -> dict:
    """SD3 MMDiT with depth 2 (hidden 128, 2 heads of 64), context 4096->128, pooled 2048, 16x16 pos table."""
    import torch
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    m = MMDiT(patch_size=2, in_channels=16, out_channels=16, depth=2, adm_in_channels=2048,
              context_embedder_config={"target": "torch.nn.Linear",
                                       "params": {"in_features": 4096, "out_features": 128}},
              pos_embed_max_size=16, num_patches=256, operations=comfy.ops.disable_weight_init)
    _init_module(m, seed)
    x = _randn(2, 16, 8, 8, seed=seed + 1)
    ctx, pooled = _clip_like_context(2, seed + 2)
    _calibrate(m, "final_layer.linear.weight",
               lambda m: m(x, torch.tensor([500.0, 500.0]), context=ctx, y=pooled), 1.0)
    return _export(m)


def clip_l_sd(seed: int = 7701) -> dict:
    """Full-size CLIP-L text model (fixed config, ~124M params) in HF key layout (``text_model.*``), fp16."""
    import torch
    import comfy.sd1_clip

    m = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    _init_module(m.transformer, seed)
    return _export(m.transformer, torch.float16)


def taesd_sd(latent_channels: int, seed: int = 4401, scale: float = 1.0, shift: float = 0.0) -> dict:
    """TAESD-format VAE (``taesd_encoder.*``/``taesd_decoder.*``, detected by comfy.sd.VAE) with the given
    latent channels (4: SD1.5, 16: SD3/Flux)."""
    import torch
    import comfy.taesd.taesd

    m = comfy.taesd.taesd.TAESD(latent_channels=latent_channels)
    _init_module(m, seed, conv_gain=math.sqrt(2), keep=("vae_scale", "vae_shift"))
    with torch.no_grad():
        m.vae_scale.fill_(scale)
        m.vae_shift.fill_(shift)
    last = [n for n, _ in m.taesd_decoder.named_parameters() if n.endswith("weight")][-1]
    z = _randn(1, latent_channels, 8, 8, seed=seed + 1) * 2.0
    _calibrate(m, f"taesd_decoder.{last}", lambda m: m.taesd_decoder(z), 0.2, bias=0.5)
    return _export(m)


def wan21_vae_sd(seed: int = 2199) -> dict:
    """Wan2.1 VAE (fixed config: ~127M params; the only VAE ComfyUI decodes 5-D Wan latents with), fp16."""
    import torch
    import comfy.ldm.wan.vae

    m = comfy.ldm.wan.vae.WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                 temperal_downsample=[False, True, True], dropout=0.0)
    _init_module(m, seed, conv_gain=math.sqrt(2))
    z = _randn(1, 16, 1, 8, 8, seed=seed + 1) * 2.0
    _calibrate(m, "decoder.head.2.weight", lambda m: m.decode(z), 0.4)
    return _export(m, torch.float16)


_FILES = {
    "sd15_ckpt": "sage_test_sd15.safetensors",
    "sd15_unet": "sage_test_sd15_unet.safetensors",
    "wan_unet": "sage_test_wan21_t2v.safetensors",
    "wan_i2v_unet": "sage_test_wan21_i2v.safetensors",
    "clip_vision_h": "sage_test_clip_vision_h.safetensors",
    "sd3_unet": "sage_test_sd3_mmdit.safetensors",
    "clip_l": "sage_test_clip_l.safetensors",
    "taesd4": "sage_test_taesd_4ch.safetensors",
    "taesd16": "sage_test_taesd_16ch.safetensors",
    "wan_vae": "sage_test_wan21_vae.safetensors",
}


def _model_table() -> dict:
    f = _FILES
    return {
        "sd15": {"ckpt": f["sd15_ckpt"], "unet": f["sd15_unet"], "clip": f["clip_l"],
                 "clip_type": "stable_diffusion", "vae": f["taesd4"]},
        "wan": {"unet": f["wan_unet"], "clip": f["clip_l"], "clip_type": "sd3", "vae": f["wan_vae"]},
        "sd3": {"unet": f["sd3_unet"], "clip": f["clip_l"], "clip_type": "sd3", "vae": f["taesd16"]},
        "wan_i2v": {"unet": f["wan_i2v_unet"], "clip": f["clip_l"], "clip_type": "sd3", "vae": f["wan_vae"],
                    "clip_vision": f["clip_vision_h"]},
    }


def build_models(models_dir: str | os.PathLike, families: Sequence[str] = FAMILIES,
                 comfy_dir: str | os.PathLike | None = None) -> ModelSet:
    """Write the tiny test models for ``families`` into ``models_dir`` (ComfyUI's layout: checkpoints/,
    diffusion_models/, text_encoders/, vae/, clip_vision/) and return a :class:`ModelSet`. ``wan_i2v`` is not
    among the default families: its CLIP vision model alone is a 1.3 GB file, built only where a test asks.

    Deterministic (fixed seeds). Files already written by the same ``MODELS_VERSION`` are reused.
    Needs ComfyUI importable (calls :func:`prepare_comfy_imports`).
    """
    prepare_comfy_imports(comfy_dir)
    import torch
    from safetensors.torch import save_file

    root = Path(models_dir)
    for sub in ("checkpoints", "diffusion_models", "text_encoders", "vae", "clip_vision"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    manifest_path = root / "sage_test_models.json"
    manifest = {}
    if manifest_path.is_file():
        with contextlib.suppress(ValueError):
            manifest = json.loads(manifest_path.read_text())
    if manifest.get("version") != MODELS_VERSION:
        manifest = {"version": MODELS_VERSION, "files": []}
    done = set(manifest["files"])
    meta = {"sage_attention_pack": "random-weight test model"}

    def write(sub: str, key: str, make):
        name = _FILES[key]
        path = root / sub / name
        if f"{sub}/{name}" in done and path.is_file():
            return
        t0 = time.perf_counter()
        sd = make()
        tmp = path.with_suffix(".tmp")
        save_file(sd, str(tmp), metadata=meta)
        os.replace(tmp, path)
        done.add(f"{sub}/{name}")
        manifest["files"] = sorted(done)
        manifest_path.write_text(json.dumps(manifest, indent=1))
        log.info("built %s in %.1fs", path, time.perf_counter() - t0)

    memo: dict = {}

    def once(key, make):
        def get():
            if key not in memo:
                memo[key] = make()
            return memo[key]
        return get

    clip = once("clip", clip_l_sd)
    sd15_unet = once("sd15_unet", sd15_unet_sd)
    # The random SD1.5 UNet does not denoise, so its KSampler latents come out large (std ~100 at cfg 5);
    # a small vae_scale keeps them in TAESD's unclamped range so decoded images still depend on them.
    taesd4 = once("taesd4", lambda: taesd_sd(4, scale=0.01))

    with torch.inference_mode(False), torch.no_grad():
        write("text_encoders", "clip_l", clip)
        if "sd15" in families:
            write("diffusion_models", "sd15_unet", sd15_unet)
            write("vae", "taesd4", taesd4)

            def ckpt():
                sd = {f"model.diffusion_model.{k}": v for k, v in sd15_unet().items()}
                sd.update({f"first_stage_model.{k}": v for k, v in taesd4().items()})
                sd.update({f"cond_stage_model.transformer.{k}": v for k, v in clip().items()})
                return sd

            write("checkpoints", "sd15_ckpt", ckpt)
        if "wan" in families:
            write("diffusion_models", "wan_unet", wan21_sd)
        if "wan" in families or "wan_i2v" in families:
            write("vae", "wan_vae", wan21_vae_sd)
        if "wan_i2v" in families:
            write("diffusion_models", "wan_i2v_unet", lambda: wan21_sd("i2v", seed=2102))
            write("clip_vision", "clip_vision_h", clip_vision_h_sd)
        if "sd3" in families:
            write("diffusion_models", "sd3_unet", sd3_mmdit_sd)
            write("vae", "taesd16", lambda: taesd_sd(16, seed=4416, scale=1.5305, shift=0.0609))

    table = _model_table()
    return ModelSet(root, {fam: table[fam] for fam in families})


def models_dir_from_env() -> Path | None:
    """The persistent models folder named by ``$SAGE_TEST_MODELS_DIR``, if set."""
    v = os.environ.get(MODELS_DIR_ENV)
    return Path(v).expanduser() if v else None


# --------------------------------------------------------------------------------------------------------------
# Workflows
# --------------------------------------------------------------------------------------------------------------

_FAMILY_DEFAULTS = {
    # sampler, scheduler, cfg
    "sd15": ("euler", "normal", 5.0),
    "wan": ("euler", "simple", 5.0),
    "sd3": ("euler", "simple", 4.5),
}


def workflow_api(family: str, models: dict, *, model_patch=None, seed: int = 42, steps: int = 4,
                 cfg: float | None = None, sampler: str | None = None, scheduler: str | None = None,
                 width: int = 64, height: int = 64, frames: int = 5, batch_size: int = 1,
                 positive: str = "a photo of a red fox in the snow", negative: str = "blurry",
                 use_checkpoint: bool = True, output: str = "SaveImage", filename_prefix: str | None = None) -> dict:
    """API-format prompt for a small text-to-image (sd15, sd3) or text-to-video (wan) sampling run.

    Graph: loaders -> CLIPTextEncode (pos/neg) -> empty latent -> KSampler -> VAEDecode -> ``output``
    (``SaveImage`` or ``PreviewImage``), node ids as in :data:`NODE_IDS`.

    ``models``: a :class:`ModelSet` (or the per-family dict from it). ``model_patch``: a node to put between
    the model loader and KSampler, as ``(class_type, inputs)`` (its ``model`` input is wired for you), or a
    list of those to chain. ``use_checkpoint`` (sd15 only): load via CheckpointLoaderSimple instead of
    UNETLoader + CLIPLoader + VAELoader. ``frames`` (wan only): video length in frames (1 + 4k).
    """
    if family not in _FAMILY_DEFAULTS:
        raise ValueError(f"unknown family {family!r}; one of {sorted(_FAMILY_DEFAULTS)}")
    files = models[family] if family in models else models
    d_sampler, d_sched, d_cfg = _FAMILY_DEFAULTS[family]
    ids = NODE_IDS
    p: dict[str, dict] = {}

    def node(nid, class_type, **inputs):
        p[nid] = {"class_type": class_type, "inputs": inputs}
        return nid

    if family == "sd15" and use_checkpoint:
        node(ids["model"], "CheckpointLoaderSimple", ckpt_name=files["ckpt"])
        model, clip, vae = [ids["model"], 0], [ids["model"], 1], [ids["model"], 2]
    else:
        node(ids["model"], "UNETLoader", unet_name=files["unet"], weight_dtype="default")
        node(ids["clip"], "CLIPLoader", clip_name=files["clip"], type=files["clip_type"])
        node(ids["vae"], "VAELoader", vae_name=files["vae"])
        model, clip, vae = [ids["model"], 0], [ids["clip"], 0], [ids["vae"], 0]

    patches = model_patch
    if patches is not None and isinstance(patches, tuple) and len(patches) == 2 and isinstance(patches[0], str):
        patches = [patches]
    for i, (class_type, inputs) in enumerate(patches or []):
        inputs = dict(inputs or {})
        inputs.setdefault("model", model)
        nid = str(int(ids["patch"]) + i)
        node(nid, class_type, **inputs)
        model = [nid, 0]

    node(ids["positive"], "CLIPTextEncode", text=positive, clip=clip)
    node(ids["negative"], "CLIPTextEncode", text=negative, clip=clip)
    if family == "sd15":
        node(ids["latent"], "EmptyLatentImage", width=width, height=height, batch_size=batch_size)
    elif family == "sd3":
        node(ids["latent"], "EmptySD3LatentImage", width=width, height=height, batch_size=batch_size)
    else:
        node(ids["latent"], "EmptyHunyuanLatentVideo", width=width, height=height, length=frames,
             batch_size=batch_size)
    node(ids["sampler"], "KSampler", model=model, seed=seed, steps=steps, cfg=d_cfg if cfg is None else cfg,
         sampler_name=sampler or d_sampler, scheduler=scheduler or d_sched, positive=[ids["positive"], 0],
         negative=[ids["negative"], 0], latent_image=[ids["latent"], 0], denoise=1.0)
    node(ids["decode"], "VAEDecode", samples=[ids["sampler"], 0], vae=vae)
    if output == "SaveImage":
        node(ids["save"], "SaveImage", images=[ids["decode"], 0], filename_prefix=filename_prefix or f"sage_{family}")
    elif output == "PreviewImage":
        node(ids["save"], "PreviewImage", images=[ids["decode"], 0])
    elif output:
        raise ValueError(f"unsupported output node {output!r}")
    return p


def expected_image_shape(family: str, width: int = 64, height: int = 64, frames: int = 5,
                         batch_size: int = 1) -> tuple[int, int, int, int]:
    """Shape of the VAEDecode IMAGE output of ``workflow_api(family, ...)`` with the same sizes."""
    n = batch_size * (frames if family == "wan" else 1)
    return (n, height, width, 3)


# --------------------------------------------------------------------------------------------------------------
# In-process execution
# --------------------------------------------------------------------------------------------------------------


class PromptError(RuntimeError):
    """A prompt failed validation or execution; ``.details`` holds ComfyUI's error payload."""

    def __init__(self, message: str, details: Any = None):
        super().__init__(message)
        self.details = details


@dataclass
class PromptRun:
    """Result of :meth:`InProcessComfy.run_prompt`."""

    prompt_id: str
    prompt: dict
    outputs: dict  # node id -> output_data (a list per output slot, each a list of values), for run/cached nodes
    ui: dict  # node id -> UI output ({"images": [{filename, subfolder, type}, ...]}, ...)
    messages: list  # (event, data) sent through send_sync during this run, in order
    success: bool
    error: dict | None = None
    seconds: float = 0.0
    executed: list = field(default_factory=list)  # node ids that ran (not cached)

    def output(self, node_id: str, slot: int = 0):
        """Value of output ``slot`` of ``node_id`` (the single value, or the list for list outputs)."""
        vals = self.outputs[str(node_id)][slot]
        return vals[0] if isinstance(vals, list) and len(vals) == 1 else vals

    def image(self, node_id: str = NODE_IDS["decode"]):
        """IMAGE tensor ([N, H, W, 3], float in [0, 1]) produced by ``node_id`` (default: the VAEDecode)."""
        return self.output(node_id, 0)

    def events(self, name: str) -> list:
        return [d for e, d in self.messages if e == name]

    def __getitem__(self, key):  # dict-style access for convenience: run["outputs"], run["messages"], ...
        return getattr(self, key)


_EXTRA_NODES_LOADED = False  # comfy_extras are registered once per process


class InProcessComfy:
    """ComfyUI initialised in this process (CPU) with the pack loaded; run prompts with :meth:`run_prompt`.

    Mirrors what main.py does minus the HTTP server: model folders from an extra-model-paths YAML, output/
    temp/input/user folders under ``work_dir``, built-in extra nodes (comfy_extras, not API nodes), the pack
    loaded with ``nodes.load_custom_node`` (``pack_loaded`` / ``pack_error`` tell how that went), a real
    ``server.PromptServer`` object (never started) whose ``send_sync`` records messages, and ComfyUI's
    progress-bar hook. One ``PromptExecutor`` is kept, so node outputs are cached between prompts exactly as in
    the server (pass ``fresh=True`` to drop them).
    """

    def __init__(self, comfy_dir: str | os.PathLike, models_dir: str | os.PathLike, work_dir: str | os.PathLike,
                 custom_nodes: Sequence[str | os.PathLike] | None = None, init_extra_nodes: bool = True):
        self.comfy_dir = prepare_comfy_imports(comfy_dir)
        self.models_dir = Path(models_dir)
        self.work_dir = Path(work_dir)
        self.custom_node_paths = [Path(p) for p in (custom_nodes if custom_nodes is not None else [])]
        self.init_extra_nodes = init_extra_nodes
        self.pack_loaded: bool | None = None
        self.pack_error: str | None = None
        self.load_results: dict[str, bool] = {}
        self.messages: list = []
        self._lock = threading.Lock()
        self._started = False

    # -- setup ---------------------------------------------------------------------------------------------------
    def start(self) -> "InProcessComfy":
        if self._started:
            return self
        import folder_paths
        import utils.extra_config
        import comfy.utils
        import comfy.model_management
        import execution
        import nodes
        import server

        for sub in ("output", "temp", "input", "user"):
            (self.work_dir / sub).mkdir(parents=True, exist_ok=True)
        folder_paths.set_output_directory(str(self.work_dir / "output"))
        folder_paths.set_temp_directory(str(self.work_dir / "temp"))
        folder_paths.set_input_directory(str(self.work_dir / "input"))
        folder_paths.set_user_directory(str(self.work_dir / "user"))
        yaml_path = write_extra_model_paths(self.work_dir / "extra_model_paths.yaml", self.models_dir)
        utils.extra_config.load_extra_path_config(str(yaml_path))

        self.loop = asyncio.new_event_loop()
        self.server = server.PromptServer(self.loop)
        self.server.send_sync = self._record  # never started: keep every message here instead
        self.client_id = "sage-tests-" + uuid.uuid4().hex[:8]

        async def init():
            global _EXTRA_NODES_LOADED
            if self.init_extra_nodes and not _EXTRA_NODES_LOADED:
                await nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False)
                _EXTRA_NODES_LOADED = True
            base = set(nodes.NODE_CLASS_MAPPINGS)
            for path in self.custom_node_paths:
                self.load_results[str(path)] = await self._load_custom_node(nodes, str(path), base)

        self._run(init())
        if self.custom_node_paths:
            self.pack_loaded = all(self.load_results.values())

        def progress_hook(value, total, preview_image, prompt_id=None, node_id=None):
            from comfy_execution.progress import get_progress_state
            from comfy_execution.utils import get_executing_context

            ctx = get_executing_context()
            if prompt_id is None and ctx is not None:
                prompt_id = ctx.prompt_id
            if node_id is None and ctx is not None:
                node_id = ctx.node_id
            comfy.model_management.throw_exception_if_processing_interrupted()
            prompt_id = prompt_id or self.server.last_prompt_id
            node_id = node_id or self.server.last_node_id
            get_progress_state().update_progress(node_id, value, total, preview_image)
            self.server.send_sync("progress", {"value": value, "max": total, "prompt_id": prompt_id,
                                               "node": node_id}, self.server.client_id)

        comfy.utils.set_progress_bar_global_hook(progress_hook)
        self.executor = execution.PromptExecutor(self.server)
        self._started = True
        return self

    async def _load_custom_node(self, nodes, path: str, base: set) -> bool:
        """``nodes.load_custom_node`` with its log captured, so a failed import is reported, not just logged."""
        records: list[logging.LogRecord] = []

        class _Grab(logging.Handler):
            def emit(self, record):
                records.append(record)

        h = _Grab(logging.WARNING)
        root = logging.getLogger()
        root.addHandler(h)
        try:
            ok = await nodes.load_custom_node(path, base, module_parent="custom_nodes")
        finally:
            root.removeHandler(h)
        if not ok:
            self.pack_error = "\n".join(r.getMessage() for r in records) or f"load_custom_node({path}) failed"
        return ok

    def _record(self, event, data, sid=None):
        with self._lock:
            self.messages.append((event, data))

    def _run(self, coro):
        asyncio.set_event_loop(self.loop)
        return self.loop.run_until_complete(coro)

    # -- running -------------------------------------------------------------------------------------------------
    def validate(self, prompt: dict, prompt_id: str | None = None):
        """``execution.validate_prompt``: returns (ok, error, output node ids, node_errors)."""
        import execution

        self.start()
        return self._run(execution.validate_prompt(prompt_id or uuid.uuid4().hex, prompt, None))

    def run_prompt(self, prompt: dict, *, timeout: float = 600.0, fresh: bool = False,
                   raise_on_error: bool = True) -> PromptRun:
        """Validate and execute ``prompt`` (API format) and return a :class:`PromptRun`.

        Raises :class:`PromptError` on validation errors, and on execution errors unless ``raise_on_error``
        is false. ``timeout`` (seconds) interrupts the run through ComfyUI's interrupt flag.
        """
        import comfy.model_management
        import execution
        import nodes

        self.start()
        prompt_id = uuid.uuid4().hex
        ok, err, outputs, node_errors = self._run(execution.validate_prompt(prompt_id, prompt, None))
        if not ok:
            raise PromptError(f"prompt failed validation: {err.get('message')}: {err.get('details')} "
                              f"{json.dumps(node_errors, default=str)[:2000]}", {"error": err,
                                                                                  "node_errors": node_errors})
        if fresh:
            self.executor.reset()
        with self._lock:
            start_msg = len(self.messages)
        timer = threading.Timer(timeout, nodes.interrupt_processing, args=(True,))
        timer.daemon = True
        t0 = time.perf_counter()
        timer.start()
        try:
            self.server.last_prompt_id = prompt_id
            self._run(self.executor.execute_async(prompt, prompt_id, {"client_id": self.client_id}, outputs))
        finally:
            timer.cancel()
            comfy.model_management.interrupt_current_processing(False)
        seconds = time.perf_counter() - t0
        with self._lock:
            msgs = self.messages[start_msg:]
        out = {}
        for nid in prompt:
            val = self.executor.caches.outputs.get(nid)
            if val is not None:
                out[nid] = getattr(val, "outputs", val)
        error = next((d for e, d in msgs if e in ("execution_error", "execution_interrupted")), None)
        executed = [d.get("node") for e, d in msgs if e == "executing" and d.get("node") is not None]
        run = PromptRun(prompt_id=prompt_id, prompt=prompt, outputs=out,
                        ui=dict(self.executor.history_result.get("outputs", {})), messages=msgs,
                        success=bool(self.executor.success) and error is None, error=error, seconds=seconds,
                        executed=executed)
        if not run.success and raise_on_error:
            if error and "exception_message" in error:
                msg = f"{error.get('node_type')} (node {error.get('node_id')}) failed: {error['exception_message']}"
                msg += "\n" + "".join(error.get("traceback") or [])
            elif error:
                msg = f"execution interrupted at node {error.get('node_id')} (timeout {timeout}s?)"
            else:
                msg = "execution failed"
            raise PromptError(msg, error)
        return run

    def register_node(self, class_type: str, cls, display_name: str | None = None):
        """Register a (V1-style) node class under ``class_type``, e.g. a test-only helper node."""
        import nodes

        self.start()
        nodes.NODE_CLASS_MAPPINGS[class_type] = cls
        if display_name:
            nodes.NODE_DISPLAY_NAME_MAPPINGS[class_type] = display_name

    def pack_nodes(self, dir_name: str = PACK_DIR_NAME) -> list[str]:
        """Class types registered by the pack (loaded from the custom_nodes folder entry ``dir_name``)."""
        import nodes

        self.start()
        mod = f"custom_nodes.{dir_name}"
        return sorted(k for k, c in nodes.NODE_CLASS_MAPPINGS.items()
                      if getattr(c, "RELATIVE_PYTHON_MODULE", None) == mod)

    def node_class(self, class_type: str):
        """The class ComfyUI registered for ``class_type`` (None if unknown)."""
        import nodes

        self.start()
        return nodes.NODE_CLASS_MAPPINGS.get(class_type)

    def close(self):
        if getattr(self, "loop", None) is not None and not self.loop.is_closed():
            with contextlib.suppress(Exception):
                self.loop.close()


# --------------------------------------------------------------------------------------------------------------
# HTTP server
# --------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A ``main.py`` process on loopback, driven over HTTP (urllib) and the /ws websocket (websocket-client).

    Use :func:`start_server` to create one. All calls have bounded timeouts.
    """

    def __init__(self, proc: subprocess.Popen, port: int, work_dir: Path, log_path: Path, output_dir: Path):
        self.proc = proc
        self.port = port
        self.host = "127.0.0.1"
        self.url = f"http://{self.host}:{port}"
        self.work_dir = work_dir
        self.log_path = log_path
        self.output_dir = output_dir
        self.client_id = "sage-tests-" + uuid.uuid4().hex[:8]
        self.messages: dict[str, list] = {}
        self._ws = None

    # -- plain HTTP -------------------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> tuple[int, bytes]:
        """Raw HTTP call; returns (status, body bytes); HTTP errors are returned, not raised."""
        data = None
        headers = {}
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get_json(self, path: str, timeout: float = 30.0):
        status, body = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise RuntimeError(f"GET {path} -> HTTP {status}: {body[:500]!r}")
        return json.loads(body)

    def object_info(self, class_type: str | None = None, timeout: float = 60.0) -> dict:
        return self.get_json("/object_info" + (f"/{urllib.parse.quote(class_type)}" if class_type else ""),
                             timeout=timeout)

    def history(self, prompt_id: str, timeout: float = 30.0) -> dict | None:
        """The /history entry of ``prompt_id`` (``{"outputs", "status", ...}``) or None when not finished."""
        return self.get_json(f"/history/{prompt_id}", timeout=timeout).get(prompt_id)

    def view(self, filename: str, subfolder: str = "", type: str = "output", timeout: float = 30.0) -> bytes:
        q = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": type})
        status, body = self.request("GET", f"/view?{q}", timeout=timeout)
        if status != 200:
            raise RuntimeError(f"/view {q} -> HTTP {status}")
        return body

    # -- prompts ----------------------------------------------------------------------------------------------
    def _connect_ws(self, timeout: float = 10.0):
        if self._ws is not None:
            return self._ws
        try:
            import websocket  # websocket-client
        except ImportError:
            return None
        ws = websocket.WebSocket()
        ws.settimeout(timeout)
        try:
            ws.connect(f"ws://{self.host}:{self.port}/ws?clientId={self.client_id}", timeout=timeout)
        except Exception as e:  # fall back to polling /history
            log.warning("websocket connect failed (%s); polling /history instead", e)
            return None
        self._ws = ws
        return ws

    def queue(self, prompt: dict, timeout: float = 30.0) -> str:
        """POST /prompt; returns the prompt id. Raises :class:`PromptError` with node errors when rejected."""
        self._connect_ws()  # before queueing, so no message of this prompt is missed
        status, body = self.request("POST", "/prompt", {"prompt": prompt, "client_id": self.client_id},
                                    timeout=timeout)
        try:
            data = json.loads(body)
        except ValueError:
            data = {"raw": body[:2000].decode(errors="replace")}
        if status != 200 or "prompt_id" not in data:
            raise PromptError(f"POST /prompt -> HTTP {status}: {json.dumps(data, default=str)[:3000]}", data)
        self.messages[data["prompt_id"]] = []
        return data["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300.0, raise_on_error: bool = True) -> dict:
        """Wait for ``prompt_id`` to finish (websocket, else polling /history) and return its history entry.

        Raises :class:`PromptError` on an execution error (unless ``raise_on_error`` is false) and
        TimeoutError after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        ws = self._ws
        msgs = self.messages.setdefault(prompt_id, [])
        if ws is not None:
            import websocket

            done = False
            while not done and time.monotonic() < deadline:
                self._check_alive()
                ws.settimeout(max(0.1, min(5.0, deadline - time.monotonic())))
                try:
                    raw = ws.recv()
                except websocket.WebSocketTimeoutException:
                    if self.history(prompt_id) is not None:
                        break
                    continue
                except (websocket.WebSocketException, OSError) as e:
                    log.warning("websocket dropped (%s); polling /history", e)
                    self._close_ws()
                    break
                if not isinstance(raw, str):
                    continue  # binary previews
                m = json.loads(raw)
                data = m.get("data") or {}
                if data.get("prompt_id") not in (None, prompt_id):
                    self.messages.setdefault(data["prompt_id"], []).append((m.get("type"), data))
                    continue
                msgs.append((m.get("type"), data))
                if m.get("type") == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                    done = True
                elif m.get("type") in ("execution_error", "execution_interrupted"):
                    done = True
        entry = None
        while time.monotonic() < deadline:
            self._check_alive()
            entry = self.history(prompt_id)
            if entry is not None and entry.get("status", {}).get("completed") is not None:
                break
            time.sleep(0.25)
        else:
            raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout}s\n{self.log_tail()}")
        status = entry.get("status", {})
        if raise_on_error and status.get("status_str") == "error":
            err = next((d for e, d in status.get("messages", []) if e == "execution_error"), status)
            raise PromptError(f"prompt {prompt_id} failed: {err.get('node_type')} node {err.get('node_id')}: "
                              f"{err.get('exception_message')}\n{''.join(err.get('traceback') or [])}", err)
        return entry

    def run(self, prompt: dict, timeout: float = 300.0) -> dict:
        """queue + wait."""
        return self.wait(self.queue(prompt), timeout=timeout)

    def output_files(self, entry: dict) -> list[Path]:
        """Files of the ``images`` outputs in a history entry, as paths under the server's output folder."""
        paths = []
        for out in entry.get("outputs", {}).values():
            for im in out.get("images", []):
                if im.get("type") == "output":
                    paths.append(self.output_dir / im.get("subfolder", "") / im["filename"])
        return paths

    def pack_nodes(self, dir_name: str = PACK_DIR_NAME) -> list[str]:
        """Class types in /object_info that come from the pack's custom_nodes folder entry ``dir_name``."""
        mod = f"custom_nodes.{dir_name}"
        return sorted(k for k, v in self.object_info().items() if v.get("python_module") == mod)

    def custom_node_imports(self) -> dict[str, bool]:
        """The "Import times for custom nodes" table from the server log: {module path: imported ok}."""
        import re

        out = {}
        for line in self.log_path.read_text(errors="replace").splitlines():
            m = re.match(r"^\s*[\d.]+ seconds( \(IMPORT FAILED\))?: (.+)$", line)
            if m:
                out[m.group(2).strip()] = m.group(1) is None
        return out

    # -- lifecycle --------------------------------------------------------------------------------------------
    def log_tail(self, n: int = 60) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "--- ComfyUI log (tail) ---\n" + "\n".join(lines[-n:])

    def _check_alive(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"ComfyUI exited with code {self.proc.returncode}\n{self.log_tail()}")

    def _close_ws(self):
        if self._ws is not None:
            with contextlib.suppress(Exception):
                self._ws.close()
            self._ws = None

    def stop(self, timeout: float = 15.0):
        """Terminate the server (SIGTERM, then SIGKILL after ``timeout``)."""
        self._close_ws()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        with contextlib.suppress(Exception):
            _LIVE_SERVERS.remove(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


_LIVE_SERVERS: list[ComfyServer] = []


@atexit.register
def _stop_live_servers():
    for s in list(_LIVE_SERVERS):
        with contextlib.suppress(Exception):
            s.stop()


def start_server(models_dir: str | os.PathLike, work_dir: str | os.PathLike | None = None, *, port: int | None = None,
                 comfy_dir: str | os.PathLike | None = None, custom_nodes_dir: str | os.PathLike | None = None,
                 only_custom_nodes: Sequence[str] | None = (PACK_DIR_NAME,), extra_args: Sequence[str] = (),
                 env: dict | None = None, timeout: float = 300.0) -> ComfyServer:
    """Launch ``python main.py --cpu`` on 127.0.0.1 and return a :class:`ComfyServer` once /object_info answers.

    ``models_dir``: ComfyUI-layout models folder (see :func:`build_models`). ``work_dir`` (default: a new
    temp folder): gets the YAML, the log (``comfyui.log``) and the output/temp/input/user folders.
    ``custom_nodes_dir``: an extra custom_nodes folder (default: one made in ``work_dir`` holding a symlink to
    this pack). ``only_custom_nodes``: load only these custom node folder names (``--disable-all-custom-nodes
    --whitelist-custom-nodes``), so whatever sits in the checkout's own custom_nodes/ stays out; None loads
    everything. ``port``: default a free one. ``extra_args``: more main.py arguments.
    """
    comfy_dir = Path(comfy_dir) if comfy_dir else find_comfyui()
    if comfy_dir is None:
        raise RuntimeError(COMFYUI_MISSING)
    if work_dir is None:
        import tempfile

        work_dir = tempfile.mkdtemp(prefix="sage-comfy-server-")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    if custom_nodes_dir is None:
        custom_nodes_dir = make_custom_nodes_dir(work_dir)
    yaml_path = write_extra_model_paths(work_dir / "extra_model_paths.yaml", models_dir, custom_nodes_dir)
    dirs = {k: work_dir / k for k in ("output", "temp", "input", "user")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    log_path = work_dir / "comfyui.log"

    last_error = None
    for attempt in range(3):
        p = port if port is not None else free_port()
        args = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(p),
                "--extra-model-paths-config", str(yaml_path), "--output-directory", str(dirs["output"]),
                "--temp-directory", str(dirs["temp"]), "--input-directory", str(dirs["input"]),
                "--user-directory", str(dirs["user"]), "--disable-auto-launch", "--disable-api-nodes",
                "--preview-method", "none", "--database-url", "sqlite:///:memory:", "--log-stdout"]
        if only_custom_nodes is not None:
            args += ["--disable-all-custom-nodes", "--whitelist-custom-nodes", *only_custom_nodes]
        args += list(extra_args)
        penv = dict(os.environ)
        penv.update({"PYTHONUNBUFFERED": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
                     "TOKENIZERS_PARALLELISM": "false"})
        penv.update(env or {})
        logf = open(log_path, "ab")
        logf.write(f"\n=== {' '.join(args)}\n".encode())
        logf.flush()
        proc = subprocess.Popen(args, cwd=str(comfy_dir), stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=penv)
        logf.close()
        srv = ComfyServer(proc, p, work_dir, log_path, dirs["output"])
        _LIVE_SERVERS.append(srv)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            try:
                status, body = srv.request("GET", "/object_info", timeout=10)
                if status == 200 and body.startswith(b"{"):
                    return srv
            except (urllib.error.URLError, ConnectionError, OSError, TimeoutError):
                pass
            time.sleep(0.5)
        tail = srv.log_tail()
        srv.stop()
        last_error = f"ComfyUI server did not answer /object_info on port {p} within {timeout}s " \
                     f"(exit code {proc.returncode})\n{tail}"
        if port is not None or "address already in use" not in tail.lower():
            break
    raise RuntimeError(last_error)
