"""Batch expansion: prompts file rows x seeds x grid cells, each with its overrides, into fully resolved jobs."""
from __future__ import annotations

import copy
import csv
import hashlib
import itertools
import json
import os
import re
from collections import deque
from dataclasses import dataclass, field

from .errors import BatchError
from .workflow import (
    SEED_INPUTS,
    canonical_json,
    input_spec,
    links_of,
    node_inputs,
    parse_target,
    resolve_node,
    set_input,
    title_of,
)

SAGE_NODE = "SageAttention"
SAGE_NODES = ("SageAttention", "SageAttentionCompare")
PROMPT_KEYS = ("prompt", "positive", "text")
RESERVED_KEYS = {"prompt", "positive", "text", "negative", "seed", "name", "set"}


# ----------------------------------------------------------------------------------------------- inputs


@dataclass
class Row:
    """One line of the prompts file (or the single implicit row when there is none)."""

    index: int
    prompt: str | None = None
    negative: str | None = None
    seed: int | None = None
    name: str | None = None
    overrides: list = field(default_factory=list)  # [(target, value)]


@dataclass
class Axis:
    """One grid dimension: cells of (label, [(target, value)])."""

    name: str
    cells: list


def read_prompts(path) -> list[Row]:
    """Rows from a text file (one prompt a line; '#' comments), a CSV file (header row) or a JSON-lines file."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise BatchError(f"cannot read prompts file {path}: {e}") from None
    ext = os.path.splitext(path)[1].lower()
    if ext == ".csv":
        rows = _rows_from_csv(text, path)
    elif ext in (".jsonl", ".ndjson", ".json"):
        rows = _rows_from_jsonl(text, path)
    else:
        rows = [Row(i, prompt=line.strip()) for i, line in enumerate(_content_lines(text))]
    if not rows:
        raise BatchError(f"prompts file {path} has no prompts")
    return rows


def _content_lines(text):
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            yield line


def _rows_from_csv(text, path) -> list[Row]:
    reader = csv.DictReader(text.splitlines())
    if not reader.fieldnames:
        raise BatchError(f"CSV prompts file {path} has no header row")
    fields = [f.strip() for f in reader.fieldnames if f is not None]
    unknown = [f for f in fields if f.lower() not in RESERVED_KEYS and "." not in f and f]
    if unknown:
        raise BatchError(f"CSV prompts file {path}: unknown column(s) {', '.join(unknown)}; columns are prompt, "
                         "negative, seed, name, or an input to set such as 'KSampler.steps'")
    rows = []
    for i, rec in enumerate(reader):
        rec = {(k or "").strip(): v for k, v in rec.items() if k is not None}
        if not any((v or "").strip() for v in rec.values() if isinstance(v, str)):
            continue
        rows.append(_row_from_mapping(len(rows), rec, f"{path} row {i + 2}", from_text=True))
    return rows


def _rows_from_jsonl(text, path) -> list[Row]:
    stripped = text.strip()
    if path.lower().endswith(".json") and stripped.startswith("["):
        try:
            items = json.loads(stripped)
        except ValueError as e:
            raise BatchError(f"{path}: not valid JSON: {e}") from None
        lines = [(i + 1, item) for i, item in enumerate(items)]
    else:
        lines = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                lines.append((n, json.loads(line)))
            except ValueError as e:
                raise BatchError(f"{path} line {n}: not valid JSON: {e}") from None
    rows = []
    for n, item in lines:
        where = f"{path} line {n}"
        if isinstance(item, str):
            rows.append(Row(len(rows), prompt=item))
        elif isinstance(item, dict):
            rows.append(_row_from_mapping(len(rows), item, where, from_text=False))
        else:
            raise BatchError(f"{where}: expected an object or a string, got {type(item).__name__}")
    return rows


def _row_from_mapping(index, rec: dict, where, from_text) -> Row:
    row = Row(index)
    for key, value in rec.items():
        lk = key.lower()
        if from_text and isinstance(value, str) and value.strip() == "" and lk not in PROMPT_KEYS:
            continue
        if lk in PROMPT_KEYS:
            row.prompt = None if value is None else str(value)
        elif lk == "negative":
            row.negative = None if value is None else str(value)
        elif lk == "seed":
            row.seed = _as_seed(value, where)
        elif lk == "name":
            row.name = str(value)
        elif lk == "set":
            if not isinstance(value, dict):
                raise BatchError(f"{where}: 'set' must be an object of 'Node.input': value")
            for t, v in value.items():
                parse_target(t)
                row.overrides.append((t, v))
        elif "." in key:
            parse_target(key)
            row.overrides.append((key, value))
        else:
            raise BatchError(f"{where}: unknown key {key!r} (use prompt, negative, seed, name, set, or 'Node.input')")
    return row


def _as_seed(value, where) -> int:
    try:
        if isinstance(value, bool):
            raise ValueError
        seed = int(str(value).strip())
    except (TypeError, ValueError):
        raise BatchError(f"{where}: seed {value!r} is not an integer") from None
    if seed < 0:
        raise BatchError(f"{where}: seed {seed} is negative")
    return seed


def parse_seeds(spec: str) -> list[int]:
    """'1,2,10-13' -> [1, 2, 10, 11, 12, 13]; 'N' random-free counts are not guessed: every seed is explicit."""
    seeds = []
    for part in str(spec).replace(" ", "").split(","):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise BatchError(f"invalid --seeds {spec!r}: use numbers and ranges, e.g. '1,2,10-13'")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) else a
        if b < a:
            raise BatchError(f"invalid --seeds range {part!r}: the end is below the start")
        if b - a >= 100000:
            raise BatchError(f"--seeds range {part!r} is too long")
        seeds.extend(range(a, b + 1))
    if not seeds:
        raise BatchError(f"invalid --seeds {spec!r}: no seed")
    return seeds


def parse_assignment(text: str, flag="--set") -> tuple[str, str]:
    """'Node.input=value' -> ('Node.input', 'value'), checking the shape only."""
    target, eq, value = str(text).partition("=")
    if not eq:
        raise BatchError(f"invalid {flag} {text!r}: expected 'Node title or id.input=value', e.g. 'KSampler.steps=30'")
    parse_target(target)
    return target.strip(), value


def parse_grid(text: str) -> Axis:
    """'Node.input=a,b,c' (or a JSON list after '=') -> one grid axis."""
    target, raw = parse_assignment(text, "--grid")
    raw_s = raw.strip()
    if raw_s.startswith("["):
        try:
            values = json.loads(raw_s)
        except ValueError as e:
            raise BatchError(f"invalid --grid {text!r}: {e}") from None
        if not isinstance(values, list):
            raise BatchError(f"invalid --grid {text!r}: expected a list of values")
    else:
        values = [v.strip() for v in raw.split(",")]
    values = [v for v in values if v != ""]
    if not values:
        raise BatchError(f"invalid --grid {text!r}: no values")
    _, name = parse_target(target)
    return Axis(name=target, cells=[(f"{name}-{v}", [(target, v)]) for v in values])


# ----------------------------------------------------------------------------------------------- graph roles


def seed_targets(graph: dict, object_info: dict) -> list[tuple[str, str]]:
    """Every unlinked seed widget (seed / noise_seed) of the graph."""
    out = []
    for nid, node in graph.items():
        info = object_info.get(node.get("class_type")) or {}
        for spec in node_inputs(info):
            if spec.type == "INT" and spec.name in SEED_INPUTS and not isinstance(node["inputs"].get(spec.name), list):
                out.append((nid, spec.name))
    return sorted(out, key=lambda t: (_nid_key(t[0]), t[1]))


def prompt_targets(graph: dict, object_info: dict, role: str) -> list[tuple[str, str]]:
    """The text inputs that feed the samplers' positive (or negative) conditioning."""
    starts = deque()
    for nid, node in graph.items():
        for name, src, slot in links_of(graph, nid):
            if name == role or (role == "positive" and name in ("conditioning", "guider")
                                and "positive" not in node["inputs"]):
                if _is_sampler_like(graph, nid, object_info):
                    starts.append((src, slot))
    found, seen = [], set()
    while starts:
        nid, slot = starts.popleft()
        if nid in seen or nid not in graph:
            continue
        seen.add(nid)
        node = graph[nid]
        info = object_info.get(node.get("class_type")) or {}
        texts = [s.name for s in node_inputs(info)
                 if s.type == "STRING" and s.opts.get("multiline") and isinstance(node["inputs"].get(s.name), str)]
        if texts:
            found.extend((nid, t) for t in texts)
            continue
        out_names = [str(n).lower() for n in (info.get("output_name") or [])]
        want = out_names[slot] if 0 <= slot < len(out_names) and out_names[slot] in ("positive", "negative") else role
        links = list(links_of(graph, nid))
        names = {n for n, _, _ in links}
        for name, src, sslot in links:
            spec = input_spec(info, name)
            if spec is None or not ({"CONDITIONING", "GUIDER"} & set(spec.type.split(","))):
                continue
            if {"positive", "negative"} <= names and name in ("positive", "negative") and name != want:
                continue
            starts.append((src, sslot))
    return sorted(set(found), key=lambda t: (_nid_key(t[0]), t[1]))


