"""Backbone loading (Hub id, local path or the embedded tiny one), the two heads,
last-hidden-state extraction and LoRA."""

from rrec.model.backbone import (
    BackboneError,
    add_control_tokens,
    build_backbone,
    load_model_and_tokenizer,
    resolve_dtype,
)
from rrec.model.item_table import ItemTable, score
from rrec.model.lora import apply_lora, load_adapter, save_adapter, trainable_parameters
from rrec.model.tokenizer import ANSWER, CHAT_TEMPLATE, END_ANSWER, control_token_id
from rrec.model.two_headed import RecModel, answer_positions, answer_rows

__all__ = [
    "ANSWER",
    "CHAT_TEMPLATE",
    "END_ANSWER",
    "BackboneError",
    "ItemTable",
    "RecModel",
    "add_control_tokens",
    "answer_positions",
    "answer_rows",
    "apply_lora",
    "build_backbone",
    "control_token_id",
    "load_adapter",
    "load_model_and_tokenizer",
    "resolve_dtype",
    "save_adapter",
    "score",
    "trainable_parameters",
]
