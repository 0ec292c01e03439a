"""Stable artefact paths, the ones `dvc.yaml` names. Everything is relative to a root."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    root: Path = Path(".")

    # download
    @property
    def raw(self) -> Path:
        return self.root / "data" / "raw"

    def rating_only_file(self, category: str) -> Path:
        return self.raw / f"{category}.csv.gz"

    def reviews_file(self, category: str) -> Path:
        return self.raw / f"{category}.jsonl.gz"

    def meta_file(self, category: str) -> Path:
        return self.raw / f"meta_{category}.jsonl.gz"

    # window
    @property
    def processed(self) -> Path:
        return self.root / "data" / "processed"

    def split_file(self, split: str) -> Path:
        return self.processed / f"{split}.parquet"

    @property
    def items_file(self) -> Path:
        return self.processed / "items.parquet"

    @property
    def window_stats(self) -> Path:
        return self.root / "reports" / "window_stats.json"

    # prompts
    @property
    def prompts(self) -> Path:
        return self.root / "data" / "prompts"

    def user_prompts_file(self, split: str) -> Path:
        return self.prompts / f"users_{split}.parquet"

    @property
    def item_prompts_file(self) -> Path:
        return self.prompts / "items.parquet"

    # model
    @property
    def backbone(self) -> Path:
        return self.root / "models" / "backbone"

    @property
    def downloads(self) -> Path:
        """Downloaded model files, kept between runs of the backbone stage (not a DVC out)."""
        return self.root / "models" / "downloads"

    @property
    def item_table(self) -> Path:
        return self.root / "models" / "item_table"

    def trained(self, method: str) -> Path:
        """A trained policy: LoRA adapter, tokenizer, its item table, train summary."""
        return self.root / "models" / "trained" / method

    def serving(self, method: str) -> Path:
        """Catalogue updates made at serving time (item table + catalogue), not DVC-tracked."""
        return self.root / "models" / "serving" / method

    def checkpoints(self, method: str) -> Path:
        return self.root / "checkpoints" / method

    def eval_report(self, method: str) -> Path:
        """Curves and metrics of one method (`reports/eval/<method>/`)."""
        return self.reports / "eval" / method

    @property
    def baselines_report(self) -> Path:
        return self.reports / "eval" / "baselines.json"

    @property
    def baselines(self) -> Path:
        return self.root / "models" / "baselines"

    # reports
    @property
    def reports(self) -> Path:
        return self.root / "reports"


SPLITS = ("train", "valid", "test")
