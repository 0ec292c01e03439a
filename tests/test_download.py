"""The download stage against a real HTTP server on 127.0.0.1 (started per test, in a thread)."""

from __future__ import annotations

import gzip
import random
import socket
import sys
import threading
import time
import types
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rrec.config import DataParams, Params, SampleParams
from rrec.data.download import (
    DownloadError,
    download_one,
    fetch,
    gzip_problem,
    run_download,
    source_urls,
)
from rrec.paths import Paths
from rrec.stages.download import download_stage

CHUNK = 1024


def gz_bytes(seed: int, n: int = 60_000) -> bytes:
    """A gzip file of `n` random bytes (incompressible, so the file is about `n` long)."""
    return gzip.compress(random.Random(seed).randbytes(n), mtime=0)


@dataclass
class Server:
    """Serves `files` (URL path -> bytes) with Range support; records every request."""

    files: dict[str, bytes] = field(default_factory=dict)
    cut_next: int = 0  # this many upcoming GETs announce the full length, then stop halfway
    ignore_range: bool = False
    fail_next: list[int] = field(default_factory=list)  # statuses answered before serving
    delay_s: float = 0.0  # wait this long before answering
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    port: int = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base + path

    def ranges(self, path: str) -> list[str | None]:
        return [r for p, r in self.requests if p == path]


def _handler(state: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep pytest output quiet
            pass

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            range_header = self.headers.get("Range")
            state.requests.append((self.path, range_header))
            if state.delay_s:
                time.sleep(state.delay_s)
            if state.fail_next:
                self.send_error(state.fail_next.pop(0))
                return
            body = state.files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            start, status = 0, 200
            if range_header and not state.ignore_range:
                start = int(range_header.removeprefix("bytes=").removesuffix("-"))
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
            payload = body[start:]
            self.send_response(status)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if state.cut_next > 0:
                state.cut_next -= 1
                payload = payload[: len(payload) // 2]
                self.close_connection = True
            self.wfile.write(payload)
            self.wfile.flush()

    return Handler


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)  # type: ignore[arg-type]
        # a client that gave up (a timeout test) is expected


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Server:
    state = Server()
    httpd = _QuietServer(("127.0.0.1", 0), _handler(state))
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()

    def stop() -> None:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)

    request.addfinalizer(stop)
    return state


def get(url: str, dest: Path) -> Path:
    return fetch(url, dest, timeout_s=10, chunk_bytes=CHUNK, progress=False)


def test_full_download(server: Server, tmp_path: Path) -> None:
    body = gz_bytes(1)
    server.files["/a.csv.gz"] = body
    dest = tmp_path / "sub" / "a.csv.gz"
    assert get(server.url("/a.csv.gz"), dest) == dest
    assert dest.read_bytes() == body
    assert not (tmp_path / "sub" / "a.csv.gz.part").exists()
    assert server.ranges("/a.csv.gz") == [None]


def test_cut_transfer_resumes_with_range(server: Server, tmp_path: Path) -> None:
    body = gz_bytes(2)
    server.files["/b.csv.gz"] = body
    server.cut_next = 1
    dest = tmp_path / "b.csv.gz"
    part = tmp_path / "b.csv.gz.part"
    with pytest.raises(DownloadError, match=r"/b\.csv\.gz.*run the download again to resume"):
        get(server.url("/b.csv.gz"), dest)
    assert not dest.exists()
    n = part.stat().st_size
    assert 0 < n < len(body)
    assert part.read_bytes() == body[:n]

    get(server.url("/b.csv.gz"), dest)
    assert server.ranges("/b.csv.gz") == [None, f"bytes={n}-"]
    assert dest.read_bytes() == body
    assert not part.exists()


