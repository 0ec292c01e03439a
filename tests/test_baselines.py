import json
import math
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from rrec.baselines import load_baseline, reference_metrics, run_baselines, train_baseline
from rrec.baselines.data import SequenceData, left_pad, load_n_items, load_split
from rrec.baselines.models import MODEL_NAMES, build_model, model_config
from rrec.baselines.reference import popularity_counts, popularity_scorer
from rrec.baselines.sasrec import SASRec
from rrec.baselines.train import cpu_threads, model_scorer, train_epoch
from rrec.config import BaselinesParams, parse_params
from rrec.data.schema import EXAMPLES, ITEMS
from rrec.metrics import evaluate_scorer
from rrec.paths import Paths

TINY = {
    "sasrec": {"hidden": 16, "layers": 2, "heads": 2, "dropout": 0.1},
    "gru4rec": {"hidden": 16, "layers": 1, "dropout": 0.1},
    "caser": {"hidden": 16, "n_vertical": 2, "n_horizontal": 4, "dropout": 0.1, "window": 4},
}


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models: one thread is faster, and far faster on a busy machine
    with cpu_threads(1):
        yield


def _tiny_params(**baselines: Any) -> BaselinesParams:
    return parse_params({"baselines": {**TINY, **baselines}}).baselines


def _model(name: str, n_items: int, max_len: int = 20, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(model_config(name, n_items, max_len, _tiny_params()))


def _planted_sequences(n_users: int, n_items: int, seed: int, noise: float = 0.1) -> list[list[int]]:
    """Per user a walk where the next item is (last + 1) mod n, or a random item with prob `noise`."""
    rng = random.Random(seed)
    seqs = []
    for _ in range(n_users):
        seq = [rng.randrange(n_items)]
        for _ in range(rng.randint(3, 12)):
            nxt = rng.randrange(n_items) if rng.random() < noise else (seq[-1] + 1) % n_items
            if nxt not in seq:  # one interaction per (user, item), as the window stage keeps
                seq.append(nxt)
        seqs.append(seq)
    return seqs


def _examples(seqs: list[list[int]], max_history: int = 20) -> tuple[list[list[int]], list[int]]:
    histories, targets = [], []
    for seq in seqs:
        for t in range(1, len(seq)):
            histories.append(seq[max(0, t - max_history) : t])
            targets.append(seq[t])
    return histories, targets


# ------------------------------------------------------------------ model structure


def test_sasrec_causal_mask_keeps_earlier_positions_fixed():
    model = _model("sasrec", n_items=50).eval()
    g = torch.Generator().manual_seed(1)
    seqs = torch.randint(0, 50, (3, 12), generator=g)
    seqs[0, :4] = model.pad_id  # one left-padded row too
    changed = seqs.clone()
    changed[:, 7] = (changed[:, 7] + 13) % 50
    with torch.no_grad():
        before, after = model.encode(seqs), model.encode(changed)
    assert torch.allclose(before[:, :7], after[:, :7], atol=1e-6)
    assert not torch.allclose(before[:, 7:], after[:, 7:], atol=1e-3)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_padding_never_changes_scores(name: str):
    model = _model(name, n_items=50).eval()
    histories = [[3], [4, 9, 1], [7, 2, 8, 30, 11, 5], list(range(10, 25))]
    with torch.no_grad():
        alone = [model(torch.tensor([h])) for h in histories]  # no padding at all
        batch20 = model(left_pad(histories, 20, model.pad_id))
        batch33 = model(left_pad(histories, 33, model.pad_id))
    assert torch.isfinite(batch20).all()
    for row, scores in enumerate(alone):
        assert torch.allclose(batch20[row], scores[0], atol=1e-5), row
        assert torch.allclose(batch33[row], scores[0], atol=1e-5), row
    # the scores do depend on the history itself
    assert not torch.allclose(batch20[1], batch20[2], atol=1e-3)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_loss_falls_and_model_learns_planted_successor(name: str):
    n_items = 30
    histories, targets = _examples(_planted_sequences(400, n_items, seed=2))
    model = _model(name, n_items)
    seqs = left_pad(histories, 20, model.pad_id)
    y = torch.tensor(targets)
    with torch.no_grad():
        model.eval()
        initial = float(F.cross_entropy(model(seqs), y))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        loss = train_epoch(model, opt, seqs, y, 128, g, torch.device("cpu"), progress=False)
    assert loss < 0.5 * initial, (initial, loss)
    # the planted rule is learnt: after [.., k] comes k + 1
    probe = [[(k - 2) % n_items, (k - 1) % n_items, k] for k in range(n_items)]
    model.eval()
    with torch.no_grad():
        pred = model(left_pad(probe, 20, model.pad_id)).argmax(dim=1)
    right = sum(int(p) == (k + 1) % n_items for k, p in enumerate(pred))
    assert right >= 0.8 * n_items, right
    # the padding row of the item table never moves away from zero
    assert model.items.weight[model.pad_id].abs().max() == 0


# ------------------------------------------------------------------ evaluation


def test_evaluate_scorer_target_first_is_perfect_even_behind_history():
    n_items = 12
    histories = [[0, 1], [], [5], [2, 3, 4], [11], [7, 8]] * 3
    targets = [2, 0, 6, 9, 10, 1] * 3

    def score(idx: list[int]) -> torch.Tensor:
        s = torch.zeros(len(idx), n_items)
        for row, i in enumerate(idx):
            s[row, histories[i]] = 5.0  # above the target, but masked as history
            s[row, targets[i]] = 1.0
        return s

    m = evaluate_scorer(score, histories, targets, ks=(1, 5), batch_size=4, progress=False)
    assert m == {"hit@1": 1.0, "ndcg@1": 1.0, "hit@5": 1.0, "ndcg@5": 1.0, "n": 18.0}


def test_evaluate_scorer_rejects_bad_input():
    def nan_scores(idx: list[int]) -> torch.Tensor:
        return torch.full((len(idx), 4), float("nan"))

    with pytest.raises(ValueError, match="NaN"):
        evaluate_scorer(nan_scores, [[0]], [1], ks=(1,), batch_size=2, progress=False)
    with pytest.raises(ValueError, match="1 histories but 2 targets"):
        evaluate_scorer(nan_scores, [[0]], [1, 2], ks=(1,), batch_size=2, progress=False)
    with pytest.raises(ValueError, match="outside the 4 scored items"):
        evaluate_scorer(lambda idx: torch.zeros(len(idx), 4), [[0]], [7], ks=(1,), batch_size=2, progress=False)


def test_popularity_counts_each_user_item_once_and_gives_known_metrics():
    # user a's three examples repeat item 0 in every history: it still counts once for a
    train = SequenceData(
        user_ids=["a", "a", "a", "b", "b", "c"],
        histories=[[0], [0, 1], [0, 1, 2], [0], [0, 1], [3]],
        targets=[1, 2, 4, 1, 4, 0],
    )
    counts = popularity_counts(train, n_items=6)
    assert counts.tolist() == [3.0, 2.0, 1.0, 1.0, 2.0, 0.0]
    # test ranking: 0 (3) > 1 = 4 (2) > 2 = 3 (1) > 5 (0), ties pessimistic
    histories = [[0], [], [1, 4], [0, 1]]
    targets = [1, 2, 5, 3]
    # ranks: 2 (4 ties with 1), 5 (0, 1, 4 above, 3 ties), 4 (0, 2, 3 above 5), 3 (4 above, 2 ties)
    m = evaluate_scorer(popularity_scorer(counts), histories, targets, ks=(1, 3), batch_size=3, progress=False)
    assert m["hit@1"] == 0.0
    assert math.isclose(m["hit@3"], 2 / 4)
    assert math.isclose(m["ndcg@3"], (1 / math.log2(3) + 1 / math.log2(4)) / 4)


# ------------------------------------------------------------------ end to end


def _write_processed(root: Path, n_items: int = 40, n_users: int = 300, seed: int = 3) -> Paths:
    paths = Paths(root)
    paths.processed.mkdir(parents=True)
    items = [
        {
            "item_id": i, "parent_asin": f"B{i:05d}", "title": f"Item {i}", "description": "",
            "features": "", "store": "", "categories": "", "main_category": "Toys",
            "price": 1.0, "average_rating": 4.0, "rating_number": 10, "n_interactions": 0,
        }
        for i in range(n_items)
    ]
    pq.write_table(pa.Table.from_pylist(items, schema=ITEMS), paths.items_file)
    rows = []
    clock = 1_600_000_000_000
    for u, seq in enumerate(_planted_sequences(n_users, n_items, seed)):
        stamps = [clock + (u * 7919 % 1000) * 3_600_000 + t * 86_400_000 for t in range(len(seq))]
        for t in range(1, len(seq)):
            lo = max(0, t - 20)
            rows.append({
                "user_id": f"u{u}", "history_item_ids": seq[lo:t],
                "history_ratings": [5.0] * (t - lo), "history_timestamps": stamps[lo:t],
                "target_item_id": seq[t], "target_rating": 5.0, "target_timestamp": stamps[t],
            })
    rows.sort(key=lambda r: r["target_timestamp"])
    n = len(rows)
    cuts = {"train": (0, int(0.8 * n)), "valid": (int(0.8 * n), int(0.9 * n)), "test": (int(0.9 * n), n)}
    for split, (a, b) in cuts.items():
        part = [{"example_id": a + i, **r} for i, r in enumerate(rows[a:b])]
        pq.write_table(pa.Table.from_pylist(part, schema=EXAMPLES), paths.split_file(split))
    return paths


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def start(self, name: str, params: dict[str, Any]) -> None:
        self.calls.append(("start", name))

    def log_epoch(self, epoch: int, loss: float, valid: dict[str, float]) -> None:
        self.calls.append(("epoch", epoch))

    def finish(self, test: dict[str, float], checkpoint: Path, best_valid: dict[str, float], model: Any) -> None:
        self.calls.append(("finish", checkpoint))


def test_run_baselines_end_to_end_beats_random(tmp_path: Path):
    paths = _write_processed(tmp_path)
    params = parse_params({
        "evaluate": {"ks": [1, 5]},
        "baselines": {**TINY, "epochs": 6, "batch_size": 64, "lr": 1e-2, "patience": 2, "warn_after_s": 120},
    })
    tracker = _Recorder()
    results = run_baselines(params, paths, tracker=tracker, progress=False)
    random_row = reference_metrics("random", params, paths, "test", progress=False)
    popular_row = reference_metrics("popularity", params, paths, "test", progress=False)
    assert set(results) == set(MODEL_NAMES)
    for name, res in results.items():
        assert res.checkpoint == paths.baselines / name / "model.pt" and res.checkpoint.exists()
        assert set(res.test) == {"hit@1", "ndcg@1", "hit@5", "ndcg@5", "hit@10", "ndcg@10", "n"}
        assert res.test["ndcg@10"] > random_row["ndcg@10"] + 0.2, (name, res.test, random_row)
        assert res.test["ndcg@10"] > popular_row["ndcg@10"], (name, res.test, popular_row)
        assert 1 <= res.best_epoch <= len(res.epochs) <= 6
        assert res.best_valid == max((e.valid for e in res.epochs), key=lambda v: v["ndcg@10"])
        # the checkpoint is the best model: reloading it reproduces the test metrics
        model, ckpt = load_baseline(res.checkpoint)
        assert ckpt["best_epoch"] == res.best_epoch and ckpt["config"]["name"] == name
        n_items = load_n_items(paths)
        test = load_split(paths, "test", n_items)
        seqs = left_pad(test.histories, 20, model.pad_id)
        score = model_scorer(model, seqs, torch.device("cpu"))
        again = evaluate_scorer(score, test.histories, test.targets, (1, 5, 10), 64, progress=False)
        assert again == pytest.approx(res.test)
        saved = json.loads((res.checkpoint.parent / "result.json").read_text())
        assert saved["test"] == pytest.approx(res.test)
    starts = [c for c in tracker.calls if c[0] == "start"]
    assert [c[1] for c in starts] == list(MODEL_NAMES)
    assert sum(c[0] == "epoch" for c in tracker.calls) == sum(len(r.epochs) for r in results.values())
    assert tracker.calls[-1] == ("finish", results["caser"].checkpoint)


def test_time_never_changes_a_baseline_only_warns(tmp_path: Path):
    """Epochs and patience decide the model: a tiny warn_after_s gives the same weights
    and metrics as a large one, and says that the time passed."""
    paths = _write_processed(tmp_path, n_users=120)
    slow = parse_params({"baselines": {**TINY, "epochs": 2, "batch_size": 16, "warn_after_s": 1e-6}})
    fast = parse_params({"baselines": {**TINY, "epochs": 2, "batch_size": 16, "warn_after_s": 1e6}})
    with pytest.warns(UserWarning, match="baselines.warn_after_s"):
        a = train_baseline("gru4rec", slow, paths, progress=False)
    a_state = torch.load(a.checkpoint, weights_only=False)
    b = train_baseline("gru4rec", fast, paths, progress=False)
    b_state = torch.load(b.checkpoint, weights_only=False)
    assert len(a.epochs) == len(b.epochs) == 2
    assert a.test == b.test and a.best_valid == b.best_valid
    for key, tensor in a_state["state_dict"].items():
        assert torch.equal(tensor, b_state["state_dict"][key]), key


def test_inconsistent_splits_are_reported_with_file_row_and_field(tmp_path: Path):
    paths = _write_processed(tmp_path, n_items=40, n_users=50)
    # drop the last items from the table: the splits now refer to unknown ids
    table = pq.read_table(paths.items_file)
    pq.write_table(table.slice(0, 20), paths.items_file)
    with pytest.raises(ValueError, match=r"train\.parquet: row \d+, field (target_item_id|history_item_ids)"):
        load_split(paths, "train", load_n_items(paths))
    pq.write_table(table.slice(1, 30), paths.items_file)
    with pytest.raises(ValueError, match=r"items\.parquet: column item_id must hold each of 0\.\.29"):
        load_n_items(paths)


def test_sasrec_rejects_heads_not_dividing_hidden():
    with pytest.raises(ValueError, match="baselines.sasrec.hidden"):
        SASRec(n_items=10, max_len=5, hidden=10, layers=1, heads=3, dropout=0.0)
