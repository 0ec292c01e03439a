"""Serving: recommend for a user history (Python API, CLI, MLflow pyfunc), catalogue updates.

- `rrec.serve.recommend`: `Recommender` — greedy reasoning with the unified model, the user
  state read in the same pass, full-catalogue scoring, history and removed items masked.
- `rrec.serve.catalogue`: the item catalogue beside the item table;
  `rrec.serve.catalogue_updates`: add, replace and remove items without retraining.
- `rrec.serve.pyfunc`: the MLflow `python_function` model (`log_pyfunc`, `save_pyfunc`).
"""

from rrec.serve.catalogue import Catalogue
from rrec.serve.catalogue_updates import CatalogueUpdate, add_or_replace_items, remove_items
from rrec.serve.recommend import (
    Recommendation,
    RecommendedItem,
    Recommender,
    RequestError,
    serving_dir,
)

__all__ = [
    "Catalogue",
    "CatalogueUpdate",
    "Recommendation",
    "RecommendedItem",
    "Recommender",
    "RequestError",
    "add_or_replace_items",
    "remove_items",
    "serving_dir",
]
