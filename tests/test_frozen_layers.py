"""Item states kept below the trained layers give the states of a full pass."""

from __future__ import annotations

import pytest
import torch

from rrec.config import LoraParams
from rrec.model.frozen_layers import FrozenItemStates, frozen_depth
from rrec.model.lora import apply_lora
from rrec.model.two_headed import shared_prefix_length
from tests.tiny import conversations, tiny_recmodel


def _with_lora_on_last(layers: int, of: int):
    rec = tiny_recmodel(layers=of)
    rec.lm = apply_lora(rec.lm, LoraParams(enabled=True, r=4, layers=layers))
    with torch.no_grad():  # a non-zero adapter, so the trained layers differ from the backbone
        for name, p in rec.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    rec.lm.eval()
    return rec


def test_depth_counts_the_untrained_layers():
    assert frozen_depth(_with_lora_on_last(1, of=3)) == 2
    assert frozen_depth(_with_lora_on_last(3, of=3)) == 0
    full = tiny_recmodel(layers=3)
    full.lm.requires_grad_(True)
    assert frozen_depth(full) == 0  # embeddings train: nothing is frozen


@pytest.mark.parametrize("shared_head", [False, True])
def test_kept_states_give_the_full_pass_states(shared_head: bool):
    rec = _with_lora_on_last(1, of=3)
    prompts = rec.item_prompt_ids(conversations(12, seed=3))
    prefix = prompts[0][: shared_prefix_length(prompts)] if shared_head else ()
    assert len(prefix) >= 3 or not shared_head  # the chat template's head at least
    expected = rec.encode(prompts).detach()
    frozen = FrozenItemStates(frozen_depth(rec), prefix)
    first = frozen.encode(rec, prompts[:7])  # full passes, states kept
    assert len(frozen.states) == 7
    mixed = frozen.encode(rec, prompts[5:] + prompts[:2])  # kept and new rows together
    torch.testing.assert_close(first, expected[:7], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mixed, torch.cat([expected[5:], expected[:2]]), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("shared_head", [False, True])
def test_trained_layers_change_what_kept_states_give(shared_head: bool):
    rec = _with_lora_on_last(1, of=3)
    prompts = rec.item_prompt_ids(conversations(4, seed=1))
    prefix = prompts[0][: shared_prefix_length(prompts)] if shared_head else ()
    frozen = FrozenItemStates(frozen_depth(rec), prefix)
    before = frozen.encode(rec, prompts)
    with torch.no_grad():
        for name, p in rec.lm.named_parameters():
            if "lora_B" in name:
                p.add_(1.0)
    after = frozen.encode(rec, prompts)
    expected = rec.encode(prompts).detach()
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=1e-4)


def test_a_prompt_without_the_shared_head_is_refused():
    rec = _with_lora_on_last(1, of=3)
    prompts = rec.item_prompt_ids(conversations(3, seed=1))
    frozen = FrozenItemStates(frozen_depth(rec), [-1, -2])
    with pytest.raises(ValueError, match="shared prefix"):
        frozen.encode(rec, prompts)


def test_nothing_frozen_is_refused():
    with pytest.raises(ValueError, match="nothing is frozen"):
        FrozenItemStates(0)
