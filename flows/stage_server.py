"""A fork server for the stage processes of one `dvc repro`.

Every `dvc.yaml` stage is its own `python -m flows.run STAGE` process, and before any
work it imports Prefect (about 1 s), and for the model stages torch, transformers,
peft, accelerate and MLflow (3-6 s more). `python -m flows.pipeline repro` and
`pipeline_flow` therefore start this server beside DVC: it imports those libraries
once and waits on a Unix socket, named to the stages in `RREC_STAGE_SERVER`. A stage
process that finds the variable hands its arguments, working directory, environment,
`sys.path` and its stdin/stdout/stderr to the server and waits; the server forks a
child that runs `flows.run` exactly as `python -m flows.run` would, and the stage
process exits with the child's exit status. So DVC sees the same command, output and
exit status, and each stage still runs in a process of its own:

- the project's own modules (`rrec`, `flows`) are never inherited: the child imports
  them afresh from the stage's working directory, so an edit between stages is seen;
- the child gets the stage process's environment, working directory, umask, `sys.path`
  and standard streams, and fresh seeds for numpy's and torch's global generators;
  signals sent to the stage process (Ctrl-C, SIGTERM) are passed on to the child's
  process group, and if the stage process dies (or the server) the child is stopped;
- the child ends as a Python program does (non-daemon threads joined, `atexit` handlers
  run, Prefect's and MLflow's flushes among them, its exit status or signal passed
  back), except that the libraries it shares with the server are not torn down; a
  failing stage fails its Prefect and MLflow runs as before.

The stage process runs the stage itself, as before, whenever there is no server, it is
not ready yet (it only listens once its imports are done), or it was started with a
different interpreter, interpreter options or environment (variables DVC and the shell
set for a stage, `DVC_*`, `PWD`, `OLDPWD`, `SHLVL`, `_`, `PATH` and the shell's prompt
and layout variables, may differ).

Linux only (fork, `SCM_RIGHTS`). `RREC_FORK_STAGES=0` turns it off.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import io
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from rrec.processes import stop_process

ENV_SOCKET = "RREC_STAGE_SERVER"
ENV_ENABLE = "RREC_FORK_STAGES"
PROTOCOL = 1
PROJECT_PACKAGES = ("rrec", "flows")
# Set by DVC (`DVC_ROOT`, `DVC_STAGE`, experiments) or the shell that runs a stage's
# command; none of them is read while the libraries are imported.
_ENV_MAY_DIFFER = frozenset(
    {"PWD", "OLDPWD", "SHLVL", "_", "PATH", "PS1", "PS2", "PS4", "IFS", "OPTIND", "COLUMNS", "LINES",
     "RREC_STAGE_SERVER_DEBUG"}
)
# What the stages import: the server imports these, then forgets the project's own
# modules again and keeps the third-party ones. Failures are ignored (a stage that
# needs a module that failed here imports it itself, or fails as it would have).
WARM_MODULES = (
    "prefect",
    "prefect.flow_engine",
    "prefect.task_engine",
    "prefect.logging.handlers",
    "prefect.events.worker",
    "prefect.client.orchestration",
    "typer",
    "flows.stages",
    "flows.run",
    "rrec.data.download",
    "rrec.data.sample",
    "rrec.data.window",
    "rrec.prompts",
    "rrec.model.backbone",
    "rrec.items",
    "rrec.train.run",
    "rrec.evaluate",
    "rrec.baselines.stage",
    "rrec.report",
    "rrec.tracking",
    "rrec.registry",
    "rrec.serve.pyfunc",
    "mlflow",
    "mlflow.pyfunc",
)
CLIENT_GONE_GRACE_S = 10.0
STOP_GRACE_S = 20.0


def enabled() -> bool:
    return sys.platform == "linux" and os.environ.get(ENV_ENABLE, "1") not in ("0", "false", "no", "")


def _interpreter() -> dict[str, Any]:
    """What must match between the stage process and the server besides the environment."""
    return {
        "protocol": PROTOCOL,
        "executable": os.path.realpath(sys.executable),
        "prefix": os.path.realpath(sys.prefix),
        "version": sys.version,
        "flags": list(sys.flags),
        "xoptions": sorted(f"{k}={v}" for k, v in sys._xoptions.items()),
        "warnoptions": list(sys.warnoptions),
    }


def _env_difference(client: Mapping[str, str], server: Mapping[str, str]) -> list[str]:
    keys = set(client) | set(server)
    return sorted(
        k for k in keys
        if k not in _ENV_MAY_DIFFER and not k.startswith("DVC_") and client.get(k) != server.get(k)
    )


def _forget_project_modules() -> None:
    for name in list(sys.modules):
        if name.split(".", 1)[0] in PROJECT_PACKAGES:
            del sys.modules[name]
    importlib.invalidate_caches()


def _send(conn: socket.socket, message: dict[str, Any]) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


def _read_line(conn: socket.socket, buf: bytearray, limit: int = 16 << 20) -> bytes | None:
    """One newline-terminated message from `conn` (blocking); None at end of stream."""
    while b"\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buf += chunk
        if len(buf) > limit:
            raise ValueError("message too long")
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line


# ------------------------------------------------------------------------ the client


def delegate(argv: list[str]) -> int | None:
    """Run `python -m flows.run <argv[1:]>` in the stage server; returns its exit status,
    or None when there is no usable server (the caller then runs the stage itself)."""
    path = os.environ.get(ENV_SOCKET)
    if not path or not enabled():
        return None
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(path)
    except OSError:
        return None
    with conn:
        umask = os.umask(0)
        os.umask(umask)
        request = {
            **_interpreter(),
            "argv": list(argv),
            "cwd": os.getcwd(),
            "env": dict(os.environ),
            "path": list(sys.path),
            "umask": umask,
        }
        buf = bytearray()
        try:
            socket.send_fds(conn, [b"F"], [0, 1, 2])
            _send(conn, request)
            line = _read_line(conn, buf)
            reply = json.loads(line) if line else {}
        except (OSError, ValueError):  # ValueError: JSONDecodeError included
            return None
        if not reply.get("ok"):
            if os.environ.get("RREC_STAGE_SERVER_DEBUG"):
                print(f"stage server declined: {reply.get('reason')}", file=sys.stderr)
            return None
        child = int(reply["pid"])
        if os.environ.get("RREC_STAGE_SERVER_DEBUG"):
            print(f"stage server: running in forked process {child}", file=sys.stderr)

        def forward(signum: int, _frame: Any) -> None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child, signum)

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, forward)
        try:
            line = _read_line(conn, buf)
        except (OSError, ValueError):
            line = None
    if not line:  # the server died: stop the stage rather than leave it running unseen
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child, signal.SIGTERM)
        print(f"flows.run: lost the stage server while stage process {child} ran", file=sys.stderr)
        return 1
    code = int(json.loads(line)["exit"])
    if code < 0:  # the child was killed by a signal: end the same way
        sig = -code
        with contextlib.suppress(OSError, ValueError):
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
        return 128 + sig
    return code


# ------------------------------------------------------------------------ the server


@dataclass
class ChildTask:
    """What a forked child runs (returned from the server loop in the child only)."""

    argv: list[str]
    cwd: str
    env: dict[str, str]
    path: list[str]
    umask: int
    fds: list[int]


@dataclass
class _Running:
    conn: socket.socket
    kill_at: float | None = None


@dataclass
class _Server:
    path: str
    base_env: dict[str, str]
    interpreter: dict[str, Any] = field(default_factory=_interpreter)
    running: dict[int, _Running] = field(default_factory=dict)
    stopping: bool = False
    sel: selectors.BaseSelector = field(default_factory=selectors.DefaultSelector)

    def serve(self) -> ChildTask | None:
        """Accept stages until SIGTERM; returns a ChildTask in a forked child, None in
        the server when it stops."""
        sel = self.sel
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path + ".tmp")
        listener.bind(self.path + ".tmp")
        listener.listen(64)
        os.replace(self.path + ".tmp", self.path)  # clients only see a ready server
        sel.register(listener, selectors.EVENT_READ, "listen")
        sel.register(wake_r, selectors.EVENT_READ, "wake")
        parent = os.getppid()
        try:
            while not (self.stopping and not self.running):
                if os.getppid() != parent:  # whoever started the server is gone
                    self._on_signal(signal.SIGTERM, None)
                self._reap()
                self._kill_overdue()
                if self.stopping:
                    if listener.fileno() >= 0:
                        sel.unregister(listener)
                        listener.close()
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(self.path)
                for key, _ in sel.select(timeout=1.0):
                    if key.data == "wake":
                        with contextlib.suppress(BlockingIOError):
                            while os.read(wake_r, 512):
                                pass
                    elif key.data == "listen" and not self.stopping:
                        task = self._accept(listener, sel, [wake_r, wake_w])
                        if task is not None:
                            return task  # in the child
                    elif isinstance(key.data, int):
                        self._client_event(key.fileobj, key.data, sel)  # type: ignore[arg-type]
        finally:
            if not _in_child():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
        return None

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if signum != signal.SIGCHLD:
            self.stopping = True
            for pid, run in self.running.items():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGTERM)
                run.kill_at = run.kill_at or time.monotonic() + STOP_GRACE_S

    def _accept(
        self, listener: socket.socket, sel: selectors.BaseSelector, owned_fds: list[int]
    ) -> ChildTask | None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return None
        conn.settimeout(10)
        fds: list[int] = []
        try:
            _, fds, _, _ = socket.recv_fds(conn, 1, 3)
            line = _read_line(conn, bytearray())
            request = json.loads(line) if line else None
            reason = self._refusal(request, fds)
            if reason:
                _send(conn, {"ok": False, "reason": reason})
                raise ValueError(reason)
            assert request is not None
            pid = os.fork()
        except (OSError, ValueError, AssertionError, json.JSONDecodeError):
            for fd in fds:
                os.close(fd)
            conn.close()
            return None
        if pid == 0:
            _CHILD[0] = True
            for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.set_wakeup_fd(-1)
            with contextlib.suppress(OSError):
                os.setpgid(0, 0)
            # the child keeps nothing of the server: its sockets, selector and pipe
            for key in list(sel.get_map().values()):
                if isinstance(key.fileobj, socket.socket):
                    key.fileobj.close()
            sel.close()
            for fd in owned_fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            for run in self.running.values():
                run.conn.close()
            conn.close()
            return ChildTask(
                argv=list(request["argv"]), cwd=request["cwd"], env=dict(request["env"]),
                path=list(request["path"]), umask=int(request["umask"]), fds=fds,
            )
        for fd in fds:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)
        conn.settimeout(None)
        self.running[pid] = _Running(conn)
        try:
            _send(conn, {"ok": True, "pid": pid})
        except OSError:
            self._client_gone(pid)
        sel.register(conn, selectors.EVENT_READ, pid)
        return None

    def _refusal(self, request: dict[str, Any] | None, fds: list[int]) -> str | None:
        if not isinstance(request, dict) or len(fds) != 3:
            return "malformed request"
        theirs = {k: request.get(k) for k in self.interpreter}
        if theirs != self.interpreter:
            return "different interpreter or interpreter options"
        if request.get("cwd") != os.getcwd():
            # Prefect reads settings from .env / prefect.toml / pyproject.toml there
            return "different working directory"
        differ = _env_difference(request.get("env", {}), self.base_env)
        if differ:
            return f"environment differs in {', '.join(differ[:10])}"
        return None

    def _client_event(self, conn: socket.socket, pid: int, sel: selectors.BaseSelector) -> None:
        try:
            data = conn.recv(4096)
        except OSError:
            data = b""
        if not data:  # the stage process is gone: stop its child
            sel.unregister(conn)
            self._client_gone(pid)

    def _client_gone(self, pid: int) -> None:
        run = self.running.get(pid)
        if run is None or run.kill_at is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
        run.kill_at = time.monotonic() + CLIENT_GONE_GRACE_S

    def _kill_overdue(self) -> None:
        now = time.monotonic()
        for pid, run in self.running.items():
            if run.kill_at is not None and now > run.kill_at:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)

    def _reap(self) -> None:
        while self.running:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            run = self.running.pop(pid, None)
            if run is None:
                continue
            with contextlib.suppress(OSError):
                _send(run.conn, {"exit": os.waitstatus_to_exitcode(status)})
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(run.conn)
            run.conn.close()


_CHILD = [False]  # set in a forked child
_ZYGOTE_STDIO: list[Any] = []  # the server's std streams, still used by its log handlers


def _in_child() -> bool:
    return _CHILD[0]


def _fresh_stdio(unbuffered: bool) -> None:
    """sys.stdin/stdout/stderr as a fresh interpreter makes them for fds 0-2 (CPython's
    create_stdio: line-buffered on a terminal and for stderr, write-through when
    unbuffered, stderr with backslashreplace)."""
    encoding = getattr(sys.__stdout__, "encoding", None) or "utf-8"

    def text(fd: int, name: str, write: bool, errors: str) -> io.TextIOWrapper:
        raw = io.FileIO(fd, "wb" if write else "rb", closefd=False)
        tty = raw.isatty()
        buffered: Any = raw if (write and unbuffered) else (io.BufferedWriter(raw) if write else io.BufferedReader(raw))
        wrapper = io.TextIOWrapper(
            buffered, encoding=encoding, errors=errors, newline="\n",
            line_buffering=write and not unbuffered and (tty or fd == 2), write_through=write and unbuffered,
        )
        with contextlib.suppress(AttributeError):
            raw.name = name  # type: ignore[misc]
            wrapper.mode = "w" if write else "r"  # type: ignore[misc]
        return wrapper

    sys.stdin = sys.__stdin__ = text(0, "<stdin>", False, "strict")
    sys.stdout = sys.__stdout__ = text(1, "<stdout>", True, "strict")
    sys.stderr = sys.__stderr__ = text(2, "<stderr>", True, "backslashreplace")


def _exit_status(exc: SystemExit) -> int:
    """The exit status Python gives `raise SystemExit(exc.code)` (printing a non-int)."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def _flush_std_streams() -> None:
    for stream in {id(s): s for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__, *_ZYGOTE_STDIO)}.values():
        with contextlib.suppress(Exception):
            stream.flush()  # type: ignore[union-attr]


