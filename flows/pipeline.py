"""The whole pipeline as one Prefect flow: DVC owns the stages, Prefect runs them.

`pipeline_flow` runs `dvc repro --single-item <stage>` for every stage of `dvc.yaml`, in
the file's order, one Prefect task each, with DVC's output in the task's logs. DVC
decides whether a stage has work to do: its lock file (`dvc.lock`) records the hashes
of every stage's deps, params and outs, so a re-run after a failure or an interruption
skips the stages that already finished and resumes at the first one whose inputs
changed or whose outputs are missing. The stages themselves (`rrec/stages/`) know
nothing of Prefect.

    python -m flows.pipeline run [--stage window --stage prompts]
"""

from __future__ import annotations

import io
import logging
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Annotated, Any

import typer
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

log = logging.getLogger(__name__)

DOWNLOAD_STAGE = "download"
REPORT_STAGE = "report"
TAIL_LINES = 30
# tqdm redraws its bar with "\r"; such lines are logged at most this often per stream.
PROGRESS_LOG_EVERY_S = 10.0
_SKIP_MARKERS = ("didn't change, skipping", "is cached - skipping run")


class StageFailed(RuntimeError):
    """A `dvc repro` that exited non-zero; the message holds the end of its stderr."""


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    stdout_tail: list[str]
    stderr_tail: list[str]
    skipped: bool


def dvc_stages(root: str | Path = ".") -> list[str]:
    """The pipeline's stage names as DVC addresses them (a `foreach` stage gives one per
    item, e.g. `train@recpo`), in `dvc.yaml` order wherever that order already runs every
    stage after the stages it depends on (a topological order otherwise)."""
    import networkx as nx
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    try:
        repo = Repo(str(root))
    except NotDvcRepoError:
        raise FileNotFoundError(
            f"{Path(root).resolve()}: not a DVC project (no .dvc/); pass the project root "
            f"as `root`, or run `dvc init` there"
        ) from None
    with repo:
        stages = [s for s in repo.index.stages if isinstance(s, PipelineStage)]
        if not stages:
            raise ValueError(f"{Path(root).resolve()}: dvc.yaml defines no stages")
        top = (Path(repo.root_dir) / "dvc.yaml").resolve()

        def address(stage: PipelineStage) -> str:  # relative to `root`, where dvc runs
            file = Path(stage.dvcfile.path).resolve()
            return stage.name if file == top else f"{file.relative_to(repo.root_dir)}:{stage.name}"

        names = {id(s): address(s) for s in stages}
        position = {id(s): i for i, s in enumerate(stages)}
        # DVC's graph points from a stage to the stages it depends on.
        ordered = nx.lexicographical_topological_sort(
            repo.index.graph.reverse(copy=True), key=lambda s: position.get(id(s), len(position))
        )
        return [names[id(s)] for s in ordered if id(s) in names]


def dvc_command() -> list[str]:
    """How to call DVC: the `dvc` on PATH, else the one installed beside this Python."""
    found = shutil.which("dvc")
    return [found] if found else [sys.executable, "-m", "dvc"]


def _pump(raw: IO[bytes], name: str, out: queue.Queue[tuple[str, str | None]]) -> None:
    # newline="": lines end at "\n", "\r\n" or "\r", and the ending is kept, so
    # progress-bar redraws (ending in a bare "\r") can be told from lines.
    stream = io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="")
    for line in iter(stream.readline, ""):
        out.put((name, line))
    out.put((name, None))


