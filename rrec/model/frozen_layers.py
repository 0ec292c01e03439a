"""Item states below the trained layers, computed once.

With LoRA on the last N decoder layers only (`model.lora.layers`), the layers below
them, and the embeddings, never change during training. An item prompt's hidden states
at the input of the first trained layer are therefore the same at every step; only the
top N layers need to run again when the item table is re-encoded (before every
evaluation, for the rows refreshed after an update, and for the in-batch targets of
the contrastive loss). `FrozenItemStates` keeps those states the first time an item is
encoded (a forward pre-hook on the first trained layer records them during the ordinary
pass) and afterwards runs the decoder on them with its layer list cut to the trained
layers. On SmolLM2-135M with LoRA on 4 of 30 layers that is about an eighth of the work.

Only for decoders that take their input states as they are (`inputs_embeds`, no
scaling) and whose layers are all alike (one attention type): Llama, Qwen2/3, Mistral.
The states match a full pass up to float rounding (padding differs between batches).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from rrec.model.last_layer import last_layer_only_at
from rrec.model.two_headed import RecModel, answer_rows

SUPPORTED = frozenset({"llama", "qwen2", "qwen3", "mistral"})


def frozen_depth(rec: RecModel) -> int:
    """How many leading decoder layers (with the embeddings) have no trainable weight;
    0 when the embeddings train or the architecture is not supported."""
    decoder = rec.lm.get_decoder()
    config = decoder.config
    attention_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if config.model_type not in SUPPORTED or len(attention_types) > 1:
        return 0
    if any(p.requires_grad for p in decoder.embed_tokens.parameters()):
        return 0
    depth = 0
    for layer in decoder.layers:
        if any(p.requires_grad for p in layer.parameters()):
            break
        depth += 1
    return depth if depth < len(decoder.layers) else 0


@contextmanager
def _top_layers(decoder: nn.Module, depth: int) -> Iterator[None]:
    """The decoder with its layer list cut to the layers from `depth` on."""
    layers = decoder.layers
    decoder.layers = nn.ModuleList(list(layers)[depth:])
    try:
        yield
    finally:
        decoder.layers = layers


class FrozenItemStates:
    """States at the first trained layer's input, by item prompt (token ids). Item prompts
    share a head (chat template, instruction): `prefix`, run through the whole decoder
    once per call as in `RecModel.encode_after_prefix`; only what follows it is kept."""

    def __init__(self, depth: int, prefix: Sequence[int] = ()) -> None:
        if depth < 1:
            raise ValueError("nothing is frozen: there are no states to keep")
        self.depth = depth
        self.prefix = tuple(prefix)
        self.states: dict[tuple[int, ...], torch.Tensor] = {}

    @torch.no_grad()
    def encode(self, rec: RecModel, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """`rec.encode(sequences)` (no gradient): kept states run through the trained
        layers only; the others by a full pass that keeps theirs."""
        n = len(self.prefix)
        if any(tuple(s[:n]) != self.prefix or len(s) <= n for s in sequences):
            raise ValueError("every item prompt must start with the shared prefix and go on after it")
        keys = [tuple(s) for s in sequences]
        new = [i for i, k in enumerate(keys) if k not in self.states]
        kept = [i for i, k in enumerate(keys) if k in self.states]
        out: list[torch.Tensor | None] = [None] * len(keys)
        if new:
            for i, state in zip(new, self._full_pass(rec, [keys[i] for i in new]), strict=True):
                out[i] = state
        if kept:
            for i, state in zip(kept, self._top_pass(rec, [keys[i] for i in kept]), strict=True):
                out[i] = state
        return torch.stack(out)  # type: ignore[arg-type]

    def _full_pass(self, rec: RecModel, keys: Sequence[tuple[int, ...]]) -> torch.Tensor:
        seen: list[torch.Tensor] = []

        def keep(_module: nn.Module, args: tuple) -> None:
            seen.append(args[0])

        prefix = rec.shared_prefix(self.prefix) if self.prefix else None
        handle = rec.lm.get_decoder().layers[self.depth].register_forward_pre_hook(keep)
        try:
            states = rec.encode_after_prefix(prefix, keys) if prefix else rec.encode(keys)
        finally:
            handle.remove()
        n = len(self.prefix)
        for row, key in enumerate(keys):  # right-padded: the real tokens come first
            self.states[key] = seen[0][row, : len(key) - n].clone()
        return states

    def _top_pass(self, rec: RecModel, keys: Sequence[tuple[int, ...]]) -> torch.Tensor:
        n = len(self.prefix)
        ids, mask = rec.pad([k[n:] for k in keys])  # right-padded, as the kept states are
        first = self.states[keys[0]]
        x = first.new_zeros((*ids.shape, first.shape[-1]))
        for row, key in enumerate(keys):
            x[row, : len(key) - n] = self.states[key]
        rows = answer_rows(ids, mask, rec.answer_token_id)
        width = ids.shape[1]
        positions = n + torch.arange(width, device=x.device).expand(len(keys), -1)
        inputs: dict = {"inputs_embeds": x, "position_ids": positions, "use_cache": bool(n)}
        if n:  # the prefix's keys and values in the trained layers change with them: recomputed
            prefix = rec.shared_prefix(self.prefix)
            prefix.cache.batch_repeat_interleave(len(keys))  # encoded for this pass alone: no copy
            inputs["past_key_values"] = prefix.cache
            inputs["attention_mask"] = prefix.attention_mask(mask)
        decoder = rec.lm.get_decoder()
        # without a prefix and right-padded, a real token only attends to earlier real
        # tokens, so no padding mask is needed (RecModel.forward)
        with _top_layers(decoder, self.depth), last_layer_only_at(decoder, rows):
            hidden = decoder(**inputs).last_hidden_state
        return hidden.flatten(0, 1)[rows]
