"""The item table: batched, resumable, multi-process encoding; load and update."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from rrec.config import Params
from rrec.data.schema import ITEM_PROMPTS
from rrec.items import CHUNKS_DIR, encode_items, read_item_prompts, run_items
from rrec.model import RecModel, build_backbone, load_model_and_tokenizer
from rrec.model.item_table import INDEX_FILE, TABLE_FILE, ItemTable
from rrec.model.two_headed import shared_prefix_length
from rrec.paths import Paths
from tests.test_model import TINY, tiny_params, write_fixture_prompts

N_ITEMS = 40
CHUNK = 8
BATCH = 3


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a shared, oversubscribed
    CPU the threads' synchronisation makes every op many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Params, Paths, RecModel, list[list[int]]]:
    paths = write_fixture_prompts(tmp_path_factory.mktemp("items"), n_items=N_ITEMS, n_users=16)
    params = tiny_params(pretrain_steps=5)
    build_backbone(params, paths)
    model, tokenizer = load_model_and_tokenizer(params, paths.backbone)
    rec = RecModel(model, tokenizer, tau=params.model.tau)
    prompts = rec.item_prompt_ids(read_item_prompts(paths.item_prompts_file))
    return params, paths, rec, prompts


def _encode(rec: RecModel, prompts: list[list[int]], out: Path, **kw: Any) -> torch.Tensor:
    return encode_items(
        rec, prompts, out, batch_size=BATCH, chunk_size=CHUNK, meta={"backbone": "t"}, **kw
    ).embeddings


def test_batched_encoding_equals_one_at_a_time(setup: Any, tmp_path: Path) -> None:
    _, _, rec, prompts = setup
    assert len({len(p) for p in prompts}) > 5  # lengths vary, so batches are padded
    assert shared_prefix_length(prompts) > 10  # the encoder takes the shared-prefix path
    table = _encode(rec, prompts, tmp_path / "t")
    with torch.no_grad():
        one_by_one = torch.cat([rec.encode([p]) for p in prompts])
    assert table.shape == (N_ITEMS, TINY["hidden_size"]) and table.dtype == torch.float32
    torch.testing.assert_close(table, one_by_one, atol=1e-5, rtol=1e-5)
    index = json.loads((tmp_path / "t" / INDEX_FILE).read_text())
    assert (index["n_items"], index["dim"], index["backbone"], index["adapter"]) == (
        N_ITEMS,
        TINY["hidden_size"],
        "t",
        None,
    )
    assert not (tmp_path / "t" / CHUNKS_DIR).exists()  # chunks are removed once concatenated
    assert torch.equal(ItemTable.load(tmp_path / "t").embeddings, table)
    assert rec.training is False


def test_interrupted_encoding_resumes_to_the_same_table(setup: Any, tmp_path: Path) -> None:
    _, _, rec, prompts = setup
    reference = _encode(rec, prompts, tmp_path / "ref")
    done: list[int] = []

    def stop_after_two(c: int) -> None:
        done.append(c)
        if len(done) == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        _encode(rec, prompts, tmp_path / "run", on_chunk=stop_after_two)
    chunk_files = sorted((tmp_path / "run" / CHUNKS_DIR).glob("*.safetensors"))
    assert [p.name for p in chunk_files] == ["00000.safetensors", "00001.safetensors"]
    assert not (tmp_path / "run" / TABLE_FILE).exists()

    resumed: list[int] = []
    table = _encode(rec, prompts, tmp_path / "run", on_chunk=resumed.append)
    assert resumed == [2, 3, 4]  # the finished chunks are not encoded again
    assert torch.equal(table, reference)

    again: list[int] = []
    assert torch.equal(_encode(rec, prompts, tmp_path / "run", on_chunk=again.append), reference)
    assert again == []  # the finished table is reused as is


def test_chunks_of_other_weights_or_meta_are_discarded(setup: Any, tmp_path: Path) -> None:
    _, _, rec, prompts = setup

    def stop(c: int) -> None:
        raise Interrupt

    def run(meta: dict[str, str], **kw: Any) -> torch.Tensor:
        return encode_items(
            rec, prompts, tmp_path, batch_size=BATCH, chunk_size=CHUNK, meta=meta, **kw
        ).embeddings

    with pytest.raises(Interrupt):
        run({"adapter": "a"}, on_chunk=stop)
    redone: list[int] = []
    before = run({"adapter": "b"}, on_chunk=redone.append)
    assert redone == [0, 1, 2, 3, 4]

    # same meta, but the weights moved (a training step): nothing is reused
    weight = rec.lm.get_input_embeddings().weight
    with torch.no_grad():
        weight.add_(0.5)
    try:
        redone.clear()
        after = run({"adapter": "b"}, on_chunk=redone.append)
    finally:
        with torch.no_grad():
            weight.sub_(0.5)
    assert redone == [0, 1, 2, 3, 4] and not torch.allclose(after, before)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


SCRIPT = """
import sys
from pathlib import Path
from rrec.config import load_params
from rrec.items import process_state, run_items
from rrec.paths import Paths
root = Path(sys.argv[1])
summary = run_items(load_params(root / "params.yaml"), Paths(root), out_dir=Path(sys.argv[2]))
state = process_state()
print(f"rank {state.process_index} of {state.num_processes}: {summary['n_items']} items")
"""


def test_two_process_run_equals_one_process(setup: Any, tmp_path: Path) -> None:
    params, paths, _, _ = setup
    # only the sections this stage reads; the rest are the schema's defaults
    raw = {
        "model": params.model.model_dump(mode="json"),
        "items": {"batch_size": BATCH, "chunk_size": CHUNK},
    }
    (paths.root / "params.yaml").write_text(yaml.safe_dump(raw))
    script = tmp_path / "encode.py"
    script.write_text(SCRIPT)
    one = Params.model_validate(raw)
    summary = run_items(one, paths, out_dir=tmp_path / "one")
    assert summary["n_items"] == N_ITEMS

    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
        "OMP_NUM_THREADS": "1",
    }
    # torchrun starts the processes; process_state() puts them in one gloo group
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(script), str(paths.root), str(tmp_path / "two"),
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        f"rank 0 of 2: {N_ITEMS} items" in done.stdout
        and f"rank 1 of 2: {N_ITEMS} items" in done.stdout
    )
    two = ItemTable.load(tmp_path / "two").embeddings
    torch.testing.assert_close(two, ItemTable.load(tmp_path / "one").embeddings, atol=1e-6, rtol=1e-6)
    assert json.loads((tmp_path / "two" / INDEX_FILE).read_text())["backbone"] == "tiny"


def test_update_rows_and_errors(tmp_path: Path) -> None:
    table = ItemTable(torch.zeros(4, 2), backbone="b", adapter="a", fingerprint="f")
    storage = table.embeddings
    table.update_rows([3, 1], torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True))
    assert table.embeddings is storage and not table.embeddings.requires_grad  # in place, detached
    assert torch.equal(table.embeddings, torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0], [1.0, 2.0]]))
    assert table.fingerprint is None  # no longer the items stage's table
    with pytest.raises(ValueError, match="one per item id"):
        table.update_rows([0], torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        table.update_rows([4], torch.zeros(1, 2))
    with pytest.raises(FileNotFoundError, match="items stage"):
        ItemTable.load(tmp_path)
    with pytest.raises(ValueError, match="2-D"):
        ItemTable(torch.zeros(3))

    # growth: a new id past the end appends rows (zeros until written)
    table.set_rows([5], torch.tensor([[7.0, 8.0]]))
    assert len(table) == 6 and table.dim == 2
    assert torch.equal(table.embeddings[4:], torch.tensor([[0.0, 0.0], [7.0, 8.0]]))
    table.set_rows([], torch.zeros(0, 2))
    assert len(table) == 6

    # save and load keep the rows and the index
    table.save(tmp_path / "saved")
    back = ItemTable.load(tmp_path / "saved")
    assert torch.equal(back.embeddings, table.embeddings)
    assert (back.backbone, back.adapter, back.fingerprint) == ("b", "a", None)
    index = json.loads((tmp_path / "saved" / INDEX_FILE).read_text())
    assert (index["n_items"], index["dim"]) == (6, 2)

    # a table file that disagrees with its index is refused
    ItemTable(torch.zeros(2, 2)).save(tmp_path / "small")
    (tmp_path / "small" / TABLE_FILE).replace(tmp_path / "saved" / TABLE_FILE)
    with pytest.raises(ValueError, match="disagrees"):
        ItemTable.load(tmp_path / "saved")

    # copy_from overwrites in place (the training table is registered for checkpointing)
    target = ItemTable(torch.ones(2, 2))
    kept = target.embeddings
    target.copy_from(ItemTable(torch.full((2, 2), 3.0)))
    assert target.embeddings is kept and bool((kept == 3.0).all())
    with pytest.raises(ValueError, match="shape"):
        target.copy_from(ItemTable(torch.zeros(3, 2)))

    bad = tmp_path / "items.parquet"
    rows = [{"item_id": i, "messages": [{"role": "user", "content": "x"}]} for i in (0, 2)]
    pq.write_table(pa.Table.from_pylist(rows, schema=ITEM_PROMPTS), bad)
    with pytest.raises(ValueError, match=r"items.parquet: item_id must be exactly 0..1"):
        read_item_prompts(bad)
    shuffled = tmp_path / "shuffled.parquet"
    rows = [{"item_id": i, "messages": [{"role": "user", "content": f"item {i}"}]} for i in (1, 0)]
    pq.write_table(pa.Table.from_pylist(rows, schema=ITEM_PROMPTS), shuffled)
    assert [m[0]["content"] for m in read_item_prompts(shuffled)] == ["item 0", "item 1"]


def test_shared_prefix_length_and_misuse(setup: Any) -> None:
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 3]]) == 2  # [1,2,3] keeps one token
    assert shared_prefix_length([[1, 2], [3, 2]]) == 0
    assert shared_prefix_length([]) == 0
    _, _, rec, prompts = setup
    prefix = rec.shared_prefix(prompts[0][:5])
    with pytest.raises(ValueError, match="shared prefix"):
        rec.encode_after_prefix(prefix, [prompts[0][1:]])
    with torch.no_grad():
        torch.testing.assert_close(rec.encode_after_prefix(prefix, prompts[:4]), rec.encode(prompts[:4]), atol=1e-5, rtol=1e-5)
