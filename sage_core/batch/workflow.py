"""Workflows: loading, UI-format to API-format conversion through `/object_info`, node lookup, overrides, validation.

ComfyUI has two workflow formats. The UI format (what the browser saves: `nodes`, `links`, `widgets_values`) keeps
widget values as a positional list and has frontend-only nodes (notes, reroutes, primitive nodes, bypassed nodes).
The API format (`{id: {class_type, inputs, _meta}}`, what `/prompt` accepts) names every input. The conversion
below follows the frontend's own rules (`graphToPrompt`), with the node definitions from the server's `/object_info`
telling which inputs are widgets and in which order their values are stored.
"""
from __future__ import annotations

import copy
import difflib
import json
import math
import os

from .errors import BatchError

# Frontend-only node types: never sent to the server.
VIRTUAL_NODES = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode", "Label (rgthree)"})
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize"})
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload", "upload")
UPLOAD_WIDGET_VALUES = frozenset({"image", "video", "audio", "upload", "", None})
MODE_MUTED = 2
MODE_BYPASS = 4
SEED_INPUTS = ("seed", "noise_seed")


# ----------------------------------------------------------------------------------------------- loading


def load_workflow_file(path) -> dict:
    """Read a workflow file (UI or API format, JSON); a PNG saved by ComfyUI also works (its embedded workflow)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise BatchError(f"workflow file not found: {path}")
    try:
        if path.lower().endswith(".png"):
            data = _workflow_from_png(path)
        else:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
    except BatchError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BatchError(f"cannot read workflow {path}: {e}") from None
    if not isinstance(data, dict) or detect_format(data) is None:
        raise BatchError(f"{path} is not a ComfyUI workflow (neither UI format with 'nodes' nor API format)")
    return data


def _workflow_from_png(path) -> dict:
    import struct
    import zlib

    texts = {}
    with open(path, "rb") as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            raise BatchError(f"{path} is not a PNG file")
        while True:
            head = f.read(8)
            if len(head) < 8:
                break
            length, kind = struct.unpack(">I4s", head)
            body = f.read(length)
            f.read(4)
            if kind == b"tEXt":
                key, _, val = body.partition(b"\0")
                texts[key.decode("latin-1")] = val.decode("utf-8", "replace")
            elif kind == b"zTXt":
                key, _, val = body.partition(b"\0")
                texts[key.decode("latin-1")] = zlib.decompress(val[1:]).decode("utf-8", "replace")
            elif kind == b"iTXt":
                key, _, rest = body.partition(b"\0")
                compressed = rest[0] == 1
                rest = rest[2:]
                _, _, rest = rest.partition(b"\0")
                _, _, val = rest.partition(b"\0")
                texts[key.decode("latin-1")] = (zlib.decompress(val) if compressed else val).decode("utf-8", "replace")
            elif kind == b"IEND":
                break
    for key in ("workflow", "prompt"):
        if key in texts:
            return json.loads(texts[key])
    raise BatchError(f"{path} holds no ComfyUI workflow")


def detect_format(data) -> str | None:
    if isinstance(data.get("nodes"), list):
        return "ui"
    if data and all(isinstance(v, dict) and "class_type" in v for v in data.values()):
        return "api"
    return None


# ----------------------------------------------------------------------------------------------- node definitions


class InputSpec:
    """One input of a node definition (from /object_info)."""

    __slots__ = ("name", "type", "opts", "required", "options")

    def __init__(self, name, raw, required):
        self.name = name
        self.required = required
        raw = list(raw) if isinstance(raw, (list, tuple)) else [raw]
        kind = raw[0] if raw else "*"
        self.opts = raw[1] if len(raw) > 1 and isinstance(raw[1], dict) else {}
        if isinstance(kind, list):
            self.type, self.options = "COMBO", list(kind)
        elif kind == "COMBO":
            self.type, self.options = "COMBO", list(self.opts.get("options") or [])
        else:
            self.type, self.options = str(kind), None

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.opts.get("forceInput")

    @property
    def has_control(self) -> bool:
        return bool(self.opts.get("control_after_generate")) or (self.type == "INT" and self.name in SEED_INPUTS)

    @property
    def has_upload(self) -> bool:
        return any(self.opts.get(k) for k in UPLOAD_FLAGS)

    def describe(self) -> str:
        if self.type == "COMBO":
            return "one of " + _short_list(self.options)
        bits = [self.type]
        if "min" in self.opts or "max" in self.opts:
            bits.append(f"{self.opts.get('min', '-inf')}..{self.opts.get('max', 'inf')}")
        return " ".join(bits)


def node_inputs(info: dict) -> list[InputSpec]:
    """A node definition's inputs in the frontend's order (required, then optional; hidden ones left out)."""
    specs = []
    inputs = info.get("input") or {}
    order = info.get("input_order") or {}
    for group in ("required", "optional"):
        defs = inputs.get(group) or {}
        names = list(order.get(group) or []) or list(defs)
        names += [n for n in defs if n not in names]
        for name in names:
            if name in defs:
                specs.append(InputSpec(name, defs[name], group == "required"))
    return specs


def input_spec(info: dict, name: str) -> InputSpec | None:
    for spec in node_inputs(info):
        if spec.name == name:
            return spec
    return None


# ----------------------------------------------------------------------------------------------- UI -> API


def _links_of(ui: dict) -> dict:
    links = {}
    for link in ui.get("links") or []:
        if isinstance(link, dict):
            links[link["id"]] = (link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                                 link.get("type"))
        elif isinstance(link, (list, tuple)) and len(link) >= 5:
            links[link[0]] = (link[1], link[2], link[3], link[4], link[5] if len(link) > 5 else None)
    return links


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow into the API format, using the server's node definitions."""
    nodes = {n["id"]: n for n in ui.get("nodes") or []}
    subgraphs = {s.get("id") for s in ((ui.get("definitions") or {}).get("subgraphs") or [])}
    links = _links_of(ui)

    missing = sorted({n["type"] for n in nodes.values()
                      if n.get("type") not in VIRTUAL_NODES and n.get("type") not in object_info
                      and n.get("type") not in subgraphs and n.get("mode", 0) not in (MODE_MUTED,)})
    if any(n.get("type") in subgraphs for n in nodes.values()):
        raise BatchError("the workflow uses subgraphs; open it in ComfyUI and export it with 'Export (API)', "
                         "then pass that file")
    if missing:
        raise BatchError("unknown node type(s) on the server: " + ", ".join(missing)
                         + " (install the custom nodes that provide them)")

    def resolve(link_id, seen=()):
        """Follow a link to a real node's output: ("link", [id, slot]), ("value", v), or None."""
        if link_id is None or link_id not in links or link_id in seen:
            return None
        origin_id, origin_slot, _, _, ltype = links[link_id]
        origin = nodes.get(origin_id)
        if origin is None:
            return None
        seen = (*seen, link_id)
        kind = origin.get("type")
        mode = origin.get("mode", 0)
        if kind == "PrimitiveNode":
            vals = origin.get("widgets_values") or []
            return ("value", vals[0]) if vals else None
        if kind == "Reroute":
            ins = origin.get("inputs") or []
            return resolve(ins[0].get("link"), seen) if ins else None
        if mode == MODE_MUTED or kind in VIRTUAL_NODES:
            return None
        if mode == MODE_BYPASS:
            outs = origin.get("outputs") or []
            otype = outs[origin_slot].get("type") if origin_slot < len(outs) else ltype
            ins = origin.get("inputs") or []
            cand = []
            if origin_slot < len(ins) and ins[origin_slot].get("type") == otype:
                cand.append(ins[origin_slot])
            cand += [i for i in ins if i.get("type") == otype and i not in cand]
            for inp in cand:
                if inp.get("link") is not None:
                    return resolve(inp["link"], seen)
            return None
        return ("link", [str(origin_id), origin_slot])

    api = {}
    for nid, node in sorted(nodes.items(), key=lambda kv: _id_sort_key(kv[0])):
        kind = node.get("type")
        if kind in VIRTUAL_NODES or node.get("mode", 0) in (MODE_MUTED, MODE_BYPASS):
            continue
        info = object_info[kind]
        specs = node_inputs(info)
        ui_inputs = node.get("inputs") or []
        by_name = {i.get("name"): i for i in ui_inputs}
        by_widget = {(i.get("widget") or {}).get("name"): i for i in ui_inputs if i.get("widget")}
        values = _widget_values(node, specs)
        inputs = {}
        for spec in specs:
            ui_in = by_widget.get(spec.name) or by_name.get(spec.name)
            if ui_in is not None and ui_in.get("link") is not None:
                got = resolve(ui_in["link"])
                if got is not None:
                    inputs[spec.name] = got[1]
                    continue
                if not spec.is_widget:
                    continue
            if spec.is_widget and spec.name in values:
                inputs[spec.name] = values[spec.name]
            elif spec.is_widget and spec.required:
                default = _default_of(spec)  # the frontend fills a widget it has no stored value for
                if default is not None:
                    inputs[spec.name] = default
        title = node.get("title") or info.get("display_name") or kind
        api[str(nid)] = {"inputs": inputs, "class_type": kind, "_meta": {"title": title}}
    return api


