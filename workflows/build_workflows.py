"""Regenerate the example workflows in this folder (maintainers only; users just load the JSON files).

Each workflow is ComfyUI's own template for that model (the `comfyui-workflow-templates` package that ships with
ComfyUI, the same graphs and model files as the official ComfyUI examples) with a Sage Attention node inserted
between the model loader (after LoRA / model-sampling nodes) and the sampler, and a note listing the model files.
The API-format twin in `api/` is converted from the UI graph with the node definitions of a ComfyUI server.

    python workflows/build_workflows.py --server 127.0.0.1:8188      # a server with this pack loaded
    python workflows/build_workflows.py --object-info object_info.json
"""
from __future__ import annotations

import argparse
import functools
import copy
import json
import os
import sys
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))

try:
    from sage_attention_pack.sage_core.batch.client import ComfyClient
    from sage_attention_pack.sage_core.batch.workflow import ui_to_api
except ImportError:  # the pack not installed: run from its folder
    sys.path.insert(0, os.path.dirname(HERE))
    from sage_core.batch.client import ComfyClient
    from sage_core.batch.workflow import ui_to_api

SAGE_WIDGETS = ["auto", True, False, "per_warp", "128", "", 0.0, 1.0, "fallback"]
SAGE_SIZE = [330, 262]
# Nodes whose MODEL input is the one that samples: the Sage node goes on the link that feeds them.
SAMPLER_MODEL_USERS = {"KSampler", "KSamplerAdvanced", "SamplerCustom", "BasicGuider", "CFGGuider", "DualCFGGuider",
                       "SageAttentionCompare"}
EXAMPLES = "https://comfyanonymous.github.io/ComfyUI_examples"
FOLDERS = {"checkpoints": "models/checkpoints", "diffusion_models": "models/diffusion_models",
           "text_encoders": "models/text_encoders", "vae": "models/vae", "clip_vision": "models/clip_vision",
           "loras": "models/loras"}

# What the Sage nodes look like in /object_info, for building without a server that has the pack loaded.
SAGE_OBJECT_INFO = {
    "SageAttention": {
        "input": {"required": {
            "model": ["MODEL", {}],
            "kernel": ["COMBO", {"options": ["auto", "int8_fp16", "int8_fp8", "off"], "default": "auto"}],
            "smooth_k": ["BOOLEAN", {"default": True}],
            "smooth_v": ["BOOLEAN", {"default": False}],
            "qk_granularity": ["COMBO", {"options": ["per_block", "per_warp", "per_thread"], "default": "per_warp"}],
            "quant_block": ["COMBO", {"options": ["128", "64"], "default": "128"}],
            "exact_blocks": ["STRING", {"default": ""}],
            "start_percent": ["FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}],
            "end_percent": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001}],
            "on_unsupported": ["COMBO", {"options": ["fallback", "raise"], "default": "fallback"}]}},
        "input_order": {"required": ["model", "kernel", "smooth_k", "smooth_v", "qk_granularity", "quant_block",
                                     "exact_blocks", "start_percent", "end_percent", "on_unsupported"]},
        "output": ["MODEL"], "output_is_list": [False], "output_name": ["MODEL"], "name": "SageAttention",
        "display_name": "Sage Attention", "category": "model_patches/sage_attention", "output_node": False},
}


