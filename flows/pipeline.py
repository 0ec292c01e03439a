"""The whole pipeline as one Prefect flow, and `dvc repro` behind one shared Prefect server.

`pipeline_flow` runs `dvc repro --single-item <stage>` for every stage of `dvc.yaml`, in
the file's order, one Prefect task each. DVC decides whether a stage has work to do:
its lock file (`dvc.lock`) records the hashes of every stage's deps, params and outs,
so a re-run after a failure or an interruption skips the stages that already finished
and resumes at the first one whose inputs changed or whose outputs are missing.

Every `python -m flows.run STAGE` that DVC starts is a Prefect client. Without
`PREFECT_API_URL` each of them would start (and stop) its own temporary Prefect
server; the flow here passes its own API URL to the stages instead, and
`repro_with_server` starts one server for a plain `dvc repro`. Both also start a stage
server (flows/stage_server.py) for the stages to fork from, so that a stage does not
spend its first seconds importing Prefect, torch, transformers and MLflow again.

    python -m flows.pipeline run [--stage window --stage prompts]
    python -m flows.pipeline repro [-- <dvc repro arguments>]
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import logging
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Annotated

import typer
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.stage_server import stage_server
from rrec.processes import free_port, stop_process, wait_until_answering

log = logging.getLogger(__name__)

DOWNLOAD_STAGE = "download"
TAIL_LINES = 30
# tqdm redraws its bar with "\r"; such lines are logged at most this often per stream.
PROGRESS_LOG_EVERY_S = 10.0
_SKIP_MARKERS = ("didn't change, skipping", "is cached - skipping run")
# The environment for DVC while `shared_stage_processes` is active.
_DVC_ENV: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("_DVC_ENV", default=None)


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


def current_api_url() -> str | None:
    """The Prefect API this process talks to, for the child processes to share.

    That is `PREFECT_API_URL` when set, else the temporary server this process started
    for itself (a real HTTP server on 127.0.0.1 that lives until this process exits)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if url:
        return url
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        url = str(client.api_url).rstrip("/")
    return url if url.startswith(("http://", "https://")) else None


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


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    url = current_api_url()
    if url:
        env["PREFECT_API_URL"] = url
    return env


@contextlib.contextmanager
def shared_stage_processes(root: str | Path = ".") -> Iterator[dict[str, str]]:
    """For the block, `run_dvc` gives DVC's stages the Prefect API of this process and a
    stage server to fork from (flows/stage_server.py); yields that environment."""
    with stage_server(child_env(), root) as env:
        token = _DVC_ENV.set(env)
        try:
            yield env
        finally:
            _DVC_ENV.reset(token)


def run_dvc(args: Sequence[str], root: Path, share_stages: bool = False) -> CommandResult:
    """`dvc <args>` in `root`, its output streamed to the current Prefect run's logger.
    `share_stages`: with a stage server of its own (see `shared_stage_processes`), for a
    command that runs many stages.

    Raises `StageFailed` with the end of stderr when DVC exits non-zero."""
    if share_stages and _DVC_ENV.get() is None:
        with shared_stage_processes(root):
            return run_dvc(args, root)
    logger = get_run_logger()
    cmd = [*dvc_command(), *args]
    shown = "dvc " + " ".join(args)
    logger.info("running `%s` in %s", shown, root.resolve())

    def log_line(stream: str, text: str) -> None:
        (logger.warning if stream == "stderr" and "ERROR" in text else logger.info)(text)

    result = run_streaming(cmd, root, log_line, env=_DVC_ENV.get() or child_env())
    if result.returncode != 0:
        tail = result.stderr_tail or result.stdout_tail
        body = "\n".join(f"  {line}" for line in tail) or "  (no output)"
        raise StageFailed(
            f"`{shown}` exited with status {result.returncode} in {root.resolve()}. "
            f"Last lines of its {'stderr' if result.stderr_tail else 'output'}:\n{body}\n"
            f"Fix the cause and run again: stages that finished are skipped."
        )
    return result


