"""`python -m rrec.stages.download` (DVC stage `download`): writes the bundled sample catalogue, or downloads the category's
interactions and metadata, into `data/raw/`.

DVC keeps `data/raw` between runs (`persist: true` in dvc.yaml), so that a cut download
resumes its `.part` and a verified file is not fetched again; the stage itself removes
what other settings (another category or source) left there, so that the output holds
only this run's files."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from rrec.config import Params
from rrec.data.download import KEYS, run_download, target_path
from rrec.paths import Paths
from rrec.stages import run

log = logging.getLogger(__name__)


def stage_files(params: Params, paths: Paths) -> list[Path]:
    """The files the stage leaves in `data/raw/` for these params."""
    if params.data.source == "sample":
        cat = params.data.category
        return [paths.rating_only_file(cat), paths.reviews_file(cat), paths.meta_file(cat)]
    return [target_path(params, paths, key) for key in KEYS]


def remove_other_files(params: Params, paths: Paths) -> list[Path]:
    """Delete what `data/raw/` holds besides this run's files and their `.part`s."""
    keep = {f.name for f in stage_files(params, paths)}
    keep |= {f"{name}.part" for name in keep}
    removed = []
    if paths.raw.is_dir():
        for f in sorted(paths.raw.iterdir()):
            if f.name in keep:
                continue
            if f.is_dir() and not f.is_symlink():
                shutil.rmtree(f)
            else:
                f.unlink()
            removed.append(f)
    if removed:
        log.warning("removed from %s what other settings left there: %s",
                    paths.raw, ", ".join(f.name for f in removed))
    return removed


def download_stage(params: Params, paths: Paths) -> dict[str, Path]:
    remove_other_files(params, paths)
    return run_download(params, paths)


if __name__ == "__main__":
    run("download", download_stage)
