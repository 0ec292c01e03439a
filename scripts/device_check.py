"""The prepared device check: the embedded default on one CUDA GPU.

    python scripts/device_check.py prepare DIR            # anywhere the project is installed (CPU)
    python scripts/device_check.py run DIR [--steps 3] [--json OUT] [--require-all]
    python scripts/device_check.py steps DIR --method recpo [--engine vllm] --json OUT

`prepare` builds the embedded default with the stage functions (sample catalogue ->
window -> prompts -> the committed tiny backbone architecture, shortly pre-trained ->
item table) into DIR, on the CPU in float32: that item table is the CPU reference.
`run` then, on the machine under test (needing only torch, transformers, peft,
accelerate and the small pure-Python part of the project's dependencies that rrec's
modules import; see docs/gpu.md):

- items: the items stage on this machine's device (`model.dtype: auto` is bfloat16 on a
  GPU) against the CPU float32 states of the same weights. Tolerance: every row's cosine
  similarity >= COS_MIN and the median relative L2 error <= REL_MEDIAN_MAX;
- contrastive, recpo: a few optimiser steps of each method, set up as the train stage
  sets them up (`rrec.train.steps`), with the HF rollout engine;
- recpo (accelerate launch + DeepSpeed ZeRO-2): the same RecPO steps in a child process
  under `accelerate launch --config_file configs/accelerate_deepspeed_zero2.yaml
  --num_processes 1`, when CUDA is there and DeepSpeed imports;
- recpo (vLLM rollout): the same steps with `train.rollout.engine: vllm`, in a child
  process, when CUDA is there and vLLM imports.

A part that cannot run here is reported as skipped with its reason, never as passed.
The table gives each part's step time (mean over the steps after the first, which
carries the warm-up), the first step's time and the peak GPU memory torch allocated.
Exit status: 1 when a part failed; with --require-all, 2 when none failed but one was
skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a work tree without `pip install -e .`
    sys.path.insert(0, str(ROOT))

# item states on the device vs the CPU float32 states of the same weights
COS_MIN = 0.99
REL_MEDIAN_MAX = 0.05

DEEPSPEED_CONFIG = ROOT / "configs" / "accelerate_deepspeed_zero2.yaml"

# On top of the committed params.yaml: the embedded default (sample catalogue, the
# committed tiny architecture) with a short pre-training, and step sizes for a check.
PREPARE_OVERRIDES: dict[str, Any] = {
    "model.dtype": "float32",  # the CPU reference table
    "model.tiny.pretrain_steps": 40,
    "model.tiny.pretrain_warn_after_s": 600.0,
    "train.batch_size": 8,
    "train.micro_batch_size": 32,
    "train.warmup_steps": 1,
    "train.rollout.group_size": 4,
    "train.rollout.max_new_tokens": 16,
    "train.recpo.init": "backbone",  # the check trains RecPO alone, from the backbone
}


# ------------------------------------------------------------------ prepare


def prepare(out: Path, pretrain_steps: int | None = None) -> dict[str, Any]:
    """Build the embedded default under `out` with the stage functions, on the CPU."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch starts: the reference is the CPU's
    import yaml

    from rrec.config import load_params
    from rrec.data.download import run_download
    from rrec.data.window import run_window
    from rrec.items import run_items
    from rrec.paths import Paths
    from rrec.prompts import run_prompts
    from rrec.stages.backbone import backbone_stage

    overrides = dict(PREPARE_OVERRIDES)
    if pretrain_steps is not None:
        overrides["model.tiny.pretrain_steps"] = pretrain_steps
    out.mkdir(parents=True, exist_ok=True)
    params = load_params(ROOT / "params.yaml", overrides)
    (out / "params.yaml").write_text(
        yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False)
    )
    paths = Paths(out)
    t0 = time.monotonic()
    for stage in (run_download, run_window, run_prompts, backbone_stage, run_items):
        print(f"prepare: {stage.__name__}", flush=True)
        stage(params, paths)
    shutil.rmtree(paths.raw, ignore_errors=True)  # the run reads prompts and models only
    info = {"reference": "cpu float32", "seconds": round(time.monotonic() - t0, 1)}
    (out / "device_check.json").write_text(json.dumps(info, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"prepared {out} in {info['seconds']} s ({size / 2**20:.1f} MiB)")
    return info


# ------------------------------------------------------------------ parts


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_mib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def load(project: Path, dtype: str, engine: str = "hf"):  # -> (Params, Paths)
    from rrec.config import load_params
    from rrec.paths import Paths

    params = load_params(
        project / "params.yaml", {"model.dtype": dtype, "train.rollout.engine": engine}
    )
    return params, Paths(project)


def check_items(project: Path, workdir: Path, dtype: str) -> dict[str, Any]:
    """The items stage on this device against the CPU float32 table of the same weights."""
    import torch
    import torch.nn.functional as F

    from rrec.items import run_items
    from rrec.model.backbone import resolve_dtype
    from rrec.model.item_table import ItemTable

    params, paths = load(project, dtype)
    reference = ItemTable.load(paths.item_table).embeddings
    out_dir = workdir / "item_table_device"
    shutil.rmtree(out_dir, ignore_errors=True)
    _reset_peak()
    t0 = time.perf_counter()
    run_items(params, paths, out_dir=out_dir)
    _sync()
    seconds = time.perf_counter() - t0
    table = ItemTable.load(out_dir).embeddings
    cos = F.cosine_similarity(table, reference, dim=1)
    rel = (table - reference).norm(dim=1) / reference.norm(dim=1).clamp_min(1e-12)
    ok = table.shape == reference.shape and bool(torch.isfinite(table).all())
    ok = ok and float(cos.min()) >= COS_MIN and float(rel.median()) <= REL_MEDIAN_MAX
    used = resolve_dtype(params.model.dtype, "cuda" if _cuda() else "cpu")
    return {
        "status": "passed" if ok else "failed",
        "steps": int(table.shape[0]),
        "first_s": seconds,
        "s_per_step": None,
        "peak_gpu_mib": _peak_mib(),
        "note": (
            f"{table.shape[0]} items in {str(used).removeprefix('torch.')} vs CPU float32: cosine min "
            f"{float(cos.min()):.5f} (>= {COS_MIN}), rel. L2 median {float(rel.median()):.2e} "
            f"max {float(rel.max()):.2e} (median <= {REL_MEDIAN_MAX}); {table.shape[0] / seconds:.0f} items/s"
        ),
    }


def run_steps(
    project: Path, method: str, steps: int, dtype: str, engine: str = "hf"
) -> dict[str, Any]:
    """`steps` optimiser steps of `method`, set up as the train stage sets them up."""
    import numpy as np

    from rrec.model.backbone import resolve_dtype
    from rrec.train.build import build_training
    from rrec.train.loop import Checkpoints, Progress

    params, paths = load(project, dtype, engine)
    tp = params.train
    training, users = build_training(params, paths, method)
    accelerator, step_fn, reasoning = training.accelerator, training.step, training.reasoning
    b = tp.batch_size
    if len(users) < b * steps:
        raise RuntimeError(f"{len(users)} train examples; {steps} steps of {b} need {b * steps}")
    _reset_peak()
    seconds, losses = [], []
    for k in range(steps):
        t0 = time.perf_counter()
        out = step_fn(np.arange(k * b, (k + 1) * b), k)
        _sync()
        seconds.append(time.perf_counter() - t0)
        losses.append(float(out["loss"]))
    ok = all(math.isfinite(x) for x in losses)
    # one optimiser step per update (a DeepSpeed engine counts its own), and a checkpoint
    # that saves and loads back under this back-end
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    optimiser_steps = wrapped.engine.global_steps if wrapped is not None else training.ctx.scheduler.last_epoch
    with tempfile.TemporaryDirectory(prefix="rrec-device-ckpt-") as tmp:
        checkpoints = Checkpoints(Path(tmp), accelerator)
        resumed = checkpoints.load(checkpoints.save(Progress(step=steps))).step
    ok = ok and optimiser_steps == steps and resumed == steps
    used = resolve_dtype(params.model.dtype, accelerator.device)
    dist = accelerator.state.distributed_type
    return {
        "status": "passed" if ok else "failed",
        "steps": steps,
        "first_s": seconds[0],
        "s_per_step": statistics.fmean(seconds[1:]) if steps > 1 else None,
        "peak_gpu_mib": _peak_mib(),
        "note": (
            f"{str(used).removeprefix('torch.')}, B={b}"
            + (
                f", G={tp.rollout.group_size}, {tp.rollout.max_new_tokens} new tokens, engine {tp.rollout.engine}"
                if reasoning
                else ""
            )
            + f", {str(dist).rsplit('.', 1)[-1]}, losses {', '.join(f'{x:.3f}' for x in losses)}"
            + f", {optimiser_steps} optimiser steps, checkpoint resumed at step {resumed}"
        ),
    }


def _child(argv: list[str], out_json: Path, timeout_s: float) -> dict[str, Any]:
    """A part run in a child process that writes its row to `out_json`."""
    out_json.unlink(missing_ok=True)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return _failed(f"timed out after {timeout_s:.0f} s")
    if proc.returncode != 0 or not out_json.exists():
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-8:]
        print(
            f"--- {' '.join(argv[:4])} ... (exit {proc.returncode}):\n" + "\n".join(tail),
            flush=True,
        )
        reason = tail[-1] if tail else "no output"
        return _failed(
            f"exit {proc.returncode} after {time.monotonic() - t0:.0f} s: {reason[:160]}"
        )
    return json.loads(out_json.read_text())


