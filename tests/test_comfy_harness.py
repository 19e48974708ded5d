"""Tests of the real-ComfyUI harness itself (tests/comfy_harness.py, tests/conftest.py).

They do not need any of the pack's nodes: a test-only MODEL -> MODEL node stands in for "Sage Attention" to
prove the model-patch hook and to count attention calls through ComfyUI's ``optimized_attention_override``.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

import comfy_harness as harness

FAMILIES = harness.FAMILIES
ATTENTION_LOG: dict[str, list[tuple]] = {}


class HarnessAttentionCounter:
    """MODEL -> MODEL: clones the model and records every attention call (q shape, heads) under ``tag``."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "tag": ("STRING", {"default": "x"})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "testing"

    def patch(self, model, tag):
        calls = ATTENTION_LOG.setdefault(tag, [])

        def override(func, q, k, v, heads, *args, **kwargs):
            calls.append((tuple(q.shape), heads, bool(kwargs.get("skip_reshape", False))))
            return func(q, k, v, heads, *args, **kwargs)

        m = model.clone()
        m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = override
        return (m,)


# ---------------------------------------------------------------------------------------------------------------
# No ComfyUI needed
# ---------------------------------------------------------------------------------------------------------------


def _fake_checkout(path: Path) -> Path:
    (path / "comfy").mkdir(parents=True)
    (path / "main.py").write_text("")
    return path


def test_find_comfyui_prefers_env(monkeypatch, tmp_path):
    env = _fake_checkout(tmp_path / "env")
    default = _fake_checkout(tmp_path / "default")
    monkeypatch.setattr(harness, "DEFAULT_COMFYUI", default)
    monkeypatch.setenv(harness.COMFYUI_ENV, str(env))
    assert harness.find_comfyui() == env.resolve()
    monkeypatch.setenv(harness.COMFYUI_ENV, str(tmp_path / "nothing-here"))
    assert harness.find_comfyui() == default.resolve()
    monkeypatch.setattr(harness, "DEFAULT_COMFYUI", tmp_path / "missing")
    assert harness.find_comfyui() is None
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "main.py").write_text("")
    assert not harness.is_comfyui_checkout(tmp_path / "half")


def test_workflow_api_wires_model_patch():
    models = {"sd15": {"ckpt": "a.safetensors"}, "sd3": {"unet": "u", "clip": "c", "clip_type": "sd3", "vae": "v"}}
    ids = harness.NODE_IDS
    plain = harness.workflow_api("sd15", models)
    assert plain[ids["model"]]["class_type"] == "CheckpointLoaderSimple"
    assert plain[ids["sampler"]]["inputs"]["model"] == [ids["model"], 0]
    assert plain[ids["sampler"]]["inputs"]["steps"] == 4 and plain[ids["sampler"]]["inputs"]["cfg"] > 1

    one = harness.workflow_api("sd3", models, model_patch=("PatchA", {"mode": "auto"}))
    assert one[ids["patch"]] == {"class_type": "PatchA", "inputs": {"mode": "auto", "model": [ids["model"], 0]}}
    assert one[ids["sampler"]]["inputs"]["model"] == [ids["patch"], 0]
    assert one[ids["latent"]]["class_type"] == "EmptySD3LatentImage"

    two = harness.workflow_api("sd3", models, model_patch=[("PatchA", {}), ("PatchB", {"x": 1})])
    second = str(int(ids["patch"]) + 1)
    assert two[second]["inputs"]["model"] == [ids["patch"], 0]
    assert two[ids["sampler"]]["inputs"]["model"] == [second, 0]
    # every link points at a node of the prompt
    for node in two.values():
        for value in node["inputs"].values():
            if isinstance(value, list):
                assert value[0] in two


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


