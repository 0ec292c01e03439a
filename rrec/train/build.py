"""The one place a training is set up, for the train stage, the benchmarks, the device
check and the tests: the policy (fresh, or started from a trained model), the train
prompts, optimiser, scheduler, accelerator, and the step of the method."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import get_constant_schedule_with_warmup

from rrec.config import METHODS, Params
from rrec.items import read_item_prompts
from rrec.model.backbone import saved_by_stage
from rrec.model.frozen_layers import FrozenItemStates, frozen_depth
from rrec.model.generation import RolloutEngine, make_engine
from rrec.model.item_table import ItemTable
from rrec.model.loading import TABLE_DIR, new_policy, start_from_trained
from rrec.model.two_headed import RecModel, shared_prefix_length
from rrec.paths import Paths
from rrec.prompts import UserPrompts, load_user_prompts
from rrec.train.steps import ContrastiveStep, RecPOStep, StepContext


def make_optimizer(model: torch.nn.Module, params: Params, method: str) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters at `method`'s learning rate; bitsandbytes'
    paged 8-bit AdamW on a GPU when it is installed (the paper's memory setting)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    lr = params.train.lr_for(method)
    if torch.cuda.is_available():
        with contextlib.suppress(ImportError):
            import bitsandbytes as bnb

            return bnb.optim.PagedAdamW8bit(trainable, lr=lr, weight_decay=params.train.weight_decay)
    return torch.optim.AdamW(trainable, lr=lr, weight_decay=params.train.weight_decay)


def new_accelerator() -> Accelerator:
    return Accelerator(cpu=not torch.cuda.is_available(), step_scheduler_with_optimizer=False)


def rollout_engine(params: Params, paths: Paths) -> RolloutEngine:
    """The rollout engine of `train.rollout`; vLLM loads the backbone by its reference
    (the folder the backbone stage saved, a Hub id or a local path)."""
    tp = params.train
    ref = str(paths.backbone) if saved_by_stage(params.model.backbone) else params.model.backbone
    return make_engine(
        tp.rollout.engine, temperature=tp.rollout.temperature, top_k=tp.rollout.top_k,
        max_new_tokens=tp.rollout.max_new_tokens, model_ref=ref,
        batch_size=max(tp.micro_batch_size, 1) * tp.rollout.group_size,
    )


@dataclass
class Training:
    """A method ready to train: `step(global_batch, step_number)` is one optimiser step."""

    method: str
    accelerator: Any
    policy: RecModel  # unwrapped
    ctx: StepContext
    step: ContrastiveStep | RecPOStep
    n_examples: int

    @property
    def reasoning(self) -> bool:
        return self.method == "recpo"


def assemble(
    params: Params,
    method: str,
    policy: RecModel,
    *,
    user_prompt_ids: list[list[int]],
    histories: list[list[int]],
    targets: list[int],
    item_prompt_ids: list[list[int]],
    table: ItemTable | None = None,
    engine: RolloutEngine | None = None,
    accelerator: Any = None,
) -> Training:
    """A training of `method` over given prompts: optimiser, scheduler, the policy
    prepared by the accelerator, and the method's step (RecPO needs the item `table`
    it rewards against and a rollout `engine`)."""
    if method not in METHODS:
        raise ValueError(f"unknown training method {method!r}; expected contrastive or recpo")
    accelerator = accelerator or new_accelerator()
    optimizer = make_optimizer(policy, params, method)
    scheduler = get_constant_schedule_with_warmup(optimizer, params.train.warmup_steps)
    model, optimizer = accelerator.prepare(policy, optimizer)
    ctx = StepContext(
        accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler, params=params,
        user_prompt_ids=user_prompt_ids, histories=histories, targets=targets, item_prompt_ids=item_prompt_ids,
    )
    if method == "recpo":
        if table is None or engine is None:
            raise ValueError("RecPO needs the item table and a rollout engine")
        step: ContrastiveStep | RecPOStep = RecPOStep(ctx, engine, table)
    else:
        step = ContrastiveStep(ctx)
    return Training(method, accelerator, policy, ctx, step, len(targets))


def starting_point(params: Params, paths: Paths, method: str) -> Path | None:
    """The trained model RecPO starts from (`train.recpo.init: contrastive`), else None."""
    if method == "recpo" and params.train.recpo.init == "contrastive":
        return paths.trained("contrastive")
    return None


def build_training(
    params: Params, paths: Paths, method: str, accelerator: Any = None
) -> tuple[Training, UserPrompts]:
    """The training of `method` on the project's train split, as the train stage runs it;
    also returns the train prompts."""
    accelerator = accelerator or new_accelerator()
    set_seed(params.train.seed)
    policy = new_policy(params, paths.backbone, device=accelerator.device)
    start = starting_point(params, paths, method)
    if start is not None:
        start_from_trained(policy, start)
    users = load_user_prompts(paths, "train")
    reasoning = method == "recpo"
    table = engine = None
    if reasoning:
        table = ItemTable.load(start / TABLE_DIR if start is not None else paths.item_table)
        engine = rollout_engine(params, paths)
    item_prompt_ids = policy.item_prompt_ids(read_item_prompts(paths.item_prompts_file))
    depth = frozen_depth(policy) if params.train.keep_frozen_item_states else 0
    if depth:
        shared = item_prompt_ids[0][: shared_prefix_length(item_prompt_ids)]
        policy.frozen_items = FrozenItemStates(depth, shared)
    training = assemble(
        params, method, policy,
        user_prompt_ids=policy.user_prompt_ids(users.conversations, answer=not reasoning),
        histories=users.histories, targets=users.targets,
        item_prompt_ids=item_prompt_ids,
        table=table, engine=engine, accelerator=accelerator,
    )
    return training, users
