"""RecPO mathematics as pure tensor functions (docs/method.md).

Nothing here touches a model: the trainer runs the forward passes and hands these
functions hidden states and log-probabilities. Shapes, using the names of docs/method.md:

- B users per batch, G trajectories per user, N = B*G trajectories (groups contiguous,
  user b owns rows b*G .. b*G+G-1), T generated tokens per trajectory;
- I items in the catalogue, M distinct target items in the batch, d hidden size.

Scores are always `cos(h_u, h_i) / tau`, computed in float32 whatever the model dtype.
Statistics come back as detached 0-d tensors so that a GPU loop does not synchronise
on every step; call `float()` on them when logging.
"""

from __future__ import annotations

from typing import Literal

import torch

from rrec.metrics import mask_history, ndcg_from_ranks, target_ranks
from rrec.model.item_table import score

AdvantageKind = Literal["grpo", "rloo"]
TokenAverage = Literal["global", "sequence"]

GRPO_STD_EPS = 1e-8


def _check_1d(name: str, t: torch.Tensor, n: int) -> None:
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}], got {list(t.shape)}")


def _check_clip(eps_low: float, eps_high: float) -> None:
    if not 0.0 <= eps_low < 1.0:
        raise ValueError(f"eps_low must lie in [0, 1) (got {eps_low}); see train.recpo.eps_low")
    if eps_high < 0.0:
        raise ValueError(f"eps_high must be >= 0 (got {eps_high}); see train.recpo.eps_high")


def _check_tau(tau: float) -> None:
    if not tau > 0:
        raise ValueError(f"tau must be positive (got {tau}); see model.tau")


# --------------------------------------------------------------------------- reward


