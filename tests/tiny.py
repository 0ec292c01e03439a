"""A tiny tokenizer + randomly initialised Qwen2 model for fast unit tests."""

from __future__ import annotations

import random

from rrec.config import TinyBackboneParams
from rrec.model.backbone import build_tiny_model
from rrec.model.tokenizer import train_tokenizer
from rrec.model.two_headed import RecModel

WORDS = "racing puzzle horror sports strategy shooter rating title buyers game console history item analyse recommend next".split()


def conversations(n: int = 60, seed: int = 0) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    return [
        [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 30)))}]
        for _ in range(n)
    ]


def tiny_recmodel(seed: int = 0, hidden: int = 32, layers: int = 2, tau: float = 0.02) -> RecModel:
    tok = train_tokenizer(conversations(), vocab_size=400, model_max_length=512)
    tiny = TinyBackboneParams(
        vocab_size=400, hidden_size=hidden, num_layers=layers, num_heads=4, num_kv_heads=2,
        intermediate_size=2 * hidden, max_position=512,
    )
    lm = build_tiny_model(tiny, tok, seed)
    lm.eval()
    return RecModel(lm, tok, tau=tau)
