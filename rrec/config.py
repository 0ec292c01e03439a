"""Typed parameters: the one schema that `params.yaml` is read through.

Every knob of the pipeline lives here, grouped by stage. Unknown keys, wrong
types and impossible values stop with a `ConfigError` naming the key.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_PARAMS = Path("params.yaml")


class ConfigError(ValueError):
    """A parameter file that cannot be used, with the offending key in the message."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


# --------------------------------------------------------------------------- data


class SampleParams(_Strict):
    """The embedded sample catalogue (written by `download` when `data.source: sample`)."""

    seed: int = 7
    n_items: int = Field(2400, ge=50)
    n_users: int = Field(3200, ge=50)
    n_genres: int = Field(12, ge=2)
    start: dt.date = dt.date(2021, 1, 1)
    months: int = Field(30, ge=2)
    mean_interactions: float = Field(9.0, gt=1.0)
    dirt_share: float = Field(0.03, ge=0.0, le=0.5)


class WindowParams(_Strict):
    """Item cleaning, the temporal window and the split (the protocol: rrec/data/window.py)."""

    end: dt.date = dt.date(2023, 6, 30)
    months: int = Field(12, ge=1)
    min_items: int = Field(1500, ge=1)
    kcore: int = Field(0, ge=0)
    max_history: int = Field(20, ge=1)
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    max_title_words: int = Field(20, ge=1)
    max_malformed_share: float = Field(0.01, ge=0.0, le=1.0)
    # Interaction lines lost to bad data (malformed, bad_rating, no_metadata) over all
    # interaction lines: above this the window stage stops (above 0.2 it warns).
    max_dropped_share: float = Field(0.5, ge=0.0, le=1.0)
    memory_limit: str = "2GB"
    threads: int = Field(2, ge=1)

    @field_validator("split")
    @classmethod
    def _split_sums_to_one(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f <= 0 for f in v):
            raise ValueError(f"split fractions must all be positive (got {list(v)})")
        if not math.isclose(sum(v), 1.0, abs_tol=1e-6):
            raise ValueError(f"split fractions must sum to 1 (got {sum(v):g} from {list(v)})")
        return v

    @field_validator("memory_limit")
    @classmethod
    def _memory_limit(cls, v: str) -> str:
        if not re.fullmatch(r"\d+(\.\d+)?\s*(KB|MB|GB|TB|KiB|MiB|GiB|TiB)", v):
            raise ValueError(f"memory_limit must look like '2GB' or '512MiB' (got {v!r})")
        return v


class DataParams(_Strict):
    source: Literal["sample", "amazon2023"] = "sample"
    category: str = "Video_Games"
    interactions: Literal["rating_only", "reviews"] = "rating_only"
    base_url: str = "https://mcauleylab.ucsd.edu/public_datasets/data/amazon_2023"
    timeout_s: float = Field(60.0, gt=0)
    retries: int = Field(3, ge=0)
    chunk_bytes: int = Field(1 << 20, ge=1024)
    sample: SampleParams = SampleParams()
    window: WindowParams = WindowParams()

    @field_validator("category")
    @classmethod
    def _category_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", v):
            raise ValueError(
                f"category must be an Amazon Reviews 2023 category name such as "
                f"'Video_Games' (letters, digits, '_' or '-'), got {v!r}"
            )
        return v

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, v: str) -> str:
        if not re.match(r"^(https?|file)://", v):
            raise ValueError(f"base_url must start with http://, https:// or file:// (got {v!r})")
        return v.rstrip("/")


# ------------------------------------------------------------------------ prompts


class PromptParams(_Strict):
    max_description_words: int = Field(100, ge=1)
    # the user prompt lists only the last N items of the history (null: all of it); the
    # history itself (masking, baselines) is data.window.max_history's
    max_history_items: int | None = Field(None, ge=1)


# -------------------------------------------------------------------------- model


PretrainFormat = Literal["prompts", "answers", "learn_answer", "last_title"]


