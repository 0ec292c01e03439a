"""The item-embedding table `H` (SPEC section 3): encode, save, load, update rows.

Row `i` of the table is the final-layer hidden state at the `<answer>` that pre-fills
the assistant turn of item `i`'s prompt. On disk, a directory holds

- `table.safetensors`: tensor `embeddings`, [n_items, d] float32, row i = item_id i;
- `index.json`: {n_items, dim, backbone, adapter, fingerprint}.

Encoding sorts the prompts by token length (longest first) and cuts that order into
chunks of `items.chunk_size`; each chunk is encoded in batches of `items.batch_size`
padded to their own longest row, so padding is small. Each finished chunk is written
to `<out>/chunks/NNNNN.safetensors`, so an interrupted run resumes where it stopped.
A `manifest.json` beside the chunks holds a fingerprint of the prompts, the weights
and the batching; chunks from a different fingerprint are discarded rather than
mixed in. Under `accelerate launch` or `torchrun` chunk `c` belongs to process
`c % world_size`; the main process concatenates once everyone is done and removes
the chunks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, parse_flag_from_env
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from rrec.config import Params
from rrec.model.backbone import load_model_and_tokenizer
from rrec.model.lora import load_adapter
from rrec.model.wrapper import RecModel, shared_prefix_length
from rrec.paths import Paths

TABLE_FILE = "table.safetensors"
INDEX_FILE = "index.json"
CHUNKS_DIR = "chunks"
MANIFEST_FILE = "manifest.json"
TENSOR = "embeddings"


# ------------------------------------------------------------------ storage


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _atomic_text(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_item_table(
    table: torch.Tensor,
    directory: Path,
    *,
    backbone: str | None,
    adapter: str | None,
    fingerprint: str | None = None,
) -> Path:
    """Write `table` [n_items, d] and its index to `directory`; returns the table path."""
    if table.dim() != 2:
        raise ValueError(f"an item table is 2-D [n_items, dim], got shape {tuple(table.shape)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / TABLE_FILE
    _atomic_save({TENSOR: table.detach().float().cpu()}, path)
    index = {
        "n_items": int(table.shape[0]),
        "dim": int(table.shape[1]),
        "backbone": backbone,
        "adapter": adapter,
        "fingerprint": fingerprint,
    }
    _atomic_text(json.dumps(index, indent=2) + "\n", directory / INDEX_FILE)
    return path


def read_index(directory: Path) -> dict[str, Any]:
    path = Path(directory) / INDEX_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no item table index; run the items stage first (`dvc repro items`)"
        )
    return json.loads(path.read_text())


def load_item_table(directory: Path, device: torch.device | str | None = None) -> torch.Tensor:
    """The table [n_items, d] float32 saved in `directory`, checked against its index."""
    directory = Path(directory)
    index = read_index(directory)
    path = directory / TABLE_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: missing although {INDEX_FILE} exists; rerun the items stage"
        )
    table = load_file(str(path))[TENSOR]
    if tuple(table.shape) != (index["n_items"], index["dim"]):
        raise ValueError(
            f"{path}: shape {tuple(table.shape)} disagrees with {INDEX_FILE} "
            f"({index['n_items']} x {index['dim']}); rerun the items stage"
        )
    return table.to(device) if device is not None else table


def update_rows(
    table: torch.Tensor, item_ids: Sequence[int] | torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """Replace rows `item_ids` of `table` in place with `rows` (detached); returns `table`.

    Adding an item is appending a row (`torch.cat`), deleting one is dropping it; this
    is the in-place refresh of SPEC section 4 step 5. With repeated ids the last write
    wins, which is harmless when they come from the same prompt.
    """
    ids = torch.as_tensor(item_ids, dtype=torch.long, device=table.device).flatten()
    if rows.dim() != 2 or rows.shape[0] != ids.numel() or rows.shape[1] != table.shape[1]:
        raise ValueError(
            f"rows must be [{ids.numel()}, {table.shape[1]}] (one per item id), got {tuple(rows.shape)}"
        )
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= table.shape[0]):
        raise ValueError(
            f"item ids must lie in [0, {table.shape[0]}), got {ids.min()}..{ids.max()}"
        )
    with torch.no_grad():
        table[ids] = rows.detach().to(device=table.device, dtype=table.dtype)
    return table


# ----------------------------------------------------------------- encoding


def process_state() -> PartialState:
    """The `accelerate` process state. Without a GPU (or with ACCELERATE_USE_CPU=1) it is
    created with `cpu=True`, without which processes started by `torchrun` on a CPU
    machine would each believe they are alone instead of joining a gloo group."""
    cpu = not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU")
    return PartialState(cpu=cpu)


def length_order(prompts: Sequence[Sequence[int]]) -> list[int]:
    """Prompt indices, longest first, ties by index (deterministic)."""
    return sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))


@torch.no_grad()
def weights_signature(module: torch.nn.Module) -> str:
    """A digest of every parameter's sum and sum of squares (float64): any training
    update changes it. One pass over the weights, cheap next to encoding the items."""
    stats = [
        torch.stack([p.double().sum(), p.double().square().sum()]) for p in module.parameters()
    ]
    if not stats:
        return "no-parameters"
    return hashlib.sha256(torch.stack(stats).cpu().numpy().tobytes()).hexdigest()


def fingerprint(
    prompts: Sequence[Sequence[int]],
    chunk_size: int,
    batch_size: int,
    meta: Mapping[str, Any],
    weights: str = "",
) -> str:
    """What makes two encodings the same: prompts, batching, `meta` and the weights."""
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {"chunk": chunk_size, "batch": batch_size, "meta": dict(meta), "weights": weights},
            sort_keys=True,
            default=str,
        ).encode()
    )
    for ids in prompts:
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()


def _chunk_path(chunks: Path, c: int) -> Path:
    return chunks / f"{c:05d}.safetensors"


def _prepare_chunks(chunks: Path, fp: str, n_items: int, n_chunks: int) -> None:
    """Main process: keep finished chunks only if they belong to this fingerprint."""
    manifest = chunks / MANIFEST_FILE
    if chunks.exists():
        old = json.loads(manifest.read_text()) if manifest.exists() else {}
        if old.get("fingerprint") != fp:
            shutil.rmtree(chunks)
        else:
            for stale in chunks.glob(".*.tmp-*"):
                stale.unlink(missing_ok=True)
    chunks.mkdir(parents=True, exist_ok=True)
    _atomic_text(
        json.dumps({"fingerprint": fp, "n_items": n_items, "n_chunks": n_chunks}, indent=2) + "\n",
        manifest,
    )


def _concatenate(chunks: Path, n_chunks: int, n_items: int, dim: int) -> torch.Tensor:
    table = torch.empty((n_items, dim), dtype=torch.float32)
    seen = torch.zeros(n_items, dtype=torch.bool)
    for c in tqdm(range(n_chunks), desc="concatenate chunks", unit="chunk", leave=False):
        path = _chunk_path(chunks, c)
        if not path.exists():
            raise RuntimeError(
                f"{path}: chunk missing after every process finished; rerun the items stage"
            )
        part = load_file(str(path))
        ids = part["item_ids"]
        table[ids] = part[TENSOR]
        seen[ids] = True
    if not bool(seen.all()):
        raise RuntimeError(
            f"{chunks}: {int((~seen).sum())} items have no row; rerun the items stage"
        )
    return table


def encode_items(
    rec: RecModel,
    prompts: Sequence[Sequence[int]],
    out_dir: Path,
    *,
    batch_size: int,
    chunk_size: int,
    meta: Mapping[str, Any] | None = None,
    state: PartialState | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Encode item prompts (token ids ending in `<answer>`, index = item id) into the
    table saved under `out_dir`; returns it [n_items, d] float32 on the CPU.

    `meta` (backbone, adapter and whatever identifies the weights) goes into the
    fingerprint, and its `backbone`/`adapter` into `index.json`. `on_chunk(c)` is
    called after chunk `c` is safely on disk. Every process of `state` must call this.
    """
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(
            f"items.batch_size and items.chunk_size must be >= 1, got {batch_size}, {chunk_size}"
        )
    n = len(prompts)
    if n == 0:
        raise ValueError("no item prompts to encode")
    state = state or process_state()
    meta = dict(meta or {})
    out_dir = Path(out_dir)
    chunks = out_dir / CHUNKS_DIR
    fp = fingerprint(prompts, chunk_size, batch_size, meta, weights_signature(rec))
    if state.num_processes > 1:  # every process must take the same decisions below
        fp = broadcast_object_list([fp])[0]

    table_path = out_dir / TABLE_FILE
    if (
        table_path.exists()
        and (out_dir / INDEX_FILE).exists()
        and read_index(out_dir).get("fingerprint") == fp
    ):
        return load_item_table(out_dir)  # this exact table is already there

    order = length_order(prompts)
    n_chunks = (n + chunk_size - 1) // chunk_size
    if state.is_main_process:
        _prepare_chunks(chunks, fp, n, n_chunks)
    state.wait_for_everyone()

    mine = [
        c
        for c in range(n_chunks)
        if c % state.num_processes == state.process_index and not _chunk_path(chunks, c).exists()
    ]
    total = sum(len(order[c * chunk_size : (c + 1) * chunk_size]) for c in mine)
    was_training = rec.training
    rec.eval()
    # item prompts share the chat template's head and the instruction: encode it once
    n_shared = shared_prefix_length(prompts)
    prefix = rec.shared_prefix(prompts[0][:n_shared]) if n_shared and mine else None
    try:
        with (
            torch.no_grad(),
            tqdm(
                total=total,
                desc="encode items",
                unit="item",
                disable=not state.is_local_main_process,
            ) as bar,
        ):
            for c in mine:
                ids = order[c * chunk_size : (c + 1) * chunk_size]
                parts = []
                for start in range(0, len(ids), batch_size):
                    batch = [prompts[i] for i in ids[start : start + batch_size]]
                    states = rec.encode_after_prefix(prefix, batch) if prefix else rec.encode(batch)
                    parts.append(states.float().cpu())
                    bar.update(len(batch))
                _atomic_save(
                    {"item_ids": torch.tensor(ids, dtype=torch.long), TENSOR: torch.cat(parts)},
                    _chunk_path(chunks, c),
                )
                if on_chunk is not None:
                    on_chunk(c)
    finally:
        rec.train(was_training)

    state.wait_for_everyone()
    if state.is_main_process:
        table = _concatenate(chunks, n_chunks, n, rec.hidden_size)
        save_item_table(
            table,
            out_dir,
            backbone=meta.get("backbone"),
            adapter=meta.get("adapter"),
            fingerprint=fp,
        )
        shutil.rmtree(chunks)
    state.wait_for_everyone()
    return load_item_table(out_dir)