def _is_sampler_like(graph, nid, object_info) -> bool:
    info = object_info.get(graph[nid].get("class_type")) or {}
    outs = set(info.get("output") or [])
    return bool(outs & {"LATENT", "GUIDER"}) or "sampl" in graph[nid].get("class_type", "").lower()


def _nid_key(nid):
    try:
        return (0, int(nid))
    except ValueError:
        return (1, nid)


def sage_nodes(graph: dict) -> list[str]:
    return sorted((nid for nid, n in graph.items() if n.get("class_type") in SAGE_NODES), key=_nid_key)


def attention_settings(graph: dict) -> list[dict]:
    """The Sage nodes of a resolved graph and their settings (what the job asked the attention to do)."""
    out = []
    for nid in sage_nodes(graph):
        node = graph[nid]
        settings = {k: v for k, v in (node.get("inputs") or {}).items() if not isinstance(v, list)}
        out.append({"node": nid, "title": title_of(graph, nid), "class_type": node["class_type"], "settings": settings})
    return out


def sage_ab_axis(graph: dict) -> Axis:
    ids = [nid for nid in sage_nodes(graph) if graph[nid]["class_type"] == SAGE_NODE]
    if not ids:
        raise BatchError("--sage-ab needs a 'Sage Attention' node in the workflow")
    on = []
    for nid in ids:
        kernel = graph[nid]["inputs"].get("kernel", "auto")
        on.append((f"#{nid}.kernel", "auto" if kernel == "off" else kernel))
    return Axis(name="sage", cells=[("sage-on", on), ("sage-off", [(f"#{nid}.kernel", "off") for nid in ids])])


