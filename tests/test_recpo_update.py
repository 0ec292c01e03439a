"""One RecPO update as the accelerator sees it: importance ratios that start at 1 even
when the model has dropout or runs in bfloat16 (the rollout's cached decoding and the
update's full forward are different computations), and one gradient synchronisation
(one DeepSpeed engine step) per update however many micro-batches the token term takes."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from rrec.config import LoraParams
from rrec.model.item_table import ItemTable
from rrec.model.lora import apply_lora
from rrec.model.two_headed import RecModel
from rrec.train.build import assemble
from tests.test_learning import _setup


def _recpo(dropout: float, dtype: torch.dtype = torch.float32, item_warmup_steps: int = 0):
    rec, item_ids, user_ids, targets, params, engine = _setup(4)
    lm = apply_lora(rec.lm.to(dtype), LoraParams(enabled=True, r=4, alpha=8.0, dropout=dropout))
    with torch.no_grad():  # a trained adapter: a fresh one (B = 0) passes nothing through its dropout
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    rec = RecModel(lm, rec.tokenizer, tau=rec.tau)
    rec.train()
    recpo = params.train.recpo.model_copy(update={"item_warmup_steps": item_warmup_steps})
    params = params.model_copy(
        update={"train": params.train.model_copy(update={"micro_batch_size": 16, "recpo": recpo})}
    )
    with torch.no_grad():
        table = rec.encode(item_ids).float()
    training = assemble(
        params, "recpo", rec, user_prompt_ids=user_ids, histories=[[] for _ in user_ids], targets=targets,
        item_prompt_ids=item_ids, table=ItemTable(table), engine=engine, accelerator=Accelerator(cpu=True),
    )  # fmt: skip
    return training


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
def test_importance_ratios_start_at_one_with_lora_dropout(dtype, tol):
    torch.manual_seed(0)
    training = _recpo(dropout=0.5, dtype=dtype)
    stats = training.step(torch.arange(16).numpy(), 0)
    assert abs(stats["ratio_mean"] - 1.0) < tol, stats
    assert abs(stats["item_ratio_mean"] - 1.0) < tol, stats
    assert stats["clip_high"] == 0.0 and stats["clip_low"] == 0.0, stats


def test_one_gradient_synchronisation_per_update(monkeypatch):
    torch.manual_seed(0)
    training = _recpo(dropout=0.0)
    acc = training.accelerator
    synced: list[bool] = []
    backward = acc.backward
    monkeypatch.setattr(acc, "backward", lambda loss, **kw: (synced.append(acc.sync_gradients), backward(loss, **kw)))
    training.step(torch.arange(16).numpy(), 0)  # 64 trajectories: 4 token micro-batches, then the item term
    assert synced == [False, False, False, False, True]
    assert acc.sync_gradients


def test_item_warmup_trains_the_head_through_the_greedy_reasoning(monkeypatch):
    torch.manual_seed(0)
    training = _recpo(dropout=0.0, item_warmup_steps=1)
    engine, table = training.step.engine, training.step.table
    greedy: list[bool] = []
    generate = engine.generate
    monkeypatch.setattr(engine, "generate", lambda *a, **kw: (greedy.append(kw["greedy"]), generate(*a, **kw))[1])
    batch = torch.arange(16).numpy()
    targets = sorted({training.ctx.targets[i] for i in batch})
    before = table.embeddings[targets].clone()
    warm = training.step(batch, 0)
    assert greedy == [True] and "reward" not in warm and warm["loss"] > 0
    assert not torch.allclose(table.embeddings[targets], before)  # the trained rows are refreshed
    assert "reward" in training.step(torch.arange(16, 32).numpy(), 1)  # then RecPO proper
    assert greedy == [True, False]
