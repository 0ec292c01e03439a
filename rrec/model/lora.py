"""LoRA through peft, from `params.model.lora`; `enabled: false` trains the full model.

What is saved: with LoRA, the adapter (`adapter_config.json` +
`adapter_model.safetensors`, peft's format); without, the full model weights and
config (`save_pretrained`). `load_adapter` tells the two apart by those files.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM, PreTrainedModel

from rrec.config import LoraParams

ADAPTER_CONFIG = "adapter_config.json"


def lora_config(lora: LoraParams, num_layers: int | None = None) -> LoraConfig:
    """peft's config; with `lora.layers`, the adapters go on the last `lora.layers` of the
    model's `num_layers` decoder layers."""
    last: dict = {}
    if lora.layers is not None:
        if num_layers is None:
            raise ValueError("model.lora.layers needs the model's number of decoder layers")
        if lora.layers > num_layers:
            raise ValueError(f"model.lora.layers={lora.layers}, but the backbone has {num_layers} layers")
        last = {"layers_to_transform": list(range(num_layers - lora.layers, num_layers)),
                "layers_pattern": "layers"}
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        **last,
    )


@contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft reads `is_gradient_checkpointing`, which transformers deprecates with a
    FutureWarning on every wrap; it says nothing a user of this project can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def apply_lora(model: PreTrainedModel, lora: LoraParams) -> PreTrainedModel | PeftModel:
    """Wrap `model` with a fresh LoRA adapter (only its weights trainable), or, with
    `lora.enabled: false`, return `model` with every parameter trainable."""
    if not lora.enabled:
        model.requires_grad_(True)
        return model
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    absent = [m for m in lora.target_modules if m not in present]
    if len(absent) == len(lora.target_modules):
        raise ValueError(
            f"model.lora.target_modules {list(lora.target_modules)}: none of these modules exists in "
            f"{type(model).__name__}; name its linear layers (e.g. q_proj, v_proj for Qwen2/Gemma/Llama)"
        )
    num_layers = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    with _quiet_peft():
        return get_peft_model(model, lora_config(lora, num_layers))


def trainable_parameters(model: PreTrainedModel | PeftModel) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


@torch.no_grad()
def merged_weights(model: PreTrainedModel | PeftModel) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the weights an inference engine serves: the base model's names,
    with each LoRA layer's delta added out of place, so the policy keeps its adapters
    (peft's `merge_and_unload` would strip them) and its base weights stay bit-exact
    (merging and unmerging in place rounds them in bf16)."""
    if not isinstance(model, PeftModel):
        yield from model.state_dict().items()
        return
    base = model.get_base_model()
    adapter = model.active_adapter
    lora_layers = {
        f"{name}.base_layer.weight": module
        for name, module in base.named_modules()
        if isinstance(module, LoraLayer) and adapter in module.lora_A
    }
    for name, tensor in base.state_dict().items():
        if ".lora_" in name:
            continue
        if name in lora_layers:
            tensor = tensor + lora_layers[name].get_delta_weight(adapter).to(tensor.dtype)
        yield name.replace(".base_layer.", "."), tensor


def save_adapter(model: PreTrainedModel | PeftModel, out_dir: Path) -> Path:
    """Save the adapter (LoRA) or the full weights (no LoRA) to `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PeftModel):
        # LoRA leaves the embeddings untouched; the rows of added control tokens are
        # re-derived identically when the backbone is loaded, so they are not stored
        model.save_pretrained(out_dir, save_embedding_layers=False)
    else:
        model.save_pretrained(out_dir)
    return out_dir


def load_adapter(
    model: PreTrainedModel, adapter_dir: Path, *, trainable: bool = False
) -> PreTrainedModel | PeftModel:
    """Put the weights saved by `save_adapter` onto the base `model`.

    A LoRA directory is attached with peft (trainable or frozen); a full-weights
    directory is loaded as a model of the same class and dtype, replacing `model`.
    """
    adapter_dir = Path(adapter_dir)
    if (adapter_dir / ADAPTER_CONFIG).exists():
        with _quiet_peft():
            return PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)
    if (adapter_dir / "config.json").exists():
        loaded = AutoModelForCausalLM.from_pretrained(adapter_dir, dtype=model.dtype)
        loaded.to(model.device)
        loaded.requires_grad_(trainable)
        return loaded
    raise FileNotFoundError(
        f"{adapter_dir}: neither {ADAPTER_CONFIG} (a LoRA adapter) nor config.json (full weights); "
        "point it at the output of the train stage"
    )