def _failed(note: str) -> dict[str, Any]:
    return {
        "status": "failed",
        "steps": None,
        "first_s": None,
        "s_per_step": None,
        "peak_gpu_mib": None,
        "note": note,
    }


def _skipped(note: str) -> dict[str, Any]:
    return {
        "status": "skipped",
        "steps": None,
        "first_s": None,
        "s_per_step": None,
        "peak_gpu_mib": None,
        "note": note,
    }


def _guarded(fn: Any, *args: Any) -> dict[str, Any]:
    try:
        return fn(*args)
    except Exception as err:  # a part's failure is a row of the table, not the end of the check
        traceback.print_exc()
        return _failed(
            f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
        )


def run(
    project: Path, workdir: Path, steps: int, dtype: str, child_timeout_s: float
) -> list[tuple[str, dict[str, Any]]]:
    import torch

    if not (project / "params.yaml").exists() or not (project / "models" / "item_table").exists():
        raise SystemExit(
            f"{project}: not a prepared project; run `scripts/device_check.py prepare {project}` first"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    rows: list[tuple[str, dict[str, Any]]] = []
    rows.append(("items: device vs CPU states", _guarded(check_items, project, workdir, dtype)))
    rows.append(("contrastive steps", _guarded(run_steps, project, "contrastive", steps, dtype)))
    rows.append(("recpo steps (hf rollout)", _guarded(run_steps, project, "recpo", steps, dtype)))

    me = [sys.executable, str(Path(__file__).resolve())]
    common = [str(project), "--method", "recpo", "--steps", str(steps), "--dtype", dtype]
    if not cuda:
        rows.append(
            (
                "recpo: accelerate + DeepSpeed ZeRO-2",
                _skipped("no CUDA device (ZeRO-2 here is for GPUs)"),
            )
        )
    elif importlib.util.find_spec("deepspeed") is None:
        rows.append(
            (
                "recpo: accelerate + DeepSpeed ZeRO-2",
                _skipped("deepspeed does not import (pip install -e '.[gpu]')"),
            )
        )
    else:
        out = workdir / "deepspeed.json"
        argv = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DEEPSPEED_CONFIG),
            "--num_processes", "1", str(Path(__file__).resolve()), "steps", *common, "--json", str(out),
        ]  # fmt: skip
        rows.append(("recpo: accelerate + DeepSpeed ZeRO-2", _child(argv, out, child_timeout_s)))
    if not cuda:
        rows.append(("recpo: vLLM rollout", _skipped("no CUDA device (vLLM samples on a GPU)")))
    elif importlib.util.find_spec("vllm") is None:
        rows.append(
            ("recpo: vLLM rollout", _skipped("vllm does not import (pip install -e '.[gpu]')"))
        )
    else:
        out = workdir / "vllm.json"
        argv = [*me, "steps", *common, "--engine", "vllm", "--json", str(out)]
        rows.append(("recpo: vLLM rollout", _child(argv, out, child_timeout_s)))
    return rows


