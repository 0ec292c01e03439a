"""`python -m rrec.stages.window` (DVC stage `window`): cleans the raw files and cuts the temporal window into items and
train/valid/test examples (`data/processed/`, `reports/window_stats.json`)."""

from rrec.data.window import run_window
from rrec.stages import run

if __name__ == "__main__":
    run("window", run_window)