class TinyBackboneParams(_Strict):
    """The embedded default backbone: a small Qwen2-style decoder built offline."""

    vocab_size: int = Field(4096, ge=300)
    hidden_size: int = Field(96, ge=8)
    num_layers: int = Field(3, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(256, ge=8)
    max_position: int = Field(2048, ge=64)
    pretrain_steps: int = Field(300, ge=0)
    # steps decide what is computed; past this many seconds the stage only warns
    pretrain_warn_after_s: float = Field(150.0, gt=0)
    pretrain_batch_size: int = Field(8, ge=1)
    pretrain_seq_len: int = Field(256, ge=16)
    pretrain_lr: float = Field(3e-3, gt=0)
    # what the tiny backbone is pre-trained on (rrec.model.backbone.pretrain_documents):
    # `prompts` (the prompts alone), `answers` (`<answer>` followed by the item's or the
    # next item's title, a short reasoning on half of the user documents), `learn_answer`
    # (every prompt ends with a learned `<answer>`), `last_title` (each train-split user
    # prompt is answered by the title of the user's last item, then `<answer>`)
    pretrain_format: PretrainFormat = "prompts"
    # weight of the term that keeps the final states at `<answer>` spread out
    # (rrec.model.pretrain.answer_state_mean); 0 turns it off
    pretrain_answer_spread: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyBackboneParams:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})"
            )
        return self


class LoraParams(_Strict):
    # off for the tiny default: on a 0.5 M-parameter decoder, rank-8 LoRA left the
    # contrastive loss at ln(batch) for 300 steps where full fine-tuning learned
    # (README, "Choices"); turn it on for a real backbone
    enabled: bool = False
    r: int = Field(8, ge=1)
    # adapters on the last N decoder layers only (null: all): the layers below get no
    # gradient, so the backward pass stops at the first adapted layer
    layers: int | None = Field(None, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    ]


class ModelParams(_Strict):
    # tiny (built offline), a packaged name (smollm2-135m), a Hub id or a local folder
    backbone: str = "tiny"
    tiny: TinyBackboneParams = TinyBackboneParams()
    lora: LoraParams = LoraParams()
    tau: float = Field(0.02, gt=0)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_prompt_tokens: int = Field(1024, ge=16)
    # torch.compile the decoder of trained policies loaded for evaluation and serving:
    # about half the CPU time per decoding step, after a one-off compilation per process
    compile: bool = False
    # a greedy request on its own (serving) is decoded by the decoder exported with
    # torch.export and compiled ahead of time by AOTInductor: no Python or guard checks
    # per step; built on first use (~15 s on CPU, needs a C++ compiler)
    aot_single_requests: bool = False
    # the backbone's end of turn (e.g. <|im_end|>) also ends the reasoning, which then
    # gets `<answer>` appended; null: on for every backbone but the tiny one, whose
    # reasoning ends only at <answer> or the token budget
    reasoning_ends_at_end_of_turn: bool | None = None

    @property
    def end_of_turn_stops(self) -> bool:
        if self.reasoning_ends_at_end_of_turn is not None:
            return self.reasoning_ends_at_end_of_turn
        return self.backbone != "tiny"


# -------------------------------------------------------------------------- items


class ItemsParams(_Strict):
    batch_size: int = Field(64, ge=1)
    chunk_size: int = Field(512, ge=1)


# -------------------------------------------------------------------------- train


