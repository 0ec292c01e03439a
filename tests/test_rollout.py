import pytest
import torch

from rrec.model.generation import HFEngine, make_engine, score_trajectories
from tests.tiny import conversations, tiny_recmodel


def _prompts(model, n=3):
    return model.user_prompt_ids(conversations(n, seed=5))


def test_answer_state_from_rollout_equals_full_forward():
    torch.manual_seed(0)
    model = tiny_recmodel()
    engine = HFEngine(temperature=1.5, top_k=50, max_new_tokens=6)
    roll = engine.generate(model, _prompts(model), group_size=2)
    assert len(roll.reasoning_ids) == 6 and roll.user_states.shape == (6, model.hidden_size)
    seqs = roll.sequences(model.answer_token_id)
    for row, seq in enumerate(seqs):
        assert seq[-1] == model.answer_token_id
        assert seq.count(model.answer_token_id) == 1
        with torch.no_grad():
            full = model.encode([seq])[0]
        torch.testing.assert_close(roll.user_states[row], full.float(), atol=1e-4, rtol=1e-4)


def test_logprobs_match_a_full_forward_at_temperature():
    torch.manual_seed(1)
    model = tiny_recmodel()
    t = 1.5
    roll = HFEngine(temperature=t, top_k=0, max_new_tokens=5).generate(model, _prompts(model, 2), group_size=2)
    for row, seq in enumerate(roll.sequences(model.answer_token_id)):
        p = len(roll.prompt_ids[row])
        k = len(roll.reasoning_ids[row])
        ids = torch.tensor([seq])
        with torch.no_grad():
            logits = model.lm(input_ids=ids).logits[0].float()
        lp = torch.log_softmax(model.reasoning_logits(logits) / t, dim=-1)
        expected = lp[p - 1 : p - 1 + k].gather(1, ids[0, p : p + k].unsqueeze(1)).squeeze(1)
        torch.testing.assert_close(roll.old_logprobs[row], expected, atol=1e-4, rtol=1e-4)


def test_rows_stopping_early_and_left_padding():
    # prompts of very different lengths: left padding, and some rows stop at <answer>
    torch.manual_seed(2)
    model = tiny_recmodel()
    # make <answer> likely so that some rows stop before max_new_tokens
    _answer_likely(model)
    prompts = [p[: 5 + 7 * i] for i, p in enumerate(_prompts(model, 4))]
    roll = HFEngine(temperature=3.0, top_k=0, max_new_tokens=8).generate(model, prompts, group_size=3)
    for row, seq in enumerate(roll.sequences(model.answer_token_id)):
        with torch.no_grad():
            full = model.encode([seq])[0]
        torch.testing.assert_close(roll.user_states[row], full.float(), atol=1e-4, rtol=1e-4)
        assert len(roll.old_logprobs[row]) == len(roll.reasoning_ids[row])
    assert min(roll.lengths) < 8


def _answer_likely(model, logit: float = 14.0):
    """Point `<answer>`'s output row along the mean final state of some prompts, so that
    its logit is about `logit` (the model itself has not learned to stop)."""
    ids, mask = model.pad(_prompts(model, 4))
    with torch.no_grad():
        hidden = model.lm.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        mean = hidden[mask.bool()].mean(0)
        model.lm.lm_head.weight[model.answer_token_id] = logit * mean / mean.pow(2).sum()


def test_single_requests_stopping_early_or_at_the_cap():
    # batches of one have no padding: the engine passes no attention mask, and its
    # `<answer>` step feeds one token after an early stop and two after the cap
    torch.manual_seed(3)
    model = tiny_recmodel()
    _answer_likely(model, 9.0)
    engine = HFEngine(temperature=3.0, top_k=0, max_new_tokens=6, batch_size=1)
    roll = engine.generate(model, _prompts(model, 4), group_size=4)
    for row, seq in enumerate(roll.sequences(model.answer_token_id)):
        with torch.no_grad():
            full = model.encode([seq])[0]
        torch.testing.assert_close(roll.user_states[row], full.float(), atol=1e-4, rtol=1e-4)
    assert 6 in roll.lengths and min(roll.lengths) < 5


