"""The Parquet contracts between stages. Writers cast to these; readers may rely on them."""

from __future__ import annotations

import pyarrow as pa

# data/processed/items.parquet — one row per kept item, item_id contiguous 0..n-1,
# assigned in order of parent_asin so that ids are stable for a given window.
ITEMS = pa.schema(
    [
        ("item_id", pa.int32()),
        ("parent_asin", pa.string()),
        ("title", pa.string()),  # cleaned by rrec.data.clean
        ("description", pa.string()),  # cleaned, description[] joined with spaces ("" if none)
        ("features", pa.string()),  # cleaned, features[] joined with spaces ("" if none)
        ("store", pa.string()),  # cleaned ("" if none)
        ("categories", pa.string()),  # cleaned, categories[] joined with " > " ("" if none)
        ("main_category", pa.string()),
        ("price", pa.float64()),
        ("average_rating", pa.float64()),  # null if absent
        ("rating_number", pa.int64()),  # null if absent
        ("n_interactions", pa.int64()),  # inside the window
    ]
)

# data/processed/{train,valid,test}.parquet — one row per example (rrec/data/window.py).
# History is oldest first, at most `data.window.max_history` items; timestamps in ms.
EXAMPLES = pa.schema(
    [
        ("example_id", pa.int64()),  # position in the global temporal order (0..N-1)
        ("user_id", pa.string()),
        ("history_item_ids", pa.list_(pa.int32())),
        ("history_ratings", pa.list_(pa.float32())),
        ("history_timestamps", pa.list_(pa.int64())),
        ("target_item_id", pa.int32()),
        ("target_rating", pa.float32()),
        ("target_timestamp", pa.int64()),
    ]
)

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])

# data/prompts/items.parquet — the item prompt as chat messages (user turn only);
# whoever tokenises applies the backbone's chat template and pre-fills the
# assistant turn with the control token <answer>.
ITEM_PROMPTS = pa.schema([("item_id", pa.int32()), ("messages", pa.list_(MESSAGE))])

# data/prompts/users_{split}.parquet — the user prompt (user turn only) per example.
USER_PROMPTS = pa.schema(
    [
        ("example_id", pa.int64()),
        ("user_id", pa.string()),
        ("history_item_ids", pa.list_(pa.int32())),
        ("target_item_id", pa.int32()),
        ("messages", pa.list_(MESSAGE)),
    ]
)