class RolloutParams(_Strict):
    engine: Literal["hf", "vllm"] = "hf"
    group_size: int = Field(4, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(200, ge=0)
    max_new_tokens: int = Field(8, ge=1)


class RecPOParams(_Strict):
    beta: float = Field(0.05, ge=0.0, le=1.0)
    advantage: Literal["grpo", "rloo"] = "grpo"
    eps_low: float = Field(0.2, ge=0.0, lt=1.0)
    eps_high: float = Field(0.28, ge=0.0)
    item_topk: int = Field(1, ge=1)
    # the item term's advantage in a group whose rewards all tie (0 = the plain GRPO
    # zero: no item gradient; 1 = contrastive learning on that group's trajectory)
    tie_item_advantage: float = Field(1.0, ge=0.0)
    # where the policy starts: the backbone, or the trained contrastive model (models/
    # trained/contrastive, its weights and item table), as RL starts from a supervised model
    init: Literal["backbone", "contrastive"] = "contrastive"
    ndcg_cutoff: int = Field(1000, ge=1)
    # a cap on RecPO's optimiser steps on top of train.max_steps: a RecPO step samples
    # group_size reasonings per user, so it costs many contrastive steps
    max_steps: int | None = Field(150, ge=1)
    # RecPO's learning rate (null: train.lr). RL fine-tunes a trained model, whose
    # state a supervised rate can knock off (docs/learning.md)
    lr: float | None = Field(1e-4, gt=0)
    # the first N of those steps train only the recommendation head, with the contrastive
    # loss on h_u read after the greedy reasoning (what evaluation reads), before RL
    item_warmup_steps: int = Field(25, ge=0)


METHODS = ("contrastive", "recpo")  # the LLM training methods; dvc.yaml trains them in this order


class TrainParams(_Strict):
    # the methods `dvc repro` evaluates (one `evaluate@<method>` stage each; dvc.yaml
    # trains both, recpo after contrastive since it may start from it);
    # "contrastive" is the paper's "w/o reasoning" row
    methods: list[Literal["recpo", "contrastive"]] = ["contrastive", "recpo"]
    seed: int = 0
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0)
    batch_size: int = Field(16, ge=2)
    micro_batch_size: int = Field(32, ge=1)
    epochs: int = Field(3, ge=1)
    max_steps: int | None = Field(600, ge=1)
    eval_every: int = Field(50, ge=1)
    # validation during training: every example of this many seeded random users
    # (null: the whole valid split)
    eval_max_users: int | None = Field(None, ge=1)
    # each evaluation also scores the fused reward of every train example of this many
    # seeded train users (0: none): a training reward comparable across steps
    reward_probe_users: int = Field(256, ge=0)
    # with LoRA on the last layers only (model.lora.layers), keep every item prompt's
    # states below them in memory (items x prompt tokens x hidden size floats), so that
    # re-encoding the table runs only the trained layers (rrec/model/frozen_layers.py)
    keep_frozen_item_states: bool = True
    patience: int = Field(2, ge=1)
    # no early stopping before this step: the contrastive loss sits at ln(batch) for its
    # first 150-200 steps, and patience alone would stop it there
    min_steps: int = Field(300, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(50, ge=1)
    eval_samples: int = Field(8, ge=0)
    # subtract log(train frequency) of each in-batch target column from its score while
    # training (sampled-softmax bias correction): in-batch negatives are drawn in
    # proportion to popularity, and without it the model learns to demote popular items.
    # On for real data (popularity-skewed); off for the embedded sample, whose popularity
    # is nearly flat and where it made training unstable (docs/learning.md)
    logq_correction: bool = False
    rollout: RolloutParams = RolloutParams()
    recpo: RecPOParams = RecPOParams()

    def steps_for(self, method: str) -> int | None:
        """The step budget of `method`: train.max_steps, capped by recpo.max_steps for RecPO."""
        caps = [s for s in (self.max_steps, self.recpo.max_steps if method == "recpo" else None) if s is not None]
        return min(caps) if caps else None

    def lr_for(self, method: str) -> float:
        """The learning rate of `method`: train.lr, or recpo.lr for RecPO when set."""
        return self.recpo.lr if method == "recpo" and self.recpo.lr is not None else self.lr

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"methods must be a non-empty list without repeats (got {v})")
        return v


# ----------------------------------------------------------------------- evaluate


class EvaluateParams(_Strict):
    ks: list[int] = [5, 10, 20]
    batch_size: int = Field(64, ge=1)
    max_new_tokens: int = Field(8, ge=1)
    # every example of this many seeded random users (params.seed), the same for every
    # method; null: the whole split
    max_users: int | None = Field(None, ge=1)

    @field_validator("ks")
    @classmethod
    def _ks(cls, v: list[int]) -> list[int]:
        if not v or any(k < 1 for k in v):
            raise ValueError(f"ks must be a non-empty list of positive cut-offs (got {v})")
        return sorted(set(v))


# ---------------------------------------------------------------------- baselines


class SASRecParams(_Strict):
    hidden: int = Field(64, ge=4)
    layers: int = Field(2, ge=1)
    heads: int = Field(2, ge=1)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)


