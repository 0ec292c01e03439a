"""The ahead-of-time compiled decoder (`rrec.model.aot`) for single greedy requests."""

from __future__ import annotations

import threading

import pytest
import torch

from rrec.model.generation import HFEngine
from tests.tiny import conversations, tiny_recmodel

STEPS = 6


@pytest.fixture(scope="module")
def model_and_prompts():
    """A tiny policy whose greedy reasoning, over these prompts, stops by sampling
    `<answer>`, stops at an end-of-turn token, or runs to the cap."""
    model = tiny_recmodel(layers=2)
    model.max_prompt_tokens = 96
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # an untrained model repeats one token: make the reasoning vary
        for name, weight in model.lm.named_parameters():
            if "norm" not in name:
                weight.normal_(0, 0.3, generator=g)
    prompts = model.user_prompt_ids(conversations(8, seed=11))
    reasoning = HFEngine(1.0, 0, STEPS).generate(model, prompts, greedy=True).reasoning_ids

    def own_token(i: int) -> int:  # a token only prompt i's reasoning writes, not first
        others = {t for j, r in enumerate(reasoning) if j != i for t in r}
        return next(t for t in reasoning[i][1:] if t not in others and t not in reasoning[i][:1])

    answer_row, turn_end = own_token(0), own_token(1)
    head = model.lm.get_output_embeddings().weight
    with torch.no_grad():  # <answer> now wins (by 1 %, no float ties) where that token did
        head[model.answer_token_id] = head[answer_row] * 1.01
    model.lm.generation_config.eos_token_id = [turn_end]
    return model, prompts


def test_single_requests_give_the_hf_engines_tokens_and_states(model_and_prompts) -> None:
    model, prompts = model_and_prompts
    engine = HFEngine(1.0, 0, STEPS)
    model.aot_single_requests = False
    expected = [engine.generate(model, [p], greedy=True) for p in prompts]
    model.aot_single_requests = True
    try:
        aot = model.aot_decoder(STEPS)
        got = [engine.generate(model, [p], greedy=True) for p in prompts]
        two_stage_first = HFEngine(1.0, 0, STEPS, read_states=False).generate(model, [prompts[0]], greedy=True)
    finally:
        model.aot_single_requests = False
    kinds = set()
    for e, g in zip(expected, got, strict=True):
        assert g.reasoning_ids == e.reasoning_ids and g.sampled_answer == e.sampled_answer
        torch.testing.assert_close(g.user_states, e.user_states, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g.old_logprobs[0], e.old_logprobs[0], atol=1e-5, rtol=1e-5)
        n = len(e.reasoning_ids[0])
        kinds.add("answer" if e.sampled_answer[0] else "cap" if n == STEPS else "end of turn")
    assert kinds == {"answer", "cap", "end of turn"}
    assert two_stage_first.user_states.shape == (1, 0)
    assert two_stage_first.reasoning_ids == expected[0].reasoning_ids
    assert aot.fits(96, STEPS) and not aot.fits(aot.max_cache_len, 1)


def test_concurrent_requests_are_served_one_at_a_time(model_and_prompts) -> None:
    model, prompts = model_and_prompts
    aot = model.aot_decoder(STEPS)
    stops, answer = [model.answer_token_id], model.answer_token_id
    expected = [aot.greedy(p, STEPS, stops, answer).user_state for p in prompts]
    errors: list[BaseException] = []

    def work(order: list[int]) -> None:
        try:
            for i in order:
                torch.testing.assert_close(aot.greedy(prompts[i], STEPS, stops, answer).user_state, expected[i])
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=work, args=(order,)) for order in ([0, 1, 2, 3] * 3, [3, 2, 1, 0] * 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_without_a_compiler_it_says_what_to_do(monkeypatch) -> None:
    monkeypatch.setattr("shutil.which", lambda name: None)
    model = tiny_recmodel(layers=1)
    with pytest.raises(RuntimeError, match="model.aot_single_requests on CPU needs a C\\+\\+ compiler"):
        model.aot_decoder(STEPS)