def test_reasoning_never_holds_special_tokens_but_answer():
    """Chat-template tokens, end of text and `</answer>` are masked out of sampling and
    greedy decoding, even when they are the model's favourites; `<answer>` ends it."""
    torch.manual_seed(4)
    model = tiny_recmodel()
    banned = model.banned_in_reasoning()
    special = [i for i in model.tokenizer.all_special_ids if i != model.answer_token_id]
    assert special and banned[special].all() and not banned[model.answer_token_id]
    with torch.no_grad():  # make every special token the most likely next token
        for i in special:
            model.lm.lm_head.weight[i] = 5 * model.lm.lm_head.weight.mean(0)
    for greedy in (False, True):
        roll = HFEngine(temperature=1.5, top_k=0, max_new_tokens=8).generate(
            model, _prompts(model, 3), group_size=2, greedy=greedy
        )
        for ids, sampled in zip(roll.reasoning_ids, roll.sampled_answer, strict=True):
            body = ids[:-1] if sampled else ids
            assert not any(banned[t] for t in body) and model.answer_token_id not in body


def test_greedy_is_deterministic_and_vllm_needs_extra():
    model = tiny_recmodel()
    engine = HFEngine(temperature=1.5, top_k=10, max_new_tokens=5)
    a = engine.generate(model, _prompts(model, 2), greedy=True)
    b = engine.generate(model, _prompts(model, 2), greedy=True)
    assert a.reasoning_ids == b.reasoning_ids
    torch.testing.assert_close(a.user_states, b.user_states)
    try:
        import vllm  # noqa: F401
    except ImportError:
        import pytest

        with pytest.raises(RuntimeError, match=r"\.\[gpu\]"):
            make_engine("vllm", temperature=1.0, top_k=1, max_new_tokens=1, model_ref="x")


def test_greedy_decoding_equals_transformers_generate():
    # the engine's own decoding loop against the library's, on left-padded prompts of
    # different lengths (reasoning compared up to each row's first stop token)
    model = tiny_recmodel(seed=3)
    prompts = [p[: 6 + 9 * i] for i, p in enumerate(_prompts(model, 3))]
    rows_seen = []  # the last layer's MLP: one row per prompt in the prompt pass
    model.lm.get_decoder().layers[-1].mlp.down_proj.register_forward_hook(
        lambda _m, args, _out: rows_seen.append(args[0].flatten(0, -2).shape[0])
    )
    roll = HFEngine(temperature=1.0, top_k=0, max_new_tokens=7).generate(model, prompts, greedy=True)
    assert rows_seen[0] == len(prompts)
    ids, mask = model.pad(prompts, padding_side="left")
    stop = {model.answer_token_id, model.tokenizer.eos_token_id, *model.lm.generation_config.eos_token_id}
    with torch.no_grad():
        out = model.lm.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=7, do_sample=False,
            eos_token_id=sorted(stop), pad_token_id=model.pad_token_id,
        )[:, ids.shape[1] :].tolist()
    for row, reasoning in enumerate(roll.reasoning_ids):
        expected = []
        for token in out[row]:
            expected.append(token)
            if token in stop:
                break
        if expected and expected[-1] in stop and expected[-1] != model.answer_token_id:
            expected.pop()  # a turn end is not part of the reasoning
        assert reasoning == expected


def test_compiled_decoder_gives_the_eager_states_and_reasoning():
    torch.manual_seed(0)
    eager = tiny_recmodel()
    compiled = tiny_recmodel()  # the same seed: the same weights
    compiled.compile_decoder()
    # batches of one, as served (padded batches compile more graphs: a minute on CPU)
    prompts = eager.user_prompt_ids(conversations(2, seed=4))
    engine = HFEngine(temperature=1.0, top_k=0, max_new_tokens=5, batch_size=1)
    with torch.no_grad():
        want, got = engine.generate(eager, prompts, greedy=True), engine.generate(compiled, prompts, greedy=True)
        assert got.reasoning_ids == want.reasoning_ids
        torch.testing.assert_close(got.user_states, want.user_states, atol=1e-4, rtol=1e-4)
        for seq in want.sequences(eager.answer_token_id):
            torch.testing.assert_close(compiled.encode([seq]), eager.encode([seq]), atol=1e-4, rtol=1e-4)
    assert compiled.lm.get_decoder()._compiled_call_impl is not None
    assert torch._dynamo.config.recompile_limit >= 64  # or the later kinds of call would run eagerly


