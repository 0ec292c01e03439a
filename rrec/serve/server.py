"""`mlflow models serve` of a logged recommender on 127.0.0.1, for the load test and the
tests: started on a free port, waited for until /ping answers, stopped by process id."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rrec.processes import free_port, stop_process, wait_until_answering


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


@contextmanager
def model_server(
    model_uri: str, log_file: Path, *, workers: int = 1, start_timeout: float = 120.0
) -> Iterator[str]:
    """`mlflow models serve --env-manager local` in its own process group, its output in
    `log_file`; yields its URL once /ping answers, and stops the whole group after."""
    port = free_port()
    # the server finds `mlflow` (and this interpreter's packages) on PATH
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port), "-w", str(workers)]
    with Path(log_file).open("w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_answering(
                proc, f"{url}/ping", start_timeout, name="mlflow models serve", output=lambda: _tail(log_file),
                interval_s=0.5,
            )
            yield url
        finally:
            stop_process(proc, grace_s=30, group=True)  # uvicorn's workers are its children
