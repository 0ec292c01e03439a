"""`RecModel`: one causal LM with two heads (docs/method.md).

- the language-modelling head is the backbone's own `lm_head`;
- the recommendation head reads the final-layer hidden state (after the final norm,
  i.e. `hidden_states[-1]` of the HF output) at the last `<answer>` token of each row
  and scores it against the item table by cosine similarity over a temperature.

Padding: rows may be padded on either side. Position ids are derived from the
attention mask, so a padded row gets exactly the positions it would have alone, and
the hidden state at `<answer>` matches an unpadded forward pass up to float error.
Right-padded batches (what `pad` builds by default) skip the padding mask altogether:
causal attention already keeps real tokens from seeing the padding after them.

Under DDP call the wrapped module itself (`ddp(ids, mask, output="answer_states")`)
rather than `.answer_states`, so DDP's forward hooks see the pass.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from rrec.model.aot import AOTDecoder, cache_positions, require_cpp_compiler
from rrec.model.chat import chat_ids
from rrec.model.last_layer import last_layer_only_at, unwrap
from rrec.model.tokenizer import ANSWER, END_ANSWER, control_token_id

if TYPE_CHECKING:
    from rrec.model.frozen_layers import FrozenItemStates

Messages = Sequence[dict[str, str]]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """0-based positions counting only attended tokens (padding gets 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """True if every row is ones followed by zeros (no left padding, no holes)."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def answer_positions(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, answer_id: int
) -> torch.Tensor:
    """Index of the last attended `answer_id` in each row; an error if a row has none."""
    hits = (input_ids == answer_id) & attention_mask.bool()
    if not bool(hits.any(dim=1).all()):
        bad = (~hits.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(
            f"rows {bad} contain no <answer> token (id {answer_id}); build the ids with "
            "RecModel.item_prompt_ids / user_prompt_ids(answer=True) or append <answer> after the reasoning"
        )
    index = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    return torch.where(hits, index, -1).max(dim=1).values


def answer_rows(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, answer_id: int
) -> torch.Tensor:
    """Flat index (into [B*T]) of each row's last `<answer>`: `hidden.flatten(0, 1)[rows]`
    is [B, d]."""
    pos = answer_positions(input_ids, attention_mask, answer_id)
    return torch.arange(input_ids.shape[0], device=pos.device) * input_ids.shape[1] + pos


def template_tail_length(tokenizer: PreTrainedTokenizerBase) -> int:
    """Tokens the chat template writes after the last message's content when it opens
    the assistant turn (e.g. `<|im_end|>`, `\\n`, `<|im_start|>`, `assistant`, `\\n`).

    Found by rendering a probe conversation; 0 if the template's tail does not start
    on a token boundary (truncation then keeps only what is appended after it)."""
    probe = "rrec probe"
    messages = [{"role": "user", "content": probe}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    end = text.rfind(probe)
    if end < 0:
        return 0
    suffix = tokenizer.encode(text[end + len(probe) :], add_special_tokens=False)
    return len(suffix) if suffix and list(ids[-len(suffix) :]) == suffix else 0


def shared_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of `sequences`, at most the shortest one's
    length minus one (every sequence keeps a token of its own after the prefix)."""
    if not sequences:
        return 0
    limit = min(len(s) for s in sequences) - 1
    first = sequences[0]
    n = 0
    while n < limit and all(s[n] == first[n] for s in sequences):
        n += 1
    return n


_RECOMPILE_LIMIT = 64
_AOT_BUILD_LOCK = threading.Lock()


@dataclass(frozen=True)
class SharedPrefix:
    """The decoder's KV cache of a token prefix that many sequences start with."""

    ids: tuple[int, ...]
    cache: DynamicCache

    def suffixes(self, sequences: Sequence[Sequence[int]]) -> list[list[int]]:
        """What follows the prefix in each sequence; every one must start with it and go on."""
        n = len(self.ids)
        if any(tuple(s[:n]) != self.ids or len(s) <= n for s in sequences):
            raise ValueError("every sequence must start with the shared prefix and go on after it")
        return [list(s[n:]) for s in sequences]

    def for_batch(self, rows: int) -> DynamicCache:
        """A copy of the cache repeated for `rows` sequences (the kept one is never extended)."""
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(rows)
        return cache

    def attention_mask(self, suffix_mask: torch.Tensor) -> torch.Tensor:
        """The mask of prefix + suffix: the prefix is attended in every row."""
        return torch.cat([torch.ones_like(suffix_mask[:, :1]).expand(-1, len(self.ids)), suffix_mask], dim=1)


class RecModel(nn.Module):
    """The causal LM `lm` (possibly a peft model) with the recommendation head."""

    def __init__(
        self,
        lm: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        tau: float = 0.02,
        max_prompt_tokens: int | None = None,
        aot_single_requests: bool = False,
        end_of_turn_stops: bool = False,
    ) -> None:
        super().__init__()
        self.lm = lm
        # the backbone's end-of-turn tokens may end the reasoning (`<answer>` is appended)
        self.end_of_turn_stops = end_of_turn_stops
        # item states below the trained layers, kept while training (rrec.model.frozen_layers)
        self.frozen_items: FrozenItemStates | None = None
        self.tokenizer = tokenizer
        self.tau = tau
        self.max_prompt_tokens = max_prompt_tokens
        self.answer_token_id = control_token_id(tokenizer, ANSWER)
        self.end_answer_token_id = control_token_id(tokenizer, END_ANSWER)
        self.template_tail = template_tail_length(tokenizer)
        pad = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        if pad is None:
            raise ValueError(
                "the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token"
            )
        self.pad_token_id = int(pad)
        self._banned_in_reasoning: torch.Tensor | None = None
        # greedy requests on their own go through `aot_decoder` (model.aot_single_requests)
        self.aot_single_requests = aot_single_requests
        self._aot: AOTDecoder | None = None
        self.train(lm.training)  # start in the mode the LM is in (eval after loading)

    # ---------------------------------------------------------------- ids

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    def compile_decoder(self) -> None:
        """`torch.compile` the decoder in place, with dynamic shapes, for inference.

        Every later call of the decoder (prompt prefill, decoding steps, the `<answer>`
        step, encoding) runs the compiled graphs; the first call of each kind of input
        pays the compilation (seconds to a minute on CPU). On CPU, inductor compiles C++
        and needs a compiler (`CXX`, `g++` or `clang++`)."""
        if self.device.type == "cpu":
            require_cpp_compiler("model.compile")
        # Prefill, decoding steps, the `<answer>` step and encoding, with and without
        # padding, each compile their own graph: more than dynamo's default limit of 8,
        # past which it would silently run the rest eagerly.
        import torch._dynamo

        dynamo_config = torch._dynamo.config
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, _RECOMPILE_LIMIT)
        decoder = self.lm.get_decoder()
        unwrap(decoder)  # compiled, the decoder always runs its last layer in full
        decoder.compile(dynamic=True)

    def aot_decoder(self, max_new_tokens: int) -> AOTDecoder:
        """The decoder compiled ahead of time for single greedy requests (`rrec.model.aot`),
        built on first use (seconds; a C++ compiler is needed) with room for the longest
        prompt (`max_prompt_tokens`) and `max_new_tokens`. It holds the weights as they are
        now: build it from a trained policy, not during training."""
        limit = self.max_prompt_tokens or int(self.lm.config.max_position_embeddings)
        needed = cache_positions(limit, max_new_tokens)
        with _AOT_BUILD_LOCK:
            if self._aot is None or self._aot.max_cache_len < needed:
                self._aot = AOTDecoder(self.lm, needed)
            return self._aot

    def banned_in_reasoning(self) -> torch.Tensor:
        """Boolean [vocab] mask of the ids reasoning may never contain: every special or
        added token of the tokenizer (chat-template tokens, end of text, `</answer>`, ...)
        and the output head's rows beyond the tokenizer, all but `<answer>`, which ends
        the reasoning, and, with `end_of_turn_stops`, the backbone's end-of-turn tokens,
        which end it too (a pretrained chat model ends its answer there). Sampling and
        greedy decoding set their logits to -inf, as a chat
        model's turn is text; the update masks the same ids, so the ratios stay exact."""
        device = self.device
        if self._banned_in_reasoning is None or self._banned_in_reasoning.device != device:
            rows = int(self.lm.get_output_embeddings().weight.shape[0])
            banned = torch.zeros(rows, dtype=torch.bool)
            tok = self.tokenizer
            ids = set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}))
            banned[[i for i in ids if 0 <= i < rows]] = True
            banned[len(tok) :] = True
            banned[self.answer_token_id] = False
            if self.end_of_turn_stops:
                banned[[i for i in self.end_of_turn_ids() if 0 <= i < rows]] = False
            self._banned_in_reasoning = banned.to(device)  # once per device, not per decoding step
        return self._banned_in_reasoning

    def end_of_turn_ids(self) -> list[int]:
        """The ids that end a turn: the generation config's eos ids and the tokenizer's eos."""
        eos = getattr(getattr(self.lm, "generation_config", None), "eos_token_id", None)
        ids = [*(eos if isinstance(eos, (list, tuple)) else [eos]), self.tokenizer.eos_token_id]
        return sorted({int(i) for i in ids if i is not None})

    def reasoning_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` [..., vocab] with the ids of `banned_in_reasoning` at -inf (float32)."""
        return logits.float().masked_fill(self.banned_in_reasoning(), float("-inf"))

    @property
    def hidden_size(self) -> int:
        return int(self.lm.get_input_embeddings().weight.shape[1])

    def _truncate(self, ids: list[int], tail: int) -> list[int]:
        """Cut the end of the prompt body so the last `tail` tokens (the end of the user
        turn, the assistant header, `<answer>`) survive `max_prompt_tokens`."""
        limit = self.max_prompt_tokens
        if limit is None or len(ids) <= limit:
            return ids
        if tail >= limit:
            raise ValueError(
                f"model.max_prompt_tokens={limit} is too small for the chat template's tail "
                f"({tail} tokens); raise it"
            )
        return ids[: limit - tail] + ids[len(ids) - tail :]

    def prompt_ids(self, conversations: Sequence[Messages], *, answer: bool) -> list[list[int]]:
        """Token ids of chat conversations with the generation prompt (the assistant turn
        opened), then `<answer>` if `answer`. Control tokens inside message text are
        encoded as text. Too long prompts lose the end of their body, never the tail."""
        rendered = chat_ids(self.tokenizer, conversations)
        tail = self.template_tail + int(answer)
        suffix = [self.answer_token_id] if answer else []
        return [self._truncate(list(ids) + suffix, tail) for ids in rendered]

    def item_prompt_ids(self, conversations: Sequence[Messages]) -> list[list[int]]:
        """Item prompts: the assistant turn pre-filled with `<answer>`."""
        return self.prompt_ids(conversations, answer=True)

    def user_prompt_ids(
        self, conversations: Sequence[Messages], *, answer: bool = False
    ) -> list[list[int]]:
        """User prompts; `answer=True` for the contrastive baseline (no reasoning)."""
        return self.prompt_ids(conversations, answer=answer)

    def pad(
        self, sequences: Sequence[Sequence[int]], padding_side: Literal["left", "right"] = "right"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) on the model's device, padded to the longest row."""
        if not sequences:
            raise ValueError("no sequences to pad")
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            n = len(seq)
            cols = slice(width - n, width) if padding_side == "left" else slice(0, n)
            ids[row, cols] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[row, cols] = 1
        return ids.to(self.device), mask.to(self.device)

    # ------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        output: Literal["answer_states", "lm"] = "answer_states",
        **kwargs: Any,
    ) -> Any:
        """`output="answer_states"`: [B, d] at each row's last `<answer>`, computed by the
        decoder alone (no logits over the vocabulary). `output="lm"`: the causal LM's
        output with all hidden states, for passes that need both heads."""
        position_ids = kwargs.pop("position_ids", None)
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        if output == "lm":
            return self.lm(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                output_hidden_states=True,
                **kwargs,
            )
        decoder_mask: torch.Tensor | None = attention_mask
        if is_right_padded(attention_mask):
            # under the causal mask a real token only sees earlier, real tokens, so the
            # padding mask changes nothing that is read; without it the fused causal
            # attention kernel applies (about 10 % faster on CPU)
            decoder_mask = None
        rows = answer_rows(input_ids, attention_mask, self.answer_token_id)
        return self._decoder_states_at(
            rows, input_ids=input_ids, attention_mask=decoder_mask, position_ids=position_ids, **kwargs
        )

    def _decoder_states_at(self, rows: torch.Tensor, **decoder_inputs: Any) -> torch.Tensor:
        """One decoder pass whose last layer runs only at flat positions `rows` (of [B*T]);
        the final hidden states there, [len(rows), d]."""
        decoder = self.lm.get_decoder()
        with last_layer_only_at(decoder, rows):
            hidden = decoder(**decoder_inputs).last_hidden_state
        return hidden.flatten(0, 1)[rows]

    def answer_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final-layer hidden state at the last `<answer>` of each row: [B, d]."""
        return self(input_ids, attention_mask, output="answer_states")

    def encode(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """Answer states of token-id lists (padded here); gradients as the caller's context."""
        ids, mask = self.pad(sequences)
        return self.answer_states(ids, mask)

    def encode_items(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """`encode` for item prompts: through `frozen_items` when it is set."""
        if self.frozen_items is not None:
            return self.frozen_items.encode(self, sequences)
        return self.encode(sequences)

    @torch.no_grad()
    def shared_prefix(self, prefix: Sequence[int]) -> SharedPrefix:
        """Run `prefix` once through the decoder and keep its KV cache (inference only)."""
        ids = torch.tensor([list(prefix)], dtype=torch.long, device=self.device)
        cache = DynamicCache()
        nothing_read = torch.zeros(0, dtype=torch.long, device=self.device)  # only the cache is
        self._decoder_states_at(
            nothing_read, input_ids=ids, past_key_values=cache, use_cache=True,
            position_ids=torch.arange(ids.shape[1], device=self.device).unsqueeze(0),
        )  # fmt: skip
        return SharedPrefix(tuple(prefix), cache)

    @torch.no_grad()
    def encode_after_prefix(self, prefix: SharedPrefix, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """`encode(sequences)` for sequences that all start with `prefix`, computing only
        what follows it, on top of the prefix's cache: the same states (up to float
        rounding) for a fraction of the work when prompts share a long template head."""
        ids, mask = self.pad(prefix.suffixes(sequences))
        return self._decoder_states_at(
            answer_rows(ids, mask, self.answer_token_id),
            input_ids=ids,
            attention_mask=prefix.attention_mask(mask),
            position_ids=len(prefix.ids) + position_ids_from_mask(mask),
            past_key_values=prefix.for_batch(len(sequences)),
            use_cache=True,
        )
