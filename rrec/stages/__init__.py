"""The pipeline's stages, one module each, run by `dvc.yaml` as `python -m rrec.stages.<stage>`.

A stage module reads its inputs, calls library functions, writes its outputs and talks
to MLflow through `rrec.tracking`; the computing lives in the library. `stage_main`
gives every stage the same command line (`--params`, `--root`, `--method`), prints the
time spent in the stage's work (`rrec-stage-compute <stage> <seconds>`, read by
`benchmarks/orchestration_overhead.py`) and turns a failure into one message naming
what failed and why, with exit status 1 (2 for a parameter file that cannot be used);
`RREC_DEBUG=1` shows the traceback instead. Every stage first checks that the tracking
store answers (`rrec.reachability`), so that a pipeline whose later stages would fail
to log stops before it computes anything. Stages that compute with the model run
with `params.threads` torch threads, whatever the machine has.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rrec.config import METHODS, ConfigError, load_params
from rrec.paths import Paths
from rrec.reachability import require_reachable

COMPUTE_MARK = "rrec-stage-compute"
DEBUG_ENV = "RREC_DEBUG"


def failure_message(stage: str, err: BaseException) -> str:
    """The one message a failing stage prints: what failed and why (the exception's own
    text names the file or setting and the fix)."""
    text = str(err).strip() or repr(err)
    name = type(err).__name__
    if type(err).__module__.split(".")[0] == "mlflow" and "API request to" in text:
        # a tracking server that went away after the stage's start-up check
        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        reason = next(filter(None, (re.search(r, text) for r in (
            "Connection refused", "Read timed out", "timed out", "Max retries exceeded"))), None)
        name, text = "TrackingUnavailable", (
            f"the MLflow tracking server at {uri} (MLFLOW_TRACKING_URI) stopped answering during "
            f"the stage ({reason.group(0).lower() if reason else text.split(' failed with')[0]}); "
            f"start it, point MLFLOW_TRACKING_URI at a running one, or unset it to track into "
            f"the project's own store (mlflow/), then run the stage again"
        )
    return f"error: stage {stage} failed: {name}: {text}\n(set {DEBUG_ENV}=1 for the traceback)"


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """A warning as one `warning:` line with its text, not the internal line that raised it."""
    print(f"warning: {message}", file=file or sys.stderr, flush=True)


def _release(err: BaseException) -> None:
    """Drop the locals of the failed stage's frames before exit, when native extensions
    (DuckDB's nanobind) would otherwise report every object they still hold as a leak."""
    seen: set[int] = set()
    exc: BaseException | None = err
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__
    gc.collect()


def parse_args(stage: str, argv: list[str] | None, with_method: bool) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=f"python -m rrec.stages.{stage}", description=f"The {stage} stage.")
    ap.add_argument("--params", default="params.yaml", help="parameter file, relative to --root")
    ap.add_argument("--root", default=".", help="project root holding data/, models/, reports/")
    if with_method:
        ap.add_argument("--method", required=True, choices=METHODS, help="the training method")
    return ap.parse_args(argv)


def stage_main(
    stage: str,
    work: Callable[..., Any],
    argv: list[str] | None = None,
    *,
    with_method: bool = False,
    torch_threads: bool = False,
) -> int:
    """Run `work(params, paths[, method])` as the stage `stage`; returns the exit status.
    `torch_threads`: set torch's CPU threads to `params.threads` first."""
    args = parse_args(stage, argv, with_method)
    name = f"{stage}@{args.method}" if with_method else stage
    debug = bool(os.environ.get(DEBUG_ENV))
    try:
        params = load_params(Path(args.root) / args.params)
    except ConfigError as err:
        print(str(err), file=sys.stderr)
        return 2
    paths = Paths(Path(args.root))
    if torch_threads:
        import torch  # only the model stages load torch

        torch.set_num_threads(params.threads)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            # before anything is computed: a full `dvc repro` stops at its first stage
            require_reachable(paths.root)
            work(params, paths, args.method) if with_method else work(params, paths)
    except Exception as err:
        if debug:
            raise
        print(failure_message(name, err), file=sys.stderr, flush=True)
        _release(err)
        return 1
    print(f"{COMPUTE_MARK} {name} {time.perf_counter() - start:.2f}", flush=True)
    return 0


def run(stage: str, work: Callable[..., Any], *, with_method: bool = False, torch_threads: bool = False) -> None:
    """`if __name__ == "__main__": run(...)` of a stage module."""
    sys.exit(stage_main(stage, work, with_method=with_method, torch_threads=torch_threads))
