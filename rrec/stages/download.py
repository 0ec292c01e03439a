"""`python -m rrec.stages.download` (DVC stage `download`): writes the bundled sample catalogue, or downloads the category's
interactions and metadata, into `data/raw/`."""

from rrec.data.download import run_download
from rrec.stages import run

if __name__ == "__main__":
    run("download", run_download)