def test_small_models_are_detected_by_comfyui(small_models):
    import comfy.model_detection
    import comfy.sd
    import comfy.utils

    expected = {"sd15": ("SD15", 20e6, 30e6), "wan": ("WAN21_T2V", 2e6, 3e6), "sd3": ("SD3", 1.5e6, 2.5e6)}
    for family, (config_name, lo, hi) in expected.items():
        sd = comfy.utils.load_torch_file(str(small_models.path(family, "unet")))
        assert lo < sum(v.numel() for v in sd.values()) < hi
        config = comfy.model_detection.model_config_from_unet(sd, "")
        assert type(config).__name__ == config_name, family
    ckpt = comfy.utils.load_torch_file(str(small_models.path("sd15", "ckpt")))
    assert type(comfy.model_detection.model_config_from_unet(ckpt, "model.diffusion_model.")).__name__ == "SD15"
    assert any(k.startswith("first_stage_model.taesd_decoder.") for k in ckpt)
    clip = comfy.utils.load_torch_file(str(small_models.path("sd3", "clip")))
    assert comfy.sd.detect_te_model(clip) == comfy.sd.TEModel.CLIP_L
    for family, channels, dims in (("sd15", 4, 2), ("sd3", 16, 2), ("wan", 16, 3)):
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(small_models.path(family, "vae"))))
        assert (vae.latent_channels, vae.latent_dim) == (channels, dims), family


def test_build_models_is_deterministic_and_reused(comfyui, small_models):
    from safetensors.torch import load_file

    on_disk = load_file(str(small_models.path("sd3", "unet")))
    rebuilt = harness.sd3_mmdit_sd()
    assert on_disk.keys() == rebuilt.keys() and all(on_disk[k].equal(rebuilt[k]) for k in on_disk)
    stamps = {p: p.stat().st_mtime_ns for p in small_models.root.rglob("*.safetensors")}
    assert len(stamps) == 8
    again = harness.build_models(small_models.root, comfy_dir=comfyui)
    assert again == small_models
    assert {p: p.stat().st_mtime_ns for p in small_models.root.rglob("*.safetensors")} == stamps


