"""The `download` stage: raw Amazon Reviews 2023 files for one category, resumable and verified.

`fetch` streams one URL into `<dest>.part`, resumes an interrupted part with an HTTP
`Range` request, checks that the result is a complete gzip stream and only then renames
it to `dest`, so `dest` either does not exist or is whole. It never retries by itself:
calling it again after a failure resumes where the previous call stopped.

Every failure is a `DownloadError` whose `transient` says whether trying again can help:
connection failures, timeouts, a transfer cut short and HTTP 408/429/5xx are transient;
HTTP 404 and other 4xx, a file that fails the gzip integrity check, a size mismatch and
a bad URL are not. `download_one` retries only the transient ones (`data.retries` times,
RETRY_DELAYS_S apart, each retry resuming the partial file); the others fail at once.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import re
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse
from urllib.request import url2pathname

import requests
import urllib3
from tqdm.auto import tqdm

from rrec.config import DataParams, Params
from rrec.paths import Paths

log = logging.getLogger(__name__)

Key = Literal["interactions", "meta"]
KEYS: tuple[Key, ...] = ("interactions", "meta")
FetchFn = Callable[..., Path]
# Verifies a finished download: None when the file is whole, else what is wrong with it.
CheckFn = Callable[[Path, int], "str | None"]


class DownloadError(RuntimeError):
    """A file that could not be fetched or verified; the message names the URL and the reason.
    `transient`: the failure may go away by itself (network, server overload), so trying
    again can help; otherwise it would fail the same way again."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


# Seconds before the 1st, 2nd, 3rd, ... retry of a transient failure (the last repeats).
RETRY_DELAYS_S: tuple[float, ...] = (2.0, 10.0, 30.0)
# HTTP statuses that say "try again later".
_TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


def source_urls(data: DataParams) -> dict[str, str]:
    """The interactions and metadata URLs of `data.category` under `data.base_url`."""
    base, cat = data.base_url.rstrip("/"), data.category
    if data.interactions == "rating_only":
        interactions = f"{base}/benchmark/5core/rating_only/{cat}.csv.gz"
    else:
        interactions = f"{base}/raw/review_categories/{cat}.jsonl.gz"
    return {"interactions": interactions, "meta": f"{base}/raw/meta_categories/meta_{cat}.jsonl.gz"}


def gzip_problem(path: Path, chunk_bytes: int = 1 << 20) -> str | None:
    """Decompress the whole file; None when it is a complete, CRC-correct gzip stream,
    otherwise a short description of what is wrong."""
    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(chunk_bytes):
                pass
    except EOFError:
        return "the gzip stream ends early (truncated file)"
    except (gzip.BadGzipFile, zlib.error) as err:
        return f"not a valid gzip file ({err})"
    return None


def _part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def sha256_check(expected: str) -> CheckFn:
    """A `CheckFn` that accepts exactly the file whose SHA-256 hex digest is `expected`."""

    def check(path: Path, chunk_bytes: int) -> str | None:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(chunk_bytes):
                digest.update(chunk)
        got = digest.hexdigest()
        return None if got == expected else f"its SHA-256 is {got}, not the pinned {expected}"

    return check


def _finish(url: str, part: Path, dest: Path, chunk_bytes: int, check: CheckFn, whole: int | None) -> Path:
    """`whole`: the size the source announced when every byte of it arrived, else None."""
    problem = check(part, chunk_bytes)
    if problem is not None:
        part.unlink(missing_ok=True)
        if whole is not None:
            raise DownloadError(
                f"{url}: the source file is damaged: all {whole:,} bytes it has arrived, and "
                f"they fail the integrity check: {problem}. Downloading it again would fail "
                f"the same way: fetch it from another mirror or report the damaged file to "
                f"its provider. {part} was deleted."
            )
        raise DownloadError(
            f"{url}: downloaded file failed the integrity check: {problem}. "
            f"The bad partial file {part} was deleted; run the download again."
        )
    # Not rrec.atomic: the `.part` file outlives a failed call on purpose (the next call
    # resumes it with an HTTP Range request), so only this final rename is shared with it.
    os.replace(part, dest)
    return dest