def _compare_info(object_info):
    ks = object_info["KSampler"]["input"]["required"]
    order = ["model", "positive", "negative", "latent_image", "vae", "seed", "steps", "cfg", "sampler_name",
             "scheduler", "denoise", "kernel", "smooth_k", "smooth_v", "qk_granularity", "quant_block",
             "exact_blocks", "warmup_steps", "heat_gain"]
    req = {
        "model": ["MODEL", {}], "positive": ["CONDITIONING", {}], "negative": ["CONDITIONING", {}],
        "latent_image": ["LATENT", {}], "vae": ["VAE", {}],
        "seed": ["INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}],
        "steps": ["INT", {"default": 20, "min": 1, "max": 10000}],
        "cfg": ["FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0}],
        "sampler_name": ks["sampler_name"], "scheduler": ks["scheduler"],
        "denoise": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0}],
        "kernel": ["COMBO", {"options": ["from model", "auto", "int8_fp16", "int8_fp8", "off"], "default": "auto"}],
        "smooth_k": ["BOOLEAN", {"default": True}], "smooth_v": ["BOOLEAN", {"default": False}],
        "qk_granularity": ["COMBO", {"options": ["per_block", "per_warp", "per_thread"], "default": "per_warp"}],
        "quant_block": ["COMBO", {"options": ["128", "64"], "default": "128"}],
        "exact_blocks": ["STRING", {"default": ""}],
        "warmup_steps": ["INT", {"default": 1, "min": 0, "max": 100}],
        "heat_gain": ["FLOAT", {"default": 10.0, "min": 0.0, "max": 1000.0}],
    }
    return {"input": {"required": req}, "input_order": {"required": order},
            "output": ["IMAGE", "IMAGE", "IMAGE", "IMAGE", "STRING"], "output_is_list": [False] * 5,
            "output_name": ["exact_image", "sage_image", "side_by_side", "heat_map", "report"],
            "name": "SageAttentionCompare", "display_name": "Sage Attention Compare", "output_node": True}


# --------------------------------------------------------------------------------------------------- graph editing


