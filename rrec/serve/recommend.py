"""Recommend for user histories with a trained R²ec policy (docs/method.md).

For each history the user prompt is built with `rrec.prompts.user_messages` (titles from
the catalogue), the policy writes its reasoning greedily and the user state `h_u` is read
at `<answer>` in the same pass (`rrec.model.generation.HFEngine`: `generate`, then one cached
`<answer>` step). A model trained without reasoning (`contrastive`) reads `h_u` at
`<answer>` appended to the prompt. Every item is scored (cosine over tau), the history's
items and removed items are masked, and the top K are returned with the reasoning text.

A history is a list, oldest first, of item ids (ints) or of objects
`{"item_id" | "parent_asin" | "title": ..., "rating": 4.0, "timestamp": <ms>}`; rating and
timestamp are optional. Entries with timestamps are ordered by them. The prompt writes each
interaction's time before "now" (the request's `now` in ms, default the current time); an
entry without a timestamp reads as "now" (`0d 0.0h ago`), one without a rating as
`unknown`. Only the last `data.window.max_history` entries enter the prompt (as in
training), but every entry is masked. Bad input raises `RequestError` naming the request,
the entry and the field.

Catalogue updates (`rrec.serve.catalogue_updates`) persist with `Recommender.save(dir)`; the CLI
keeps them in `models/serving/<method>/`, which `Recommender.from_dir` reads when present.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from rrec.config import Params
from rrec.metrics import mask_history, pad_histories
from rrec.model.generation import policy_user_states
from rrec.model.item_table import ItemTable
from rrec.model.loading import ADAPTER_DIR, TABLE_DIR, TRAIN_SUMMARY, policy_from_adapter
from rrec.model.tokenizer import CONTROL_TOKENS
from rrec.model.two_headed import RecModel
from rrec.paths import Paths
from rrec.prompts import user_messages
from rrec.serve.catalogue import Catalogue

CATALOGUE_FILE = "items.parquet"
SERVING_JSON = "serving.json"
DEFAULT_K = 10
HISTORY_KEYS = ("item_id", "parent_asin", "title", "rating", "timestamp")
# Amazon timestamps are milliseconds; anything below this (1973 in ms) is seconds.
_MIN_MS = 100_000_000_000

History = Sequence[Any]


class RequestError(ValueError):
    """A request that cannot be served; the message names what is wrong and where."""


@dataclass(frozen=True)
class RecommendedItem:
    item_id: int
    parent_asin: str
    title: str
    score: float


@dataclass
class Recommendation:
    reasoning: str
    items: list[RecommendedItem]
    reasoning_tokens: int = 0
    # Why fewer than k items came back (the history and removed items cover the rest).
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if not self.note:
            del out["note"]
        return out


@dataclass
class _Parsed:
    item_ids: list[int]
    titles: list[str]
    ratings: list[float | None]
    timestamps: list[int]


def serving_dir(paths: Paths, method: str) -> Path:
    """Where the CLI keeps a method's updated item table and catalogue."""
    return paths.serving(method)


def summary_digest(summary_path: Path) -> str:
    """Identifies one training run's output (train_summary.json changes with every run)."""
    return hashlib.sha256(Path(summary_path).read_bytes()).hexdigest()[:16]


def serving_files(paths: Paths, method: str, updates: Path | None = None) -> tuple[Path, Path]:
    """(item table dir, catalogue file) to serve `method` with: those saved with catalogue
    updates in `updates` (default `serving_dir(paths, method)`) when they exist, else the
    trained model's table and the window stage's items."""
    trained = paths.trained(method)
    summary_file = trained / TRAIN_SUMMARY
    if not summary_file.exists():
        raise FileNotFoundError(
            f"{summary_file}: no trained model for method {method!r}; run the train stage "
            f"first (`dvc repro train@{method}`)"
        )
    updates = updates if updates is not None else serving_dir(paths, method)
    if not (updates / SERVING_JSON).exists():
        return trained / TABLE_DIR, paths.items_file
    saved = json.loads((updates / SERVING_JSON).read_text())
    if saved.get("source") != summary_digest(summary_file):
        raise RuntimeError(
            f"{updates}: catalogue updates made for an earlier training of {method!r} (the "
            f"model in {trained} was retrained since); delete {updates} and apply the "
            "updates again (`rrec catalogue add/remove`)"
        )
    return updates / TABLE_DIR, updates / CATALOGUE_FILE