# ------------------------------------------------------------------ table


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    head = ["part", "status", "steps", "s/step", "first s", "peak GPU MiB", "note"]
    body = [
        [name, r["status"], _fmt(r["steps"], "d"), _fmt(r["s_per_step"], ".3f"), _fmt(r["first_s"], ".3f"),
         _fmt(r["peak_gpu_mib"], ".0f"), r["note"]]
        for name, r in rows
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def environment() -> str:
    import accelerate
    import peft
    import torch
    import transformers

    dev = (
        f"cuda ({torch.cuda.get_device_name(0)})"
        if torch.cuda.is_available()
        else "cpu (no CUDA device)"
    )
    extra = []
    for name in ("deepspeed", "vllm", "bitsandbytes"):
        extra.append(f"{name} {'absent' if importlib.util.find_spec(name) is None else 'present'}")
    return (
        f"device {dev}; python {sys.version.split()[0]}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, peft {peft.__version__}, accelerate {accelerate.__version__}; "
        + ", ".join(extra)
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="build the embedded default (CPU, needs the full install)")
    p.add_argument("project", type=Path)
    p.add_argument("--pretrain-steps", type=int, default=None)
    r = sub.add_parser("run", help="run every part and print the table")
    r.add_argument("project", type=Path)
    r.add_argument(
        "--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)"
    )
    r.add_argument("--steps", type=int, default=3)
    r.add_argument(
        "--dtype", default="auto", help="model.dtype for every part (auto: bf16 on a GPU)"
    )
    r.add_argument("--child-timeout", type=float, default=240.0, help="seconds for each child part")
    r.add_argument("--json", type=Path, default=None, help="also write the rows here")
    r.add_argument("--require-all", action="store_true", help="exit 2 when a part was skipped")
    s = sub.add_parser("steps", help="one part: the steps of a method (run's child process)")
    s.add_argument("project", type=Path)
    s.add_argument("--method", choices=["contrastive", "recpo"], required=True)
    s.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    s.add_argument("--steps", type=int, default=3)
    s.add_argument("--dtype", default="auto")
    s.add_argument("--json", type=Path, required=True)
    args = ap.parse_args(argv)

    if args.cmd == "prepare":
        prepare(args.project, args.pretrain_steps)
        return 0
    if args.cmd == "steps":
        row = run_steps(args.project, args.method, args.steps, args.dtype, args.engine)
        from accelerate import PartialState

        if PartialState().is_main_process:
            args.json.write_text(json.dumps(row) + "\n")
        return 0 if row["status"] == "passed" else 1

    import tempfile

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rrec-device-check-") as tmp:
        rows = run(
            args.project, args.workdir or Path(tmp), args.steps, args.dtype, args.child_timeout
        )
    counts = {k: sum(r["status"] == k for _, r in rows) for k in ("passed", "failed", "skipped")}
    print()
    print(environment())
    print(table(rows))
    print(
        f"device check: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped "
        f"(a skip is not a pass) in {time.monotonic() - t0:.0f} s"
    )
    if args.json:
        args.json.write_text(
            json.dumps({"environment": environment(), "rows": dict(rows)}, indent=2) + "\n"
        )
    if counts["failed"]:
        return 1
    return 2 if args.require_all and counts["skipped"] else 0


if __name__ == "__main__":
    sys.exit(main())