@torch.no_grad()
def rewards(
    user_states: torch.Tensor,
    item_table: torch.Tensor,
    targets: torch.Tensor,
    history: torch.Tensor,
    tau: float,
    beta: float,
    ndcg_cutoff: int = 1000,
    max_chunk_elements: int = 1 << 24,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full-catalogue reward of each trajectory: `(R, R_d, R_c)`, each float32 [N].

    user_states [N, d] (h_u at each trajectory's `<answer>`), item_table [I, d] (the
    rec head), targets [N] item ids, history [N, L] item ids padded with -1.
    Scores are cos/tau with the history at -inf; rank is 1-based and pessimistic on
    ties (`rrec.metrics.target_ranks`), so a target tied with another item is ranked
    behind it. R_d = 1/log2(rank+1) if rank <= ndcg_cutoff else 0; R_c = softmax
    probability of the target over all (history-masked) item scores;
    R = (1-beta)*R_d + beta*R_c. Users are processed in chunks of at most
    `max_chunk_elements` scores to bound memory.
    """
    if user_states.dim() != 2 or item_table.dim() != 2 or user_states.shape[1] != item_table.shape[1]:
        raise ValueError(
            f"user_states [N, d] and item_table [I, d] must share d; got "
            f"{list(user_states.shape)} and {list(item_table.shape)}"
        )
    n, n_items = user_states.shape[0], item_table.shape[0]
    _check_1d("targets", targets, n)
    if history.dim() != 2 or history.shape[0] != n:
        raise ValueError(f"history must have shape [{n}, L] padded with -1, got {list(history.shape)}")
    if n and (targets.min() < 0 or targets.max() >= n_items):
        raise ValueError(f"targets must be item ids in [0, {n_items}); got range "
                         f"[{int(targets.min())}, {int(targets.max())}]")
    if history.numel() and history.max() >= n_items:
        raise ValueError(f"history holds item id {int(history.max())} but the item table has {n_items} rows")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1] (got {beta}); see train.recpo.beta")
    if ndcg_cutoff < 1:
        raise ValueError(f"ndcg_cutoff must be >= 1 (got {ndcg_cutoff}); see train.recpo.ndcg_cutoff")
    _check_tau(tau)

    device = user_states.device
    items = item_table.to(device)
    targets = targets.to(device)
    history = history.to(device)
    chunk = max(1, max_chunk_elements // max(n_items, 1))
    r_d = torch.empty(n, dtype=torch.float32, device=device)
    r_c = torch.empty(n, dtype=torch.float32, device=device)
    for start in range(0, n, chunk):
        sl = slice(start, start + chunk)
        scores = mask_history(score(user_states[sl], items, tau), history[sl])
        ranks = target_ranks(scores, targets[sl])
        r_d[sl] = ndcg_from_ranks(ranks, ndcg_cutoff).float()
        r_c[sl] = scores.softmax(dim=-1).gather(1, targets[sl].view(-1, 1)).squeeze(1)
    return (1.0 - beta) * r_d + beta * r_c, r_d, r_c


# ------------------------------------------------------------------------ advantage


def group_advantages(r: torch.Tensor, group_size: int, kind: AdvantageKind = "grpo") -> torch.Tensor:
    """Advantage of each trajectory within its user's group; r is flat [B*G], groups contiguous.

    - "grpo": A_i = (R_i - mean(R)) / (std(R) + 1e-8) with the *sample* standard
      deviation (Bessel's correction, divisor G-1). This is what the authors' RRec
      trainer computes (`Tensor.std` default) and what TRL's GRPOTrainer computes
      (its `nanstd` applies the same correction). A group of equal rewards gets zeros.
    - "rloo": A_i = R_i - mean_{j != i} R_j = G/(G-1) * (R_i - mean(R)).
      (The authors' code used R_i*(1+1/G) - mean(R), which is not leave-one-out; the
      formula of docs/method.md is the one implemented.)
    - group_size 1: no baseline can be formed, every advantage is 0.
    """
    if r.dim() != 1:
        raise ValueError(f"rewards must be flat [B*G], got shape {list(r.shape)}")
    if group_size < 1 or r.shape[0] % group_size:
        raise ValueError(
            f"{r.shape[0]} rewards cannot be split into groups of {group_size} "
            f"(train.rollout.group_size); expected B*G rewards, groups contiguous"
        )
    if kind not in ("grpo", "rloo"):
        raise ValueError(f"advantage kind must be 'grpo' or 'rloo' (got {kind!r}); see train.recpo.advantage")
    if group_size == 1:
        return torch.zeros_like(r)
    grouped = r.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if kind == "grpo":
        adv = centred / (grouped.std(dim=1, correction=1, keepdim=True) + GRPO_STD_EPS)
    else:
        adv = centred * (group_size / (group_size - 1))
    return adv.reshape(-1)


def tied_group_fallback(adv: torch.Tensor, r: torch.Tensor, group_size: int, value: float) -> torch.Tensor:
    """Advantages for the item term: a group whose rewards all tie gets `value` instead
    of zeros.

    A tie (empty or identical reasoning, or G = 1) tells nothing about which reasoning is
    better, so the token term rightly gets no signal; but the item term would get none
    either, and the recommendation head would stop learning exactly when reasoning adds
    nothing. With `value` = 1 a tied group's selected trajectory is trained like the
    contrastive baseline (the clipped surrogate with A = 1), so RecPO with empty reasoning
    falls back to contrastive learning instead of standing still."""
    if group_size < 1 or r.shape[0] % group_size:
        raise ValueError(f"{r.shape[0]} rewards cannot be split into groups of {group_size}")
    grouped = r.view(-1, group_size)
    tied = (grouped == grouped[:, :1]).all(dim=1).repeat_interleave(group_size)
    return torch.where(tied, torch.full_like(adv, value), adv)


# ----------------------------------------------------------------- clipped surrogate


def _clipped_surrogate(
    log_ratio: torch.Tensor, adv: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-element -min(rho*A, clip(rho)*A), rho, and where the low/high clip is active."""
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = -torch.minimum(ratio * adv, clipped * adv)
    # the clipped branch is the minimum (and the gradient vanishes) exactly here
    low = (ratio < 1.0 - eps_low) & (adv < 0)
    high = (ratio > 1.0 + eps_high) & (adv > 0)
    return loss, ratio, low, high


def token_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float,
    eps_high: float,
    average: TokenAverage = "global",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped token-level policy loss over the reasoning tokens.

    logp_new [N, T] (with grad) and logp_old [N, T] are the log-probabilities of the
    sampled tokens under the current and the rollout policy; advantages [N] (one per
    trajectory, broadcast over its tokens); mask [N, T] is true on reasoning tokens and
    false on prompt and padding. Per token: -min(rho*A, clip(rho, 1-eps_low, 1+eps_high)*A)
    with rho = exp(logp_new - logp_old). Masked positions are neutralised *before* the
    exponential, so whatever they hold (even inf/nan) changes neither loss nor gradient.

    average: "global" = mean over all unmasked tokens of the batch (longer trajectories
    weigh more); "sequence" = mean per trajectory, then mean over the trajectories that
    have at least one unmasked token. With no unmasked token at all the loss is 0.

    stats: `clip_low` / `clip_high` = fraction of unmasked tokens on which the lower
    (rho < 1-eps_low, A < 0) or upper (rho > 1+eps_high, A > 0) clip is active, i.e. the
    token's gradient is cut; `ratio_mean`, `ratio_min`, `ratio_max` over unmasked
    tokens; `tokens` = number of unmasked tokens.
    """
    if logp_new.dim() != 2 or logp_old.shape != logp_new.shape or mask.shape != logp_new.shape:
        raise ValueError(
            f"logp_new, logp_old and mask must all be [N, T]; got {list(logp_new.shape)}, "
            f"{list(logp_old.shape)}, {list(mask.shape)}"
        )
    _check_1d("advantages", advantages, logp_new.shape[0])
    _check_clip(eps_low, eps_high)
    if average not in ("global", "sequence"):
        raise ValueError(f"average must be 'global' or 'sequence' (got {average!r})")

    keep = mask.to(torch.bool)
    diff = logp_new.float() - logp_old.detach().float()
    log_ratio = torch.where(keep, diff, torch.zeros_like(diff))
    adv = advantages.detach().float().unsqueeze(1)
    per_token, ratio, low, high = _clipped_surrogate(log_ratio, adv, eps_low, eps_high)
    per_token = torch.where(keep, per_token, torch.zeros_like(per_token))

    weight = keep.float()
    n_tokens = weight.sum()
    if average == "global":
        loss = per_token.sum() / n_tokens.clamp(min=1.0)
    else:
        per_seq_tokens = weight.sum(dim=1)
        has_tokens = per_seq_tokens > 0
        seq_loss = per_token.sum(dim=1) / per_seq_tokens.clamp(min=1.0)
        loss = seq_loss.sum() / has_tokens.sum().clamp(min=1).float()

    with torch.no_grad():
        denom = n_tokens.clamp(min=1.0)
        kept_ratio = ratio[keep]
        stats = {
            "clip_low": (low & keep).float().sum() / denom,
            "clip_high": (high & keep).float().sum() / denom,
            "ratio_mean": (ratio * weight).sum() / denom,
            "ratio_min": kept_ratio.min() if kept_ratio.numel() else torch.ones((), device=ratio.device),
            "ratio_max": kept_ratio.max() if kept_ratio.numel() else torch.ones((), device=ratio.device),
            "tokens": n_tokens,
        }
    return loss, stats


# ---------------------------------------------------------------------- item term


def dedupe_targets(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct target items of a batch and each example's column among them.

    targets [B] item ids -> (unique_items [M] sorted ascending, target_index [B]) with
    unique_items[target_index] == targets. Two users sharing a target item thus share
    one in-batch column, so neither user's target is a negative for the other.
    """
    if targets.dim() != 1:
        raise ValueError(f"targets must be a flat [B] tensor of item ids, got shape {list(targets.shape)}")
    unique_items, target_index = torch.unique(targets, sorted=True, return_inverse=True)
    return unique_items, target_index


def target_log_frequency(targets: torch.Tensor, n_items: int) -> torch.Tensor:
    """log of each item's share of the training targets, [n_items] float32: the logQ
    correction's sampling probability. An item that is never a target is never an
    in-batch column either; it gets the count 1 so that the log stays finite."""
    counts = torch.bincount(targets, minlength=n_items).clamp(min=1).double()
    return (counts / counts.sum()).log().float()


def inbatch_logprob(
    user_states: torch.Tensor,
    target_states: torch.Tensor,
    target_index: torch.Tensor,
    tau: float,
    log_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """log pi(target | u) under the in-batch softmax over cos/tau against the batch's targets.

    user_states [N, d], target_states [M, d] (one row per distinct target item, see
    `dedupe_targets`), target_index [N] the column of each user's own target -> [N] float32.
    Differentiable in both user_states and target_states. `log_q` [M], if given, is the
    log of each column's sampling probability, subtracted from its score (logQ
    correction): the in-batch softmax then estimates the catalogue-wide one instead of
    one that favours rare items.
    """
    if user_states.dim() != 2 or target_states.dim() != 2 or user_states.shape[1] != target_states.shape[1]:
        raise ValueError(
            f"user_states [N, d] and target_states [M, d] must share d; got "
            f"{list(user_states.shape)} and {list(target_states.shape)}"
        )
    _check_1d("target_index", target_index, user_states.shape[0])
    _check_tau(tau)
    m = target_states.shape[0]
    if target_index.numel() and (target_index.min() < 0 or target_index.max() >= m):
        raise ValueError(f"target_index must lie in [0, {m}) (the rows of target_states)")
    logits = score(user_states, target_states, tau)
    if log_q is not None:
        _check_1d("log_q", log_q, m)
        logits = logits - log_q.to(logits)
    return logits.log_softmax(dim=-1).gather(1, target_index.view(-1, 1)).squeeze(1)


@torch.no_grad()
def inbatch_reward(
    user_states: torch.Tensor, target_states: torch.Tensor, target_index: torch.Tensor, tau: float, beta: float
) -> torch.Tensor:
    """The reward's formula over the batch's target items instead of the catalogue:
    (1-beta)/log2(rank+1) + beta*softmax probability, float32 [N].

    Every term is scored with item states the current policy has just encoded, so unlike
    the full-catalogue reward (scored against a table refreshed a few rows at a time) it
    is comparable from one step to the next: the training curve to watch."""
    logits = score(user_states, target_states, tau)
    ranks = target_ranks(logits, target_index)
    prob = logits.softmax(dim=-1).gather(1, target_index.view(-1, 1)).squeeze(1)
    return (1.0 - beta) * ndcg_from_ranks(ranks, logits.shape[1]).float() + beta * prob


def select_topk(advantages: torch.Tensor, group_index: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Boolean mask [N] of the k trajectories with the highest advantage in each group.

    Groups are given by group_index [N] (any integer labels, not necessarily contiguous).
    Ties are broken towards the lowest row index, so the choice is deterministic; a group
    with fewer than k trajectories is selected whole.
    """
    n = advantages.shape[0]
    _check_1d("advantages", advantages, n)
    _check_1d("group_index", group_index, n)
    if k < 1:
        raise ValueError(f"topk must be >= 1 (got {k}); see train.recpo.item_topk")
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=advantages.device)
    # stable sorts: by advantage (descending, ties keep row order), then by group
    by_adv = torch.sort(advantages.detach(), descending=True, stable=True).indices
    by_group = torch.sort(group_index[by_adv], stable=True).indices
    order = by_adv[by_group]
    _, counts = torch.unique_consecutive(group_index[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_group = torch.arange(n, device=advantages.device) - starts.repeat_interleave(counts)
    selected = torch.zeros(n, dtype=torch.bool, device=advantages.device)
    selected[order] = rank_in_group < k
    return selected


def item_loss(
    user_states: torch.Tensor,
    target_states: torch.Tensor,
    target_index: torch.Tensor,
    group_index: torch.Tensor,
    advantages: torch.Tensor,
    old_logprob: torch.Tensor,
    tau: float,
    eps_low: float,
    eps_high: float,
    topk: int = 1,
    log_q: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped item-level policy loss on the best trajectories of each group.

    user_states [N, d] and target_states [M, d] carry gradient; target_index [N] maps each
    trajectory to its target's row of target_states; group_index [N] names its user;
    advantages [N]; old_logprob [N] = `inbatch_logprob` under the rollout policy (with the
    same `log_q`). In each group the `topk` trajectories by advantage are selected (`select_topk`: ties
    go to the lowest row index). With rho = exp(inbatch_logprob - old_logprob), the loss
    is the mean over the selected trajectories of -min(rho*A, clip(rho, 1-eps_low,
    1+eps_high)*A). (The authors' code divided the same sum by N instead of by the
    number selected; that differs from this only by the constant factor G/topk.)

    stats: `selected` count, `logprob_mean` (new, over selected), `ratio_mean`,
    `clip_low` / `clip_high` fractions of the selected trajectories.
    """
    n = user_states.shape[0]
    for name, t in (("group_index", group_index), ("advantages", advantages), ("old_logprob", old_logprob)):
        _check_1d(name, t, n)
    _check_clip(eps_low, eps_high)
    selected = select_topk(advantages, group_index, topk)
    logp = inbatch_logprob(user_states, target_states, target_index, tau, log_q)
    log_ratio = logp[selected] - old_logprob[selected].detach().float()
    adv = advantages[selected].detach().float()
    per_traj, ratio, low, high = _clipped_surrogate(log_ratio, adv, eps_low, eps_high)
    loss = per_traj.mean() if per_traj.numel() else logp.sum() * 0.0
    with torch.no_grad():
        count = selected.sum()
        denom = count.clamp(min=1).float()
        stats = {
            "selected": count.float(),
            "logprob_mean": logp[selected].sum() / denom,
            "ratio_mean": ratio.sum() / denom,
            "clip_low": low.float().sum() / denom,
            "clip_high": high.float().sum() / denom,
        }
    return loss, stats


# ---------------------------------------------------------- w/o reasoning baseline


def contrastive_loss(
    user_states: torch.Tensor,
    target_states: torch.Tensor,
    target_index: torch.Tensor,
    tau: float,
    log_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """In-batch softmax cross-entropy (paper eq. 1): mean of -log pi(target | u) over users
    (`log_q`: see `inbatch_logprob`)."""
    return -inbatch_logprob(user_states, target_states, target_index, tau, log_q).mean()
