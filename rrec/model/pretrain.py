"""Brief causal-LM pre-training of the tiny backbone on the catalogue's prompts.

Documents are token-id lists; they are packed end to end (each followed by the eos
token) into blocks of `seq_len` tokens, the usual recipe for short LM pre-training.
A label of -100 is ignored by the loss. It marks the padding of the last block and
the tokens the caller says are not the model's to write (the eos separators between
documents, which carry no meaning of their own).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

IGNORE = -100


@dataclass(frozen=True)
class Blocks:
    """Packed training blocks: `input_ids` and `labels`, both [N, seq_len] long."""

    input_ids: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_tokens(self) -> int:
        """Tokens that count in the loss (predicted positions)."""
        return int((self.labels[:, 1:] != IGNORE).sum())


def pack(
    docs: Sequence[Sequence[int]],
    seq_len: int,
    eos_id: int,
    pad_id: int,
    unlearned_ids: Sequence[int] = (),
) -> Blocks:
    """Concatenate `docs` (each followed by `eos_id`) and cut into `seq_len` blocks.

    The last, partial block is right-padded with `pad_id` (label -100); since the model
    is causal, right padding needs no attention mask. Tokens in `unlearned_ids` keep
    their place in the input but get label -100.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    stream: list[int] = []
    for doc in docs:
        stream.extend(doc)
        stream.append(eos_id)
    if not stream:
        raise ValueError("no documents to pack")
    n_blocks = math.ceil(len(stream) / seq_len)
    ids = torch.full((n_blocks * seq_len,), pad_id, dtype=torch.long)
    ids[: len(stream)] = torch.tensor(stream, dtype=torch.long)
    labels = ids.clone()
    labels[len(stream) :] = IGNORE
    for token in unlearned_ids:
        labels[ids == token] = IGNORE
    return Blocks(ids.view(n_blocks, seq_len), labels.view(n_blocks, seq_len))


def _nll_from_hidden(model: PreTrainedModel, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = model.get_output_embeddings()(hidden[:, :-1]).float()
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )


def _token_nll(
    model: PreTrainedModel, input_ids: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Summed next-token negative log-likelihood over the labelled positions."""
    return _nll_from_hidden(model, model.get_decoder()(input_ids=input_ids).last_hidden_state, labels)


def answer_state_mean(hidden: torch.Tensor, input_ids: torch.Tensor, answer_id: int) -> torch.Tensor:
    """Squared norm of the mean unit-length final state at the `<answer>` tokens of a
    batch: 1 when every such state points the same way, near 0 when they spread out.

    A causal LM's final states share a large common direction (it carries the unigram
    prior of the output head), so the states the recommendation head reads start almost
    parallel: cosine scores over tau = 0.02 are then all alike, and in-batch contrastive
    training collapses instead of learning. Adding this term to the pre-training loss
    keeps the `<answer>` states spread (it uses no user or target, only where `<answer>` is)."""
    states = hidden[input_ids == answer_id]
    if states.shape[0] < 2:
        return hidden.sum() * 0.0
    return F.normalize(states.float(), dim=-1).mean(dim=0).pow(2).sum()


@torch.no_grad()
def perplexity(
    model: PreTrainedModel, blocks: Blocks, batch_size: int, desc: str = "perplexity"
) -> float:
    """exp(mean next-token NLL) over every labelled position of `blocks`."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, blocks.n_tokens
    if count == 0:
        raise ValueError("no labelled tokens to compute the perplexity on")
    for start in tqdm(range(0, len(blocks), batch_size), desc=desc, unit="batch", leave=False):
        ids = blocks.input_ids[start : start + batch_size].to(device)
        labels = blocks.labels[start : start + batch_size].to(device)
        total += float(_token_nll(model, ids, labels))
    model.train(was_training)
    return math.exp(total / count)


def _lr_factor(step: int, steps: int) -> float:
    """Linear warm-up over the first 5 % of steps, then cosine decay to 10 %."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass(frozen=True)
class PretrainResult:
    """What the run computed, saved with the backbone. Nothing about how long it took:
    the backbone's bytes (and DVC hash) must not depend on how busy the machine was."""

    steps_done: int
    steps_planned: int
    final_train_loss: float | None
    final_answer_state_mean: float | None = None

    def as_dict(self) -> dict[str, float | int | str | None]:
        return asdict(self)


def pretrain(
    model: PreTrainedModel,
    blocks: Blocks,
    *,
    steps: int,
    warn_after_s: float,
    batch_size: int,
    lr: float,
    seed: int,
    max_grad_norm: float = 1.0,
    answer_id: int | None = None,
    answer_spread: float = 0.0,
) -> PretrainResult:
    """Train `model` as a causal LM on `blocks` for exactly `steps` steps. Batches are
    drawn from seeded epoch permutations, so on one device the run is deterministic.
    Past `warn_after_s` seconds a warning is printed once; the run still does every step
    (the same params must give the same backbone however busy the machine is).
    With `answer_spread` > 0 the loss adds `answer_spread * answer_state_mean(...)`."""
    if len(blocks) == 0:
        raise ValueError("no training blocks")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, steps))
    model.train()
    order = torch.randperm(len(blocks), generator=generator)
    cursor, last_loss, last_spread, done = 0, None, None, 0
    warned = False
    start = time.monotonic()
    with tqdm(total=steps, desc="pretrain", unit="step") as bar:
        while done < steps:
            if not warned and time.monotonic() - start >= warn_after_s:
                warned = True
                warnings.warn(
                    f"pre-training passed {warn_after_s:g} s (model.tiny.pretrain_warn_after_s) at step "
                    f"{done} of {steps}; it goes on to the last step", stacklevel=2,
                )
            if cursor + batch_size > len(order):
                order = torch.cat(
                    [order[cursor:], torch.randperm(len(blocks), generator=generator)]
                )
                cursor = 0
            idx = order[cursor : cursor + batch_size]
            cursor += batch_size
            ids = blocks.input_ids[idx].to(device)
            labels = blocks.labels[idx].to(device)
            n = (labels[:, 1:] != IGNORE).sum().clamp(min=1)
            hidden = model.get_decoder()(input_ids=ids).last_hidden_state
            loss = _nll_from_hidden(model, hidden, labels) / n
            if answer_spread > 0 and answer_id is not None:
                spread = answer_state_mean(hidden, ids, answer_id)
                loss = loss + answer_spread * spread
                last_spread = spread.item()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            scheduler.step()
            last_loss = loss.item()
            done += 1
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.3f}")
    model.eval()
    return PretrainResult(
        steps_done=done,
        steps_planned=steps,
        final_train_loss=last_loss,
        final_answer_state_mean=last_spread,
    )