# -------------------------------------------------------------------- stage


def read_item_prompts(path: Path) -> list[list[dict[str, str]]]:
    """Item prompt messages ordered by item_id, which must be exactly 0..n-1."""
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: not found; run the prompts stage first (`dvc repro prompts`)"
        )
    table = pq.read_table(path, columns=["item_id", "messages"])
    ids = np.asarray(table.column("item_id").to_numpy(zero_copy_only=False), dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    if not np.array_equal(ids[order], np.arange(len(ids))):
        raise ValueError(
            f"{path}: item_id must be exactly 0..{len(ids) - 1} (one prompt per item, row i = item i); "
            "rerun the prompts stage"
        )
    messages = table.column("messages").to_pylist()
    return [messages[i] for i in order]


def _stage_meta(params: Params, adapter_dir: Path | None) -> dict[str, Any]:
    return {
        "backbone": params.model.backbone,
        "adapter": str(adapter_dir) if adapter_dir is not None else None,
        "dtype": params.model.dtype,
    }


def run_items(
    params: Params, paths: Paths, adapter_dir: Path | None = None, out_dir: Path | None = None
) -> dict[str, Any]:
    """The `items` stage: encode every item prompt with the backbone (plus the adapter
    in `adapter_dir`, if given) into `out_dir` (default `paths.item_table`)."""
    state = process_state()
    out_dir = Path(out_dir) if out_dir is not None else paths.item_table
    model, tokenizer = load_model_and_tokenizer(params, paths, device=state.device)
    if adapter_dir is not None:
        model = load_adapter(model, Path(adapter_dir)).to(state.device)
    model.eval()
    rec = RecModel(
        model, tokenizer, tau=params.model.tau, max_prompt_tokens=params.model.max_prompt_tokens
    )
    prompts = rec.item_prompt_ids(read_item_prompts(paths.item_prompts_file))
    start = time.monotonic()
    table = encode_items(
        rec,
        prompts,
        out_dir,
        batch_size=params.items.batch_size,
        chunk_size=params.items.chunk_size,
        meta=_stage_meta(params, Path(adapter_dir) if adapter_dir is not None else None),
        state=state,
    )
    seconds = time.monotonic() - start
    return {
        "n_items": int(table.shape[0]),
        "dim": int(table.shape[1]),
        "seconds": round(seconds, 3),
        "items_per_s": round(table.shape[0] / max(seconds, 1e-9), 2),
        "table": str(out_dir / TABLE_FILE),
    }
