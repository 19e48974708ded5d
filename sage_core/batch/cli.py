"""`sage-batch`: render a batch from a ComfyUI workflow without the browser.

    sage-batch WORKFLOW [--prompts FILE] [--seeds 1-8] [--set "KSampler.steps=30"] [--grid "Node.input=a,b"]
               [--sage-ab] [--server HOST:PORT ...] [-o OUT] [--resume]

Everything is checked (workflow, prompts, overrides, model files on every server) before the first job is queued.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import time

from .client import ComfyClient
from .errors import BatchError, ServerError
from .jobs import parse_assignment, parse_grid, parse_seeds, plan_batch, read_prompts
from .local import LocalServer, find_comfyui
from .manifest import Manifest, clean_partials, now_iso
from .progress import Progress
from .runner import BatchRunner, RunOptions, Slot
from .workflow import (
    canonical_json,
    detect_format,
    load_workflow_file,
    node_inputs,
    to_api,
    validate_graph,
)

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sage-batch",
        description="Render a batch of jobs from a ComfyUI workflow (UI or API format) on one or more ComfyUI "
                    "servers, with resumable output and a JSON-lines manifest.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  sage-batch flux.json --prompts prompts.txt --seeds 1-4 --server 127.0.0.1:8188
  sage-batch wan.json --sage-ab --seeds 1,2,3 --server gpu0:8188 --server gpu1:8188 -o ab_run
  sage-batch sdxl.json --set "KSampler.steps=30" --grid "KSampler.cfg=5,7" --local 2 --cuda-devices 0,1
  sage-batch sdxl.json -o ab_run --resume      # render only what is missing

exit status: 0 all jobs rendered, 1 some failed or not rendered, 2 bad input (nothing queued), 130 interrupted""")
    p.add_argument("workflow", help="workflow file: UI format (as saved by ComfyUI), API format, or a ComfyUI PNG")
    b = p.add_argument_group("batch")
    b.add_argument("--prompts", metavar="FILE", help="prompts: .txt (one a line), .csv (header: prompt, negative, "
                   "seed, name, Node.input ...) or .jsonl (objects with the same keys, 'set' for overrides)")
    b.add_argument("--seeds", metavar="SPEC", help="seeds for every prompt, e.g. '1,2,10-13' (default: the workflow's)")
    b.add_argument("--set", dest="sets", action="append", default=[], metavar="NODE.INPUT=VALUE",
                   help="override an input of a node named by title, type or id ('#12'); repeatable")
    b.add_argument("--grid", action="append", default=[], metavar="NODE.INPUT=V1,V2",
                   help="a grid axis: one job per value (axes multiply each other, seeds and prompts); repeatable")
    b.add_argument("--sage-ab", action="store_true",
                   help="A/B grid: every job with the Sage Attention node(s) on and off (kernel=off)")
    b.add_argument("--repeat", type=int, default=1, metavar="N", help="render each job N times (default 1)")
    b.add_argument("--prompt-target", metavar="NODE.INPUT", help="where prompts go (default: the text feeding the "
                   "samplers' positive conditioning); several separated by ';'")
    b.add_argument("--negative-target", metavar="NODE.INPUT", help="where negative prompts go")
    b.add_argument("--seed-target", metavar="NODE.INPUT", help="where seeds go (default: every seed/noise_seed)")
    s = p.add_argument_group("servers")
    s.add_argument("--server", action="append", default=[], metavar="HOST:PORT",
                   help="a running ComfyUI server; repeat (or separate with commas) to spread the batch over several")
    s.add_argument("--local", type=int, default=None, metavar="N",
                   help="start N ComfyUI servers here (default: 1 when no --server is given) and stop them at the end")
    s.add_argument("--comfyui-path", metavar="DIR", help="the ComfyUI to start (default: $COMFYUI_PATH, comfy-cli's "
                   "default workspace, ~/comfy/ComfyUI)")
    s.add_argument("--comfy-args", default="", metavar="ARGS", help="extra arguments for started servers, e.g. '--cpu'")
    s.add_argument("--python", metavar="EXE", help="Python to start ComfyUI with (default: its venv, else this one)")
    s.add_argument("--cuda-devices", metavar="LIST", help="one started server per listed GPU, e.g. '0,1'")
    s.add_argument("--startup-timeout", type=float, default=300.0, metavar="S", help="seconds for a started server")
    s.add_argument("--max-restarts", type=int, default=2, metavar="N",
                   help="restarts of a started server that dies (default 2); a --server that dies is dropped")
    o = p.add_argument_group("output")
    o.add_argument("-o", "--output", metavar="DIR", help="output folder (default: sage-batch-<workflow name>)")
    o.add_argument("--resume", action="store_true", help="go on with the batch in the output folder: render only "
                   "jobs that have no complete output there")
    o.add_argument("--retries", type=int, default=2, metavar="N", help="retries of a failed job (default 2)")
    o.add_argument("--job-timeout", type=float, default=3600.0, metavar="S", help="seconds per job (default 3600)")
    o.add_argument("--include-previews", action="store_true", help="also download preview (temp) images")
    o.add_argument("--keep-prefix", action="store_true",
                   help="keep the save nodes' filename_prefix on the server (default: sage-batch/<job>)")
    o.add_argument("--poll", action="store_true",
                   help="follow jobs by polling /history instead of the websocket (no per-step progress)")
    o.add_argument("--progress", choices=("auto", "tqdm", "plain", "none"), default="auto")
    o.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    o.add_argument("--dry-run", action="store_true", help="check everything and list the jobs; queue nothing")
    o.add_argument("--export-api", metavar="FILE",
                   help="write the workflow in API format (with --set applied) and exit")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    started = []
    try:
        return _run(args, started, argv)
    except BatchError as e:
        print(f"sage-batch: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ServerError as e:
        print(f"sage-batch: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("sage-batch: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        for srv in started:
            srv.stop()


def _say(args, text):
    if not args.quiet:
        print(text, file=sys.stderr, flush=True)


def _run(args, started: list, argv) -> int:
    # ---- everything local first: files and syntax
    data = load_workflow_file(args.workflow)
    rows = read_prompts(args.prompts) if args.prompts else None
    seeds = parse_seeds(args.seeds) if args.seeds else None
    sets = [parse_assignment(t) for t in args.sets]
    axes = [parse_grid(t) for t in args.grid]
    if args.retries < 0 or args.repeat < 1:
        raise BatchError("--retries must be >= 0 and --repeat >= 1")
    out_dir = os.path.abspath(args.output or f"sage-batch-{_stem(args.workflow)}")
    manifest = Manifest(out_dir)
    if not (args.dry_run or args.export_api) and manifest.exists() and not args.resume:
        raise BatchError(f"{manifest.path} exists: pass --resume to go on with that batch, or choose another --output")

    # ---- servers
    addresses = [a.strip() for item in args.server for a in item.split(",") if a.strip()]
    cuda = [d.strip() for d in args.cuda_devices.split(",")] if args.cuda_devices else []
    n_local = args.local if args.local is not None else (len(cuda) if cuda else (0 if addresses else 1))
    if n_local < 0:
        raise BatchError("--local must be >= 0")
    if cuda and n_local != len(cuda):
        raise BatchError(f"--cuda-devices lists {len(cuda)} devices but --local asks for {n_local} servers")
    slots = []
    for addr in addresses:
        client = ComfyClient(addr, events=not args.poll)
        try:
            info = client.object_info()
        except ServerError as e:
            raise BatchError(f"cannot reach ComfyUI at {client.label}: {e}") from None
        slots.append(Slot(client=client, object_info=info))
    if n_local:
        comfy = find_comfyui(args.comfyui_path)
        extra = shlex.split(args.comfy_args)
        for i in range(n_local):
            log = os.path.join(out_dir, "logs", f"comfyui-{i}.log")
            srv = LocalServer(comfy, python=args.python, extra_args=extra, cuda_device=cuda[i] if cuda else None,
                              log_path=log)
            _say(args, f"starting ComfyUI from {comfy} on {srv.address}" + (f" (GPU {cuda[i]})" if cuda else ""))
            started.append(srv)
            srv.start(timeout=args.startup_timeout)
            client = ComfyClient(srv.address, events=not args.poll)
            slots.append(Slot(client=client, object_info=client.object_info(), local=srv))
    if not slots:
        raise BatchError("no server: pass --server HOST:PORT or --local N")

    # ---- the batch, fully resolved and checked on every server
    ref_info = slots[0].object_info
    base = to_api(data, ref_info)
    plan = plan_batch(base, ref_info, rows=rows, seeds=seeds, sets=sets, axes=axes, sage_ab=args.sage_ab,
                      seed_target=args.seed_target, prompt_target=args.prompt_target,
                      negative_target=args.negative_target, repeat=args.repeat)
    if args.export_api:
        with open(args.export_api, "w", encoding="utf-8") as f:
            json.dump(plan.base, f, indent=2, ensure_ascii=False)
            f.write("\n")
        _say(args, f"wrote {args.export_api}")
        return EXIT_OK
    _upload_local_inputs(plan.jobs, slots, args)
    _validate(plan.jobs, slots)

    done_keys = manifest.completed_keys() if args.resume else set()
    todo = [j for j in plan.jobs if j.key not in done_keys]
    skipped = len(plan.jobs) - len(todo)
    _say(args, f"{len(plan.jobs)} job(s)" + (f", {skipped} already rendered" if skipped else "")
         + f", {len(slots)} server(s): {', '.join(s.label for s in slots)}; output: {out_dir}")
    if args.dry_run:
        for j in plan.jobs:
            state = "done" if j.key in done_keys else "todo"
            print(f"{state}\t{j.name}\tseed={j.seed}\t{' '.join(j.cells)}\t{(j.prompt or '')[:60]}")
        return EXIT_OK
    if not todo:
        _say(args, "nothing to render: every job is in the manifest with its outputs")
        return EXIT_OK

    os.makedirs(out_dir, exist_ok=True)
    clean_partials(out_dir)
    manifest.append({"type": "batch", "started_at": now_iso(), "workflow": os.path.abspath(args.workflow),
                     "workflow_sha256": hashlib.sha256(canonical_json(data).encode()).hexdigest(),
                     "format": detect_format(data), "jobs": len(plan.jobs), "to_render": len(todo),
                     "servers": [s.label for s in slots], "resume": bool(args.resume),
                     "argv": list(argv) if argv is not None else sys.argv[1:]})
    kind = "none" if args.quiet else args.progress
    progress = Progress(len(plan.jobs), [s.label for s in slots], kind=kind, done=skipped)
    opts = RunOptions(retries=args.retries, job_timeout=args.job_timeout, max_restarts=args.max_restarts,
                      include_temp=args.include_previews, keep_prefix=args.keep_prefix,
                      startup_timeout=args.startup_timeout)
    targets = [t for t, _ in sets] + [t for a in axes for _, assigns in a.cells for t, _ in assigns]
    if rows:
        targets += [t for r in rows for t, _ in r.overrides]
    runner = BatchRunner(todo, slots, manifest, progress, opts, overridden_targets=targets)
    t0 = time.time()
    try:
        summary = runner.run()
    finally:
        progress.close()
    summary.skipped = skipped
    _say(args, f"rendered {len(summary.ok)}, failed {len(summary.failed)}, not rendered {len(summary.unrendered)}, "
         f"already done {skipped} in {time.time() - t0:.1f} s; manifest: {manifest.path}")
    if summary.dropped_servers:
        _say(args, f"servers dropped: {', '.join(summary.dropped_servers)}")
    if summary.interrupted:
        _say(args, "interrupted: run again with --resume to render the rest")
        return EXIT_INTERRUPTED
    if summary.unrendered:
        _say(args, "no server left for the remaining jobs: run again with --resume to render them")
    return EXIT_OK if not summary.failed and not summary.unrendered else EXIT_FAILED


def _stem(path) -> str:
    return os.path.splitext(os.path.basename(path))[0] or "workflow"


def _validate(jobs, slots) -> None:
    """Every job's graph against every server's node definitions; one error listing the problems."""
    problems, seen = [], set()
    for slot in slots:
        for job in jobs:
            for msg in validate_graph(job.graph, slot.object_info, server=slot.label):
                key = (slot.label, msg)
                if key in seen:
                    continue
                seen.add(key)
                problems.append(f"{slot.label}: {msg}" if len(slots) > 1 else msg)
    if problems:
        shown = problems[:12]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise BatchError("the batch cannot run, nothing was queued:\n  " + "\n  ".join(shown) + more)


def _upload_local_inputs(jobs, slots, args) -> None:
    """A Load Image/Video value that names a file here (not on the server) is uploaded to every server first."""
    uploads = {}
    for job in jobs:
        for node in job.graph.values():
            info = slots[0].object_info.get(node.get("class_type")) or {}
            for spec in node_inputs(info):
                v = node.get("inputs", {}).get(spec.name)
                if spec.type != "COMBO" or not spec.has_upload or not isinstance(v, str) or v in spec.options:
                    continue
                path = os.path.expanduser(v)
                if not os.path.isfile(path):
                    continue
                if path not in uploads:
                    with open(path, "rb") as f:
                        digest = hashlib.sha256(f.read()).hexdigest()[:12]
                    name = f"{digest}_{os.path.basename(path)}"
                    value = f"sage-batch/{name}"
                    if not args.dry_run:
                        for slot in slots:
                            value = slot.client.upload_input(path, name, subfolder="sage-batch")
                        _say(args, f"uploaded {path} as {value}")
                    uploads[path] = value
                node["inputs"][spec.name] = uploads[path]

