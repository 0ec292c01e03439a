"""Classic sequential recommenders (SASRec, GRU4Rec, Caser) and reference rows."""

from rrec.baselines.models import MODEL_NAMES, build_model, load_baseline
from rrec.baselines.reference import REFERENCES, reference_metrics, run_references
from rrec.baselines.train import BaselineResult, EpochRecord, Tracker, run_baselines, train_baseline

__all__ = [
    "MODEL_NAMES",
    "REFERENCES",
    "BaselineResult",
    "EpochRecord",
    "Tracker",
    "build_model",
    "load_baseline",
    "reference_metrics",
    "run_baselines",
    "run_references",
    "train_baseline",
]