def test_compiling_on_cpu_without_a_compiler_says_what_to_do(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(RuntimeError, match="C\\+\\+ compiler"):
        tiny_recmodel().compile_decoder()


def test_trajectories_written_elsewhere_are_scored_as_the_engine_scores_its_own():
    # the vLLM path: tokens come from another engine, log-probs and h_u from one forward
    torch.manual_seed(6)
    model = tiny_recmodel()
    t = 1.3
    roll = HFEngine(temperature=t, top_k=0, max_new_tokens=6).generate(model, _prompts(model, 3), group_size=2)
    scored = score_trajectories(model, roll.prompt_ids, roll.reasoning_ids, roll.sampled_answer, t, batch_size=4)
    assert scored.reasoning_ids == roll.reasoning_ids
    for mine, theirs in zip(scored.old_logprobs, roll.old_logprobs, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scored.user_states, roll.user_states, atol=1e-4, rtol=1e-4)


def _prompts_with_a_shared_head(model, n=5):
    head = {"role": "system", "content": "recommend the next game title from the buyers history"}
    convs = [[head, *conv] for conv in conversations(n, seed=9)]
    return convs, model.user_prompt_ids(convs)


def test_generation_after_a_shared_prefix_equals_generation_of_whole_prompts():
    from rrec.model.two_headed import shared_prefix_length

    model = tiny_recmodel()
    _, prompts = _prompts_with_a_shared_head(model, 6)
    n = shared_prefix_length(prompts)
    assert n > 5 and len({len(p) for p in prompts}) > 1  # a real head, and left padding after it
    prefix = model.shared_prefix(prompts[0][:n])
    engine = HFEngine(temperature=3.0, top_k=0, max_new_tokens=7)
    whole = engine.generate(model, prompts, greedy=True)
    after = engine.generate(model, prompts, greedy=True, prefix=prefix)
    assert after.reasoning_ids == whole.reasoning_ids and set(whole.lengths) == {7}
    torch.testing.assert_close(after.user_states, whole.user_states, atol=1e-4, rtol=1e-4)
    _answer_likely(model, 9.0)  # now some rows stop early, others run to the cap
    prefix = model.shared_prefix(prompts[0][:n])  # the cache of the current weights
    torch.manual_seed(3)
    sampled_whole = engine.generate(model, prompts, group_size=2)
    torch.manual_seed(3)
    sampled_after = engine.generate(model, prompts, group_size=2, prefix=prefix)
    assert sampled_after.reasoning_ids == sampled_whole.reasoning_ids
    assert min(sampled_whole.lengths) < 7 and 7 in sampled_whole.lengths
    torch.testing.assert_close(sampled_after.user_states, sampled_whole.user_states, atol=1e-4, rtol=1e-4)
    for a, b in zip(sampled_after.old_logprobs, sampled_whole.old_logprobs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="shared prefix"):
        engine.generate(model, [prompts[0][1:]], greedy=True, prefix=prefix)


@pytest.mark.parametrize("reasoning", [False, True])
def test_user_states_encode_the_shared_head_once(reasoning):
    from rrec.model.generation import policy_user_states

    model = tiny_recmodel()
    convs, _ = _prompts_with_a_shared_head(model, 7)
    prompts = model.user_prompt_ids(convs, answer=not reasoning)
    fed: list[tuple[int, ...]] = []
    hook = model.lm.get_input_embeddings().register_forward_hook(lambda _m, args, _o: fed.append(tuple(args[0].shape)))
    try:
        states, texts = policy_user_states(
            model, convs, reasoning=reasoning, max_new_tokens=4, batch_size=3, progress=False
        )
    finally:
        hook.remove()
    from rrec.model.two_headed import shared_prefix_length

    n = shared_prefix_length(prompts)
    # the head once, then per batch of 3 (sorted by length) only what follows it, padded
    by_length = sorted(prompts, key=len)
    batches = [by_length[i : i + 3] for i in range(0, len(prompts), 3)]
    assert fed[0] == (1, n)
    prompt_passes = [shape for shape in fed[1:] if shape[1] > 2]  # not a decoding or `<answer>` step
    assert prompt_passes == [(len(b), max(map(len, b)) - n) for b in batches]
    engine = HFEngine(temperature=1.0, top_k=0, max_new_tokens=4)
    for row, prompt in enumerate(prompts):
        if reasoning:
            alone = engine.generate(model, [prompt], greedy=True)
            assert texts[row] == alone.reasoning_ids[0]
            expected = alone.user_states[0]
        else:
            with torch.no_grad():
                expected = model.encode([prompt])[0].float()
        torch.testing.assert_close(states[row], expected, atol=1e-4, rtol=1e-4)