def _finish(status: int, interrupted: bool) -> NoReturn:
    """End the child as Python ends a program, less the teardown of the modules the
    server imported: they are shared with the server, and freeing them touches (and so
    copies) every page of its memory, 2 s or more per stage. Non-daemon threads are
    joined, `atexit` handlers run (Prefect's and MLflow's flushes among them), the
    project's modules are released and garbage-collected, and the streams flushed."""
    import atexit
    import threading

    threading._shutdown()  # type: ignore[attr-defined]  # what Py_FinalizeEx does first
    atexit._run_exitfuncs()
    _forget_project_modules()
    gc.collect()
    _flush_std_streams()
    if interrupted:  # as Python does for an uncaught KeyboardInterrupt
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(status & 0xFF)


def run_child(task: ChildTask) -> NoReturn:
    """In the forked child: become `python -m flows.run <argv>` of the stage process."""
    import runpy

    unbuffered = bool(getattr(sys.stderr, "write_through", False))
    _ZYGOTE_STDIO.extend(s for s in (sys.stdout, sys.stderr) if s is not None)
    _flush_std_streams()
    for target, fd in enumerate(task.fds):
        os.dup2(fd, target)
        os.close(fd)
    _fresh_stdio(unbuffered)
    os.chdir(task.cwd)
    os.umask(task.umask)
    env = {k: v for k, v in task.env.items() if k != ENV_SOCKET}
    os.environ.clear()
    os.environ.update(env)
    sys.path[:] = task.path
    _forget_project_modules()
    # a fresh process seeds numpy's global generator and torch's CPU generator afresh
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    if "torch" in sys.modules:
        sys.modules["torch"].random.default_generator.seed()
    sys.argv = list(task.argv)
    status, interrupted = 0, False
    try:
        runpy.run_module("flows.run", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        status = _exit_status(exc)
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())
        status, interrupted = 130, True
    except BaseException:  # noqa: BLE001 - reported as Python reports it
        sys.excepthook(*sys.exc_info())
        status = 1
    _finish(status, interrupted)