def _widget_values(node: dict, specs: list[InputSpec]) -> dict:
    """Map a UI node's `widgets_values` onto input names, skipping the frontend's extra widgets
    (seed control, upload button) the way the frontend lays them out."""
    raw = node.get("widgets_values")
    if isinstance(raw, dict):
        return {s.name: raw[s.name] for s in specs if s.is_widget and s.name in raw}
    raw = list(raw or [])
    out = {}
    i = 0
    for spec in specs:
        if not spec.is_widget:
            continue
        if i >= len(raw):
            break
        out[spec.name] = raw[i]
        i += 1
        if spec.has_control and i < len(raw) and (_is_str_in(raw[i], CONTROL_VALUES) or raw[i] is None
                                                  or isinstance(raw[i], bool)):
            i += 1
            if spec.type == "COMBO" and i < len(raw) and isinstance(raw[i], str) and raw[i] not in spec.options:
                i += 1  # the control's filter text
        if spec.has_upload and i < len(raw) and (raw[i] is None or _is_str_in(raw[i], UPLOAD_WIDGET_VALUES)):
            i += 1
    return out


def _default_of(spec: InputSpec):
    if "default" in spec.opts:
        return spec.opts["default"]
    if spec.type == "COMBO":
        return spec.options[0] if spec.options else None
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(spec.type)