def run_streaming(
    cmd: Sequence[str],
    cwd: Path,
    log_line: Callable[[str, str], None],
    env: dict[str, str] | None = None,
    tail_lines: int = TAIL_LINES,
) -> CommandResult:
    """Run `cmd`, handing each output line to `log_line(stream, line)` as it arrives
    ("stdout" or "stderr"); returns the exit status and the last lines of each stream."""
    proc = subprocess.Popen(
        list(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    lines: queue.Queue[tuple[str, str | None]] = queue.Queue()
    assert proc.stdout is not None and proc.stderr is not None
    readers = [
        threading.Thread(target=_pump, args=(proc.stdout, "stdout", lines), daemon=True),
        threading.Thread(target=_pump, args=(proc.stderr, "stderr", lines), daemon=True),
    ]
    for t in readers:
        t.start()
    tails = {"stdout": deque[str](maxlen=tail_lines), "stderr": deque[str](maxlen=tail_lines)}
    last_progress = {"stdout": 0.0, "stderr": 0.0}
    skipped, open_streams = False, 2
    try:
        while open_streams:
            name, raw = lines.get()
            if raw is None:
                open_streams -= 1
                continue
            text = raw.rstrip("\r\n")
            if not text.strip():
                continue
            if raw.endswith("\r") and not raw.endswith("\r\n"):
                now = time.monotonic()
                if now - last_progress[name] < PROGRESS_LOG_EVERY_S:
                    continue
                last_progress[name] = now
            else:
                tails[name].append(text)
            skipped = skipped or any(m in text for m in _SKIP_MARKERS)
            log_line(name, text)
    except BaseException:
        proc.terminate()
        proc.wait()
        raise
    returncode = proc.wait()
    for t in readers:
        t.join()
    return CommandResult(returncode, list(tails["stdout"]), list(tails["stderr"]), skipped)


def run_dvc(args: Sequence[str], root: Path) -> CommandResult:
    """`dvc <args>` in `root`, its output streamed to the current Prefect run's logger.

    Raises `StageFailed` with the end of stderr when DVC exits non-zero."""
    logger = get_run_logger()
    cmd = [*dvc_command(), *args]
    shown = "dvc " + " ".join(args)
    logger.info("running `%s` in %s", shown, root.resolve())

    def log_line(stream: str, text: str) -> None:
        (logger.warning if stream == "stderr" and "ERROR" in text else logger.info)(text)

    result = run_streaming(cmd, root, log_line)
    if result.returncode != 0:
        tail = result.stderr_tail or result.stdout_tail
        body = "\n".join(f"  {line}" for line in tail) or "  (no output)"
        raise StageFailed(
            f"`{shown}` exited with status {result.returncode} in {root.resolve()}. "
            f"Last lines of its {'stderr' if result.stderr_tail else 'output'}:\n{body}\n"
            f"Fix the cause and run again: stages that finished are skipped."
        )
    return result


SKIPPED_STATE = "Skipped"  # the state name the Prefect UI shows for a stage DVC did not run


@task(name="dvc-repro-stage", cache_policy=NO_CACHE, retries=0)
def repro_stage(stage: str, root: str) -> Any:
    """One stage, alone (`--single-item`): its upstream stages ran before it in this flow.
    A stage DVC skipped (its inputs match `dvc.lock`) ends in a Completed state named
    `Skipped`, so the UI tells it from one that ran."""
    from prefect.states import Completed

    result = run_dvc(["repro", "--single-item", stage], Path(root))
    if result.skipped:
        return Completed(name=SKIPPED_STATE, message=f"DVC skipped {stage}: nothing changed", data="skipped")
    return "ran"


MLFLOW_UI = "http://127.0.0.1:5000"  # `mlflow ui` as docs/usage.md starts it


def comparison_markdown(root: Path, ui: str = MLFLOW_UI) -> str:
    """The report stage's table and a link to each method's MLflow run (the pipeline
    flow's artifact)."""
    import csv

    table, rows = root / "reports" / "comparison.md", root / "reports" / "comparison.csv"
    if not table.exists() or not rows.exists():
        return "No comparison yet: the report stage writes `reports/comparison.md`."
    links = []
    with rows.open() as f:
        runs = [(r["method"], r["run_id"]) for r in csv.DictReader(f) if r.get("run_id")]
    experiments = _experiment_ids([run_id for _, run_id in runs], root)
    for method, run_id in runs:
        exp = experiments.get(run_id)
        url = f"{ui}/#/experiments/{exp}/runs/{run_id}" if exp else None
        links.append(f"- {method}: [{run_id}]({url})" if url else f"- {method}: run {run_id}")
    return table.read_text() + "\nMLflow runs (`mlflow ui` on " + ui + "):\n\n" + "\n".join(links) + "\n"


def _experiment_ids(run_ids: Sequence[str], root: Path) -> dict[str, str]:
    """{run id: experiment id} of the runs the store has."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from rrec import tracking
    from rrec.reachability import TrackingUnavailable

    try:
        client = MlflowClient(tracking_uri=tracking.configure(root))
    except TrackingUnavailable:
        return {}
    out = {}
    for run_id in run_ids:
        try:
            out[run_id] = client.get_run(run_id).info.experiment_id
        except MlflowException:
            continue
    return out


def _select(stages: Sequence[str] | None, root: str) -> list[str]:
    """`stages` (names, or a `foreach` stage's group name such as `train`) in run order."""
    known = dvc_stages(root)
    if stages is None:
        return known
    groups = {name.split("@", 1)[0] for name in known}
    unknown = [s for s in stages if s not in known and s not in groups]
    if unknown:
        raise ValueError(
            f"{Path(root) / 'dvc.yaml'} has no stage(s) {unknown}; choose from {known}"
        )
    wanted = set(stages)
    return [s for s in known if s in wanted or s.split("@", 1)[0] in wanted]


@flow(name="pipeline")
def pipeline_flow(
    stages: list[str] | None = None,
    root: str = ".",
    download_retries: int = 0,
    retry_delay_s: float = 30.0,
) -> dict[str, str]:
    """Reproduce the pipeline stage by stage, in `dvc.yaml` order; returns stage -> "ran"/"skipped".
    A run that includes the report stage ends with the artifact `rrec-comparison`: the
    comparison table and links to each method's MLflow run.

    `stages` limits the run to those stages (still in `dvc.yaml` order; `train` selects
    every `train@<method>`). A stage whose
    deps, params and outs match `dvc.lock` is skipped by DVC itself, so running this flow
    again after a failure resumes at the failed stage. No stage is retried by default:
    `download` retries transient network failures itself (`data.retries`) and fails at
    once on a deterministic one (HTTP 404, a failed integrity check), and any other stage
    failing again on the same inputs would fail the same way; `download_retries` adds
    whole-stage retries of `download`. A failing stage fails the flow run; its stderr
    tail is in the message.
    """
    logger = get_run_logger()
    selected = _select(stages, root)
    logger.info("stages to reproduce: %s", ", ".join(selected))
    outcome: dict[str, str] = {}
    for stage in selected:
        step = repro_stage.with_options(name=f"repro-{stage}")
        if stage == DOWNLOAD_STAGE and download_retries > 0:
            step = step.with_options(retries=download_retries, retry_delay_seconds=retry_delay_s)
        state = step(stage, root, return_state=True)
        state.result()  # a failed stage raises its error here and fails the flow
        outcome[stage] = "skipped" if state.name == SKIPPED_STATE else "ran"
    if REPORT_STAGE in outcome:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(
            key="rrec-comparison", markdown=comparison_markdown(Path(root)),
            description="Test metrics of every method (reports/comparison.md) and their MLflow runs",
        )
    return outcome


app = typer.Typer(add_completion=False, help=__doc__, no_args_is_help=True)


@app.callback()
def _group() -> None:
    """A group even with one command, so `run` is spelled as the docs spell it."""


@app.command("run")
def run_cmd(
    stage: Annotated[
        list[str] | None, typer.Option("--stage", "-s", help="only these stages (repeatable)")
    ] = None,
    root: str = typer.Option(".", help="project root holding dvc.yaml"),
) -> None:
    """Run `pipeline_flow`: one Prefect task per stage."""
    try:
        pipeline_flow(stages=stage or None, root=root)
    except StageFailed as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(1) from None


if __name__ == "__main__":
    app()