def _warm_up() -> list[str]:
    failed = []
    for name in WARM_MODULES:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - best effort, see WARM_MODULES
            failed.append(name)
    _forget_project_modules()
    return failed


def _cuda_in_use() -> bool:
    torch = sys.modules.get("torch")
    try:
        return bool(torch is not None and torch.cuda.is_initialized())
    except Exception:  # noqa: BLE001
        return True


def main(socket_path: str) -> None:
    base_env = dict(os.environ)
    # the server itself asks CUDA nothing that would spoil it for forked children
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    started = time.perf_counter()
    failed = _warm_up()
    os.environ.clear()
    os.environ.update(base_env)
    print(
        f"stage server pid {os.getpid()}: imports took {time.perf_counter() - started:.1f} s"
        + (f"; could not import {', '.join(failed)}" if failed else ""),
        file=sys.stderr, flush=True,
    )
    # what the children share with the server is never collected in them (collecting
    # it would write to, and so copy, all of it)
    gc.collect()
    gc.freeze()
    if _cuda_in_use():
        print("stage server: CUDA was initialised during the imports; not serving", file=sys.stderr)
        return
    task = _Server(socket_path, base_env).serve()
    if task is not None:
        run_child(task)  # never returns
    # the server has nothing to flush or finish: skip the teardown of all it imported
    _flush_std_streams()
    os._exit(0)


# ---------------------------------------------------------- starting and stopping it


@contextlib.contextmanager
def stage_server(env: Mapping[str, str], root: str | Path = ".") -> Iterator[dict[str, str]]:
    """A stage server for the duration of the block; yields `env` with `RREC_STAGE_SERVER`
    set, for the `dvc` process whose stages should use it.

    The server starts importing at once and only listens when done; stages that start
    before then run on their own. It is stopped by its process id when the block ends.
    Yields `env` unchanged where the server is turned off or not supported."""
    if not enabled() or env.get(ENV_ENABLE, "1") in ("0", "false", "no", ""):
        yield dict(env)
        return
    tmp = tempfile.mkdtemp(prefix="rrec-stages-")
    sock = os.path.join(tmp, "sock")
    served = {**env, ENV_SOCKET: sock}
    log = open(os.path.join(tmp, "server.log"), "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.stage_server", sock], cwd=Path(root), env=served,
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        yield served
    finally:
        stop_process(proc, grace_s=STOP_GRACE_S + 10)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1])