class GRU4RecParams(_Strict):
    hidden: int = Field(64, ge=4)
    layers: int = Field(1, ge=1)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)


class CaserParams(_Strict):
    hidden: int = Field(64, ge=4)
    n_vertical: int = Field(4, ge=1)
    n_horizontal: int = Field(16, ge=1)
    dropout: float = Field(0.3, ge=0.0, lt=1.0)
    window: int = Field(5, ge=1)  # L: the convolutions see the last L items


class BaselinesParams(_Strict):
    models: list[Literal["sasrec", "gru4rec", "caser"]] = ["sasrec", "gru4rec", "caser"]
    seed: int = 0
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    patience: int = Field(3, ge=1)
    # epochs and patience decide what is computed; past this many seconds a model only warns
    warn_after_s: float = Field(60.0, gt=0)
    # CPU intra-op threads while training (0 keeps torch's default); these models are
    # small, and two spinning threads on a busy 2-core machine run ~10x slower than one
    threads: int = Field(1, ge=0)
    sasrec: SASRecParams = SASRecParams()
    gru4rec: GRU4RecParams = GRU4RecParams()
    caser: CaserParams = CaserParams()


# ----------------------------------------------------------------------- tracking


class TrackingParams(_Strict):
    experiment: str = "rrec"


class Params(_Strict):
    seed: int = 0
    # torch's CPU threads in the stages that compute with the model (backbone, items,
    # train, evaluate). Float sums are split by thread, so the count changes results in
    # the last bits and, through sampling, RecPO's trajectories: it is a param, not a
    # property of the machine. No effect on GPU kernels.
    threads: int = Field(2, ge=1)
    data: DataParams = DataParams()
    prompts: PromptParams = PromptParams()
    model: ModelParams = ModelParams()
    items: ItemsParams = ItemsParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    baselines: BaselinesParams = BaselinesParams()
    tracking: TrackingParams = TrackingParams()

    def flat(self) -> dict[str, Any]:
        """Dotted-key view, for logging to MLflow."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value

        walk("", self.model_dump(mode="json"))
        return out


def _format_error(source: str, err: ValidationError) -> str:
    lines = [f"{source}: invalid parameters"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling against params.yaml / rrec/config.py)"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {p} is not a section")
    node[parts[-1]] = value


def parse_params(raw: dict[str, Any] | None, source: str = "params") -> Params:
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise ConfigError(_format_error(source, err)) from None


def load_params(
    path: str | Path = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None
) -> Params:
    """Read and validate a params file; `overrides` maps dotted keys to values."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: parameter file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    _refuse_bare_dates(raw, path)
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    return parse_params(raw, str(path))


def _bare_dates(node: Any, prefix: str = "") -> list[tuple[str, dt.date]]:
    if isinstance(node, dict):
        return [d for k, v in node.items() for d in _bare_dates(v, f"{prefix}{k}.")]
    if isinstance(node, list):
        return [d for i, v in enumerate(node) for d in _bare_dates(v, f"{prefix}{i}.")]
    return [(prefix.rstrip("."), node)] if isinstance(node, dt.date) else []


def _refuse_bare_dates(raw: dict[str, Any], path: Path) -> None:
    """DVC cannot read a date that YAML parsed as a date (`dvc repro` stops with "unexpected
    error ... Unsupported value of type 'date'"), so every stage refuses it too."""
    found = _bare_dates(raw)
    if found:
        fixes = ", ".join(f"{key.rsplit('.', 1)[-1]}: '{value.isoformat()}'" for key, value in found)
        keys = ", ".join(key for key, _ in found)
        raise ConfigError(
            f"{path}: quote the date{'s' if len(found) > 1 else ''} ({fixes}): {keys} "
            f"{'are' if len(found) > 1 else 'is'} written as a bare date, which DVC cannot read "
            f"(dvc repro stops with \"unexpected error - Unsupported value of type 'date'\")"
        )


if __name__ == "__main__":
    import sys

    # `python -m rrec.config [params.yaml]`: the check DVC's own message does not give.
    target = Path(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_PARAMS)
    try:
        load_params(target)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"{target}: valid")