def test_server_ignoring_range_restarts_cleanly(server: Server, tmp_path: Path) -> None:
    body = gz_bytes(3)
    server.files["/c.csv.gz"] = body
    server.ignore_range = True
    dest = tmp_path / "c.csv.gz"
    # A part whose bytes would corrupt the result if the 200 answer were appended to it.
    (tmp_path / "c.csv.gz.part").write_bytes(b"\x00" * 500)
    get(server.url("/c.csv.gz"), dest)
    assert server.ranges("/c.csv.gz") == ["bytes=500-"]
    assert dest.read_bytes() == body


def test_complete_part_after_416_is_verified_and_kept(server: Server, tmp_path: Path) -> None:
    body = gz_bytes(4)
    server.files["/d.csv.gz"] = body
    dest = tmp_path / "d.csv.gz"
    (tmp_path / "d.csv.gz.part").write_bytes(body)
    get(server.url("/d.csv.gz"), dest)
    assert server.ranges("/d.csv.gz") == [f"bytes={len(body)}-"]
    assert dest.read_bytes() == body


def test_404_names_url_and_what_to_check(server: Server, tmp_path: Path) -> None:
    url = server.url("/missing/No_Such_Cat.csv.gz")
    with pytest.raises(DownloadError) as info:
        get(url, tmp_path / "x.csv.gz")
    msg = str(info.value)
    assert url in msg and "404" in msg
    assert "data.category" in msg and "data.base_url" in msg
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_gzip_is_rejected_and_removed(
    server: Server, tmp_path: Path, damage: str
) -> None:
    body = bytearray(gz_bytes(5))
    if damage == "flip":
        body[len(body) // 2] ^= 0xFF
    else:
        del body[-100:]
    server.files["/e.csv.gz"] = bytes(body)
    url = server.url("/e.csv.gz")
    dest = tmp_path / "e.csv.gz"
    with pytest.raises(DownloadError, match="integrity check") as info:
        get(url, dest)
    assert url in str(info.value)
    assert not dest.exists()
    assert not (tmp_path / "e.csv.gz.part").exists()
    # every announced byte arrived: the file on the server is damaged, and a retry would not help
    assert f"the source file is damaged: all {len(body):,} bytes it has arrived" in str(info.value)
    assert "Downloading it again would fail the same way" in str(info.value)
    assert "run the download again" not in str(info.value)


def test_existing_complete_file_is_not_downloaded_again(server: Server, tmp_path: Path) -> None:
    body = gz_bytes(6)
    server.files["/f.csv.gz"] = body
    dest = tmp_path / "f.csv.gz"
    get(server.url("/f.csv.gz"), dest)
    get(server.url("/f.csv.gz"), dest)
    assert len(server.requests) == 1
    assert dest.read_bytes() == body


def test_existing_corrupt_file_is_downloaded_again(server: Server, tmp_path: Path) -> None:
    body = gz_bytes(7)
    server.files["/g.csv.gz"] = body
    dest = tmp_path / "g.csv.gz"
    dest.write_bytes(body[:-50])
    get(server.url("/g.csv.gz"), dest)
    assert len(server.requests) == 1
    assert dest.read_bytes() == body


def test_connection_refused_names_url(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port that nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/h.csv.gz"
    with pytest.raises(DownloadError, match="connection failed") as info:
        get(url, tmp_path / "h.csv.gz")
    assert url in str(info.value)


def test_file_url(tmp_path: Path) -> None:
    body = gz_bytes(8)
    src = tmp_path / "mirror" / "i.jsonl.gz"
    src.parent.mkdir()
    src.write_bytes(body)
    dest = tmp_path / "out" / "i.jsonl.gz"
    get(src.as_uri(), dest)
    assert dest.read_bytes() == body

    bad = tmp_path / "mirror" / "bad.jsonl.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(DownloadError, match="integrity check"):
        get(bad.as_uri(), tmp_path / "out" / "bad.jsonl.gz")
    assert not (tmp_path / "out" / "bad.jsonl.gz").exists()
    with pytest.raises(DownloadError, match="data.category"):
        get((tmp_path / "mirror" / "nope.jsonl.gz").as_uri(), tmp_path / "out" / "nope.jsonl.gz")


def test_gzip_problem_on_files(tmp_path: Path) -> None:
    ok = tmp_path / "ok.gz"
    ok.write_bytes(gz_bytes(9, 3000) + gz_bytes(10, 3000))  # two members are one valid file
    assert gzip_problem(ok) is None
    short = tmp_path / "short.gz"
    short.write_bytes(gz_bytes(9, 3000)[:-10])
    assert "truncated" in (gzip_problem(short) or "")


def test_source_urls() -> None:
    base = "https://example.org/amazon_2023/"
    rating = source_urls(DataParams(category="CDs_and_Vinyl", base_url=base))
    assert rating == {
        "interactions": "https://example.org/amazon_2023/benchmark/5core/rating_only/CDs_and_Vinyl.csv.gz",
        "meta": "https://example.org/amazon_2023/raw/meta_categories/meta_CDs_and_Vinyl.jsonl.gz",
    }
    reviews = source_urls(
        DataParams(category="Video_Games", base_url=base, interactions="reviews")
    )
    assert reviews == {
        "interactions": "https://example.org/amazon_2023/raw/review_categories/Video_Games.jsonl.gz",
        "meta": "https://example.org/amazon_2023/raw/meta_categories/meta_Video_Games.jsonl.gz",
    }


def _params(base_url: str, interactions: str = "rating_only") -> Params:
    return Params(
        data=DataParams(
            source="amazon2023", category="Toy_Cat", base_url=base_url, interactions=interactions,
            timeout_s=10, chunk_bytes=CHUNK,
        )
    )


@pytest.mark.parametrize(
    ("interactions", "remote", "local"),
    [
        ("rating_only", "/benchmark/5core/rating_only/Toy_Cat.csv.gz", "Toy_Cat.csv.gz"),
        ("reviews", "/raw/review_categories/Toy_Cat.jsonl.gz", "Toy_Cat.jsonl.gz"),
    ],
)
def test_run_download_from_server(
    server: Server, tmp_path: Path, interactions: str, remote: str, local: str
) -> None:
    inter, meta = gz_bytes(11), gz_bytes(12)
    server.files[remote] = inter
    server.files["/raw/meta_categories/meta_Toy_Cat.jsonl.gz"] = meta
    paths = Paths(root=tmp_path)
    out = run_download(_params(server.base, interactions), paths)
    assert out == {
        "interactions": tmp_path / "data" / "raw" / local,
        "meta": tmp_path / "data" / "raw" / "meta_Toy_Cat.jsonl.gz",
    }
    assert out["interactions"].read_bytes() == inter
    assert out["meta"].read_bytes() == meta
    assert sorted(p for p, _ in server.requests) == sorted(
        [remote, "/raw/meta_categories/meta_Toy_Cat.jsonl.gz"]
    )


def test_download_one_passes_url_dest_and_settings(tmp_path: Path) -> None:
    calls: list[tuple[str, Path, dict[str, object]]] = []

    def fake_fetch(url: str, dest: Path, **kw: object) -> Path:
        calls.append((url, dest, kw))
        return dest

    paths = Paths(root=tmp_path)
    got = download_one(_params("http://mirror.test/a2023"), paths, "meta", fetch_fn=fake_fetch)
    assert got == paths.meta_file("Toy_Cat")
    assert calls == [
        (
            "http://mirror.test/a2023/raw/meta_categories/meta_Toy_Cat.jsonl.gz",
            paths.meta_file("Toy_Cat"),
            {"timeout_s": 10.0, "chunk_bytes": CHUNK},
        )
    ]
    with pytest.raises(ValueError, match="interactions"):
        download_one(_params("http://mirror.test"), paths, "ratings", fetch_fn=fake_fetch)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="data.source is 'sample'"):
        download_one(Params(), paths, "meta", fetch_fn=fake_fetch)


def test_run_download_sample_calls_write_sample(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[SampleParams, str, Path]] = []
    result = {k: tmp_path / k for k in ("rating_only", "reviews", "meta")}

    def write_sample(params: SampleParams, category: str, out_dir: Path) -> dict[str, Path]:
        seen.append((params, category, out_dir))
        return result

    # Stand-in for rrec.data.sample: this test is about the dispatch, not the catalogue.
    monkeypatch.setitem(
        sys.modules, "rrec.data.sample", types.SimpleNamespace(write_sample=write_sample)
    )

    def no_fetch(*args: object, **kw: object) -> Path:
        raise AssertionError("the sample source must not download anything")

    params = Params()
    paths = Paths(root=tmp_path)
    assert run_download(params, paths, fetch_fn=no_fetch) == result
    assert seen == [(params.data.sample, "Video_Games", paths.raw)]


# ------------------------------------------------------------------ retries


def _retrying(server: Server, retries: int = 3) -> tuple[Params, list[float]]:
    params = Params.model_validate(
        {"data": {"source": "amazon2023", "category": "Toy_Cat", "base_url": server.base,
                  "interactions": "rating_only", "timeout_s": 10.0, "chunk_bytes": CHUNK,
                  "retries": retries}}
    )
    return params, []


META = "/raw/meta_categories/meta_Toy_Cat.jsonl.gz"


def test_404_is_not_retried(server: Server, tmp_path: Path) -> None:
    params, slept = _retrying(server)
    with pytest.raises(DownloadError, match="HTTP 404") as info:
        download_one(params, Paths(root=tmp_path), "meta", sleep=slept.append)
    assert info.value.transient is False
    assert len(server.requests) == 1 and slept == []


def test_failed_integrity_check_is_not_retried(server: Server, tmp_path: Path) -> None:
    body = bytearray(gz_bytes(21))
    body[len(body) // 2] ^= 0xFF
    server.files[META] = bytes(body)
    params, slept = _retrying(server)
    with pytest.raises(DownloadError, match="integrity check") as info:
        download_one(params, Paths(root=tmp_path), "meta", sleep=slept.append)
    assert info.value.transient is False
    assert len(server.requests) == 1 and slept == []


def test_transient_failures_are_retried_then_succeed(server: Server, tmp_path: Path) -> None:
    server.files[META] = body = gz_bytes(22)
    server.fail_next = [503, 502]
    params, slept = _retrying(server)
    got = download_one(params, Paths(root=tmp_path), "meta", sleep=slept.append)
    assert got.read_bytes() == body
    assert len(server.requests) == 3 and slept == [2.0, 10.0]


def test_transient_failures_give_up_after_data_retries(server: Server, tmp_path: Path) -> None:
    server.files[META] = gz_bytes(23)
    server.fail_next = [503] * 5
    params, slept = _retrying(server, retries=2)
    with pytest.raises(DownloadError, match=r"HTTP 503.*gave up after 2 retries") as info:
        download_one(params, Paths(root=tmp_path), "meta", sleep=slept.append)
    assert info.value.transient is True
    assert len(server.requests) == 3 and slept == [2.0, 10.0]


def test_read_timeout_is_not_reported_as_connecting(server: Server, tmp_path: Path) -> None:
    server.files["/slow.csv.gz"] = gz_bytes(24)
    server.delay_s = 1.0  # accepts the connection, then says nothing for a second
    with pytest.raises(DownloadError) as info:
        fetch(server.url("/slow.csv.gz"), tmp_path / "slow.csv.gz", timeout_s=0.2,
              chunk_bytes=CHUNK, progress=False)
    msg = str(info.value)
    assert "while connecting" not in msg
    assert "sent no response for 0.2 s (read timeout" in msg
    assert info.value.transient is True


def test_the_download_stage_fails_once_on_a_404_with_one_message(server: Server, tmp_path: Path) -> None:
    """`python -m rrec.stages.download` as DVC runs it: a 404 is asked once (no retries
    by the stage or anything around it), one `error:` line, exit status 1."""
    import subprocess
    import sys

    import yaml

    tree = yaml.safe_load((Path(__file__).resolve().parent.parent / "params.yaml").read_text())
    tree["data"].update({"source": "amazon2023", "category": "Toy_Cat", "base_url": server.base, "retries": 3})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tree))
    done = subprocess.run(
        [sys.executable, "-m", "rrec.stages.download", "--root", str(tmp_path)],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=300,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert [line for line in out.splitlines() if line.startswith("error:")] == [
        line for line in out.splitlines() if "HTTP 404" in line
    ], out
    assert "stage download failed" in out and "Traceback" not in out
    assert len(server.requests) == 1, server.requests


# ------------------------------------------------------------------ under dvc repro

INTER = "/benchmark/5core/rating_only/Toy_Cat.csv.gz"
ROOT = Path(__file__).resolve().parent.parent


def _dvc_project(tmp_path: Path, base_url: str) -> Path:
    """A DVC project holding the real `download` stage of dvc.yaml and the rrec sources."""
    import shutil

    import yaml

    project = tmp_path / "project"
    shutil.copytree(ROOT / "rrec", project / "rrec", ignore=shutil.ignore_patterns("__pycache__"))
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"download": stages["download"]}}))
    tree = yaml.safe_load((ROOT / "params.yaml").read_text())
    tree["data"].update({"source": "amazon2023", "category": "Toy_Cat", "base_url": base_url,
                         "retries": 0, "chunk_bytes": CHUNK})
    (project / "params.yaml").write_text(yaml.safe_dump(tree))
    _dvc(project, "init", "--no-scm", "-q")
    return project