def _is_str_in(v, choices) -> bool:
    return isinstance(v, str) and v in choices


def _id_sort_key(nid):
    try:
        return (0, int(nid), "")
    except (TypeError, ValueError):
        return (1, 0, str(nid))


def to_api(data: dict, object_info: dict) -> dict:
    """Any workflow (UI or API format) as a fresh API-format graph."""
    if detect_format(data) == "ui":
        return ui_to_api(data, object_info)
    return copy.deepcopy(data)


# ----------------------------------------------------------------------------------------------- lookup


def title_of(graph: dict, nid: str) -> str:
    node = graph[nid]
    return (node.get("_meta") or {}).get("title") or node.get("class_type")


def find_nodes(graph: dict, ref: str) -> list[str]:
    """Node ids matching `ref`: an id ("12" or "#12"), a title, or a class type (exact first, then case-insensitive)."""
    ref = str(ref).strip()
    rid = ref[1:] if ref.startswith("#") else ref
    if rid in graph:
        return [rid]
    for match in (lambda a, b: a == b, lambda a, b: a.casefold() == b.casefold()):
        hits = [nid for nid in graph if match(title_of(graph, nid), ref)]
        if hits:
            return hits
        hits = [nid for nid in graph if match(graph[nid].get("class_type", ""), ref)]
        if hits:
            return hits
    return []


