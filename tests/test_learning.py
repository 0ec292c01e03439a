"""The recommender must learn: a short RecPO training on a small fixture raises the
reward and beats the untrained model, with the item term alone and with both terms.

The fixture is a catalogue of 24 items, each about one topic word; a user's prompt
names the topic of the item they buy next, among distractor words. A model that
learns anything maps the user's `<answer>` state near that item's. A change that
stops the recommendation head from learning (a zero advantage, a detached state, a
wrong column) leaves the held-out NDCG at the untrained level and fails here.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from rrec.config import TinyBackboneParams, parse_params
from rrec.metrics import pad_histories, ranking_metrics, target_ranks
from rrec.model.backbone import build_tiny_model
from rrec.model.generation import HFEngine
from rrec.model.item_table import ItemTable, score
from rrec.model.tokenizer import train_tokenizer
from rrec.model.two_headed import RecModel
from rrec.train.build import assemble
from rrec.train.loop import epoch_batches
from rrec.train.objectives import (
    dedupe_targets,
    group_advantages,
    inbatch_logprob,
    inbatch_reward,
    item_loss,
    tied_group_fallback,
)

TOPICS = [f"topic{chr(97 + i)}{chr(97 + (7 * i) % 26)}" for i in range(24)]
FILLER = "likes games music books films sports puzzles racing".split()


def _fixture(seed: int = 0):
    rng = random.Random(seed)
    items = [[{"role": "user", "content": f"Item about {t}"}] for t in TOPICS]
    users, targets = [], []
    for _ in range(400):
        target = rng.randrange(len(TOPICS))
        words = [rng.choice(FILLER) for _ in range(4)] + [TOPICS[target]]
        rng.shuffle(words)
        users.append([{"role": "user", "content": "User " + " ".join(words)}])
        targets.append(target)
    return items, users, targets


def _model(items, users) -> RecModel:
    tok = train_tokenizer(items + users, vocab_size=400, model_max_length=256)
    tiny = TinyBackboneParams(
        vocab_size=400, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
        intermediate_size=64, max_position=256,
    )  # fmt: skip
    lm = build_tiny_model(tiny, tok, seed=0)
    lm.train()
    return RecModel(lm, tok, tau=0.1)


def _heldout_ndcg(rec: RecModel, item_ids, users, targets, engine: HFEngine) -> float:
    rec.eval()
    with torch.no_grad():
        table = rec.encode(item_ids)
        states = engine.generate(rec, users, group_size=1, greedy=True).user_states
    rec.train()
    ranks = target_ranks(score(states, table, rec.tau), torch.tensor(targets), pad_histories([[] for _ in targets]))
    return ranking_metrics(ranks, ks=(10,))["ndcg@10"]


def _setup(max_new_tokens: int, item_warmup_steps: int = 0):
    torch.manual_seed(0)
    items, users, targets = _fixture()
    rec = _model(items, users)
    item_ids = rec.item_prompt_ids(items)
    user_ids = rec.user_prompt_ids(users)
    params = parse_params({
        "model": {"tau": 0.1},
        "train": {"lr": 3e-3, "warmup_steps": 0, "batch_size": 16, "micro_batch_size": 64,
                  "recpo": {"item_warmup_steps": item_warmup_steps},
                  "rollout": {"group_size": 4, "temperature": 1.0, "top_k": 0, "max_new_tokens": max_new_tokens}},
    })  # fmt: skip
    engine = HFEngine(temperature=1.0, top_k=0, max_new_tokens=max_new_tokens, batch_size=64)
    return rec, item_ids, user_ids, targets, params, engine


@pytest.mark.parametrize(("max_new_tokens", "item_warmup_steps"), [(1, 0), (4, 0), (4, 10)])
def test_recpo_learns(max_new_tokens, item_warmup_steps):
    """Full RecPO steps (sampling, reward, both terms, table refresh): the in-batch
    reward rises and held-out NDCG@10 beats the untrained model's clearly, with and
    without the item warm-up's first steps."""
    rec, item_ids, user_ids, targets, params, engine = _setup(max_new_tokens, item_warmup_steps)
    train, held = range(0, 320), range(320, 400)
    held_users, held_targets = [user_ids[i] for i in held], [targets[i] for i in held]
    before = _heldout_ndcg(rec, item_ids, held_users, held_targets, engine)
    with torch.no_grad():
        table = rec.encode(item_ids).float()
    # set up by the train stage's own builder
    step = assemble(
        params, "recpo", rec, user_prompt_ids=[user_ids[i] for i in train], histories=[[] for _ in train],
        targets=[targets[i] for i in train], item_prompt_ids=item_ids, table=ItemTable(table), engine=engine,
        accelerator=Accelerator(cpu=True),
    ).step
    rewards = []
    batches = [b for epoch in range(3) for b in epoch_batches(len(train), 16, 0, epoch)][:60]
    for i, batch in enumerate(batches):
        rewards.append(step(batch, i)["inbatch_reward"])
    after = _heldout_ndcg(rec, item_ids, held_users, held_targets, engine)
    assert np.mean(rewards[-10:]) > np.mean(rewards[:10]) + 0.05, rewards
    assert after > before + 0.15, (before, after)


