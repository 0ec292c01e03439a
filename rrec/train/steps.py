"""One optimiser step of each method: the contrastive baseline and RecPO (docs/method.md).

Both take the indices of the *global* batch; each process works on its share of the
users and encodes its share of the batch's (deduplicated) target items, and the item
states are all-gathered with their gradient so the in-batch softmax spans the whole
global batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rrec.config import Params
from rrec.metrics import pad_histories
from rrec.model.generation import Rollout, RolloutEngine, reasoning_logprobs
from rrec.model.item_table import ItemTable
from rrec.model.two_headed import RecModel
from rrec.train.distributed import gather_no_grad, gather_with_grad, share
from rrec.train.objectives import (
    contrastive_loss,
    dedupe_targets,
    group_advantages,
    inbatch_logprob,
    inbatch_reward,
    item_loss,
    rewards,
    select_topk,
    target_log_frequency,
    tied_group_fallback,
    token_loss,
)


@dataclass
class StepContext:
    """What a step needs besides the batch."""

    accelerator: Any
    model: Any  # the prepared (possibly DDP-wrapped) RecModel
    optimizer: torch.optim.Optimizer
    scheduler: Any
    params: Params
    user_prompt_ids: list[list[int]]  # per train example
    histories: list[list[int]]
    targets: list[int]
    item_prompt_ids: list[list[int]]  # per item id
    _log_q: torch.Tensor | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.params.train.logq_correction:
            self._log_q = target_log_frequency(torch.tensor(self.targets, dtype=torch.long), len(self.item_prompt_ids))

    def column_log_q(self, items: list[int]) -> torch.Tensor | None:
        """The logQ correction of the in-batch columns `items` (None when it is off)."""
        if self._log_q is None:
            return None
        return self._log_q[torch.tensor(items, dtype=torch.long)].to(self.accelerator.device)

    @property
    def policy(self) -> RecModel:
        return self.accelerator.unwrap_model(self.model)

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    def local_users(self, batch: np.ndarray) -> list[int]:
        if len(batch) % self.world:
            raise ValueError(
                f"train.batch_size ({len(batch)}) must be divisible by the number of processes ({self.world})"
            )
        per = len(batch) // self.world
        rank = self.accelerator.process_index
        return [int(i) for i in batch[rank * per : (rank + 1) * per]]

    def batch_targets(self, batch: np.ndarray) -> tuple[list[int], dict[int, int], list[int]]:
        """(unique target items of the global batch, item -> column, this process's share)."""
        uniq, _ = dedupe_targets(torch.tensor([self.targets[int(i)] for i in batch]))
        items = uniq.tolist()
        return items, {it: j for j, it in enumerate(items)}, share(items, self.accelerator.process_index, self.world)

    def encode_items_no_grad(self, items: list[int], mine: list[int]) -> torch.Tensor:
        policy = self.policy
        was = policy.training
        policy.eval()
        with torch.no_grad():
            states = policy.encode_items([self.item_prompt_ids[i] for i in mine]).float()
        policy.train(was)
        return gather_no_grad(states, self.world)[: len(items)]

    @contextmanager
    def accumulating(self) -> Iterator[None]:
        """Forward and backward passes whose gradients add up to one optimiser step
        with those of a later, synchronising backward. accelerate steps a DeepSpeed
        engine on every backward that syncs gradients, and DDP all-reduces on it, so
        inside this block neither happens (the Hugging Face Trainer sets the same flag
        under gradient accumulation)."""
        acc = self.accelerator
        acc.gradient_state._set_sync_gradients(False)
        try:
            with acc.no_sync(self.model):
                yield
        finally:
            acc.gradient_state._set_sync_gradients(True)

    def optimiser_step(self) -> float:
        acc = self.accelerator
        grad_norm = acc.clip_grad_norm_(
            [p for p in self.model.parameters() if p.requires_grad], self.params.train.max_grad_norm
        )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        # DeepSpeed clips inside its engine and reports no norm here
        return float("nan") if grad_norm is None else float(grad_norm)

    def mean(self, value: torch.Tensor | float) -> float:
        t = torch.as_tensor(value, dtype=torch.float32, device=self.accelerator.device).detach()
        return float(self.accelerator.reduce(t, "mean")) if self.world > 1 else float(t)


class ContrastiveStep:
    """In-batch softmax cross-entropy between `h_u` at `<answer>` appended to the user
    prompt (no reasoning) and the batch's target item states (paper eq. 1). With a
    `reasoning` engine, `h_u` is read after the policy's greedy reasoning instead (RecPO's
    item warm-up)."""

    table = None  # no item table: the in-batch targets are encoded at every step

    def __init__(self, ctx: StepContext, reasoning: RolloutEngine | None = None) -> None:
        self.ctx = ctx
        self.reasoning = reasoning

    def __call__(self, batch: np.ndarray, step: int) -> dict[str, float]:
        ctx = self.ctx
        local = ctx.local_users(batch)
        items, column, mine = ctx.batch_targets(batch)
        if self.reasoning is None:
            users_seqs = [ctx.user_prompt_ids[i] for i in local]
        else:
            self.reasoning.sync_weights(ctx.policy)
            roll = self.reasoning.generate(ctx.policy, [ctx.user_prompt_ids[i] for i in local], group_size=1, greedy=True)
            users_seqs = roll.sequences(ctx.policy.answer_token_id)
        seqs = users_seqs + [ctx.item_prompt_ids[i] for i in mine]
        ids, mask = ctx.policy.pad(seqs)
        states = ctx.model(ids, mask)
        users, item_states = states[: len(local)], gather_with_grad(states[len(local) :], ctx.world)[: len(items)]
        target_index = torch.tensor([column[ctx.targets[i]] for i in local], device=users.device)
        loss = contrastive_loss(users, item_states, target_index, ctx.params.model.tau, ctx.column_log_q(items))
        r_inbatch = inbatch_reward(users.detach(), item_states.detach(), target_index, ctx.params.model.tau, ctx.params.train.recpo.beta)
        ctx.accelerator.backward(loss)
        grad_norm = ctx.optimiser_step()
        return {
            "loss": ctx.mean(loss), "inbatch_reward": ctx.mean(r_inbatch.mean()), "grad_norm": grad_norm,
            "lr": ctx.scheduler.get_last_lr()[0],
        }


def without_dropout(model: torch.nn.Module) -> None:
    """Set every dropout of `model` to 0: dropout layers (LoRA's among them) and the
    attention dropout that Hugging Face attention modules keep as a float."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


@dataclass
class Experience:
    """What RecPO collects for one global batch before it updates: the rollout
    (sequences, old log-probabilities, user states), rewards with their parts,
    advantages, and the old in-batch item log-probabilities of the targets."""

    rollout: Rollout
    local: list[int]  # this process's train examples
    rewards: torch.Tensor  # [B*G] fused reward
    reward_d: torch.Tensor  # [B*G] discrete (NDCG) part
    reward_c: torch.Tensor  # [B*G] continuous (softmax) part
    advantages: torch.Tensor  # [B*G]
    group_index: torch.Tensor  # [B*G] the user (group) of each trajectory
    items: list[int]  # the global batch's unique target items
    mine: list[int]  # this process's share of them
    target_index: torch.Tensor  # [B*G] column of each trajectory's target in `items`
    old_item_logprob: torch.Tensor  # [B*G] log pi_old(target | x, o), in-batch softmax
    inbatch_reward: torch.Tensor  # [B*G] the reward formula over the batch's targets
    log_q: torch.Tensor | None  # [M] the logQ correction of the `items` columns, if on


class RecPOStep:
    """Sample G reasonings per user, reward them against the full catalogue, and update
    the token term on every trajectory plus the item term on the best ones; in two
    phases, `collect` then `update`, as GRPO trainers read."""

    def __init__(self, ctx: StepContext, engine: RolloutEngine, table: ItemTable) -> None:
        self.ctx = ctx
        self.engine = engine
        self.table = table  # rows of trained targets refreshed after each step
        # the update recomputes what the rollout computed without dropout (generation
        # runs in eval mode): with dropout on, the importance ratios would start away from 1
        without_dropout(ctx.policy)
        # train.recpo.item_warmup_steps: the head first learns to read <answer> after the
        # greedy reasoning that evaluation reads, as a supervised stage precedes RL
        self.item_warmup = ContrastiveStep(ctx, reasoning=engine)

    def __call__(self, batch: np.ndarray, step: int) -> dict[str, float]:
        if step < self.ctx.params.train.recpo.item_warmup_steps:
            logs = self.item_warmup(batch, step)
            items, _, mine = self.ctx.batch_targets(batch)
            self.refresh_table(items, mine)
            return logs
        return self.update(self.collect(batch))

    def refresh_table(self, items: list[int], mine: list[int]) -> None:
        """Re-encode the rows of the batch's target items with the updated policy, so the
        next rewards see them (step 5)."""
        self.table.update_rows(items, self.ctx.encode_items_no_grad(items, mine).cpu())

    @torch.no_grad()
    def collect(self, batch: np.ndarray) -> Experience:
        """Sample (1), reward (2) and advantage (3) for the global `batch`."""
        ctx = self.ctx
        p = ctx.params
        tp = p.train.recpo
        device = ctx.accelerator.device
        local = ctx.local_users(batch)
        g = p.train.rollout.group_size
        # an engine with weights of its own samples from the policy as it is now (the
        # first step, after an update, after a resume)
        self.engine.sync_weights(ctx.policy)
        roll = self.engine.generate(ctx.policy, [ctx.user_prompt_ids[i] for i in local], group_size=g, greedy=False)
        targets = torch.tensor([ctx.targets[i] for i in local for _ in range(g)])
        history = pad_histories([ctx.histories[i] for i in local for _ in range(g)])
        users = roll.user_states.to(device)
        r, r_d, r_c = rewards(
            users, self.table.embeddings.to(device), targets.to(device), history.to(device), p.model.tau, tp.beta, tp.ndcg_cutoff,
        )
        # pi_old(target | x, o): in-batch softmax with item states of the policy that sampled
        items, column, mine = ctx.batch_targets(batch)
        target_index = torch.tensor([column[int(t)] for t in targets], device=device)
        old_items = ctx.encode_items_no_grad(items, mine).to(device)
        log_q = ctx.column_log_q(items)
        return Experience(
            rollout=roll, local=local, rewards=r, reward_d=r_d, reward_c=r_c,
            advantages=group_advantages(r, g, tp.advantage),
            group_index=torch.arange(len(local), device=device).repeat_interleave(g),
            items=items, mine=mine, target_index=target_index,
            old_item_logprob=inbatch_logprob(users, old_items, target_index, p.model.tau, log_q),
            inbatch_reward=inbatch_reward(users, old_items, target_index, p.model.tau, tp.beta),
            log_q=log_q,
        )

    def update(self, exp: Experience) -> dict[str, float]:
        """The token term over every trajectory (4a) and the item term on the selected
        ones (4b), one optimiser step, then the batch's table rows refreshed (5)."""
        ctx = self.ctx
        p = ctx.params
        rp, tp = p.train.rollout, p.train.recpo
        policy = ctx.policy
        device = ctx.accelerator.device
        roll, adv = exp.rollout, exp.advantages
        n, g = len(roll.reasoning_ids), rp.group_size

        # 4a. token term over every trajectory, in micro-batches (global token mean)
        seqs = roll.sequences(policy.answer_token_id)
        trained_tokens = [len(lp) for lp in roll.old_logprobs]
        total = max(sum(trained_tokens), 1)
        mb = p.train.micro_batch_size
        tok_loss_sum, clip_hi, clip_lo, ratio_sum = 0.0, 0.0, 0.0, 0.0
        for start in range(0, n, mb):
            rows = list(range(start, min(start + mb, n)))
            n_tok = [trained_tokens[i] for i in rows]
            if sum(n_tok) == 0:
                continue
            weight = sum(n_tok) / total
            with ctx.accumulating():  # the item term's backward below steps
                new_lp, mask, old_lp = self._aligned_logprobs(seqs, roll, rows, rp.temperature, device)
                loss, stats = token_loss(new_lp, old_lp, adv[rows], mask, tp.eps_low, tp.eps_high, average="global")
                ctx.accelerator.backward(loss * weight)
            tok_loss_sum += loss.item() * weight
            clip_hi += float(stats["clip_high"]) * weight
            clip_lo += float(stats["clip_low"]) * weight
            ratio_sum += float(stats["ratio_mean"]) * weight

        # 4b. item term on the top-advantage trajectory of each group (tied groups: see
        # tied_group_fallback)
        item_adv = tied_group_fallback(adv, exp.rewards, g, tp.tie_item_advantage)
        sel = select_topk(item_adv, exp.group_index, tp.item_topk).nonzero().flatten().tolist()
        sel_seqs = [seqs[i] for i in sel] + [ctx.item_prompt_ids[i] for i in exp.mine]
        ids, mask = policy.pad(sel_seqs)
        states = ctx.model(ids, mask)
        users, item_states = states[: len(sel)], gather_with_grad(states[len(sel) :], ctx.world)[: len(exp.items)]
        i_loss, i_stats = item_loss(
            users, item_states, exp.target_index[sel], exp.group_index[sel], item_adv[sel], exp.old_item_logprob[sel],
            p.model.tau, tp.eps_low, tp.eps_high, topk=tp.item_topk, log_q=exp.log_q,
        )
        ctx.accelerator.backward(i_loss)
        grad_norm = ctx.optimiser_step()

        self.refresh_table(exp.items, exp.mine)  # 5.

        lengths = torch.tensor(roll.lengths, dtype=torch.float32)
        return {
            "reward": ctx.mean(exp.rewards.mean()),
            "reward_d": ctx.mean(exp.reward_d.mean()),
            "reward_c": ctx.mean(exp.reward_c.mean()),
            "inbatch_reward": ctx.mean(exp.inbatch_reward.mean()),
            "adv_mean": ctx.mean(adv.mean()),
            "adv_std": ctx.mean(adv.std()) if n > 1 else 0.0,
            "adv_abs_mean": ctx.mean(adv.abs().mean()),
            "token_loss": ctx.mean(tok_loss_sum),
            "item_loss": ctx.mean(i_loss),
            "loss": ctx.mean(tok_loss_sum + i_loss.item()),
            "clip_high": ctx.mean(clip_hi),
            "clip_low": ctx.mean(clip_lo),
            "ratio_mean": ctx.mean(ratio_sum),
            "item_ratio_mean": ctx.mean(i_stats["ratio_mean"]),
            "reasoning_len": ctx.mean(lengths.mean()),
            "sampled_answer_share": ctx.mean(sum(roll.sampled_answer) / n),
            "grad_norm": grad_norm,
            "lr": ctx.scheduler.get_last_lr()[0],
        }

    def _aligned_logprobs(
        self, seqs: list[list[int]], roll: Any, rows: list[int], temperature: float, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """New and old log-probs of the trained tokens of `rows`, [n, K] aligned at the
        end of each trajectory, with the mask of trained tokens."""
        n_trained = [len(roll.old_logprobs[i]) for i in rows]
        new, mask, _ = reasoning_logprobs(
            self.ctx.policy, [seqs[i] for i in rows], n_trained, [not roll.sampled_answer[i] for i in rows],
            temperature, forward=self.ctx.model,
        )
        old = torch.zeros_like(new)
        for r, nt in enumerate(n_trained):
            if nt:
                old[r, -nt:] = roll.old_logprobs[rows[r]].to(device)
        return new, mask, old