def _with_tokenizer(model: RecModel, tokenizer_dir: Path) -> RecModel:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in CONTROL_TOKENS]
    if len(tokenizer) != len(model.tokenizer) or ids != [model.answer_token_id, model.end_answer_token_id]:
        raise ValueError(
            f"{tokenizer_dir}: this tokenizer ({len(tokenizer)} tokens, control ids {ids}) differs "
            f"from the backbone's ({len(model.tokenizer)} tokens, control ids "
            f"{[model.answer_token_id, model.end_answer_token_id]}); the model was trained on another backbone"
        )
    return RecModel(
        model.lm, tokenizer, tau=model.tau, max_prompt_tokens=model.max_prompt_tokens,
        aot_single_requests=model.aot_single_requests, end_of_turn_stops=model.end_of_turn_stops,
    )  # fmt: skip


def _int(value: Any) -> int | None:
    """An integer given as int / numpy int / integral float; None otherwise (bools too)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and math.isfinite(float(value)) and float(value).is_integer():
        return int(value)
    return None


def _plain(value: Any) -> Any:
    """numpy arrays and scalars (as JSON parsers and pandas hand them over) to Python."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return value.tolist()
    return value


class Recommender:
    """A trained policy, its item table and catalogue, ready to recommend."""

    def __init__(
        self,
        model: RecModel,
        table: ItemTable,
        catalogue: Catalogue,
        params: Params,
        *,
        method: str,
        reasoning: bool,
        source: str | None = None,
    ) -> None:
        if len(table) != len(catalogue):
            raise ValueError(
                f"the item table has {len(table)} rows but the catalogue {len(catalogue)} "
                "items; they must come from the same window and items stages"
            )
        self.model = model
        self.model.eval()
        self.table = replace(table, embeddings=table.embeddings.cpu())
        self.catalogue = catalogue
        self.params = params
        self.method = method
        self.reasoning = reasoning
        self.source = source

    # --------------------------------------------------------------- loading

    @classmethod
    def from_parts(
        cls,
        params: Params,
        *,
        backbone_dir: Path,
        adapter_dir: Path,
        table_dir: Path,
        catalogue_file: Path,
        summary_file: Path,
        tokenizer_dir: Path | None = None,
        device: torch.device | str | None = None,
    ) -> Recommender:
        """Load from files; `tokenizer_dir` (the tokenizer saved by training) replaces the
        backbone's after a check that both give the control tokens the same ids."""
        summary = json.loads(Path(summary_file).read_text())
        method = summary.get("method")
        if method not in ("recpo", "contrastive"):
            raise ValueError(f"{summary_file}: 'method' must be recpo or contrastive, got {method!r}")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = policy_from_adapter(params, Path(backbone_dir), Path(adapter_dir), device)
        if tokenizer_dir is not None:
            model = _with_tokenizer(model, Path(tokenizer_dir))
        return cls(
            model,
            ItemTable.load(Path(table_dir)),
            Catalogue.read(Path(catalogue_file)),
            params,
            method=method,
            reasoning=method == "recpo",
            source=summary_digest(Path(summary_file)),
        )

    @classmethod
    def from_dir(
        cls,
        params: Params,
        paths: Paths,
        method: str,
        *,
        device: torch.device | str | None = None,
        updates: Path | None = None,
    ) -> Recommender:
        """The policy in `models/trained/<method>/`; its item table and the window stage's
        catalogue, or those saved with catalogue updates in `updates` (default
        `models/serving/<method>/` when it exists)."""
        trained = paths.trained(method)
        table_dir, catalogue_file = serving_files(paths, method, updates)
        return cls.from_parts(
            params,
            backbone_dir=paths.backbone,
            adapter_dir=trained / ADAPTER_DIR,
            table_dir=table_dir,
            catalogue_file=catalogue_file,
            summary_file=trained / TRAIN_SUMMARY,
            device=device,
        )

    # ---------------------------------------------------------------- saving

    def save(self, directory: Path) -> Path:
        """Write the item table, the catalogue (with removed flags) and `serving.json`."""
        directory = Path(directory)
        self.table.save(directory / TABLE_DIR)
        self.catalogue.write(directory / CATALOGUE_FILE)
        info = {
            "method": self.method,
            "source": self.source,
            "n_items": len(self.catalogue),
            "n_removed": self.catalogue.n_removed,
            "saved_at_ms": int(time.time() * 1000),
        }
        (directory / SERVING_JSON).write_text(json.dumps(info, indent=2) + "\n")
        return directory

    def set_rows(self, item_ids: Sequence[int], rows: torch.Tensor) -> None:
        """Write item-table rows; ids from len(table) on are appended (new items)."""
        self.table.set_rows(list(item_ids), rows.float().cpu())

    @property
    def n_items(self) -> int:
        return len(self.table)

    # -------------------------------------------------------------- requests

    def _resolve(self, entry: Any, where: str) -> tuple[int, float | None, int | None]:
        item = _int(entry)
        if item is not None:
            rating, ts = None, None
        elif isinstance(entry, Mapping):
            unknown = sorted(set(map(str, entry)) - set(HISTORY_KEYS))
            if unknown:
                raise RequestError(
                    f"{where}: unknown field(s) {unknown}; an entry has item_id, parent_asin or "
                    "title, and optionally rating and timestamp (ms)"
                )
            item = self._identify(entry, where)
            rating = self._rating(entry.get("rating"), where)
            ts = self._timestamp(entry.get("timestamp"), where)
        else:
            raise RequestError(
                f"{where}: {entry!r} is neither an item id (integer) nor an object with "
                "item_id, parent_asin or title"
            )
        if not 0 <= item < len(self.catalogue):
            raise RequestError(
                f"{where}: unknown item id {item}; ids are 0..{len(self.catalogue) - 1}"
            )
        return item, rating, ts

    def _identify(self, entry: Mapping[str, Any], where: str) -> int:
        if entry.get("item_id") is not None:
            item = _int(_plain(entry["item_id"]))
            if item is None:
                raise RequestError(f"{where}: item_id must be an integer, got {entry['item_id']!r}")
            return item
        if entry.get("parent_asin") is not None:
            found = self.catalogue.id_of_asin(str(entry["parent_asin"]))
            if found is None:
                raise RequestError(f"{where}: unknown parent_asin {entry['parent_asin']!r}")
            return found
        if entry.get("title") is not None:
            ids = self.catalogue.ids_of_title(str(entry["title"]))
            if not ids:
                raise RequestError(
                    f"{where}: no item titled {entry['title']!r} in the catalogue (titles match up "
                    "to letter case and spaces); give its item_id or parent_asin"
                )
            if len(ids) > 1:
                asins = [self.catalogue.parent_asin(i) for i in ids]
                raise RequestError(
                    f"{where}: the title {entry['title']!r} names {len(ids)} items (item ids {ids}, "
                    f"parent_asin {asins}); give the item_id or parent_asin instead"
                )
            return ids[0]
        raise RequestError(f"{where}: give one of item_id, parent_asin or title")

    @staticmethod
    def _rating(value: Any, where: str) -> float | None:
        value = _plain(value)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= float(value) <= 5:
            raise RequestError(f"{where}: rating must be a number from 0 to 5, got {value!r}")
        return float(value)

    @staticmethod
    def _timestamp(value: Any, where: str) -> int | None:
        value = _plain(value)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        ts = _int(value)
        if ts is None:
            raise RequestError(f"{where}: timestamp must be an integer (ms since 1970), got {value!r}")
        if ts < _MIN_MS:
            raise RequestError(
                f"{where}: timestamp {ts} looks like seconds; give milliseconds (timestamp * 1000)"
            )
        return ts

    def parse_history(self, history: Any, now_ms: int, where: str = "history") -> _Parsed:
        """Validate one history and resolve it against the catalogue (oldest first)."""
        history = _plain(history)
        if isinstance(history, (str, bytes, Mapping)) or not isinstance(history, Sequence):
            raise RequestError(
                f"{where}: must be a list of item ids or of objects, got {type(history).__name__}"
            )
        if len(history) == 0:
            raise RequestError(f"{where}: the history is empty; give at least one item")
        entries = []
        for pos, entry in enumerate(history):
            item, rating, ts = self._resolve(_plain(entry), f"{where}[{pos}]")
            if ts is not None and ts > now_ms:
                raise RequestError(
                    f"{where}[{pos}]: timestamp {ts} is later than now ({now_ms}); history "
                    "timestamps must be in the past (ms)"
                )
            entries.append((ts if ts is not None else now_ms, pos, item, rating))
        entries.sort()
        return _Parsed(
            item_ids=[e[2] for e in entries],
            titles=[self.catalogue.title(e[2]) for e in entries],
            ratings=[e[3] for e in entries],
            timestamps=[e[0] for e in entries],
        )

    def conversation(self, parsed: _Parsed, now_ms: int) -> list[dict[str, str]]:
        keep = self.params.data.window.max_history
        return user_messages(
            parsed.titles[-keep:], parsed.ratings[-keep:], parsed.timestamps[-keep:], now_ms,
            self.params.data.category, self.params.prompts.max_history_items,
        )

    # ------------------------------------------------------------- inference

    def recommend(
        self,
        histories: Sequence[History],
        k: int | Sequence[int] = DEFAULT_K,
        *,
        now_ms: int | Sequence[int | None] | None = None,
        progress: bool = False,
    ) -> list[Recommendation]:
        """Top-k recommendations for each history (k per history or one for all): k distinct
        items, none in the history or removed (fewer only when fewer items are left, and then
        `Recommendation.note` says so). The
        histories are processed in batches of `evaluate.batch_size`, greedily, with at most
        `evaluate.max_new_tokens` reasoning tokens."""
        if isinstance(histories, (str, bytes, Mapping)) or not isinstance(histories, Sequence):
            raise RequestError("histories must be a list of histories (each a list of items)")
        n = len(histories)
        if n == 0:
            return []
        ks = [k] * n if isinstance(k, numbers.Integral) or not isinstance(k, Sequence) else list(k)
        nows = now_ms if isinstance(now_ms, Sequence) else [now_ms] * n
        if len(ks) != n or len(nows) != n:
            raise RequestError(f"{n} histories but {len(ks)} values of k and {len(nows)} of now")
        clock = int(time.time() * 1000)
        parsed, convs, ks_clean = [], [], []
        for i, (history, k_i, now_i) in enumerate(zip(histories, ks, nows, strict=True)):
            where = f"request {i}: history" if n > 1 else "history"
            kk = _int(_plain(k_i))
            if kk is None or kk < 1:
                raise RequestError(f"request {i}: k must be a positive integer, got {k_i!r}")
            now = self._timestamp(now_i, f"request {i}: now")
            now = clock if now is None else now
            p = self.parse_history(history, now, where)
            parsed.append(p)
            convs.append(self.conversation(p, now))
            ks_clean.append(kk)

        states, reasoning_ids = self.user_states(convs, progress=progress)
        return self.rank(states, reasoning_ids, [x.item_ids for x in parsed], ks_clean)

    def user_states(
        self, conversations: Sequence[Sequence[dict[str, str]]], *, progress: bool = False
    ) -> tuple[torch.Tensor, list[list[int]]]:
        """User states [N, d] and reasoning token ids: greedy generation, the state read at
        `<answer>` in the same pass (or at `<answer>` after the prompt without reasoning)."""
        p = self.params
        return policy_user_states(
            self.model, conversations, reasoning=self.reasoning,
            max_new_tokens=p.evaluate.max_new_tokens, batch_size=p.evaluate.batch_size,
            progress=progress,
        )

    def rank(
        self,
        states: torch.Tensor,
        reasoning_ids: Sequence[list[int]],
        histories: Sequence[Sequence[int]],
        ks: Sequence[int],
    ) -> list[Recommendation]:
        """Top-k of every item but the history's and the removed ones, per user state."""
        scores = self.table.score(states, self.model.tau)
        scores = mask_history(scores, pad_histories(histories))
        scores[:, self.catalogue.removed_mask()] = float("-inf")
        top = scores.topk(min(max(ks), scores.shape[1]), dim=1)
        out = []
        for row in range(len(histories)):
            items = [
                RecommendedItem(
                    item_id=int(j),
                    parent_asin=self.catalogue.parent_asin(int(j)),
                    title=self.catalogue.title(int(j)),
                    score=float(s),
                )
                for s, j in zip(top.values[row].tolist(), top.indices[row].tolist(), strict=True)
                if math.isfinite(s)
            ][: ks[row]]
            text, n_tokens = self._reasoning_text(reasoning_ids[row])
            note = ""
            if len(items) < ks[row]:
                left = int(torch.isfinite(scores[row]).sum())
                note = (
                    f"{len(items)} of the {ks[row]} items asked for: the history "
                    f"({len(set(histories[row]))} distinct items) and the removed items "
                    f"({self.catalogue.n_removed}) leave {left} of the catalogue's "
                    f"{scores.shape[1]} items to recommend"
                )
            out.append(Recommendation(reasoning=text, items=items, reasoning_tokens=n_tokens,
                                      note=note))
        return out

    def _reasoning_text(self, ids: list[int]) -> tuple[str, int]:
        if ids and ids[-1] == self.model.answer_token_id:
            ids = ids[:-1]
        return self.model.tokenizer.decode(ids, skip_special_tokens=False), len(ids)
