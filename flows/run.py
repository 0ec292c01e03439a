"""`python -m flows.run STAGE`: run one stage's Prefect flow (what `dvc.yaml` calls)."""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # Under `python -m flows.pipeline repro` a stage server (flows/stage_server.py) has
    # Prefect, torch, transformers and MLflow imported already: hand the stage to it.
    from flows.stage_server import delegate

    _status = delegate(sys.argv)
    if _status is not None:
        sys.exit(_status)

import atexit  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import logging  # noqa: E402
import subprocess  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from typing import Any  # noqa: E402

import typer  # noqa: E402

from rrec.config import ConfigError  # noqa: E402
from rrec.processes import free_port, stop_process, wait_until_answering  # noqa: E402

app = typer.Typer(add_completion=False, help=__doc__)

DEBUG_ENV = "RREC_DEBUG"
HEARTBEAT_ENV = ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY")
# The rrec module each stage's flow (flows/stages.py) imports first.
STAGE_MODULES = {
    "download": "rrec.data.download",
    "window": "rrec.data.window",
    "prompts": "rrec.prompts",
    "backbone": "rrec.model.backbone",
    "items": "rrec.items",
    "train": "rrec.train.run",
    "evaluate": "rrec.evaluate",
    "baselines": "rrec.baselines.stage",
    "report": "rrec.report",
}


class TemporaryServer:
    """Prefect's temporary server, started before Prefect is imported.

    Without `PREFECT_API_URL` Prefect starts a temporary server (uvicorn in a child
    process) when the flow begins: it first imports all of `prefect.server` here (2-3 s)
    and then waits for the server to answer (4-6 s), doing nothing else. This starts the
    same server, with the same command and environment, first thing, so that it boots
    while this process imports Prefect and the stage's libraries; it is stopped by its
    process id at exit, after Prefect has flushed its logs and events to it."""

    def __init__(self) -> None:
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        prefect_dir = os.path.dirname(importlib.util.find_spec("prefect").origin)  # type: ignore[arg-type, union-attr]
        self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            [
                sys.executable, "-m", "uvicorn", "--app-dir", os.path.dirname(prefect_dir),
                "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
                "--port", str(self.port), "--log-level", "error", "--lifespan", "on",
            ],
            env={
                **os.environ,
                "PREFECT_UI_ENABLED": "0",
                "PREFECT__SERVER_EPHEMERAL": "1",
                "PREFECT__SERVER_FINAL": "1",
            },
            stdin=subprocess.DEVNULL,
        )
        # registered before Prefect is imported, so it runs after Prefect's own exit hooks
        atexit.register(self.stop)

    def wait(self, timeout_s: float) -> None:
        assert self.proc is not None
        wait_until_answering(
            self.proc, f"{self.api_url}/health", timeout_s, name="Prefect's temporary server", interval_s=0.1
        )

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc, grace_s=5)


def _start_early_server() -> TemporaryServer | None:
    if os.environ.get("PREFECT_API_URL"):
        return None
    try:
        return TemporaryServer()
    except (OSError, AttributeError, ImportError):
        return None


def _use_api(early: TemporaryServer | None, stage_module: str | None) -> None:
    """Point Prefect at `early` unless a Prefect profile names an API (or turns temporary
    servers off), and wait until it answers, importing the stage's libraries meanwhile."""
    if early is None:
        return
    from prefect.context import refresh_global_settings_context
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        early.stop()  # Prefect decides, as before
        return
    os.environ["PREFECT_API_URL"] = early.api_url
    refresh_global_settings_context()
    if stage_module:
        # what the flow imports first anyway; an import error is left for the flow to
        # raise (and fail its run with)
        with contextlib.suppress(Exception):
            importlib.import_module(stage_module)
    early.wait(get_current_settings().server.ephemeral.startup_timeout_seconds)


@contextlib.contextmanager
def _stage_settings() -> Iterator[None]:
    """Settings for a stage's flow run: no run heartbeats unless configured.

    The heartbeat thread is joined when the flow ends, which costs up to a second per
    stage; heartbeats only serve to detect a stage process that died without reporting,
    and DVC reports those already. `PREFECT_FLOWS_HEARTBEAT_FREQUENCY` (in the
    environment or the Prefect profile) turns them back on."""
    from prefect.settings import (
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        get_current_settings,
        temporary_settings,
    )

    configured = any(os.environ.get(k) for k in HEARTBEAT_ENV) or (
        "heartbeat_frequency" in get_current_settings().flows.model_fields_set
    )
    if configured:
        yield
        return
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def failure_message(stage: str, err: BaseException) -> str:
    """The one message a failing stage prints: what failed and why (the exception's own
    text names the file or setting and the fix); the traceback only with RREC_DEBUG=1."""
    text = str(err).strip() or repr(err)
    return f"error: stage {stage} failed: {type(err).__name__}: {text}\n(set {DEBUG_ENV}=1 for the traceback)"


class _NoTraceback(logging.Filter):
    """Keeps Prefect's "Encountered exception during execution" traceback out of the
    terminal (the Prefect UI still gets it, through the API handler)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and str(record.msg).startswith("Encountered exception"))


def _console_without_tracebacks() -> None:
    from prefect.logging.handlers import PrefectConsoleHandler

    for logger in (logging.getLogger(), logging.getLogger("prefect")):
        for handler in logger.handlers:
            if isinstance(handler, PrefectConsoleHandler):
                handler.addFilter(_NoTraceback())


def _release(err: BaseException) -> None:
    """Drop the locals of the failed stage's frames. A failed flow run keeps its
    exception, and so those frames, alive until exit, when native extensions (DuckDB's
    nanobind) report every object still held as a leak, after the message."""
    seen: set[int] = set()
    exc: BaseException | None = err
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__
    gc.collect()


@app.command()
def main(
    stage: str = typer.Argument(..., help="download, window, prompts, backbone, items, train, evaluate, baselines or report"),
    params: str = typer.Option("params.yaml", help="parameter file, relative to --root"),
    root: str = typer.Option(".", help="project root holding data/, models/, reports/"),
    method: str = typer.Option(None, help="train/evaluate: the method (contrastive or recpo)"),
) -> None:
    # Without PREFECT_API_URL each stage starts Prefect's temporary server; on a busy
    # machine it can take longer than Prefect's default 20 s to answer.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    early = _start_early_server()
    from flows.stages import STAGE_FLOWS

    if stage not in STAGE_FLOWS:
        typer.echo(f"unknown stage {stage!r}; choose one of: {', '.join(STAGE_FLOWS)}", err=True)
        raise typer.Exit(2)
    kwargs: dict[str, Any] = {"params_path": params, "root": root}
    if stage in ("train", "evaluate"):
        if method is None:
            typer.echo(f"stage {stage} needs --method contrastive|recpo", err=True)
            raise typer.Exit(2)
        kwargs["method"] = method
    _use_api(early, STAGE_MODULES.get(stage))
    debug = bool(os.environ.get(DEBUG_ENV))
    if not debug:
        _console_without_tracebacks()
    try:
        with _stage_settings():
            STAGE_FLOWS[stage](**kwargs)
    except ConfigError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from None
    except Exception as err:
        if debug:
            raise
        typer.echo(failure_message(stage if method is None else f"{stage}@{method}", err), err=True)
        _release(err)
        raise typer.Exit(1) from None


if __name__ == "__main__":
    sys.exit(app())