@task(name="dvc-repro-stage", cache_policy=NO_CACHE, retries=0)
def repro_stage(stage: str, root: str) -> str:
    """One stage, alone (`--single-item`): its upstream stages ran before it in this flow."""
    result = run_dvc(["repro", "--single-item", stage], Path(root))
    return "skipped" if result.skipped else "ran"


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
    with shared_stage_processes(root):
        for stage in selected:
            step = repro_stage.with_options(name=f"repro-{stage}")
            if stage == DOWNLOAD_STAGE and download_retries > 0:
                step = step.with_options(retries=download_retries, retry_delay_seconds=retry_delay_s)
            outcome[stage] = step(stage, root)
    return outcome


# ------------------------------------------------------------ one server for `dvc repro`


def _prefect_cli() -> list[str]:
    beside = Path(sys.executable).with_name("prefect")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("prefect")
    return [found] if found else [sys.executable, "-m", "prefect"]


@contextlib.contextmanager
def prefect_server(
    host: str = "127.0.0.1", port: int | None = None, startup_timeout_s: float = 90.0
) -> Iterator[str]:
    """A Prefect server for the duration of the block; yields its API URL.

    With `PREFECT_API_URL` already set (environment or Prefect profile) nothing is started and that URL is yielded.
    Otherwise `prefect server start` runs as a child process on `host` and a free port;
    the block is entered once `/api/health` answers, and the server is stopped by its
    process id when the block ends, however it ends."""
    from prefect.settings import PREFECT_API_URL

    existing = PREFECT_API_URL.value()
    if existing:
        yield existing
        return
    port = port or free_port(host)
    api_url = f"http://{host}:{port}/api"
    cmd = [*_prefect_cli(), "server", "start", "--host", host, "--port", str(port)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        text=True, errors="replace",
    )
    output: deque[str] = deque(maxlen=40)
    assert proc.stdout is not None
    drain = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    drain.start()

    def last_output() -> str:
        if proc.poll() is not None:
            drain.join(timeout=5)  # it exited: the rest of its output is on the way
        return "".join(output)

    try:
        wait_until_answering(
            proc, f"{api_url}/health", startup_timeout_s, name=f"`{' '.join(cmd)}`", output=last_output
        )
        log.info("Prefect server pid %d answering at %s", proc.pid, api_url)
        yield api_url
    finally:
        stop_process(proc)


def repro_with_server(dvc_args: Sequence[str] = (), root: str | Path = ".") -> int:
    """`dvc repro <dvc_args>` in `root` with every stage's flow reporting to one Prefect
    server (started here unless `PREFECT_API_URL` is set) and forked from one stage
    server (flows/stage_server.py, which imports while the Prefect server starts);
    returns DVC's exit status."""
    from prefect.settings import PREFECT_API_URL

    existing = PREFECT_API_URL.value()
    port = None if existing else free_port()
    api_url = existing or f"http://127.0.0.1:{port}/api"
    with (
        stage_server({**os.environ, "PREFECT_API_URL": api_url}, root) as env,
        prefect_server(port=port) as served,
    ):
        assert served == api_url, (served, api_url)
        proc = subprocess.Popen([*dvc_command(), "repro", *dvc_args], cwd=Path(root), env=env)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            # Ctrl-C reached DVC too: let it stop its stage and release its lock
            # before the server goes away.
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                stop_process(proc)
            raise


app = typer.Typer(add_completion=False, help=__doc__, no_args_is_help=True)


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


@app.command(
    "repro", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def repro_cmd(ctx: typer.Context, root: str = typer.Option(".", help="project root")) -> None:
    """`dvc repro` (extra arguments are passed on) with one Prefect server for all stages."""
    raise typer.Exit(repro_with_server(list(ctx.args), root))


if __name__ == "__main__":
    app()