# ---------------------------------------------------------------------------------------------------------------
# In-process
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.comfy
@pytest.mark.parametrize("family", FAMILIES)
def test_inprocess_sampling(family, comfy_inprocess, small_models):
    import torch

    comfy_inprocess.register_node("HarnessAttentionCounter", HarnessAttentionCounter)
    tag = f"run-{family}"
    ATTENTION_LOG.pop(tag, None)
    prompt = harness.workflow_api(family, small_models, model_patch=("HarnessAttentionCounter", {"tag": tag}),
                                  filename_prefix=f"inproc_{family}")
    run = comfy_inprocess.run_prompt(prompt, timeout=600)
    assert run.success, run.error

    image = run.image()
    assert tuple(image.shape) == harness.expected_image_shape(family)
    assert torch.isfinite(image).all()
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert float(image.std()) > 0.02, "decoded image is flat"
    saturated = float(((image <= 0.0) | (image >= 1.0)).float().mean())
    assert saturated < 0.5, f"{saturated:.0%} of pixels clipped"
    latent = run.output(harness.NODE_IDS["sampler"])["samples"]
    assert torch.isfinite(latent).all() and latent.shape[1] == (4 if family == "sd15" else 16)

    # the patch node sat between loader and sampler, and saw every attention call
    calls = ATTENTION_LOG[tag]
    assert len(calls) == harness.ATTENTION_CALLS_PER_RUN[family]
    head_dim = {"sd15": 40, "wan": 128, "sd3": 64}[family]
    for q_shape, heads, skip_reshape in calls:
        assert (q_shape[-1] if skip_reshape else q_shape[-1] // heads) == head_dim

    # the SaveImage node wrote its file and ComfyUI reported progress for every step
    saved = run.ui[harness.NODE_IDS["save"]]["images"]
    assert len(saved) == image.shape[0]
    out_dir = comfy_inprocess.work_dir / "output"
    assert all((out_dir / im["subfolder"] / im["filename"]).is_file() for im in saved)
    steps = [d for d in run.events("progress") if d["node"] == harness.NODE_IDS["sampler"]]
    assert [d["value"] for d in steps] == [1, 2, 3, 4]
    assert any(e == "execution_success" for e, _ in run.messages)


@pytest.mark.comfy
def test_inprocess_several_prompts_cache_and_seed(comfy_inprocess, small_models):
    import torch

    ids = harness.NODE_IDS

    def prompt(seed):
        return harness.workflow_api("sd15", small_models, use_checkpoint=False, output="PreviewImage", seed=seed)

    first = comfy_inprocess.run_prompt(prompt(7))
    again = comfy_inprocess.run_prompt(prompt(7))
    assert ids["sampler"] in first.executed and ids["sampler"] not in again.executed  # cached by ComfyUI
    assert ids["positive"] not in again.executed
    assert torch.equal(first.image(), again.image())
    other = comfy_inprocess.run_prompt(prompt(8))
    assert ids["sampler"] in other.executed and ids["positive"] not in other.executed
    assert not torch.equal(first.image(), other.image())
    back = comfy_inprocess.run_prompt(prompt(7))
    assert ids["sampler"] in back.executed
    assert torch.equal(first.image(), back.image()), "same seed must give the same image"


@pytest.mark.comfy
def test_inprocess_reports_errors(comfy_inprocess, small_models):
    bad = harness.workflow_api("sd3", small_models)
    bad[harness.NODE_IDS["model"]]["inputs"]["unet_name"] = "does-not-exist.safetensors"
    with pytest.raises(harness.PromptError, match="validation"):
        comfy_inprocess.run_prompt(bad)
    with pytest.raises(harness.PromptError, match="validation"):
        comfy_inprocess.run_prompt(harness.workflow_api("sd3", small_models, model_patch=("NoSuchNode", {})))


@pytest.mark.comfy
def test_inprocess_loads_pack(comfy_inprocess):
    assert comfy_inprocess.pack_loaded is not None, "the pack was not offered to ComfyUI"
    if not (harness.REPO_ROOT / "nodes" / "extension.py").is_file():
        pytest.skip("pack has no nodes/extension.py yet")
    assert comfy_inprocess.pack_loaded, comfy_inprocess.pack_error
    assert comfy_inprocess.pack_nodes(), "the pack registered no nodes"


# ---------------------------------------------------------------------------------------------------------------
# HTTP server
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.comfy
@pytest.mark.comfy_server
def test_server_starts_with_pack(comfy_server):
    info = comfy_server.object_info()
    for node in ("KSampler", "UNETLoader", "CLIPLoader", "EmptySD3LatentImage", "EmptyHunyuanLatentVideo"):
        assert node in info
    imports = comfy_server.custom_node_imports()
    pack = [p for p in imports if Path(p).name == harness.PACK_DIR_NAME]
    assert pack, f"pack not offered to ComfyUI: {imports}\n{comfy_server.log_tail()}"
    assert not [p for p in imports if Path(p).name != harness.PACK_DIR_NAME], "only the pack should load"
    assert comfy_server.proc.poll() is None
    assert comfy_server.host == "127.0.0.1"
    if (harness.REPO_ROOT / "nodes" / "extension.py").is_file():
        assert imports[pack[0]], comfy_server.log_tail()
        assert comfy_server.pack_nodes()


@pytest.mark.comfy
@pytest.mark.comfy_server
def test_server_renders_workflow(comfy_server, small_models):
    from PIL import Image

    prompt = harness.workflow_api("sd15", small_models, filename_prefix="http_sd15")
    prompt_id = comfy_server.queue(prompt)
    entry = comfy_server.wait(prompt_id, timeout=300)
    assert entry["status"]["status_str"] == "success"
    files = comfy_server.output_files(entry)
    assert len(files) == 1 and files[0].is_file() and files[0].stat().st_size > 0
    assert os.path.commonpath([files[0], comfy_server.output_dir]) == str(comfy_server.output_dir)
    with Image.open(files[0]) as im:
        assert im.size == (64, 64)
    served = comfy_server.view(files[0].name, type="output")
    with Image.open(io.BytesIO(served)) as im:
        assert im.size == (64, 64)
    events = [e for e, _ in comfy_server.messages[prompt_id]]
    assert "execution_start" in events and "executed" in events
    assert comfy_server.history(prompt_id)["outputs"] == entry["outputs"]

    with pytest.raises(harness.PromptError):
        comfy_server.queue(harness.workflow_api("sd15", small_models, model_patch=("NoSuchNode", {})))