def test_item_term_alone_learns():
    """The item term by itself (empty reasoning: every group ties, so the fallback
    advantage trains the selected trajectory) raises the in-batch reward and beats the
    untrained model; with the plain zero advantage of a tied group it cannot move."""
    rec, item_ids, user_ids, targets, params, engine = _setup(1)
    answer = rec.answer_token_id
    prompts = [ids + [answer] for ids in user_ids]
    opt = torch.optim.AdamW([p for p in rec.parameters() if p.requires_grad], lr=3e-3)
    held_users, held_targets = user_ids[320:], targets[320:]
    before = _heldout_ndcg(rec, item_ids, held_users, held_targets, engine)
    g, rewards = 4, []
    for batch in [b for epoch in range(3) for b in epoch_batches(320, 16, 0, epoch)][:40]:
        uniq, col = dedupe_targets(torch.tensor([targets[i] for i in batch]))
        seqs = [prompts[i] for i in batch] + [item_ids[i] for i in uniq.tolist()]
        states = rec.encode(seqs)
        users, items = states[: len(batch)].repeat_interleave(g, 0), states[len(batch) :]
        index = col.repeat_interleave(g)
        r = inbatch_reward(users.detach(), items.detach(), index, 0.1, 0.05)
        rewards.append(float(r.mean()))
        adv = tied_group_fallback(group_advantages(r, g), r, g, 1.0)
        old = inbatch_logprob(users.detach(), items.detach(), index, 0.1)
        loss, _ = item_loss(users, items, index, torch.arange(len(batch)).repeat_interleave(g), adv, old, 0.1, 0.2, 0.28)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _heldout_ndcg(rec, item_ids, held_users, held_targets, engine)
    assert np.mean(rewards[-10:]) > np.mean(rewards[:10]) + 0.1, rewards
    assert after > before + 0.2, (before, after)
    # the plain GRPO zero for a tied group: no gradient at all
    opt.zero_grad()
    states = rec.encode(seqs)
    users, items = states[: len(batch)].repeat_interleave(g, 0), states[len(batch) :]
    adv = tied_group_fallback(group_advantages(r, g), r, g, 0.0)
    loss, _ = item_loss(users, items, index, torch.arange(len(batch)).repeat_interleave(g), adv, old, 0.1, 0.2, 0.28)
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in rec.parameters())


@pytest.mark.parametrize(("method", "expected"), [("contrastive", 3e-3), ("recpo", 5e-4)])
def test_each_method_trains_at_its_learning_rate(method, expected):
    rec, item_ids, user_ids, targets, params, engine = _setup(1)
    params = params.model_copy(update={"train": params.train.model_copy(
        update={"recpo": params.train.recpo.model_copy(update={"lr": 5e-4})})})
    training = assemble(
        params, method, rec, user_prompt_ids=user_ids, histories=[[] for _ in user_ids], targets=targets,
        item_prompt_ids=item_ids, table=ItemTable(torch.zeros(len(item_ids), 32)), engine=engine,
        accelerator=Accelerator(cpu=True),
    )  # fmt: skip
    assert [g["initial_lr"] for g in training.ctx.optimizer.param_groups] == [expected]