class UIGraph:
    def __init__(self, data: dict):
        self.data = copy.deepcopy(data)
        self.data.setdefault("links", [])
        self.data.setdefault("groups", [])

    @property
    def nodes(self):
        return self.data["nodes"]

    def node(self, nid):
        return next(n for n in self.nodes if n["id"] == nid)

    def links(self):
        return self.data["links"]

    def new_node_id(self):
        nid = max([n["id"] for n in self.nodes] + [self.data.get("last_node_id", 0)]) + 1
        self.data["last_node_id"] = nid
        return nid

    def new_link_id(self):
        lid = max([lk[0] for lk in self.links()] + [self.data.get("last_link_id", 0)]) + 1
        self.data["last_link_id"] = lid
        return lid

    def remove_nodes(self, ids):
        ids = set(ids)
        dead = [lk for lk in self.links() if lk[1] in ids or lk[3] in ids]
        for lk in dead:
            self._unlink(lk)
        self.data["nodes"] = [n for n in self.nodes if n["id"] not in ids]

    def drop_bypassed(self):
        """Bypassed nodes (mode 4) out, each of their output links fed from the input of the same type instead, as
        ComfyUI runs a bypassed node."""
        for n in [n for n in self.nodes if n.get("mode") == 4]:
            links = self.links()
            into = {lk[4]: lk for lk in links if lk[3] == n["id"]}  # by the input slot they feed
            for lk in [lk for lk in links if lk[1] == n["id"]]:
                source = next((into[i] for i, inp in enumerate(n.get("inputs") or [])
                               if inp.get("type") == lk[5] and i in into), None)
                self._unlink(lk)
                if source is not None:
                    self.connect(source[1], source[2], lk[3], lk[4], lk[5])
            self.remove_nodes([n["id"]])
        return self

    def _unlink(self, lk):
        lid, o, os_, t, ts, _ = lk
        self.data["links"] = [x for x in self.links() if x[0] != lid]
        for n in self.nodes:
            if n["id"] == o:
                out = n["outputs"][os_]
                out["links"] = [x for x in (out.get("links") or []) if x != lid]
            if n["id"] == t:
                for i in n.get("inputs") or []:
                    if i.get("link") == lid:
                        i["link"] = None

    def connect(self, o, os_, t, ts, ltype):
        lid = self.new_link_id()
        self.links().append([lid, o, os_, t, ts, ltype])
        on = self.node(o)
        on["outputs"][os_].setdefault("links", [])
        on["outputs"][os_]["links"] = (on["outputs"][os_]["links"] or []) + [lid]
        self.node(t)["inputs"][ts]["link"] = lid
        return lid

    def shift_right_of(self, x, dx):
        for n in self.nodes:
            if n["pos"][0] >= x:
                n["pos"] = [n["pos"][0] + dx, n["pos"][1]]
        for g in self.data["groups"]:
            b = g["bounding"]
            if b[0] >= x:
                b[0] += dx
            elif b[0] + b[2] > x:
                b[2] += dx

    def insert_sage(self, origin_id, origin_slot=0, widgets=None, title=None):
        """A Sage Attention node on every MODEL link leaving (origin, slot); returns its id."""
        origin = self.node(origin_id)
        links = [lk for lk in self.links() if lk[1] == origin_id and lk[2] == origin_slot]
        ox, oy = origin["pos"]
        ow = (origin.get("size") or [300, 100])[0]
        col = ox + ow + 40
        self.shift_right_of(col - 1, SAGE_SIZE[0] + 60)
        sid = self.new_node_id()
        sage = {"id": sid, "type": "SageAttention", "pos": [col, oy], "size": list(SAGE_SIZE), "flags": {},
                "order": 0, "mode": 0, "inputs": [{"name": "model", "type": "MODEL", "link": None}],
                "outputs": [{"name": "MODEL", "type": "MODEL", "slot_index": 0, "links": []}],
                "properties": {"Node name for S&R": "SageAttention"},
                "widgets_values": list(widgets or SAGE_WIDGETS), "color": "#232", "bgcolor": "#353"}
        if title:
            sage["title"] = title
        self.nodes.append(sage)
        for lk in links:
            _, _, _, t, ts, ltype = lk
            self._unlink(lk)
            self.connect(sid, 0, t, ts, ltype)
        self.connect(origin_id, origin_slot, sid, 0, "MODEL")
        return sid

    def model_origins(self):
        """(node, slot) of each MODEL output that feeds a sampler."""
        by_id = {n["id"]: n for n in self.nodes}
        out = []
        for lk in self.links():
            _, o, os_, t, ts, ltype = lk
            if ltype == "MODEL" and by_id[t]["type"] in SAMPLER_MODEL_USERS and (o, os_) not in out:
                out.append((o, os_))
        return out

    def add_note(self, text, title="Read me: model files", width=520, height=560):
        xs = [n["pos"][0] for n in self.nodes]
        ys = [n["pos"][1] for n in self.nodes]
        nid = self.new_node_id()
        self.nodes.append({"id": nid, "type": "MarkdownNote", "pos": [min(xs) - width - 60, min(ys)],
                           "size": [width, height], "flags": {}, "order": 0, "mode": 0, "inputs": [], "outputs": [],
                           "title": title, "properties": {}, "widgets_values": [text], "color": "#432",
                           "bgcolor": "#653"})
        return nid

    def finish(self):
        self.data["groups"] = [g for g in self.data["groups"] if self._group_has_nodes(g)]
        for i, n in enumerate(sorted(self.nodes, key=lambda n: n["id"])):
            n["order"] = i
        xs = [n["pos"][0] for n in self.nodes]
        ys = [n["pos"][1] for n in self.nodes]
        self.data["extra"] = {"ds": {"scale": 0.6, "offset": [80 - min(xs), 80 - min(ys)]}}
        self.data["id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, "sage-attention-pack/" + self.data.get("_name", "")))
        self.data.pop("_name", None)
        self.data["revision"] = 0
        self.data["version"] = 0.4
        self.data["last_node_id"] = max(n["id"] for n in self.nodes)
        self.data["last_link_id"] = max([lk[0] for lk in self.links()] or [0])
        return self.data

    def _group_has_nodes(self, g):
        x, y, w, h = g["bounding"]
        return any(x <= n["pos"][0] <= x + w and y <= n["pos"][1] <= y + h for n in self.nodes)


def model_files(graph: UIGraph):
    seen, out = set(), []
    for n in sorted(graph.nodes, key=lambda n: n["id"]):
        for m in (n.get("properties") or {}).get("models") or []:
            if m["name"] not in seen:
                seen.add(m["name"])
                out.append(m)
    return out


def note_text(title, about, files, example_url, extra=""):
    rows = "\n".join(f"| [{m['name']}]({m['url'].split('?')[0]}) | "
                     f"`ComfyUI/{FOLDERS.get(m['directory'], m['directory'])}/` |" for m in files)
    return f"""## {title}

{about}

The **Sage Attention** node sits between the model loader (after any LoRA / model-sampling node) and the sampler.
It swaps the model's attention for SageAttention's 8-bit kernels. Set `kernel` to `off` to get ComfyUI's own
attention for an A/B comparison. Without an NVIDIA GPU and Triton it falls back to exact attention.

### Model files

The same files as the official ComfyUI example ([{example_url.rsplit('/', 2)[-2] or 'examples'}]({example_url})).
Download them and put each one in the folder listed:

| File | Put it in |
|---|---|
{rows}
{extra}
### Batch rendering without the browser

```
sage-batch this_workflow.json --prompts prompts.txt --seeds 1-4 --sage-ab --server 127.0.0.1:8188
```
"""


# --------------------------------------------------------------------------------------------------- the workflows


def templates_dir():
    import comfyui_workflow_templates

    return os.path.join(os.path.dirname(comfyui_workflow_templates.__file__), "templates")


def load_template(name):
    with open(os.path.join(templates_dir(), name + ".json"), encoding="utf-8") as f:
        return json.load(f)


def _plain(template, drop_types=("MarkdownNote",), drop_ids=()):
    g = UIGraph(load_template(template))
    g.remove_nodes([n["id"] for n in g.nodes if n["type"] in drop_types or n["id"] in drop_ids])
    return g


def _with_sage(g, titled=False):
    for o, s in g.model_origins():
        g.insert_sage(o, s, title=_expert_title(g, o) if titled else None)
    return g


def _expert_title(g, nid):
    """'Sage Attention (high noise)' etc., from the model file loaded upstream of node `nid`."""
    by_target = {(lk[3], lk[4]): lk for lk in g.links()}
    for _ in range(20):
        n = g.node(nid)
        name = str((n.get("widgets_values") or [""])[0])
        if n["type"] in ("UNETLoader", "CheckpointLoaderSimple"):
            for key, label in (("high_noise", "high noise"), ("low_noise", "low noise"), ("refiner", "refiner"),
                               ("base", "base")):
                if key in name:
                    return f"Sage Attention ({label})"
            return None
        lk = next((by_target[(nid, i)] for i, inp in enumerate(n.get("inputs") or [])
                   if inp.get("type") == "MODEL" and (nid, i) in by_target), None)
        if lk is None:
            return None
        nid = lk[1]
    return None


# One template in, a Sage node before its sampler, a note out: (template, title, summary, examples page).
SIMPLE = {
    "sd15": ("default", "SD1.5 text to image + Sage Attention", "Stable Diffusion 1.5, 512x512, 20 steps.", "/"),
    "sd35": ("sd3.5_simple_example", "SD3.5 Large + Sage Attention",
             "Stable Diffusion 3.5 Large (fp8 scaled checkpoint with its text encoders inside).", "/sd3/"),
    "flux": ("flux_dev_full_text_to_image", "Flux.1 dev + Sage Attention",
             "Flux.1 dev, 1024x1024, 20 steps, guidance 3.5.", "/flux/"),
    "wan21_t2v": ("text_to_video_wan", "Wan2.1 text to video + Sage Attention",
                  "Wan2.1 T2V 1.3B, 832x480, 33 frames.", "/wan/"),
    "hunyuan": ("hunyuan_video_text_to_video", "HunyuanVideo text to video + Sage Attention",
                "HunyuanVideo T2V 720p, 848x480, 73 frames.", "/hunyuan_video/"),
    "ltxv": ("ltxv_text_to_video", "LTX-Video text to video + Sage Attention",
             "LTX-Video 2B v0.9, 768x512, 97 frames.", "/ltxv/"),
    "qwen_image": ("image_qwen_image", "Qwen-Image + Sage Attention",
                   "Qwen-Image (fp8), 1328x1328, 20 steps (the template's optional Lightning LoRA, bypassed there, "
                   "left out). Its joint attention's rotary embedding runs inside Sage's quantization.",
                   "/qwen_image/"),
    "lumina2": ("image_netayume_lumina_t2i", "NetaYume Lumina (Lumina Image 2.0) + Sage Attention",
                "NetaYume Lumina v3.5, a Lumina Image 2.0 model, 1024x1024, 30 steps (ComfyUI's own template; the "
                "example page below runs the base model's lumina_2.safetensors the same way). Its rotary embedding "
                "runs inside Sage's quantization, and its 8 K/V heads reach Sage without ComfyUI's repeat.",
                "/lumina2/"),
    "chroma": ("image_chroma_text_to_image", "Chroma1-HD + Sage Attention",
               "Chroma1-HD (fp8 scaled), 1024x1024, 26 steps (ComfyUI's own template; the example page below runs "
               "an earlier Chroma checkpoint the same way). A Flux-family model: its rotary embedding runs inside "
               "Sage's quantization.", "/chroma/"),
}


def build_simple(key):
    template, title, summary, page = SIMPLE[key]
    g = _with_sage(_plain(template).drop_bypassed())
    g.add_note(note_text(title, summary, model_files(g), EXAMPLES + page))
    return g


def build_sdxl():
    g = _plain("sdxl_simple_example")
    _with_sage(g, titled=True)
    g.add_note(note_text("SDXL base + refiner + Sage Attention",
                         "SDXL 1.0 base (steps 0-20) then the refiner (20-25), each model with its own Sage node.",
                         model_files(g), EXAMPLES + "/sdxl/"))
    return g


def build_wan21_i2v():
    g = _with_sage(_plain("image_to_video_wan"))
    extra = ("\nPut your start image in `ComfyUI/input/` and pick it in **Load Image**. Headless: "
             "`--set \"Load Image.image=start.png\"` (a file next to you is uploaded to the server first).\n")
    g.add_note(note_text("Wan2.1 image to video + Sage Attention", "Wan2.1 I2V 14B 480p, 512x512, 33 frames.",
                         model_files(g), EXAMPLES + "/wan/", extra))
    return g


def build_wan22():
    # The template holds two variants: the 4-step LoRA one (on) and the plain 20-step one (bypassed). Keep the
    # plain one, as in the official example: high-noise expert for steps 0-10, low-noise expert for 10-20.
    t = load_template("video_wan2_2_14B_t2v")
    plain = {n["id"] for n in t["nodes"] if n.get("mode", 0) == 4 and n["type"] != "SaveImage"}
    notes = {n["id"] for n in t["nodes"] if n["type"] in ("Note", "MarkdownNote") and n.get("title") in
             ("EmptyHunyuanLatentVideo",)}
    g = UIGraph(t)
    g.remove_nodes([n["id"] for n in g.nodes if n["id"] not in plain | notes])
    for n in g.nodes:
        n["mode"] = 0
    _with_sage(g, titled=True)
    g.add_note(note_text("Wan2.2 14B text to video + Sage Attention",
                         "Wan2.2 T2V A14B: the high-noise expert samples steps 0-10, the low-noise expert 10-20; "
                         "each expert has its own Sage node.", model_files(g), EXAMPLES + "/wan22/"))
    return g


def build_compare(object_info):
    """SD1.5 with the Sage node, and the Compare node sampling the same seed with exact and Sage attention."""
    g = _plain("default")
    ks = next(n for n in g.nodes if n["type"] == "KSampler")
    dec = next(n for n in g.nodes if n["type"] == "VAEDecode")
    save = next(n for n in g.nodes if n["type"] == "SaveImage")
    by_target = {(lk[3], lk[4]): lk for lk in g.links()}
    model_src = by_target[(ks["id"], 0)]
    pos_src, neg_src, lat_src = by_target[(ks["id"], 1)], by_target[(ks["id"], 2)], by_target[(ks["id"], 3)]
    ckpt = g.node(model_src[1])
    seed, _, steps, cfg, sampler, sched, denoise = ks["widgets_values"]
    kx, ky = ks["pos"]
    g.remove_nodes([ks["id"], dec["id"], save["id"]])
    cid = g.new_node_id()
    info = object_info["SageAttentionCompare"]
    names = info["input_order"]["required"]
    types = {k: v[0] for k, v in info["input"]["required"].items()}
    link_inputs = [n for n in names if types[n] in ("MODEL", "CONDITIONING", "LATENT", "VAE")]
    g.nodes.append({
        "id": cid, "type": "SageAttentionCompare", "pos": [kx, ky], "size": [360, 520], "flags": {}, "order": 0,
        "mode": 0, "inputs": [{"name": n, "type": types[n], "link": None} for n in link_inputs],
        "outputs": [{"name": nm, "type": t, "slot_index": i, "links": []}
                    for i, (nm, t) in enumerate(zip(info["output_name"], info["output"]))],
        "properties": {"Node name for S&R": "SageAttentionCompare"},
        "widgets_values": [seed, "fixed", steps, cfg, sampler, sched, denoise, "from model", True, False,
                           "per_warp", "128", "", 1, 10.0], "color": "#232", "bgcolor": "#353"})
    g.connect(model_src[1], model_src[2], cid, 0, "MODEL")
    g.connect(pos_src[1], pos_src[2], cid, 1, "CONDITIONING")
    g.connect(neg_src[1], neg_src[2], cid, 2, "CONDITIONING")
    g.connect(lat_src[1], lat_src[2], cid, 3, "LATENT")
    g.connect(ckpt["id"], 2, cid, 4, "VAE")
    x2 = kx + 420
    outs = [("SaveImage", 2, "Side by side (exact | sage)", ["sage_compare/side_by_side"], 0),
            ("SaveImage", 3, "Difference heat map", ["sage_compare/heat_map"], 380),
            ("PreviewAny", 4, "Report", [], 760)]
    for kind, slot, title, widgets, dy in outs:
        nid = g.new_node_id()
        in_name, in_type = ("images", "IMAGE") if kind == "SaveImage" else ("source", "*")
        g.nodes.append({"id": nid, "type": kind, "pos": [x2, ky + dy], "size": [400, 340], "flags": {}, "order": 0,
                        "mode": 0, "title": title, "inputs": [{"name": in_name, "type": in_type, "link": None}],
                        "outputs": [], "properties": {"Node name for S&R": kind}, "widgets_values": widgets})
        g.connect(cid, slot, nid, 0, info["output"][slot])
    g.insert_sage(ckpt["id"], 0)
    g.add_note(note_text(
        "Sage Attention Compare (SD1.5)",
        "The Compare node samples the same seed twice, with ComfyUI's attention and with Sage (here: the settings "
        "of the Sage Attention node, `kernel = from model`), and reports the speed-up and the difference "
        "(PSNR, SSIM, largest pixel difference), with a side-by-side image and a heat map.",
        model_files(g), EXAMPLES + "/"))
    return g


WORKFLOWS = {
    "sage_sd1.5_text_to_image": functools.partial(build_simple, "sd15"),
    "sage_sdxl_base_refiner": build_sdxl,
    "sage_sd3.5_large": functools.partial(build_simple, "sd35"),
    "sage_flux1_dev": functools.partial(build_simple, "flux"),
    "sage_wan2.1_text_to_video": functools.partial(build_simple, "wan21_t2v"),
    "sage_wan2.1_image_to_video": build_wan21_i2v,
    "sage_wan2.2_14B_text_to_video": build_wan22,
    "sage_hunyuan_video_text_to_video": functools.partial(build_simple, "hunyuan"),
    "sage_ltxv_text_to_video": functools.partial(build_simple, "ltxv"),
    "sage_qwen_image": functools.partial(build_simple, "qwen_image"),
    "sage_lumina2_netayume": functools.partial(build_simple, "lumina2"),
    "sage_chroma1_hd": functools.partial(build_simple, "chroma"),
    "sage_compare_sd1.5": build_compare,
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--server", help="a ComfyUI server (host:port) to read /object_info from")
    src.add_argument("--object-info", help="a saved /object_info JSON")
    ap.add_argument("--only", nargs="*", help="build only these workflows")
    args = ap.parse_args(argv)
    if args.server:
        object_info = ComfyClient(args.server).object_info()
    else:
        with open(args.object_info, encoding="utf-8") as f:
            object_info = json.load(f)
    for k, v in SAGE_OBJECT_INFO.items():
        object_info.setdefault(k, v)
    object_info.setdefault("SageAttentionCompare", _compare_info(object_info))
    os.makedirs(os.path.join(HERE, "api"), exist_ok=True)
    for name, build in WORKFLOWS.items():
        if args.only and name not in args.only:
            continue
        g = build(object_info) if build is build_compare else build()
        g.data["_name"] = name
        ui = g.finish()
        api = ui_to_api(ui, object_info)
        for path, data in ((os.path.join(HERE, name + ".json"), ui), (os.path.join(HERE, "api", name + ".json"), api)):
            with open(path, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2, ensure_ascii=False)
                f.write("\n")
        print(f"wrote {name}: {len(ui['nodes'])} nodes, {len(api)} in API format")


if __name__ == "__main__":
    main()
