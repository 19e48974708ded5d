"""The frontend extension in a real headless Chromium against a ComfyUI server on loopback.

The test loads a workflow (Sage Attention patch node -> Sage Attention Compare) into ComfyUI's own frontend,
queues it from the page, and checks that the compare node shows the before/after slider over the two outputs
with the figures the server reported (its /history entry), that the slider drags, and that the patch node
shows the counters it sent. A screenshot is kept in test-artifacts/ (or $SAGE_TEST_ARTIFACTS).

Needs Debian's chromium (/usr/bin/chromium, or $CHROMIUM) and the playwright package; skips without them.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path

import pytest

import comfy_harness as harness

pytestmark = [pytest.mark.comfy, pytest.mark.comfy_server]

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("SAGE_TEST_ARTIFACTS", REPO / "test-artifacts"))
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
FAMILY = "sd3"
PATCH_ID = harness.NODE_IDS["patch"]
COMPARE_ID = "20"
STEPS = 2


def web_workflow(models) -> dict:
    """Loaders -> Sage Attention (block 0 kept exact) -> Sage Attention Compare ('from model')."""
    patch = ("SageAttention", {"kernel": "int8_fp16", "smooth_k": True, "smooth_v": False,
                               "qk_granularity": "per_warp", "quant_block": "128", "exact_blocks": "0",
                               "start_percent": 0.0, "end_percent": 1.0, "on_unsupported": "fallback"})
    p = harness.workflow_api(FAMILY, models, model_patch=patch, steps=STEPS, output=None)
    ks = p.pop(harness.NODE_IDS["sampler"])
    dec = p.pop(harness.NODE_IDS["decode"])
    i = ks["inputs"]
    p[COMPARE_ID] = {"class_type": "SageAttentionCompare", "inputs": {
        "model": i["model"], "positive": i["positive"], "negative": i["negative"], "latent_image": i["latent_image"],
        "vae": dec["inputs"]["vae"], "seed": 1234, "steps": STEPS, "cfg": i["cfg"], "sampler_name": i["sampler_name"],
        "scheduler": i["scheduler"], "denoise": 1.0, "kernel": "from model", "smooth_k": True, "smooth_v": False,
        "qk_granularity": "per_warp", "quant_block": "128", "exact_blocks": "", "warmup_steps": 1,
        "heat_gain": 10.0}}
    return p


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"chromium not found at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def _num(v):
    return math.inf if v == "inf" else -math.inf if v == "-inf" else float(v)


def _history_payload(server, prompt_id=None, timeout=600.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hist = server.get_json("/history")
        for pid, entry in hist.items():
            if prompt_id not in (None, pid):
                continue
            out = entry.get("outputs", {}).get(COMPARE_ID, {})
            if out.get("sage_compare") and entry.get("status", {}).get("completed"):
                return pid, out["sage_compare"][0]
            if entry.get("status", {}).get("status_str") == "error":
                raise AssertionError(f"prompt failed: {entry['status']}\n{server.log_tail()}")
        time.sleep(0.5)
    raise TimeoutError(f"no compare result within {timeout}s\n{server.log_tail()}")


def test_compare_report_and_counters_in_browser(browser, comfy_server, small_models):
    server = comfy_server
    # a fresh user folder: skip the first-run template browser
    server.request("POST", "/settings/Comfy.TutorialCompleted", True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    console = []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: console.append(f"pageerror: {e} {getattr(e, 'stack', '')}"))
    try:
        page.goto(server.url, wait_until="domcontentloaded", timeout=120_000)
        page.wait_for_function("() => window.app && window.app.graph && window.sageAttentionPack", timeout=120_000)
        # our extension is registered under its name
        assert page.evaluate("() => window.app.extensions.some(e => e.name === 'sage_attention_pack.compare_report')")

        page.evaluate("(wf) => window.app.loadApiJson(wf, 'sage_web_test')", web_workflow(small_models))
        page.wait_for_function(f"() => window.app.graph.getNodeById({COMPARE_ID}) && "
                               f"window.app.graph.getNodeById({PATCH_ID})")
        page.evaluate(f"""() => {{
            const n = window.app.graph.getNodeById({COMPARE_ID});
            n.pos = [950, 80];
            window.app.canvas.ds.scale = 1;
            window.app.canvas.ds.offset = [0, 0];
            window.app.graph.setDirtyCanvas(true, true);
        }}""")
        page.evaluate("() => window.app.queuePrompt(0, 1)")

        prompt_id, payload = _history_payload(server)
        page.wait_for_selector(f'.sage-compare[data-node="{COMPARE_ID}"][data-loaded="true"]', timeout=120_000)
        page.wait_for_selector(f'.sage-stats[data-node="{PATCH_ID}"]', timeout=60_000)
        page.evaluate(f"""() => {{
            window.app.canvas.ds.scale = 0.75;
            window.app.canvas.centerOnNode(window.app.graph.getNodeById({COMPARE_ID}));
            window.app.graph.setDirtyCanvas(true, true);
        }}""")
        page.wait_for_timeout(500)

        # the node grew to show the whole report (nothing clipped)
        page.wait_for_function(f"""() => {{
            const host = document.querySelector('.sage-compare[data-node="{COMPARE_ID}"]').parentElement;
            return host.scrollHeight <= host.clientHeight + 2;
        }}""", timeout=10_000)

        # -- the figures are the server's ---------------------------------------------------------------------
        figures = page.evaluate("""() => Object.fromEntries([...document.querySelectorAll(
            '.sage-compare-figures tr')].map(tr => [tr.dataset.key, {value: tr.querySelector('td').dataset.value,
            text: tr.querySelector('td').textContent}]))""")
        expect = {
            "sampling_exact": payload["exact"]["sampling_s"], "sampling_sage": payload["sage"]["sampling_s"],
            "speedup": payload["speedup"], "attention_exact": payload["exact"]["attention_s"],
            "attention_sage": payload["sage"]["attention_s"], "attention_speedup": payload["attention_speedup"],
            "psnr": payload["psnr"], "ssim": payload["ssim"], "max_diff_8bit": payload["max_diff_8bit"],
            "latent_cosine": payload["latent_cosine"],
            "sage_calls": sum(payload["sage"]["counters"]["sage"].values()),
            "kept_exact": sum(payload["sage"]["counters"]["exact"].values()),
            "fallbacks": sum(payload["sage"]["counters"]["fallback"].values()),
        }
        for key, value in expect.items():
            assert key in figures, (key, figures)
            shown = figures[key]["value"]
            if isinstance(value, str) or isinstance(value, int):
                assert shown == str(value), (key, shown, value)
            else:
                assert _num(shown) == pytest.approx(value, rel=1e-12), (key, shown, value)
        psnr = _num(payload["psnr"])
        assert figures["psnr"]["text"] == ("∞ dB (identical)" if psnr == math.inf else f"{psnr:.2f} dB")
        assert figures["ssim"]["text"] == f"{payload['ssim']:.4f}"
        speedup = payload["speedup"]
        shown = figures["speedup"]["text"]
        assert shown.endswith("×") and float(shown[:-1]) == pytest.approx(speedup, rel=0.05, abs=0.005)
        assert figures["kept_exact"]["text"].startswith(f"{STEPS} (block kept exact: {STEPS})")

        # -- both images are the server's previews, loaded ----------------------------------------------------
        imgs = page.evaluate("""() => [...document.querySelectorAll('.sage-compare img')].map(i => ({
            cls: i.className, src: i.getAttribute('src'), w: i.naturalWidth, h: i.naturalHeight}))""")
        by = {("before" if "before" in i["cls"] else "after"): i for i in imgs}
        assert payload["images"]["exact"][0]["filename"] in by["before"]["src"]
        assert payload["images"]["sage"][0]["filename"] in by["after"]["src"]
        h, w = payload["image_shape"][1:3]
        assert (by["before"]["w"], by["before"]["h"]) == (w, h) and (by["after"]["w"], by["after"]["h"]) == (w, h)

        # -- the slider drags -------------------------------------------------------------------------------
        stage = page.locator(f'.sage-compare[data-node="{COMPARE_ID}"] .sage-compare-stage')
        box = stage.bounding_box()
        assert box and box["width"] > 50 and box["height"] > 50
        assert page.get_attribute(f'.sage-compare[data-node="{COMPARE_ID}"]', "data-position") == "50.0"
        y = box["y"] + box["height"] / 2
        page.mouse.move(box["x"] + box["width"] * 0.5, y)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.35, y, steps=5)
        page.mouse.move(box["x"] + box["width"] * 0.25, y, steps=5)
        page.mouse.up()
        pos = float(page.get_attribute(f'.sage-compare[data-node="{COMPARE_ID}"]', "data-position"))
        assert pos == pytest.approx(25.0, abs=1.5)
        clip = page.evaluate(f"""() => getComputedStyle(document.querySelector(
            '.sage-compare[data-node="{COMPARE_ID}"] .sage-compare-before')).clipPath""")
        assert clip.startswith("inset(") and f"{100 - pos:.1f}".rstrip("0").rstrip(".") in clip
        handle_left = page.evaluate(f"""() => {{
            const s = document.querySelector('.sage-compare[data-node="{COMPARE_ID}"] .sage-compare-stage')
                .getBoundingClientRect();
            const h = document.querySelector('.sage-compare[data-node="{COMPARE_ID}"] .sage-compare-handle')
                .getBoundingClientRect();
            return (h.left + h.width / 2 - s.left) / s.width;
        }}""")
        assert handle_left == pytest.approx(pos / 100, abs=0.02)
        # keyboard: the handle is a focusable slider
        page.focus(f'.sage-compare[data-node="{COMPARE_ID}"] .sage-compare-handle')
        page.keyboard.press("ArrowRight")
        pos2 = float(page.get_attribute(f'.sage-compare[data-node="{COMPARE_ID}"]', "data-position"))
        assert pos2 == pytest.approx(pos + 2, abs=0.01)

        # -- the patch node's counters are what it sent (the last run: the timed Sage run) ---------------------
        sent = page.evaluate(f"() => window.sageAttentionPack.received.stats['{PATCH_ID}']")
        assert sent["exact"] == payload["sage"]["counters"]["exact"]
        assert sent["sage"] == payload["sage"]["counters"]["sage"]
        assert sent["fallback"] == payload["sage"]["counters"]["fallback"]
        badge = page.locator(f'.sage-stats[data-node="{PATCH_ID}"]')
        assert badge.get_attribute("data-total") == str(sent["total"])
        assert badge.get_attribute("data-sage") == str(sum(sent["sage"].values()))
        assert badge.get_attribute("data-fallback") == str(sum(sent["fallback"].values()))
        assert badge.get_attribute("data-rotary") == str(sent["rotary_fused"]) == "0"  # SD3 has no rotary table
        items = page.evaluate(f"""() => [...document.querySelectorAll('.sage-stats[data-node="{PATCH_ID}"] li')]
            .map(li => li.textContent)""")
        for variant, n in sent["sage"].items():
            assert f"{variant}: {n}" in items
        for reason, n in sent["fallback"].items():
            assert f"fallback, {reason}: {n}" in items
        assert f"exact, block kept exact: {STEPS}" in items
        assert badge.is_visible()

        page.screenshot(path=str(ARTIFACTS / "web_compare.png"))
        page.locator(f'.sage-compare[data-node="{COMPARE_ID}"]').screenshot(
            path=str(ARTIFACTS / "web_compare_node.png"))
        # nothing of ours failed (the frontend itself logs unrelated errors on a bare server: missing
        # optional endpoints, settings it has not registered yet)
        ours = [c for c in console if ("sage" in c.lower() or "extensions/" in c) and
                (c.startswith("pageerror") or c.startswith("error"))]
        assert not ours, ours
    except Exception:
        page.screenshot(path=str(ARTIFACTS / "web_compare_failure.png"))
        (ARTIFACTS / "web_console.log").write_text("\n".join(console))
        raise
    finally:
        page.close()
