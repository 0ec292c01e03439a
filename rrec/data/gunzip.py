"""Stream a gzip file to DuckDB through a named pipe, decompressed by ISA-L in a thread.

DuckDB decompresses gzip itself, with a slower inflater than ISA-L's (`isal.igzip`, about
2.5x zlib's speed here) and on the same thread that parses. Feeding it the decompressed
bytes through a pipe moves the inflating to a second thread, runs it faster, and
keeps memory bounded (a pipe buffer and one 1 MiB block; nothing is written to disk).

Where named pipes do not exist (Windows), `gunzipped` yields the gzip file itself and
DuckDB decompresses it.
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

from isal import igzip

_CHUNK = 1 << 20


class GzipStreamError(OSError):
    """The gzip file could not be decompressed to its end (damaged or truncated)."""


class _Feeder(threading.Thread):
    """Writes the decompressed `source` into the pipe `fifo`; keeps its error, if any."""

    def __init__(self, source: Path, fifo: Path) -> None:
        super().__init__(name=f"gunzip {source.name}", daemon=True)
        self.source, self.fifo = source, fifo
        self.error: Exception | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            fd = os.open(self.fifo, os.O_WRONLY)  # blocks until the reader opens it
        except OSError as err:
            self.error = err
            return
        try:
            with igzip.open(self.source, "rb") as fh:
                while not self.stop.is_set() and (block := fh.read(_CHUNK)):
                    view = memoryview(block)
                    while view:
                        view = view[os.write(fd, view):]
        except BrokenPipeError:
            pass  # the reader stopped early: its own error says why
        except Exception as err:  # noqa: BLE001 - any of them leaves the reader a short stream
            self.error = err
        finally:
            os.close(fd)


def _release(feeder: _Feeder) -> None:
    """Stop the feeder and wait for it. It may be blocked in `open` (the reader never
    opened the pipe) or in `write` (the reader stopped reading): holding a read end open
    and draining it unblocks either, and the feeder then sees `stop`."""
    feeder.stop.set()
    if not feeder.is_alive():
        return
    fd = os.open(feeder.fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        while feeder.is_alive():
            with contextlib.suppress(BlockingIOError):
                os.read(fd, _CHUNK)
            feeder.join(timeout=0.01)
    finally:
        os.close(fd)


@contextlib.contextmanager
def gunzipped(path: Path, workdir: Path) -> Iterator[Path]:
    """Yield a path whose content is `path` decompressed: a named pipe in `workdir` fed by
    a thread, to be read once, from start to end, by one reader.

    On leaving, the thread is stopped and the pipe removed. If the stream could not be
    decompressed to its end (a damaged or truncated file), `GzipStreamError` naming
    `path` is raised, in place of whatever the reader made of the short stream."""
    if not hasattr(os, "mkfifo"):
        yield path
        return
    fifo = Path(workdir) / f"{path.name}.{uuid.uuid4().hex[:8]}.pipe"
    os.mkfifo(fifo, 0o600)
    feeder = _Feeder(Path(path), fifo)
    feeder.start()
    try:
        yield fifo
    finally:
        _release(feeder)
        fifo.unlink(missing_ok=True)
        if feeder.error is not None:
            raise GzipStreamError(
                f"{path}: cannot be decompressed ({feeder.error})"
            ) from feeder.error


__all__ = ["GzipStreamError", "gunzipped"]
