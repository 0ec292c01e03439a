"""`python -m rrec.stages.items` (DVC stage `items`): encodes every item prompt with the backbone into the item-embedding
table (`models/item_table/`)."""

from rrec.items import run_items
from rrec.stages import run

if __name__ == "__main__":
    run("items", run_items, torch_threads=True)