# ----------------------------------------------------------------------------------------------- jobs


@dataclass
class Job:
    index: int
    name: str
    key: str
    graph: dict
    prompt: str | None
    negative: str | None
    seed: int | None
    cells: list  # grid labels
    overrides: dict  # target -> value, as applied
    row: int
    attempts: int = 0
    server_losses: int = 0
    errors: list = field(default_factory=list)

    def record_inputs(self) -> dict:
        return {"prompt": self.prompt, "negative": self.negative, "seed": self.seed, "row": self.row,
                "grid": self.cells, "overrides": self.overrides}


@dataclass
class BatchPlan:
    base: dict
    jobs: list
    seed_targets: list
    prompt_targets: list
    negative_targets: list


def plan_batch(base: dict, object_info: dict, *, rows=None, seeds=None, sets=(), axes=(), sage_ab=False,
               seed_target=None, prompt_target=None, negative_target=None, repeat=1) -> BatchPlan:
    """Expand the batch into jobs with resolved graphs; every override is checked now (BatchError on the first
    bad one)."""
    base = copy.deepcopy(base)
    for target, value in sets:
        set_input(base, object_info, target, value)

    s_targets = _explicit_targets(base, seed_target) if seed_target else seed_targets(base, object_info)
    p_targets = (_explicit_targets(base, prompt_target) if prompt_target
                 else prompt_targets(base, object_info, "positive"))
    n_targets = (_explicit_targets(base, negative_target) if negative_target
                 else [t for t in prompt_targets(base, object_info, "negative") if t not in p_targets])

    rows = list(rows) if rows else [Row(0)]
    if any(r.prompt is not None for r in rows) and not p_targets:
        raise BatchError("the prompts file sets prompts but no prompt text input was found feeding a sampler; "
                         "name it with --prompt-target 'Node title.text'")
    if any(r.negative is not None for r in rows) and not n_targets:
        raise BatchError("the prompts file sets negative prompts but the workflow has no separate negative prompt "
                         "text; name it with --negative-target 'Node title.text'")
    want_seeds = bool(seeds) or any(r.seed is not None for r in rows)
    if want_seeds and not s_targets:
        raise BatchError("seeds were given but the workflow has no seed input; name it with --seed-target 'Node.seed'")

    axes = list(axes)
    if sage_ab:
        axes.append(sage_ab_axis(base))
    seed_list = list(seeds) if seeds else [None]
    repeat = max(1, int(repeat))

    jobs, seen_keys = [], {}
    for row in rows:
        row_seeds = [row.seed] if row.seed is not None else seed_list
        for seed in row_seeds:
            for combo in itertools.product(*[a.cells for a in axes]) if axes else [()]:
                for rep in range(repeat):
                    graph = copy.deepcopy(base)
                    applied = {}
                    where_row = f"prompts row {row.index + 1}"
                    for target, value in row.overrides:
                        _apply(graph, object_info, target, value, where_row)
                        applied[target] = value
                    if row.prompt is not None:
                        for nid, name in p_targets:
                            graph[nid]["inputs"][name] = row.prompt
                    if row.negative is not None:
                        for nid, name in n_targets:
                            graph[nid]["inputs"][name] = row.negative
                    if seed is not None:
                        for nid, name in s_targets:
                            _apply(graph, object_info, f"#{nid}.{name}", seed, "seed")
                    labels = []
                    for label, assigns in combo:
                        labels.append(label)
                        for target, value in assigns:
                            _apply(graph, object_info, target, value, "--grid")
                            applied[target] = value
                    eff_seed = seed
                    if eff_seed is None and s_targets:
                        nid, name = s_targets[0]
                        eff_seed = graph[nid]["inputs"].get(name)
                    digest = hashlib.sha256(canonical_json(graph).encode()).hexdigest()
                    n = seen_keys.get(digest, 0)
                    seen_keys[digest] = n + 1
                    key = digest[:16] + (f"-{n}" if n else "")
                    index = len(jobs)
                    name = job_name(index, row, eff_seed, labels, key, many_rows=len(rows) > 1)
                    jobs.append(Job(index=index, name=name, key=key, graph=graph, prompt=row.prompt,
                                    negative=row.negative, seed=eff_seed, cells=labels, overrides=applied,
                                    row=row.index))
    return BatchPlan(base=base, jobs=jobs, seed_targets=s_targets, prompt_targets=p_targets, negative_targets=n_targets)


def _apply(graph, object_info, target, value, where):
    try:
        set_input(graph, object_info, target, value)
    except BatchError as e:
        raise BatchError(f"{where}: {e}") from None


def _explicit_targets(graph, text) -> list[tuple[str, str]]:
    out = []
    for item in str(text).split(";"):
        if item.strip():
            ref, name = parse_target(item)
            out.extend((nid, name) for nid in resolve_node(graph, ref, allow_many=True))
    return out


def slug(text, limit=40) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._-")
    return s[:limit].rstrip("._-")


def job_name(index, row: Row, seed, labels, key, many_rows) -> str:
    """A stable, filesystem-safe job name: index, row name or number, seed, grid cells, key prefix."""
    parts = [f"{index:04d}"]
    if row.name:
        parts.append(slug(row.name, 32))
    elif many_rows:
        parts.append(f"p{row.index + 1}")
    if seed is not None:
        parts.append(f"s{seed}")
    parts.extend(slug(lbl, 24) for lbl in labels)
    parts.append(key[:8])
    return "-".join(p for p in parts if p)
