"""sage-batch: workflow conversion, job expansion, manifest and never-overwrite rules (pure), and batches on real
ComfyUI servers on loopback: two servers with one killed mid-batch, resume, a started server restarted, and bad
input refused before anything is queued."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from sage_attention_pack.sage_core.batch.errors import BatchError
from sage_attention_pack.sage_core.batch.jobs import (
    parse_assignment,
    parse_grid,
    parse_seeds,
    plan_batch,
    read_prompts,
)
from sage_attention_pack.sage_core.batch.manifest import Manifest, save_new_file
from sage_attention_pack.sage_core.batch.workflow import (
    find_nodes,
    set_input,
    ui_to_api,
    validate_graph,
)

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "sage_attention_pack.sage_core.batch"]
SD15_WORKFLOW = REPO / "workflows" / "sage_sd1.5_text_to_image.json"

# ------------------------------------------------------------------------------------------------- a small /object_info

OI = {
    "CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [["a.safetensors", "b.safetensors"]]}},
                               "output": ["MODEL", "CLIP", "VAE"], "output_name": ["MODEL", "CLIP", "VAE"],
                               "display_name": "Load Checkpoint"},
    "CLIPTextEncode": {"input": {"required": {"text": ["STRING", {"multiline": True}], "clip": ["CLIP"]}},
                       "output": ["CONDITIONING"], "output_name": ["CONDITIONING"]},
    "EmptyLatentImage": {"input": {"required": {"width": ["INT", {"default": 512, "min": 16, "max": 16384}],
                                                "height": ["INT", {"default": 512, "min": 16, "max": 16384}],
                                                "batch_size": ["INT", {"default": 1, "min": 1, "max": 4096}]}},
                         "output": ["LATENT"], "display_name": "Empty Latent Image"},
    "KSampler": {"input": {"required": {
        "model": ["MODEL"], "seed": ["INT", {"default": 0, "min": 0, "max": 2**64 - 1, "control_after_generate": True}],
        "steps": ["INT", {"default": 20, "min": 1, "max": 10000}], "cfg": ["FLOAT", {"default": 8.0, "min": 0.0}],
        "sampler_name": [["euler", "uni_pc"]], "scheduler": [["normal", "simple"]], "positive": ["CONDITIONING"],
        "negative": ["CONDITIONING"], "latent_image": ["LATENT"],
        "denoise": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0}]}},
        "input_order": {"required": ["model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive",
                                     "negative", "latent_image", "denoise"]},
        "output": ["LATENT"], "display_name": "KSampler"},
    "VAEDecode": {"input": {"required": {"samples": ["LATENT"], "vae": ["VAE"]}}, "output": ["IMAGE"]},
    "SaveImage": {"input": {"required": {"images": ["IMAGE"], "filename_prefix": ["STRING", {"default": "ComfyUI"}]}},
                  "output": [], "output_node": True, "display_name": "Save Image"},
    "LoadImage": {"input": {"required": {"image": [["x.png"], {"image_upload": True}]}}, "output": ["IMAGE", "MASK"]},
    "SageAttention": {"input": {"required": {
        "model": ["MODEL", {}], "kernel": ["COMBO", {"options": ["auto", "int8_fp16", "int8_fp8", "off"]}],
        "smooth_k": ["BOOLEAN", {"default": True}], "quant_block": ["COMBO", {"options": ["128", "64"]}]}},
        "output": ["MODEL"], "display_name": "Sage Attention"},
}


def _node(nid, kind, widgets=None, inputs=(), outputs=(), mode=0, title=None):
    n = {"id": nid, "type": kind, "pos": [0, 0], "size": [100, 100], "mode": mode,
         "inputs": [dict(i) for i in inputs], "outputs": [dict(o) for o in outputs], "widgets_values": widgets}
    if title:
        n["title"] = title
    return n


def ui_graph():
    """A UI-format graph with a primitive, a reroute, a bypassed and a muted node, a note and a seed control."""
    nodes = [
        _node(1, "CheckpointLoaderSimple", ["a.safetensors"],
              outputs=[{"name": "MODEL", "type": "MODEL", "links": [1]},
                       {"name": "CLIP", "type": "CLIP", "links": [2, 3]},
                       {"name": "VAE", "type": "VAE", "links": [4]}]),
        _node(2, "PrimitiveNode", ["a red fox", "fixed"], outputs=[{"name": "STRING", "type": "STRING", "links": [5]}],
              title="Prompt"),
        _node(3, "CLIPTextEncode", ["ignored text"], title="Positive",
              inputs=[{"name": "clip", "type": "CLIP", "link": 2},
                      {"name": "text", "type": "STRING", "widget": {"name": "text"}, "link": 5}],
              outputs=[{"name": "CONDITIONING", "type": "CONDITIONING", "links": [6]}]),
        _node(4, "CLIPTextEncode", ["blurry"], title="Negative", inputs=[{"name": "clip", "type": "CLIP", "link": 3}],
              outputs=[{"name": "CONDITIONING", "type": "CONDITIONING", "links": [7]}]),
        _node(5, "EmptyLatentImage", [512, 512, 1], outputs=[{"name": "LATENT", "type": "LATENT", "links": [8]}]),
        _node(6, "Reroute", [], inputs=[{"name": "", "type": "*", "link": 1}],
              outputs=[{"name": "", "type": "MODEL", "links": [9]}]),
        _node(7, "SageAttention", ["auto", True, "128"], mode=4, inputs=[{"name": "model", "type": "MODEL", "link": 9}],
              outputs=[{"name": "MODEL", "type": "MODEL", "links": [10]}]),
        _node(8, "KSampler", [42, "randomize", 20, 7.5, "euler", "normal", 1.0],
              inputs=[{"name": "model", "type": "MODEL", "link": 10},
                      {"name": "positive", "type": "CONDITIONING", "link": 6},
                      {"name": "negative", "type": "CONDITIONING", "link": 7},
                      {"name": "latent_image", "type": "LATENT", "link": 8}],
              outputs=[{"name": "LATENT", "type": "LATENT", "links": [11]}]),
        _node(9, "VAEDecode", [], inputs=[{"name": "samples", "type": "LATENT", "link": 11},
                                          {"name": "vae", "type": "VAE", "link": 4}],
              outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [12, 13]}]),
        _node(10, "SaveImage", ["run"], inputs=[{"name": "images", "type": "IMAGE", "link": 12}]),
        _node(11, "SaveImage", ["muted"], mode=2, inputs=[{"name": "images", "type": "IMAGE", "link": 13}]),
        _node(12, "Note", ["just a note"]),
        _node(13, "LoadImage", ["x.png", "image"], outputs=[{"name": "IMAGE", "type": "IMAGE", "links": []}]),
    ]
    links = [[1, 1, 0, 6, 0, "MODEL"], [2, 1, 1, 3, 0, "CLIP"], [3, 1, 1, 4, 0, "CLIP"], [4, 1, 2, 9, 1, "VAE"],
             [5, 2, 0, 3, 1, "STRING"], [6, 3, 0, 8, 1, "CONDITIONING"], [7, 4, 0, 8, 2, "CONDITIONING"],
             [8, 5, 0, 8, 3, "LATENT"], [9, 6, 0, 7, 0, "MODEL"], [10, 7, 0, 8, 0, "MODEL"],
             [11, 8, 0, 9, 0, "LATENT"], [12, 9, 0, 10, 0, "IMAGE"], [13, 9, 0, 11, 0, "IMAGE"]]
    return {"nodes": nodes, "links": links, "version": 0.4}


def api_graph():
    return ui_to_api(ui_graph(), OI)


# ------------------------------------------------------------------------------------------------- pure parts


def test_ui_to_api_follows_the_frontend_rules():
    api = api_graph()
    assert set(api) == {"1", "3", "4", "5", "8", "9", "10", "13"}  # no primitive/reroute/note, bypassed, muted
    assert api["3"]["inputs"] == {"text": "a red fox", "clip": ["1", 1]}  # primitive value wins over the widget
    assert api["8"]["inputs"]["model"] == ["1", 0]  # through the reroute and the bypassed Sage node
    assert api["8"]["inputs"]["seed"] == 42 and api["8"]["inputs"]["steps"] == 20  # seed control value skipped
    assert api["8"]["inputs"]["sampler_name"] == "euler" and api["8"]["inputs"]["denoise"] == 1.0
    assert api["13"]["inputs"] == {"image": "x.png"}  # upload button value skipped
    assert api["3"]["_meta"]["title"] == "Positive" and api["5"]["_meta"]["title"] == "Empty Latent Image"
    assert validate_graph(api, OI) == []


def test_validation_names_every_problem():
    api = api_graph()
    api["1"]["inputs"]["ckpt_name"] = "missing.safetensors"
    api["8"]["inputs"]["steps"] = 0
    api["9"]["inputs"]["vae"] = ["1", 7]
    api["99"] = {"class_type": "NoSuchNode", "inputs": {}}
    errs = "\n".join(validate_graph(api, OI))
    assert "missing.safetensors" in errs and "models/checkpoints" in errs
    assert "below the minimum 1" in errs
    assert "output 7 of #1" in errs
    assert "NoSuchNode" in errs


def test_overrides_by_title_id_and_type_with_clear_errors():
    api = api_graph()
    assert find_nodes(api, "Positive") == ["3"] and find_nodes(api, "#8") == ["8"]
    assert find_nodes(api, "ksampler") == ["8"]
    set_input(api, OI, "KSampler.steps", "30")
    set_input(api, OI, "#8.cfg", "4.5")
    set_input(api, OI, "Empty Latent Image.width", 640)
    assert api["8"]["inputs"]["steps"] == 30 and api["8"]["inputs"]["cfg"] == 4.5 and api["5"]["inputs"]["width"] == 640
    with pytest.raises(BatchError, match="no node titled"):
        set_input(api, OI, "KSamplr.steps", "3")
    with pytest.raises(BatchError, match="did you mean steps"):
        set_input(api, OI, "KSampler.stepz", "3")
    with pytest.raises(BatchError, match="not a valid INT"):
        set_input(api, OI, "KSampler.steps", "many")
    with pytest.raises(BatchError, match="not one of the server's choices"):
        set_input(api, OI, "KSampler.sampler_name", "eulr")
    with pytest.raises(BatchError, match="connection"):
        set_input(api, OI, "KSampler.model", "x")
    with pytest.raises(BatchError, match="matches several nodes"):
        set_input(api, OI, "CLIPTextEncode.text", "x", allow_many=False)
    with pytest.raises(BatchError, match="expected 'Node"):
        parse_assignment("steps")


def test_prompts_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# comment\na fox\n\n  an owl  \n")
    assert [r.prompt for r in read_prompts(txt)] == ["a fox", "an owl"]
    csv_ = tmp_path / "p.csv"
    csv_.write_text('prompt,negative,seed,KSampler.steps\n"a fox, running",blurry,7,12\nan owl,,,\n')
    rows = read_prompts(csv_)
    assert (rows[0].prompt, rows[0].negative, rows[0].seed, rows[0].overrides) == (
        "a fox, running", "blurry", 7, [("KSampler.steps", "12")])
    assert (rows[1].prompt, rows[1].negative, rows[1].seed, rows[1].overrides) == ("an owl", None, None, [])
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "a fox", "seed": 3, "set": {"KSampler.cfg": 5}}\n"an owl"\n')
    rows = read_prompts(jl)
    assert rows[0].overrides == [("KSampler.cfg", 5)] and rows[1].prompt == "an owl"
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,colour\nx,y\n")
    with pytest.raises(BatchError, match="unknown column"):
        read_prompts(bad)
    badj = tmp_path / "bad.jsonl"
    badj.write_text('{"prompt": "x"\n')
    with pytest.raises(BatchError, match="line 1"):
        read_prompts(badj)
    with pytest.raises(BatchError, match="cannot read"):
        read_prompts(tmp_path / "none.txt")


def test_seeds_and_grid_parsing():
    assert parse_seeds("1,2,10-12") == [1, 2, 10, 11, 12]
    for bad in ("x", "5-1", ""):
        with pytest.raises(BatchError):
            parse_seeds(bad)
    axis = parse_grid("KSampler.cfg=4,6")
    assert [c[0] for c in axis.cells] == ["cfg-4", "cfg-6"]


def test_plan_batch_expands_and_names_jobs_stably(tmp_path):
    api = api_graph()
    api["11"] = {"class_type": "SageAttention", "inputs": {"model": ["1", 0], "kernel": "auto", "smooth_k": True,
                                                          "quant_block": "128"}, "_meta": {"title": "Sage Attention"}}
    api["8"]["inputs"]["model"] = ["11", 0]
    p = tmp_path / "p.txt"
    p.write_text("a fox\nan owl\n")
    rows = read_prompts(p)

    def plan():
        return plan_batch(api, OI, rows=rows, seeds=[1, 2], sets=[("KSampler.steps", "3")],
                          axes=[parse_grid("KSampler.cfg=4,6")], sage_ab=True)

    a, b = plan(), plan()
    assert len(a.jobs) == 2 * 2 * 2 * 2
    assert [j.name for j in a.jobs] == [j.name for j in b.jobs]
    assert len({j.key for j in a.jobs}) == len(a.jobs) and len({j.name for j in a.jobs}) == len(a.jobs)
    assert a.prompt_targets == [("3", "text")] and a.negative_targets == [("4", "text")]
    j = a.jobs[-1]
    assert j.graph["3"]["inputs"]["text"] == "an owl" and j.graph["8"]["inputs"]["seed"] == 2
    assert j.graph["8"]["inputs"]["steps"] == 3 and j.graph["8"]["inputs"]["cfg"] == 6.0
    assert j.graph["11"]["inputs"]["kernel"] == "off" and "sage-off" in j.name and "s2" in j.name
    assert a.jobs[0].graph["11"]["inputs"]["kernel"] == "auto"
    with pytest.raises(BatchError, match="prompts row 1"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"prompt": "x", "KSampler.steps": "lots"}\n')
        plan_batch(api, OI, rows=read_prompts(bad))


def test_outputs_are_never_overwritten(tmp_path):
    def writer(data):
        return lambda fp: fp.write(data)

    assert save_new_file(tmp_path, "job", ".png", writer(b"one")) == "job.png"
    assert save_new_file(tmp_path, "job", ".png", writer(b"two")) == "job-1.png"
    assert (tmp_path / "job.png").read_bytes() == b"one" and (tmp_path / "job-1.png").read_bytes() == b"two"

    def broken(fp):
        fp.write(b"half")
        raise OSError("connection lost")

    with pytest.raises(OSError):
        save_new_file(tmp_path, "job2", ".png", broken)
    assert sorted(os.listdir(tmp_path)) == ["job-1.png", "job.png"]  # no half file, no leftover


def test_manifest_resume_state(tmp_path):
    m = Manifest(tmp_path)
    (tmp_path / "a.png").write_bytes(b"x")
    m.append({"type": "job", "key": "k1", "status": "failed", "outputs": []})
    m.append({"type": "job", "key": "k1", "status": "ok", "outputs": [{"file": "a.png"}]})
    m.append({"type": "job", "key": "k2", "status": "ok", "outputs": [{"file": "gone.png"}]})
    m.append({"type": "job", "key": "k3", "status": "failed", "outputs": []})
    with open(m.path, "a") as f:
        f.write('{"type": "job", "key": "k4", "sta')  # a run killed mid-line
    assert m.completed_keys() == {"k1"}
    m.append({"type": "job", "key": "k4", "status": "ok", "outputs": [{"file": "a.png"}]})
    assert m.completed_keys() == {"k1", "k4"}


def test_cli_refuses_unreadable_input_without_a_server(tmp_path, capsys):
    from sage_attention_pack.sage_core.batch.cli import main

    bad = tmp_path / "wf.json"
    bad.write_text("{not json")
    assert main([str(bad), "--server", "127.0.0.1:9"]) == 2
    assert "cannot read workflow" in capsys.readouterr().err
    assert main([str(SD15_WORKFLOW), "--seeds", "1-x", "--server", "127.0.0.1:9"]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert main([str(SD15_WORKFLOW), "--server", "127.0.0.1:9", "-o", str(tmp_path / "o")]) == 2
    assert "cannot reach ComfyUI at 127.0.0.1:9" in capsys.readouterr().err
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "manifest.jsonl").write_text('{"type": "batch"}\n')
    assert main([str(SD15_WORKFLOW), "--server", "127.0.0.1:9", "-o", str(tmp_path / "o")]) == 2
    assert "pass --resume" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- real servers


@pytest.fixture(scope="module")
def harness():
    import comfy_harness

    return comfy_harness


@pytest.fixture
def two_servers(harness, comfy_server, small_models, pack_custom_nodes, comfyui, tmp_path):
    """The session's server and one of this test's own (the one that may be killed)."""
    extra = harness.start_server(small_models.root, tmp_path / "server_b", comfy_dir=comfyui,
                                 custom_nodes_dir=pack_custom_nodes)
    yield [comfy_server, extra]
    extra.stop()


def small_sets(models):
    return ["--set", f"Load Checkpoint.ckpt_name={models['sd15']['ckpt']}", "--set", "Empty Latent Image.width=64",
            "--set", "Empty Latent Image.height=64", "--set", "KSampler.steps=2"]


class CliRun:
    """The CLI in a subprocess, its stderr read line by line so the test can act on progress."""

    def __init__(self, args, on_line=None, cwd=None):
        self.lines = []
        self.proc = subprocess.Popen(CLI + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     cwd=cwd or REPO, stdin=subprocess.DEVNULL)
        self._on_line = on_line
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if self._on_line:
                self._on_line(line)

    def wait(self, timeout):
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError("sage-batch did not finish in time:\n" + "\n".join(self.lines[-40:]))
        self._t.join(10)
        self.stdout = self.proc.stdout.read()
        return rc

    @property
    def text(self):
        return "\n".join(self.lines)


def job_states(out):
    return Manifest(out).job_states()


def rendered_files(out):
    return sorted(p.name for p in Path(out).iterdir() if p.is_file() and p.name != "manifest.jsonl")


@pytest.mark.comfy_server
def test_batch_over_two_servers_survives_a_killed_server_and_resumes(two_servers, small_models, tmp_path):
    a, b = two_servers
    sage = "SageAttention" in a.object_info()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox in the snow\nan owl at night\n")
    out = tmp_path / "out"
    ab = ["--sage-ab"] if sage else ["--grid", "KSampler.cfg=4,6"]
    batch = [str(SD15_WORKFLOW), "--prompts", str(prompts), "--seeds", "1-2", *ab, *small_sets(small_models),
             "-o", str(out), "--progress", "plain", "--retries", "1", "--job-timeout", "300"]
    args = batch + ["--server", f"127.0.0.1:{a.port}", "--server", f"127.0.0.1:{b.port}"]
    b_label = f"127.0.0.1:{b.port}"
    state = {"done": 0, "killed_during": None}

    def on_line(line):
        if line.split("] ", 1)[-1].startswith("done "):
            state["done"] += 1
        m = re.search(r"\] (\S+): started (\S+)", line)
        if m and m.group(1) == b_label and state["done"] >= 1 and state["killed_during"] is None:
            state["killed_during"] = m.group(2)
            b.proc.kill()  # the server dies in the middle of a job

    run = CliRun(args, on_line)
    rc = run.wait(600)
    assert state["killed_during"], "server B never took a second job:\n" + run.text
    assert rc == 0, run.text
    assert f"server {b_label} dropped from the pool" in run.text

    states = job_states(out)
    assert len(states) == 8 and all(s["status"] == "ok" for s in states.values()), run.text
    named = [o["file"] for s in states.values() for o in s["outputs"]]
    assert len(named) == len(set(named)) == 8  # one image per job, each named once
    assert rendered_files(out) == sorted(named)  # every output exists, nothing else (no half files)
    for s in states.values():
        assert s["inputs"]["seed"] in (1, 2) and s["inputs"]["prompt"] in ("a red fox in the snow", "an owl at night")
        assert set(s["timings"]) >= {"queued_at", "run_s", "total_s"}
        assert (Path(out) / s["outputs"][0]["file"]).read_bytes()[:4] == b"\x89PNG"
    killed = next(s for s in states.values() if s["job"] == state["killed_during"])
    assert killed["server"] == f"127.0.0.1:{a.port}"  # the job the dead server held was rendered by the other
    if sage:
        kernels = sorted(s["attention"]["nodes"][0]["settings"]["kernel"] for s in states.values())
        assert kernels == ["auto"] * 4 + ["off"] * 4
        assert any(s["attention"]["stats"] for s in states.values()), "no sage_attention.stats event recorded"

    before = (out / "manifest.jsonl").read_text()
    again = CliRun(batch + ["--server", f"127.0.0.1:{a.port}", "--resume"])
    assert again.wait(300) == 0, again.text
    assert "nothing to render" in again.text
    assert (out / "manifest.jsonl").read_text() == before and rendered_files(out) == sorted(named)


@pytest.mark.comfy_server
def test_bad_input_is_refused_before_anything_is_queued(comfy_server, small_models, tmp_path):
    a = comfy_server
    history_before = a.get_json("/history")
    base = [str(SD15_WORKFLOW), "--server", f"127.0.0.1:{a.port}", "--progress", "none"]
    cases = [
        (["--set", "No Such Node.steps=3"], "no node titled"),
        (["--set", "KSampler.stepz=3"], "no input named 'stepz'"),
        (["--set", "KSampler.steps=lots"], "not a valid INT"),
        ([], "v1-5-pruned-emaonly-fp16.safetensors"),  # the real model file is not on the test server
        (["--set", f"Load Checkpoint.ckpt_name={small_models['sd15']['ckpt']}", "--set", "KSampler.cfg=1000"],
         "above the maximum"),
    ]
    for i, (extra, needle) in enumerate(cases):
        out = tmp_path / f"out{i}"
        r = subprocess.run(CLI + base + extra + ["-o", str(out)], capture_output=True, text=True, timeout=120,
                           cwd=REPO)
        assert r.returncode == 2, (extra, r.stderr)
        assert needle in r.stderr, (extra, r.stderr)
        assert r.stderr.count("error:") == 1
        assert not out.exists()
    assert a.get_json("/history") == history_before
    assert a.get_json("/queue") == {"queue_running": [], "queue_pending": []}


def _pid_listening_on(port):
    """The pid of the process whose command line runs ComfyUI's main.py with --port `port`."""
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = open(f"/proc/{d}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if any(c.endswith(b"main.py") for c in cmd) and b"--port" in cmd and cmd[cmd.index(b"--port") + 1] == str(
                port).encode():
            return int(d)
    return None


