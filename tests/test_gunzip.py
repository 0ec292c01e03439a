"""`rrec.data.gunzip`: a gzip file streamed, decompressed, through a named pipe."""

from __future__ import annotations

import gzip
import os
import random
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from rrec.data.gunzip import GzipStreamError, gunzipped

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")


def _payload(n_lines: int, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    return b"".join(
        f"{i},{rng.getrandbits(64):x},{'é' * rng.randrange(40)}\n".encode() for i in range(n_lines)
    )


def _read_all(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _finishes(fn: Callable[[], object], seconds: float = 20.0) -> object:
    """Run `fn` in a thread; fail (instead of hanging the suite) if it does not return."""
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed back to the test
            out["error"] = err

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "gunzipped hung"
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out.get("value")


def test_streams_the_decompressed_bytes_and_removes_the_pipe(tmp_path: Path) -> None:
    data = _payload(60_000)  # several MiB: far more than a pipe buffer holds
    src = tmp_path / "f.csv.gz"
    src.write_bytes(gzip.compress(data[:1000]) + gzip.compress(data[1000:]))  # two members

    def run() -> bytes:
        with gunzipped(src, tmp_path) as plain:
            assert plain != src and plain.parent == tmp_path
            return _read_all(plain)

    assert _finishes(run) == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.csv.gz"]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_file_raises_naming_it_even_when_the_reader_succeeded(
    tmp_path: Path, damage: str
) -> None:
    blob = bytearray(gzip.compress(_payload(20_000), mtime=0))
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    else:
        blob[len(blob) // 2] ^= 0xFF
    src = tmp_path / "meta_X.jsonl.gz"
    src.write_bytes(bytes(blob))

    def run() -> None:
        with gunzipped(src, tmp_path) as plain:
            _read_all(plain)  # a short stream reads without error

    with pytest.raises(GzipStreamError, match=r"meta_X\.jsonl\.gz: cannot be decompressed"):
        _finishes(run)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta_X.jsonl.gz"]


def test_the_reader_error_wins_when_the_file_is_sound(tmp_path: Path) -> None:
    src = tmp_path / "f.gz"
    src.write_bytes(gzip.compress(_payload(100)))

    def run() -> None:
        with gunzipped(src, tmp_path) as plain:
            with open(plain, "rb") as fh:
                fh.read(10)
            raise KeyError("the reader's own error")

    with pytest.raises(KeyError, match="the reader's own error"):
        _finishes(run)


def test_no_hang_when_the_reader_never_opens_the_pipe(tmp_path: Path) -> None:
    src = tmp_path / "f.gz"
    src.write_bytes(gzip.compress(_payload(50_000)))

    def run() -> None:
        with gunzipped(src, tmp_path):
            pass

    _finishes(run)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.gz"]


def test_no_hang_when_the_reader_stops_midway_and_keeps_the_pipe_open(tmp_path: Path) -> None:
    src = tmp_path / "f.gz"
    src.write_bytes(gzip.compress(_payload(100_000)))  # the feeder blocks on a full pipe

    def run() -> bytes:
        with gunzipped(src, tmp_path) as plain:
            fh = open(plain, "rb")  # noqa: SIM115 - still open when the context exits
            try:
                head = fh.read(100)
            except BaseException:
                fh.close()
                raise
        fh.close()
        return head

    assert _finishes(run) == _payload(100_000)[:100]


def test_a_missing_file_raises_naming_it(tmp_path: Path) -> None:
    def run() -> None:
        with gunzipped(tmp_path / "absent.gz", tmp_path) as plain:
            _read_all(plain)

    with pytest.raises(GzipStreamError, match=r"absent\.gz: cannot be decompressed"):
        _finishes(run)