def _dvc(project: Path, *args: str) -> tuple[int, str]:
    import os
    import subprocess

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run([str(bin_dir / "dvc"), *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr


def test_dvc_repro_resumes_a_cut_download_and_keeps_verified_files(
    server: Server, tmp_path: Path
) -> None:
    server.files[INTER] = inter = gz_bytes(31)
    server.files[META] = meta = gz_bytes(32)
    project = _dvc_project(tmp_path, server.base)
    raw = project / "data" / "raw"

    server.cut_next = 1
    rc, out = _dvc(project, "repro", "download")
    assert rc != 0 and "run the download again to resume" in out, out
    kept = (raw / "Toy_Cat.csv.gz.part").stat().st_size
    assert 0 < kept < len(inter)

    rc, out = _dvc(project, "repro", "download")
    assert rc == 0, out
    assert server.ranges(INTER) == [None, f"bytes={kept}-"]
    assert (raw / "Toy_Cat.csv.gz").read_bytes() == inter
    assert (raw / "meta_Toy_Cat.jsonl.gz").read_bytes() == meta

    asked = len(server.requests)
    rc, out = _dvc(project, "repro", "--force", "download")
    assert rc == 0, out
    assert len(server.requests) == asked, server.requests[asked:]
    assert sorted(p.name for p in raw.iterdir()) == ["Toy_Cat.csv.gz", "meta_Toy_Cat.jsonl.gz"]


def test_the_stage_removes_files_other_settings_left(server: Server, tmp_path: Path) -> None:
    server.files[INTER] = gz_bytes(33)
    server.files[META] = gz_bytes(34)
    paths = Paths(root=tmp_path)
    paths.raw.mkdir(parents=True)
    for name in ("Other.csv.gz", "Other.csv.gz.part", "meta_Other.jsonl.gz"):
        (paths.raw / name).write_bytes(b"x")
    download_stage(_params(server.base), paths)
    assert sorted(p.name for p in paths.raw.iterdir()) == ["Toy_Cat.csv.gz", "meta_Toy_Cat.jsonl.gz"]
