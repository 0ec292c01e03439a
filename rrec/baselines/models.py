"""Build a baseline from its name and hyper-parameters, and rebuild it from a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rrec.baselines.base import SequentialRecommender
from rrec.baselines.caser import Caser
from rrec.baselines.gru4rec import GRU4Rec
from rrec.baselines.sasrec import SASRec
from rrec.config import BaselinesParams

MODEL_NAMES = ("sasrec", "gru4rec", "caser")


def model_config(name: str, n_items: int, max_len: int, params: BaselinesParams) -> dict[str, Any]:
    """Everything `build_model` needs, JSON-friendly (it goes into the checkpoint)."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown baseline {name!r}; baselines.models may list {list(MODEL_NAMES)}")
    section = getattr(params, name).model_dump(mode="json")
    return {"name": name, "n_items": n_items, "max_len": max_len, **section}


def build_model(config: dict[str, Any]) -> SequentialRecommender:
    name = config["name"]
    if name == "sasrec":
        return SASRec(
            n_items=config["n_items"],
            max_len=config["max_len"],
            hidden=config["hidden"],
            layers=config["layers"],
            heads=config["heads"],
            dropout=config["dropout"],
        )
    if name == "gru4rec":
        return GRU4Rec(
            n_items=config["n_items"],
            hidden=config["hidden"],
            layers=config["layers"],
            dropout=config["dropout"],
        )
    if name == "caser":
        return Caser(
            n_items=config["n_items"],
            window=config["window"],
            hidden=config["hidden"],
            n_vertical=config["n_vertical"],
            n_horizontal=config["n_horizontal"],
            dropout=config["dropout"],
        )
    raise ValueError(f"unknown baseline {name!r}; expected one of {list(MODEL_NAMES)}")


def load_baseline(path: Path, device: str | torch.device = "cpu") -> tuple[SequentialRecommender, dict[str, Any]]:
    """The trained model (in eval mode) and the whole checkpoint dict saved by `train_baseline`."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no baseline checkpoint; run the baselines stage first")
    ckpt = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path}: not a baseline checkpoint (needs keys 'state_dict' and 'config')")
    model = build_model(ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), ckpt
