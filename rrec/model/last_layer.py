"""Run the decoder's last layer only at the positions somebody reads.

The recommendation head reads one hidden state per sequence (at `<answer>`), and a
prompt pass before decoding reads one per row (the last). In the last layer, the
attention output projection and the MLP act on each position alone, so at every other
position their work is wasted: skipping it is exact where it matters and saves most
of that layer. (Keys and values of the last layer are computed before these parts, so
a KV cache filled under `last_layer_only_at` is complete.)

The parts are wrapped once, in place (an instance attribute `forward`, so state dicts
and peft adapters see the same modules); a wrapper does the full computation unless
the calling thread is inside `last_layer_only_at`, so concurrent requests in other
threads (a model server) are not affected.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

_active = threading.local()  # .rows: flat positions kept by this thread's current pass
_install_lock = threading.Lock()


class _RowsOnly:
    """A module's `forward` that, inside `last_layer_only_at`, runs only the kept rows of
    the flattened [B*T, d] input and writes zeros elsewhere."""

    def __init__(self, full: Callable[..., torch.Tensor]) -> None:
        self.full = full

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        rows = getattr(_active, "rows", None)
        if rows is None:
            return self.full(x, *args, **kwargs)
        flat = x.reshape(-1, x.shape[-1])
        part = self.full(flat[rows], *args, **kwargs)
        out = part.new_zeros((flat.shape[0], part.shape[-1]))
        out[rows] = part
        return out.view(*x.shape[:-1], part.shape[-1])


def per_token_parts(decoder: nn.Module) -> list[nn.Module]:
    """The last layer's attention output projection and MLP; empty if the decoder is
    not laid out as `layers[-1].self_attn.o_proj` / `layers[-1].mlp` (Llama, Qwen,
    Mistral, Gemma are)."""
    layers = getattr(decoder, "layers", None)
    if not layers:
        return []
    last = layers[-1]
    found = [getattr(getattr(last, "self_attn", None), "o_proj", None), getattr(last, "mlp", None)]
    return [m for m in found if isinstance(m, nn.Module)]


def unwrap(decoder: nn.Module) -> None:
    """Remove the wrappers (before `torch.compile`, which should trace the plain modules)."""
    with _install_lock:
        for module in per_token_parts(decoder):
            if isinstance(vars(module).get("forward"), _RowsOnly):
                del module.forward


def _wrap(decoder: nn.Module) -> bool:
    parts = per_token_parts(decoder)
    with _install_lock:
        for module in parts:
            if not isinstance(vars(module).get("forward"), _RowsOnly):
                module.forward = _RowsOnly(module.forward)
    return bool(parts)


@contextmanager
def last_layer_only_at(decoder: nn.Module, rows: torch.Tensor) -> Iterator[None]:
    """Inside this context (in this thread) the decoder's last layer computes its
    per-token parts only at flat positions `rows` of the [B*T] sequence and writes zeros
    elsewhere: exact at `rows`, garbage at positions nobody may read. Inference only:
    a no-op under autograd (activation recomputation would not see the context) and on
    a compiled decoder."""
    skip = torch.is_grad_enabled() or getattr(decoder, "_compiled_call_impl", None) is not None
    if skip or not _wrap(decoder):
        yield
        return
    outer = getattr(_active, "rows", None)
    _active.rows = rows
    try:
        yield
    finally:
        _active.rows = outer
