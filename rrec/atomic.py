"""Write-to-temporary-then-rename: a reader sees the old file or the new one, never half
of one, and an interrupted writer leaves no file under the final name.

The one place in rrec that writes a temporary and renames it (rrec/data/download.py keeps
its own `.part` file on purpose: a failed download must leave it behind to be resumed).
The temporary of `path` is `.<name>.tmp-<pid>` in the same directory, so the rename never
crosses file systems and writers in different processes never share a temporary.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_TMP_INFIX = ".tmp-"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed onto `path` when the block
    ends without an error, removed when it raises. Parent directories are created, and a
    temporary left by a killed writer that had the same process id is removed first.

    The block may make the temporary a directory (to publish a whole directory): an
    existing `path` is then removed just before the rename, since a directory cannot be
    renamed onto another one; for that instant there is no `path`, but never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{_TMP_INFIX}{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_dir() and (path.exists() or path.is_symlink()):
            _remove(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)


def remove_temporaries(directory: Path | str) -> None:
    """Remove the temporaries that interrupted `atomic_path` writers left in `directory`.
    Only for a directory no writer is using at the moment."""
    for stale in Path(directory).glob(f".*{_TMP_INFIX}*"):
        _remove(stale)


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead_temporaries(directory: Path | str) -> list[Path]:
    """Remove the temporaries in `directory` whose writer process is gone (killed); those
    of running writers stay. Returns what was removed."""
    removed = []
    for stale in sorted(Path(directory).glob(f".*{_TMP_INFIX}*")):
        pid = stale.name.rsplit(_TMP_INFIX, 1)[1]
        if pid.isdigit() and not process_alive(int(pid)):
            _remove(stale)
            removed.append(stale)
    return removed


def write_text(path: Path | str, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: Path | str, data: bytes) -> Path:
    """Write `data` to `path` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
