"""Greedy decoding of one request with the decoder compiled ahead of time (AOTInductor).

A small model's decoding step on a CPU is mostly overhead: `transformers`' Python per
layer, and with `torch.compile` dynamo's guard checks and the compiled graph's Python
wrapper (~0.2 ms of the ~0.55 ms a step). Here the decoder plus the output head are
exported once with `torch.export` over a static KV cache (`transformers.StaticCache`,
held as buffers, as `transformers.integrations.executorch` does for ExecuTorch) and
compiled by AOTInductor into a shared library: a step is then one C++ call.

The exported program takes `(input_ids [1, n], cache_position [n])`, writes the n
tokens' keys and values into the cache at those positions and returns the final hidden
state and the logits at the last of them; `n` is dynamic, so one program serves the
prompt pass, the decoding steps and the `<answer>` step. The cache holds
`max_cache_len` positions; a request that would not fit is refused (`fits`), and the
caller decodes it the usual way. The weights are frozen into the library: build it
from the trained, merged policy, after which it does not follow weight updates.

One request at a time: the cache is state, so a lock serialises callers.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, StaticCache

from rrec.model.last_layer import unwrap


def require_cpp_compiler(setting: str) -> None:
    """Inductor compiles C++ on CPU: stop with what to do when no compiler is found."""
    if not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "clang++") if c):
        raise RuntimeError(
            f"{setting} on CPU needs a C++ compiler (set CXX or install g++/clang++); "
            f"or set {setting}: false"
        )


def cache_positions(prompt_tokens: int, max_new_tokens: int) -> int:
    """Cache positions a request needs: the prompt, the reasoning but its last token, and
    the `<answer>` step (that last token and `<answer>`)."""
    return prompt_tokens + max_new_tokens + 1


@dataclass
class GreedyResult:
    reasoning_ids: list[int]  # including a sampled final <answer>
    sampled_answer: bool
    logprobs: torch.Tensor  # one per reasoning token, log_softmax(logits)
    user_state: torch.Tensor  # [d] at the final <answer>


class _StepWithStaticCache(nn.Module):
    """decoder + head over a static cache whose tensors are buffers (exportable)."""

    def __init__(self, lm: PreTrainedModel, max_cache_len: int) -> None:
        super().__init__()
        self.decoder = lm.get_decoder()
        self.head = lm.get_output_embeddings()
        config = lm.config.get_text_config()
        self.cache = StaticCache(max_cache_len=max_cache_len, config=config)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        param = next(lm.parameters())
        self.cache.early_initialization(1, config.num_key_value_heads, head_dim, param.dtype, param.device)
        for i, layer in enumerate(self.cache.layers):
            self.register_buffer(f"key_cache_{i}", layer.keys, persistent=False)
            self.register_buffer(f"value_cache_{i}", layer.values, persistent=False)
            self.register_buffer(f"cumulative_length_{i}", layer.cumulative_length, persistent=False)

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for layer in self.cache.layers:  # write at cache_position, whatever came before
            layer.cumulative_length.copy_(cache_position[0])
        hidden = self.decoder(
            input_ids=input_ids,
            position_ids=cache_position.unsqueeze(0),
            cache_position=cache_position,
            past_key_values=self.cache,
            use_cache=True,
        ).last_hidden_state[:, -1]
        return hidden, self.head(hidden)


class AOTDecoder:
    """`greedy(prompt)` for one request on the AOTInductor-compiled decoder."""

    def __init__(self, lm: PreTrainedModel, max_cache_len: int) -> None:
        require_cpp_compiler("model.aot_single_requests")
        self.max_cache_len = max_cache_len
        unwrap(lm.get_decoder())  # export the plain modules (see rrec.model.last_layer)
        step = _StepWithStaticCache(lm, max_cache_len).eval()
        length = torch.export.Dim("tokens", min=1, max=max_cache_len - 1)
        device = next(lm.parameters()).device
        example = (torch.zeros(1, 8, dtype=torch.long, device=device), torch.arange(8, device=device))
        with torch.no_grad(), tempfile.TemporaryDirectory(prefix="rrec-aot-") as tmp:
            program = torch.export.export(
                step, example, dynamic_shapes=({1: length}, {0: length}), strict=True
            )
            package = torch._inductor.aoti_compile_and_package(
                program, package_path=str(Path(tmp) / "decoder.pt2")
            )
            self._run = torch._inductor.aoti_load_package(package)
        self._device = device
        self._lock = threading.Lock()

    def fits(self, prompt_length: int, max_new_tokens: int) -> bool:
        """Prompt, reasoning and the `<answer>` step fit in the static cache."""
        return cache_positions(prompt_length, max_new_tokens) <= self.max_cache_len

    def _call(self, ids: Sequence[int], start: int) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=self._device)
        positions = torch.arange(start, start + len(ids), device=self._device)
        return self._run(input_ids, positions)

    @torch.no_grad()
    def greedy(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        stop_ids: Sequence[int],
        answer_id: int,
        *,
        banned: torch.Tensor | None = None,
        read_state: bool = True,
    ) -> GreedyResult:
        """Decode up to `max_new_tokens` greedily, stop at a stop id, then read the state at
        `<answer>` (unless not `read_state`: an empty state): the same tokens and state as
        `HFEngine` for a batch of one. `banned` [vocab] marks ids set to -inf before the
        choice (`RecModel.banned_in_reasoning`)."""
        if max_new_tokens < 1 or not self.fits(len(prompt), max_new_tokens):
            raise ValueError(
                f"a prompt of {len(prompt)} tokens and {max_new_tokens} new tokens do not fit the "
                f"AOT decoder's cache of {self.max_cache_len}"
            )
        stops = set(stop_ids)
        with self._lock:
            _, logits = self._call(prompt, 0)
            tokens: list[int] = []
            logprobs: list[torch.Tensor] = []
            position = len(prompt)
            stopped = False
            for step in range(max_new_tokens):
                row = logits[0].float()
                if banned is not None:
                    row = row.masked_fill(banned.to(row.device), float("-inf"))
                token = int(row.argmax())
                logprobs.append(torch.log_softmax(row, dim=-1)[token])
                tokens.append(token)
                if token in stops:
                    stopped = True
                    break
                if step == max_new_tokens - 1:
                    break
                _, logits = self._call([token], position)
                position += 1
            # the cache holds the prompt and every token but the last; `<answer>` goes
            # where the sampled stop token was, or after the last token at the cap
            if not read_state:
                state = torch.zeros(1, 0)
            elif stopped:
                state, _ = self._call([answer_id], position)
            else:
                state, _ = self._call([tokens[-1], answer_id], position)
        sampled_answer = stopped and tokens[-1] == answer_id
        keep = len(tokens) if sampled_answer or not stopped else len(tokens) - 1
        return GreedyResult(
            reasoning_ids=tokens[:keep],
            sampled_answer=sampled_answer,
            logprobs=torch.stack(logprobs[:keep]).float().cpu() if keep else torch.zeros(0),
            user_state=state[0].float().cpu(),
        )
