"""Child processes this project starts (servers on 127.0.0.1): a free port, and a stop
by process id. Standard library only, so that start-up code can import it cheaply."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from typing import Any


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


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
