"""Loading the policy: the backbone with a fresh LoRA adapter to train, or the trained one.

`models/trained/<method>/` (the train stage's output) holds everything a trained policy is:
`adapter/` (peft LoRA weights, or full weights when LoRA is off), `tokenizer/`,
`item_table/` (the item-embedding table encoded by the final policy) and
`train_summary.json` (method, best step, metrics, MLflow run id).
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file

from rrec.config import Params
from rrec.model.backbone import load_model_and_tokenizer
from rrec.model.item_table import ItemTable
from rrec.model.lora import apply_lora, load_adapter
from rrec.model.two_headed import RecModel

ADAPTER_DIR = "adapter"
TOKENIZER_DIR = "tokenizer"
TABLE_DIR = "item_table"
TRAIN_SUMMARY = "train_summary.json"


def new_policy(params: Params, backbone_dir: Path, device: torch.device | str | None = None) -> RecModel:
    """The backbone in `backbone_dir` with a fresh LoRA adapter (seeded), in train mode."""
    torch.manual_seed(params.train.seed)
    lm, tok = load_model_and_tokenizer(params, backbone_dir, device=device)
    lm = apply_lora(lm, params.model.lora)
    lm.train()
    return RecModel(
        lm, tok, tau=params.model.tau, max_prompt_tokens=params.model.max_prompt_tokens,
        end_of_turn_stops=params.model.end_of_turn_stops,
    )  # fmt: skip


def start_from_trained(rec: RecModel, trained: Path) -> None:
    """Load another method's trained weights into a fresh policy (`new_policy`) in place:
    RecPO starting from the contrastive model, as RL usually starts from a supervised
    model. LoRA adapters load into the fresh adapter; full weights into the model."""
    adapter = trained / ADAPTER_DIR
    if (adapter / "adapter_model.safetensors").exists():
        if not isinstance(rec.lm, PeftModel):
            raise ValueError(f"{adapter} is a LoRA adapter but model.lora.enabled is false; train both methods alike")
        set_peft_model_state_dict(rec.lm, load_file(str(adapter / "adapter_model.safetensors")))
        return
    if not (adapter / "model.safetensors").exists():
        raise FileNotFoundError(f"{adapter}: no trained weights; run `dvc repro train@contrastive` first")
    if isinstance(rec.lm, PeftModel):
        raise ValueError(f"{adapter} holds full weights but model.lora.enabled is true; train both methods alike")
    result = rec.lm.load_state_dict(load_file(str(adapter / "model.safetensors")), strict=False)
    tied = set(getattr(rec.lm, "_tied_weights_keys", None) or []) | {"lm_head.weight"}
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise ValueError(f"{adapter}: weights do not fit the backbone (missing {missing}, unexpected {result.unexpected_keys})")


def policy_from_adapter(
    params: Params, backbone_dir: Path, adapter_dir: Path | None, device: torch.device | str | None = None
) -> RecModel:
    """A trained policy for inference (`adapter_dir` None: the backbone as it is, zero-shot):
    a LoRA adapter is merged into the weights, which
    gives the same outputs without LoRA's extra matmuls at every linear layer; with
    `model.compile` the decoder is compiled (`RecModel.compile_decoder`); with
    `model.aot_single_requests` single greedy requests use `RecModel.aot_decoder`."""
    lm, tok = load_model_and_tokenizer(params, backbone_dir, device=device)
    if adapter_dir is not None:
        lm = load_adapter(lm, adapter_dir)
    if isinstance(lm, PeftModel):
        lm = lm.merge_and_unload()
    lm.eval()
    rec = RecModel(
        lm, tok, tau=params.model.tau, max_prompt_tokens=params.model.max_prompt_tokens,
        aot_single_requests=params.model.aot_single_requests,
        end_of_turn_stops=params.model.end_of_turn_stops,
    )  # fmt: skip
    if params.model.compile:
        rec.compile_decoder()
    return rec


def load_trained_policy(
    params: Params, backbone_dir: Path, trained_dir: Path, device: torch.device | str | None = None
) -> tuple[RecModel, ItemTable]:
    """The trained policy in `trained_dir` (a train stage's output; eval mode) and its item table."""
    if not (trained_dir / ADAPTER_DIR).exists():
        raise FileNotFoundError(f"{trained_dir / ADAPTER_DIR}: no trained adapter; run the train stage first")
    rec = policy_from_adapter(params, backbone_dir, trained_dir / ADAPTER_DIR, device)
    return rec, ItemTable.load(trained_dir / TABLE_DIR)
