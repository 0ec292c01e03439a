"""`python -m rrec.stages.backbone` (DVC stage `backbone`): builds and pre-trains the tiny backbone, or records a Hub id or local
path (`models/backbone/`)."""

from rrec.model.backbone import build_backbone
from rrec.stages import run

if __name__ == "__main__":
    run("backbone", build_backbone, torch_threads=True)
