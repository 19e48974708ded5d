"""Shared pytest fixtures: a real ComfyUI checkout, tiny random-weight models, ComfyUI in-process and over HTTP.

Fixtures (``seeded_torch`` seeds torch before every test; the rest are session-scoped, and the ComfyUI ones skip with
a clear reason when no checkout is found):

* ``comfyui`` -> Path of the checkout, with ComfyUI importable (first on sys.path) and ``--cpu`` set.
* ``small_models`` -> :class:`comfy_harness.ModelSet` (``{family: {role: file name}}``, ``.root`` folder).
* ``pack_custom_nodes`` -> a custom_nodes folder holding a symlink to this pack (``sage-attention-pack``).
* ``comfy_inprocess`` -> started :class:`comfy_harness.InProcessComfy` with the pack loaded.
* ``run_prompt`` -> ``comfy_inprocess.run_prompt`` (prompt dict -> :class:`comfy_harness.PromptRun`).
* ``comfy_server`` -> running :class:`comfy_harness.ComfyServer` (main.py --cpu on 127.0.0.1) with the pack.

See tests/comfy_harness.py for the helpers (``workflow_api``, ``NODE_IDS``, ``build_models``, ...).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# every call plan checks that its launches ask for what their first launch compiled (kernels/call_plan.py)
os.environ.setdefault("SAGE_ATTENTION_CHECK_PLANS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import comfy_harness as harness  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "comfy: needs a ComfyUI checkout (COMFYUI_PATH or ~/comfy/ComfyUI)")
    config.addinivalue_line("markers", "comfy_server: starts a ComfyUI server process")


@pytest.fixture(autouse=True)
def seeded_torch():
    """Each test draws its unseeded random inputs from one seed, whatever ran before it: a tolerance met once is met
    on every machine and in every order."""
    import torch

    torch.manual_seed(0)


@pytest.fixture(scope="session")
def comfyui() -> Path:
    path = harness.find_comfyui()
    if path is None:
        pytest.skip(harness.COMFYUI_MISSING)
    return harness.prepare_comfy_imports(path)


@pytest.fixture(scope="session")
def small_models(comfyui, tmp_path_factory) -> harness.ModelSet:
    root = harness.models_dir_from_env() or tmp_path_factory.mktemp("comfy_models")
    return harness.build_models(root, comfy_dir=comfyui)


@pytest.fixture(scope="session")
def pack_custom_nodes(tmp_path_factory) -> Path:
    return harness.make_custom_nodes_dir(tmp_path_factory.mktemp("pack"))


@pytest.fixture(scope="session")
def comfy_inprocess(comfyui, small_models, pack_custom_nodes, tmp_path_factory):
    comfy = harness.InProcessComfy(comfyui, small_models.root, tmp_path_factory.mktemp("comfy_inprocess"),
                                   custom_nodes=[pack_custom_nodes / harness.PACK_DIR_NAME])
    comfy.start()
    yield comfy
    comfy.close()


@pytest.fixture(scope="session")
def run_prompt(comfy_inprocess):
    return comfy_inprocess.run_prompt


@pytest.fixture(scope="session")
def comfy_server(comfyui, small_models, pack_custom_nodes, tmp_path_factory):
    server = harness.start_server(small_models.root, tmp_path_factory.mktemp("comfy_server"), comfy_dir=comfyui,
                                  custom_nodes_dir=pack_custom_nodes)
    yield server
    server.stop()