def resolve_node(graph: dict, ref: str, *, allow_many=False) -> list[str]:
    hits = find_nodes(graph, ref)
    if not hits:
        names = sorted({title_of(graph, n) for n in graph} | {graph[n]["class_type"] for n in graph})
        close = difflib.get_close_matches(ref, names, n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise BatchError(f"no node titled, typed or numbered {ref!r} in the workflow{hint}")
    if len(hits) > 1 and not allow_many:
        listed = ", ".join(f"#{n} ({title_of(graph, n)})" for n in sorted(hits, key=_id_sort_key))
        raise BatchError(f"{ref!r} matches several nodes: {listed}; use a node id (e.g. '#{hits[0]}') instead")
    return hits


def parse_target(text: str) -> tuple[str, str]:
    """'Node title.input' -> (node ref, input name); the input is after the last dot."""
    ref, dot, name = str(text).strip().rpartition(".")
    if not dot or not ref or not name:
        raise BatchError(f"invalid target {text!r}: expected 'Node title or id.input_name', e.g. 'KSampler.steps'")
    return ref.strip(), name.strip()


# ----------------------------------------------------------------------------------------------- values


def coerce_value(value, spec: InputSpec, where: str):
    """A raw value (a string from the command line, or any JSON value) as the input's type; BatchError when invalid."""
    t = spec.type
    try:
        if t == "INT":
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                value = int(value)
            v = int(str(value).strip()) if not isinstance(value, int) else value
        elif t == "FLOAT":
            if isinstance(value, bool):
                raise ValueError
            v = float(value)
            if not math.isfinite(v):
                raise ValueError
        elif t == "BOOLEAN":
            if isinstance(value, bool):
                v = value
            else:
                s = str(value).strip().lower()
                if s in ("1", "true", "yes", "on", "enable", "enabled"):
                    v = True
                elif s in ("0", "false", "no", "off", "disable", "disabled"):
                    v = False
                else:
                    raise ValueError
        elif t == "STRING":
            v = value if isinstance(value, str) else json.dumps(value) if isinstance(value, (dict, list)) \
                else str(value)
        elif t == "COMBO":
            v = value
            if spec.options and v not in spec.options:
                by_str = {str(o): o for o in spec.options}
                if str(value) in by_str:
                    v = by_str[str(value)]
        else:
            raise BatchError(f"{where} is a {t} connection, not a value that can be set")
    except (TypeError, ValueError):
        raise BatchError(f"{where}: {value!r} is not a valid {spec.describe()}") from None
    check = check_value(v, spec)
    if check and not (t == "COMBO" and spec.has_upload):
        raise BatchError(f"{where}: {check}")
    return v


def check_value(v, spec: InputSpec) -> str | None:
    """Why `v` is not acceptable for `spec` (None when it is)."""
    t = spec.type
    if t in ("INT", "FLOAT"):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (
                t == "INT" and isinstance(v, float) and not v.is_integer()):
            return f"{v!r} is not a valid {t}"
        lo, hi = spec.opts.get("min"), spec.opts.get("max")
        if lo is not None and v < lo:
            return f"{v!r} is below the minimum {lo}"
        if hi is not None and v > hi:
            return f"{v!r} is above the maximum {hi}"
    elif t == "BOOLEAN" and not isinstance(v, bool):
        return f"{v!r} is not a boolean"
    elif t == "STRING" and not isinstance(v, str):
        return f"{v!r} is not a string"
    elif t == "COMBO" and v not in spec.options:
        if not spec.options:
            return f"{v!r} is not available (the server lists no choices here)"
        close = difflib.get_close_matches(str(v), [str(o) for o in spec.options], n=3)
        hint = f"; close: {', '.join(close)}" if close else f"; choices: {_short_list(spec.options)}"
        return f"{v!r} is not one of the server's choices{hint}"
    return None


def _short_list(items, n=8):
    items = [str(i) for i in items]
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "") if items else "(none)"