@pytest.mark.comfy_server
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the started server's pid through /proc")
def test_started_server_is_restarted_when_it_dies_and_stopped_at_the_end(harness, small_models, pack_custom_nodes,
                                                                       comfyui, tmp_path):
    work = tmp_path / "local"
    yaml = harness.write_extra_model_paths(work / "extra_model_paths.yaml", small_models.root, pack_custom_nodes)
    dirs = {k: work / k for k in ("output", "temp", "input", "user")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    comfy_args = (f"--cpu --extra-model-paths-config {yaml} --output-directory {dirs['output']} "
                  f"--temp-directory {dirs['temp']} --input-directory {dirs['input']} --user-directory {dirs['user']} "
                  "--disable-api-nodes --preview-method none --database-url sqlite:///:memory: "
                  f"--disable-all-custom-nodes --whitelist-custom-nodes {harness.PACK_DIR_NAME}")
    out = tmp_path / "out"
    state = {"port": None, "killed": False, "done": 0}

    def on_line(line):
        m = re.search(r"on 127\.0\.0\.1:(\d+)", line)
        if m and line.startswith("starting ComfyUI"):
            state["port"] = int(m.group(1))
        if line.split("] ", 1)[-1].startswith("done "):
            state["done"] += 1
        if " started " in line and state["done"] >= 1 and not state["killed"] and state["port"]:
            pid = _pid_listening_on(state["port"])
            if pid:
                state["killed"] = True
                os.kill(pid, 9)

    run = CliRun([str(SD15_WORKFLOW), "--seeds", "1-2", *small_sets(small_models), "--local", "1",
                  "--comfyui-path", str(comfyui), "--comfy-args", comfy_args, "-o", str(out), "--progress", "plain",
                  "--startup-timeout", "240", "--poll"], on_line)
    rc = run.wait(600)
    assert state["killed"], run.text
    assert rc == 0, run.text
    assert "restarting it (1/2)" in run.text
    states = job_states(out)
    assert len(states) == 2 and all(s["status"] == "ok" for s in states.values())
    assert rendered_files(out) == sorted(o["file"] for s in states.values() for o in s["outputs"])
    assert _pid_listening_on(state["port"]) is None  # stopped at the end
    assert json.loads((out / "manifest.jsonl").read_text().splitlines()[0])["type"] == "batch"


@pytest.mark.comfy_server
def test_failed_job_is_retried_then_recorded_without_stopping_the_batch(harness, small_models, pack_custom_nodes,
                                                                        comfyui, tmp_path):
    out = tmp_path / "out"
    # A server whose kernels cannot run (CPU, interpreter off): with on_unsupported=raise the Sage node refuses
    # to fall back, so that job fails on every attempt while its fallback twin renders.
    cpu_only = harness.start_server(small_models.root, tmp_path / "srv", comfy_dir=comfyui,
                                    custom_nodes_dir=pack_custom_nodes, env={"TRITON_INTERPRET": "0"})
    server = f"127.0.0.1:{cpu_only.port}"
    try:
        r = subprocess.run(CLI + [str(SD15_WORKFLOW), *small_sets(small_models), "--server", server,
                                  "--grid", "Sage Attention.on_unsupported=raise,fallback", "--retries", "1",
                                  "--progress", "plain", "-o", str(out)],
                           capture_output=True, text=True, timeout=300, cwd=REPO)
    finally:
        cpu_only.stop()
    states = {s["inputs"]["grid"][0]: s for s in job_states(out).values()}
    assert r.returncode == 1, r.stderr
    failed, ok = states["on_unsupported-raise"], states["on_unsupported-fallback"]
    assert failed["status"] == "failed" and failed["attempts"] == 2 and len(failed["errors"]) == 2
    assert failed["outputs"] == [] and "cannot serve this call" in failed["errors"][0]
    assert ok["status"] == "ok" and rendered_files(out) == [ok["outputs"][0]["file"]]
    assert "rendered 1, failed 1" in r.stderr
