"""The `items` stage's work: encode every item into the item-embedding table `H`
(its format and storage: `rrec.model.item_table`).

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
from safetensors.torch import load_file
from tqdm.auto import tqdm

from rrec.atomic import remove_temporaries, write_text
from rrec.config import Params
from rrec.model.backbone import load_model_and_tokenizer
from rrec.model.item_table import (
    INDEX_FILE,
    TABLE_FILE,
    TENSOR,
    ItemTable,
    read_index,
    save_tensors,
)
from rrec.model.lora import load_adapter
from rrec.model.two_headed import RecModel, shared_prefix_length
from rrec.paths import Paths

CHUNKS_DIR = "chunks"
MANIFEST_FILE = "manifest.json"


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
            remove_temporaries(chunks)  # chunks a killed process was writing
    chunks.mkdir(parents=True, exist_ok=True)
    write_text(manifest, json.dumps({"fingerprint": fp, "n_items": n_items, "n_chunks": n_chunks}, indent=2) + "\n")


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
) -> ItemTable:
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
        return ItemTable.load(out_dir)  # this exact table is already there

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
    # (unless the states below the trained layers are kept: then only those layers run)
    n_shared = shared_prefix_length(prompts) if rec.frozen_items is None else 0
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
                    states = rec.encode_after_prefix(prefix, batch) if prefix else rec.encode_items(batch)
                    parts.append(states.float().cpu())
                    bar.update(len(batch))
                save_tensors(
                    {"item_ids": torch.tensor(ids, dtype=torch.long), TENSOR: torch.cat(parts)},
                    _chunk_path(chunks, c),
                )
                if on_chunk is not None:
                    on_chunk(c)
    finally:
        rec.train(was_training)

    state.wait_for_everyone()
    if state.is_main_process:
        ItemTable(
            _concatenate(chunks, n_chunks, n, rec.hidden_size),
            backbone=meta.get("backbone"), adapter=meta.get("adapter"), fingerprint=fp,
        ).save(out_dir)
        shutil.rmtree(chunks)
    state.wait_for_everyone()
    return ItemTable.load(out_dir)


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
    model, tokenizer = load_model_and_tokenizer(params, paths.backbone, device=state.device)
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
        "n_items": len(table),
        "dim": table.dim,
        "seconds": round(seconds, 3),
        "items_per_s": round(len(table) / max(seconds, 1e-9), 2),
        "table": str(out_dir / TABLE_FILE),
    }
