"""Child processes this project starts (servers on 127.0.0.1): a free port, a wait until
the server answers, and a stop by process id. Standard library only, so that start-up
code can import it cheaply."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def answers(url: str, timeout_s: float = 2.0) -> bool:
    """Does GET `url` answer 200 now?"""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_until_answering(
    proc: subprocess.Popen[Any],
    url: str,
    timeout_s: float,
    *,
    name: str,
    output: Callable[[], str] = lambda: "",
    interval_s: float = 0.25,
) -> None:
    """Return once GET `url` answers 200. Raise RuntimeError naming the server `name`
    if `proc` exits first or `timeout_s` passes; `output()` (its last output) ends the
    message."""
    deadline = time.monotonic() + timeout_s
    while not answers(url):
        if proc.poll() is not None:
            raise RuntimeError(
                f"{name} exited with status {proc.returncode} before answering on {url}{_tail(output())}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{name} (pid {proc.pid}) did not answer on {url} within {timeout_s:g} s{_tail(output())}"
            )
        time.sleep(interval_s)


def _tail(text: str) -> str:
    return f". Its last output:\n{text}" if text else ""


def stop_process(proc: subprocess.Popen[Any], grace_s: float = 20.0, *, group: bool = False) -> None:
    """SIGTERM the process by its id (its whole process group with `group`, for a
    server started with `start_new_session=True` whose workers are its children), then
    SIGKILL it if it has not exited after `grace_s`."""
    if proc.poll() is not None:
        return
    kill = os.killpg if group else os.kill
    kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        kill(proc.pid, signal.SIGKILL)
        proc.wait()