def set_input(graph: dict, object_info: dict, target: str, value, *, allow_many=True) -> list[str]:
    """Set `Node.input` to `value` (coerced and checked) on every node the reference matches; returns their ids."""
    ref, name = parse_target(target)
    ids = resolve_node(graph, ref, allow_many=allow_many)
    for nid in ids:
        kind = graph[nid]["class_type"]
        info = object_info.get(kind)
        where = f"{target} (#{nid} {kind})"
        if info is None:
            raise BatchError(f"{where}: node type {kind!r} is unknown to the server")
        spec = input_spec(info, name)
        if spec is None:
            names = [s.name for s in node_inputs(info)]
            close = difflib.get_close_matches(name, names, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"it has: {', '.join(names) or 'no inputs'}"
            raise BatchError(f"{where}: no input named {name!r}; {hint}")
        graph[nid].setdefault("inputs", {})[name] = coerce_value(value, spec, where)
    return ids


# ----------------------------------------------------------------------------------------------- validation

MODEL_INPUT_HINTS = {
    "ckpt_name": "models/checkpoints", "unet_name": "models/diffusion_models", "vae_name": "models/vae",
    "clip_name": "models/text_encoders", "clip_name1": "models/text_encoders", "clip_name2": "models/text_encoders",
    "clip_name3": "models/text_encoders", "lora_name": "models/loras", "control_net_name": "models/controlnet",
    "image": "input", "file": "input",
}


def validate_graph(graph: dict, object_info: dict, server: str = "the server") -> list[str]:
    """Everything the server would refuse, as messages (empty when the graph is fine)."""
    errors = []
    if not graph:
        return ["the workflow has no nodes to run"]
    has_output = False
    for nid, node in sorted(graph.items(), key=lambda kv: _id_sort_key(kv[0])):
        kind = node.get("class_type")
        label = f"#{nid} {title_of(graph, nid)!r} ({kind})"
        info = object_info.get(kind)
        if info is None:
            errors.append(f"{label}: node type unknown to {server}")
            continue
        has_output |= bool(info.get("output_node"))
        inputs = node.get("inputs") or {}
        for spec in node_inputs(info):
            if spec.name not in inputs:
                if spec.required:
                    errors.append(f"{label}: required input {spec.name!r} is missing")
                continue
            v = inputs[spec.name]
            if _is_link(v):
                src = graph.get(str(v[0]))
                if src is None:
                    errors.append(f"{label}: input {spec.name!r} is linked to node #{v[0]}, which is not in the graph")
                    continue
                sinfo = object_info.get(src.get("class_type"))
                if sinfo is None:
                    continue
                outs = sinfo.get("output") or []
                if not 0 <= int(v[1]) < len(outs):
                    errors.append(f"{label}: input {spec.name!r} is linked to output {v[1]} of #{v[0]}, "
                                  f"which has {len(outs)}")
                    continue
                otype = outs[int(v[1])]
                if not _types_match(otype, spec):
                    errors.append(f"{label}: input {spec.name!r} expects {spec.type} "
                                  f"but #{v[0]} output {v[1]} is {otype}")
                continue
            if not spec.is_widget and spec.type not in WIDGET_TYPES:
                errors.append(f"{label}: input {spec.name!r} needs a {spec.type} connection, got the value {v!r}")
                continue
            why = check_value(v, spec)
            if why and spec.type == "COMBO" and spec.has_upload and isinstance(v, str) and "/" in v:
                why = None  # a file in a subfolder of the server's input folder (listed by no combo)
            if why:
                hint = MODEL_INPUT_HINTS.get(spec.name) if spec.type == "COMBO" else None
                where = f" (put the file in ComfyUI's {hint} folder)" if hint and "not" in why else ""
                errors.append(f"{label}: {spec.name} = {why}{where}")
    if not has_output:
        errors.append("the workflow has no output node (Save Image, Save Video, ...)")
    return errors


def _is_link(v) -> bool:
    return (isinstance(v, list) and len(v) == 2 and isinstance(v[0], (str, int))
            and isinstance(v[1], int) and not isinstance(v[1], bool))


def _types_match(otype, spec: InputSpec) -> bool:
    itype = spec.type
    if isinstance(otype, list):
        otype = "COMBO"
    if "*" in (otype, itype) or otype == itype:
        return True
    a, b = set(str(otype).split(",")), set(str(itype).split(","))
    return bool(a & b)


def links_of(graph: dict, nid: str):
    """(input name, source id, source slot) for each linked input of a node."""
    for name, v in (graph[nid].get("inputs") or {}).items():
        if _is_link(v):
            yield name, str(v[0]), v[1]


def output_nodes(graph: dict, object_info: dict) -> list[str]:
    return [nid for nid, n in graph.items() if (object_info.get(n.get("class_type")) or {}).get("output_node")]


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