def fetch(
    url: str,
    dest: Path,
    *,
    timeout_s: float,
    chunk_bytes: int,
    progress: bool = True,
    check: CheckFn = gzip_problem,
) -> Path:
    """Download a file from `url` (http, https or file) to `dest`, resuming `dest.part`.

    `check` verifies the finished file (default: a complete gzip stream; `sha256_check`
    for a pinned file). A `dest` that already exists and passes it is kept as it is.
    Raises `DownloadError` (URL and reason in the message) on HTTP errors, connection
    errors, timeouts and a file that fails the check.
    """
    dest = Path(dest)
    if dest.exists():
        problem = check(dest, chunk_bytes)
        if problem is None:
            log.info("%s already present and verified; not downloading %s again", dest, url)
            return dest
        log.warning("%s exists but %s; downloading it again from %s", dest, problem, url)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = _part_path(dest)

    scheme = urlparse(url).scheme
    if scheme == "file":
        whole = _copy_local(url, part, chunk_bytes=chunk_bytes, progress=progress)
    elif scheme in ("http", "https"):
        whole = _download_http(
            url, part, timeout_s=timeout_s, chunk_bytes=chunk_bytes, progress=progress, check=check
        )
    else:
        raise DownloadError(f"{url}: unsupported URL scheme {scheme!r}; use http, https or file")
    return _finish(url, part, dest, chunk_bytes, check, whole)


def _not_found(url: str, detail: str) -> DownloadError:
    return DownloadError(
        f"{url}: not found ({detail}). The category may not exist at this location: "
        f"check data.category and data.base_url in params.yaml."
    )


def _copy_local(url: str, part: Path, *, chunk_bytes: int, progress: bool) -> int:
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise DownloadError(f"{url}: file:// URLs must point at this machine (no host name)")
    src = Path(url2pathname(parsed.path))
    if not src.is_file():
        raise _not_found(url, f"no file {src}")
    # A local copy is cheap, so it always starts over instead of resuming.
    try:
        with (
            open(src, "rb") as fin,
            open(part, "wb") as fout,
            tqdm(total=src.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024,
                 desc=part.name.removesuffix(".part"), disable=not progress) as bar,
        ):
            while chunk := fin.read(chunk_bytes):
                fout.write(chunk)
                bar.update(len(chunk))
    except OSError as err:
        raise DownloadError(f"{url}: copying to {part} failed: {err}") from err
    return part.stat().st_size


_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)")


def _content_range(header: str | None) -> tuple[int | None, int | None]:
    """(first byte, full size) of a Content-Range header; None where absent or unknown."""
    m = _CONTENT_RANGE.match(header or "")
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(3)) if m.group(3) != "*" else None
    return start, total


def _get(url: str, offset: int, timeout_s: float) -> requests.Response:
    # identity: a server that gzips the response on the fly would make byte offsets
    # (and the bytes on disk) differ from the file's own.
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return requests.get(url, headers=headers, stream=True, timeout=timeout_s)
    except requests.ConnectTimeout as err:
        raise DownloadError(
            f"{url}: timed out after {timeout_s:g} s while connecting ({err})", transient=True
        ) from err
    except requests.ReadTimeout as err:
        raise DownloadError(
            f"{url}: connected, but the server sent no response for {timeout_s:g} s "
            f"(read timeout, data.timeout_s); {err}", transient=True
        ) from err
    except requests.ConnectionError as err:
        raise DownloadError(f"{url}: connection failed ({err})", transient=True) from err
    except requests.RequestException as err:
        raise DownloadError(f"{url}: request failed ({err})", transient=True) from err


def _download_http(
    url: str, part: Path, *, timeout_s: float, chunk_bytes: int, progress: bool, check: CheckFn
) -> int | None:
    """Fill `part`; returns the file's size when the server announced one and it all arrived."""
    offset = part.stat().st_size if part.exists() else 0
    if offset:
        log.info("resuming %s at byte %d", url, offset)
    resp = _get(url, offset, timeout_s)
    with resp:
        status = resp.status_code
        if status == 416 and offset:
            # Nothing left after `offset`: the part may be whole (the rename was all that
            # was missing) or larger than the file now on the server.
            _, total = _content_range(resp.headers.get("Content-Range"))
            if (total is None or total == offset) and check(part, chunk_bytes) is None:
                return total
            log.warning("%s: %s does not match the server's file; starting over", url, part)
            part.unlink()
            return _download_http(url, part, timeout_s=timeout_s, chunk_bytes=chunk_bytes,
                                  progress=progress, check=check)
        if status == 404:
            raise _not_found(url, "HTTP 404")
        if status >= 400:
            raise DownloadError(
                f"{url}: HTTP {status} {resp.reason or ''}".rstrip(),
                transient=status in _TRANSIENT_STATUS,
            )
        if status == 206:
            start, total = _content_range(resp.headers.get("Content-Range"))
            if start != offset and not offset:
                raise DownloadError(
                    f"{url}: answered a plain request with a partial response "
                    f"(Content-Range {resp.headers.get('Content-Range')!r}); cannot download it"
                )
            if start != offset:
                log.warning("%s: server answered a range from byte %s, not %d; starting over",
                            url, start, offset)
                part.unlink()
                resp.close()
                return _download_http(url, part, timeout_s=timeout_s, chunk_bytes=chunk_bytes,
                                      progress=progress, check=check)
            if total is None:
                length = resp.headers.get("Content-Length")
                total = offset + int(length) if length and length.isdigit() else None
            mode = "ab"
        elif status == 200:
            if offset:
                log.warning("%s: server ignored the Range request; restarting from byte 0", url)
            offset, mode = 0, "wb"
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        else:
            raise DownloadError(f"{url}: unexpected HTTP {status} {resp.reason or ''}".rstrip())

        written = offset
        with (
            open(part, mode) as fout,
            tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                 desc=part.name.removesuffix(".part"), disable=not progress) as bar,
        ):
            for chunk in _body(url, resp, chunk_bytes, timeout_s, part):
                fout.write(chunk)
                written += len(chunk)
                bar.update(len(chunk))
    if total is not None and written != total:
        if written > total:
            part.unlink()
            raise DownloadError(
                f"{url}: received {written} bytes but the server announced {total}; "
                f"the partial file was deleted, run the download again"
            )
        raise DownloadError(
            f"{url}: transfer ended after {written} of {total} bytes; "
            f"{part} was kept, run the download again to resume",
            transient=True,
        )
    return total


