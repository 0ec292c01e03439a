"""`python -m rrec.stages.prompts` (DVC stage `prompts`): serialises user histories and items into chat prompts (`data/prompts/`)."""

from rrec.prompts import run_prompts
from rrec.stages import run

if __name__ == "__main__":
    run("prompts", run_prompts)