def _body(
    url: str, resp: requests.Response, chunk_bytes: int, timeout_s: float, part: Path
) -> Iterator[bytes]:
    """The raw (not content-decoded) body, network failures turned into `DownloadError`."""
    stream = resp.raw.stream(chunk_bytes, decode_content=False)
    while True:
        try:
            chunk = next(stream)
        except StopIteration:
            return
        except urllib3.exceptions.ReadTimeoutError as err:
            raise DownloadError(
                f"{url}: no data for {timeout_s:g} s during the transfer ({err}); {part} was "
                f"kept, run the download again to resume",
                transient=True,
            ) from err
        except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as err:
            raise DownloadError(
                f"{url}: connection lost during the transfer ({err}); {part} was kept, "
                f"run the download again to resume",
                transient=True,
            ) from err
        yield chunk


def target_path(params: Params, paths: Paths, key: Key) -> Path:
    """Where `download_one(params, paths, key)` writes its file."""
    cat = params.data.category
    if key == "interactions":
        if params.data.interactions == "rating_only":
            return paths.rating_only_file(cat)
        return paths.reviews_file(cat)
    if key == "meta":
        return paths.meta_file(cat)
    raise ValueError(f"download key must be one of {list(KEYS)}, got {key!r}")


def download_one(
    params: Params,
    paths: Paths,
    key: Key,
    fetch_fn: FetchFn = fetch,
    sleep: Callable[[float], None] = time.sleep,
) -> Path:
    """Fetch one source file (`key` "interactions" or "meta") of `params.data.category`,
    retrying transient failures up to `data.retries` times (RETRY_DELAYS_S apart); a
    failure that would repeat (HTTP 404, a failed integrity check, ...) is raised at once."""
    if params.data.source == "sample":
        raise ValueError(
            "data.source is 'sample': there is nothing to download; run_download writes the "
            "embedded sample instead (set data.source: amazon2023 to download)"
        )
    dest = target_path(params, paths, key)
    url = source_urls(params.data)[key]
    return retry_transient(
        lambda: fetch_fn(
            url, dest, timeout_s=params.data.timeout_s, chunk_bytes=params.data.chunk_bytes
        ),
        params.data.retries,
        sleep,
    )


def retry_transient(
    call: Callable[[], Path], retries: int, sleep: Callable[[float], None] = time.sleep
) -> Path:
    """`call()`, retried up to `retries` times (RETRY_DELAYS_S apart) while it fails with a
    transient `DownloadError` (`data.retries`); any other failure is raised at once."""
    for attempt in range(retries + 1):
        try:
            return call()
        except DownloadError as err:
            if not err.transient or attempt == retries:
                if err.transient and retries:
                    raise DownloadError(
                        f"{err} (gave up after {retries} retries, data.retries)", transient=True
                    ) from err
                raise
            delay = RETRY_DELAYS_S[min(attempt, len(RETRY_DELAYS_S) - 1)]
            log.warning("%s; retry %d of %d in %g s", err, attempt + 1, retries, delay)
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def run_download(params: Params, paths: Paths, fetch_fn: FetchFn = fetch) -> dict[str, Path]:
    """The `download` stage: the embedded sample, or the category's interactions and metadata."""
    if params.data.source == "sample":
        from rrec.data.sample import write_sample

        return write_sample(params.data.sample, params.data.category, paths.raw)
    return {key: download_one(params, paths, key, fetch_fn=fetch_fn) for key in KEYS}
