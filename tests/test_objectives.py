"""RecPO objectives against numbers worked out by hand from the formulas of docs/method.md."""

from __future__ import annotations

import math

import pytest
import torch

from rrec.train.objectives import (
    contrastive_loss,
    dedupe_targets,
    group_advantages,
    inbatch_logprob,
    item_loss,
    rewards,
    select_topk,
    target_log_frequency,
    token_loss,
)

EPS_LOW, EPS_HIGH = 0.2, 0.28
INV_LOG2_3 = 1.0 / math.log2(3.0)

# ------------------------------------------------------------------------- rewards

# five items in 2-d; item 4 points the same way as item 0 (a tie) but is twice as long,
# so only cosine (not dot product) makes them tie.
ITEMS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [2.0, 0.0]])
TAU = 0.5  # cos in {1, 0, -1} -> scores {2, 0, -2}


def _reward_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    users = torch.tensor([[3.0, 0.0], [3.0, 0.0], [0.0, 0.5]])
    targets = torch.tensor([0, 0, 0])
    history = torch.tensor([[-1, -1], [4, -1], [1, -1]])
    return users, targets, history


def _expected_components() -> tuple[list[float], list[float]]:
    e = math.e
    # user 0: scores [2, 0, -2, 0, 2], target 0 tied with item 4 -> pessimistic rank 2
    rd0, rc0 = INV_LOG2_3, e**2 / (2 * e**2 + 2 + e**-2)
    # user 1: item 4 masked -> scores [2, 0, -2, 0, -inf], rank 1
    rd1, rc1 = 1.0, e**2 / (e**2 + 2 + e**-2)
    # user 2: scores [0, 2, 0, -2, 0], item 1 masked; items 2 and 4 tie the target -> rank 3
    rd2, rc2 = 0.5, 1.0 / (3 + e**-2)
    return [rd0, rd1, rd2], [rc0, rc1, rc2]


def test_rewards_history_masking_and_ties() -> None:
    users, targets, history = _reward_case()
    r, r_d, r_c = rewards(users, ITEMS, targets, history, tau=TAU, beta=0.25)
    exp_d, exp_c = _expected_components()
    assert r_d.tolist() == pytest.approx(exp_d, rel=1e-6)
    assert r_c.tolist() == pytest.approx(exp_c, rel=1e-5)
    assert r.tolist() == pytest.approx([0.75 * d + 0.25 * c for d, c in zip(exp_d, exp_c, strict=True)], rel=1e-5)
    assert r.dtype == torch.float32 and not r.requires_grad


def test_rewards_cutoff_beta_extremes_and_chunking() -> None:
    users, targets, history = _reward_case()
    exp_d, exp_c = _expected_components()
    # cut-off 2: rank 3 of user 2 earns nothing, rank 2 of user 0 still counts
    _, r_d, _ = rewards(users, ITEMS, targets, history, tau=TAU, beta=0.0, ndcg_cutoff=2)
    assert r_d.tolist() == pytest.approx([INV_LOG2_3, 1.0, 0.0], rel=1e-6)
    r0, _, _ = rewards(users, ITEMS, targets, history, tau=TAU, beta=0.0)
    r1, _, _ = rewards(users, ITEMS, targets, history, tau=TAU, beta=1.0)
    assert r0.tolist() == pytest.approx(exp_d, rel=1e-6)
    assert r1.tolist() == pytest.approx(exp_c, rel=1e-5)
    # one user per chunk gives the same numbers
    rc, _, _ = rewards(users, ITEMS, targets, history, tau=TAU, beta=0.25, max_chunk_elements=1)
    rf, _, _ = rewards(users, ITEMS, targets, history, tau=TAU, beta=0.25)
    assert torch.equal(rc, rf)


def test_rewards_no_grad_and_bad_input() -> None:
    users, targets, history = _reward_case()
    users.requires_grad_(True)
    r, _, _ = rewards(users, ITEMS, targets, history, tau=TAU, beta=0.05)
    assert not r.requires_grad
    with pytest.raises(ValueError, match="targets"):
        rewards(users, ITEMS, torch.tensor([0, 9, 0]), history, tau=TAU, beta=0.05)
    with pytest.raises(ValueError, match="beta"):
        rewards(users, ITEMS, targets, history, tau=TAU, beta=1.5)


# ---------------------------------------------------------------------- advantages

R_GROUPS = torch.tensor([1.0, 1.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 4.0])


def test_grpo_advantages_sample_std_with_ties() -> None:
    a = group_advantages(R_GROUPS, 4, "grpo")
    # group 1: mean 0.5, sample std sqrt(4 * 0.25 / 3) -> +-0.5*sqrt(3)
    h = 0.5 * math.sqrt(3.0)
    # group 2: all equal -> 0; group 3: mean 1, sample var (1+1+1+9)/3 = 4 -> std 2
    expected = [h, h, -h, -h, 0.0, 0.0, 0.0, 0.0, -0.5, -0.5, -0.5, 1.5]
    assert a.tolist() == pytest.approx(expected, abs=1e-6)


def test_rloo_advantages_with_ties() -> None:
    a = group_advantages(R_GROUPS, 4, "rloo")
    # A_i = R_i - mean of the other three
    expected = [1 - 1 / 3, 1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 0, 0, 0, 0, -4 / 3, -4 / 3, -4 / 3, 4.0]
    assert a.tolist() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_group_size_one_gives_zero_advantage(kind: str) -> None:
    a = group_advantages(torch.tensor([0.3, 0.9, 0.1]), 1, kind)  # type: ignore[arg-type]
    assert a.tolist() == [0.0, 0.0, 0.0]


def test_advantages_reject_uneven_groups() -> None:
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="grpo"):
        group_advantages(torch.zeros(4), 2, "ppo")  # type: ignore[arg-type]


# ----------------------------------------------------------------------- token loss

# trajectory 0 (A = +1): rho = 1.1 (inside), 1.5 (above 1.28: high clip), 0.5 (unclipped
#   since rho*A < 0.8*A);
# trajectory 1 (A = -2): rho = 0.5 (below 0.8: low clip), 1.5 (unclipped since rho*A is
#   the smaller), last token masked.
RHO = torch.tensor([[1.1, 1.5, 0.5], [0.5, 1.5, 1.0]])
ADV = torch.tensor([1.0, -2.0])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
OLD = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -0.25, -1.5]])
# per-token losses: -1.1, -1.28, -0.5 | 1.6 (= -0.8*-2), 3.0 (= -1.5*-2)
TOKEN_LOSSES = [[-1.1, -1.28, -0.5], [1.6, 3.0]]


def _new_logp(rho: torch.Tensor = RHO) -> torch.Tensor:
    return (OLD + rho.log()).clone().requires_grad_(True)


def test_token_loss_global_average_and_clipped_branches() -> None:
    logp = _new_logp()
    loss, stats = token_loss(logp, OLD, ADV, MASK, EPS_LOW, EPS_HIGH)
    assert loss.item() == pytest.approx((-1.1 - 1.28 - 0.5 + 1.6 + 3.0) / 5, rel=1e-6)
    assert float(stats["clip_low"]) == pytest.approx(1 / 5)
    assert float(stats["clip_high"]) == pytest.approx(1 / 5)
    assert float(stats["ratio_mean"]) == pytest.approx((1.1 + 1.5 + 0.5 + 0.5 + 1.5) / 5, rel=1e-6)
    assert float(stats["tokens"]) == 5
    loss.backward()
    # d/dlogp of -rho*A is -rho*A (divided by 5 tokens); clipped tokens and masked ones get 0
    expected = [[-1.1 / 5, 0.0, -0.5 / 5], [0.0, 3.0 / 5, 0.0]]
    assert logp.grad is not None
    assert logp.grad.tolist()[0] == pytest.approx(expected[0], abs=1e-6)
    assert logp.grad.tolist()[1] == pytest.approx(expected[1], abs=1e-6)


def test_token_loss_sequence_average() -> None:
    loss, _ = token_loss(_new_logp(), OLD, ADV, MASK, EPS_LOW, EPS_HIGH, average="sequence")
    per_seq = [sum(TOKEN_LOSSES[0]) / 3, sum(TOKEN_LOSSES[1]) / 2]
    assert loss.item() == pytest.approx(sum(per_seq) / 2, rel=1e-6)


@pytest.mark.parametrize("average", ["global", "sequence"])
@pytest.mark.parametrize("junk", [5.0, float("inf"), float("nan"), float("-inf")])
def test_masked_positions_change_neither_loss_nor_gradient(average: str, junk: float) -> None:
    # prompt tokens lead, padding trails
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    old = torch.tensor([[-1.0, -1.0, -0.7, -1.2, 0.0], [-2.0, -0.1, -0.4, -0.9, -1.1]])
    new = old + torch.tensor([[0.0, 0.0, 0.1, -0.3, 0.0], [0.0, 0.2, -0.1, 0.05, 0.3]])
    adv = torch.tensor([0.7, -1.3])
    a = new.clone().requires_grad_(True)
    b = torch.where(mask, new, torch.full_like(new, junk)).requires_grad_(True)
    old_b = torch.where(mask, old, torch.full_like(old, -junk if math.isfinite(junk) else 0.3))
    la, _ = token_loss(a, old, adv, mask, EPS_LOW, EPS_HIGH, average=average)  # type: ignore[arg-type]
    lb, _ = token_loss(b, old_b, adv, mask, EPS_LOW, EPS_HIGH, average=average)  # type: ignore[arg-type]
    la.backward()
    lb.backward()
    assert la.item() == lb.item()
    assert a.grad is not None and b.grad is not None
    assert torch.equal(a.grad, b.grad)
    assert torch.all(b.grad[~mask] == 0)
    assert torch.all(b.grad[mask] != 0)


def test_token_loss_empty_mask_is_zero_with_grad() -> None:
    logp = _new_logp()
    loss, stats = token_loss(logp, OLD, ADV, torch.zeros_like(MASK), EPS_LOW, EPS_HIGH)
    loss.backward()
    assert loss.item() == 0.0 and float(stats["tokens"]) == 0
    assert logp.grad is not None and torch.all(logp.grad == 0)


def test_token_loss_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="advantages"):
        token_loss(_new_logp(), OLD, torch.zeros(3), MASK, EPS_LOW, EPS_HIGH)


# ------------------------------------------------------------------------ item term


def test_dedupe_targets_shares_columns() -> None:
    unique, index = dedupe_targets(torch.tensor([7, 3, 7, 5]))
    assert unique.tolist() == [3, 5, 7]
    assert index.tolist() == [2, 0, 2, 1]


def test_select_topk_ties_go_to_lowest_index() -> None:
    adv = torch.tensor([0.5, 0.5, -1.0, 1.0, 3.0, 1.0, 3.0, 2.0, 2.0, 2.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 3, 3])
    assert select_topk(adv, groups, 1).tolist() == [1, 0, 0, 1, 1, 0, 0, 1, 0, 0]
    assert select_topk(adv, groups, 2).tolist() == [1, 1, 1, 1, 1, 0, 1, 1, 1, 0]
    # groups need not be contiguous
    assert select_topk(torch.tensor([1.0, 5.0, 2.0, 0.0]), torch.tensor([1, 0, 1, 0]), 1).tolist() == [0, 1, 1, 0]


def test_inbatch_logprob_by_hand() -> None:
    users = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    logp = inbatch_logprob(users, targets, torch.tensor([1, 0, 1]), tau=1.0)
    # cos: user 0 -> [0, 1], user 1 -> [1, 0], user 2 -> [1/sqrt2, 1/sqrt2]
    expected = [1 - math.log(1 + math.e), 1 - math.log(1 + math.e), math.log(0.5)]
    assert logp.tolist() == pytest.approx(expected, rel=1e-6)


def _item_case() -> dict[str, torch.Tensor]:
    # B=3 users, G=2; user targets 7, 3, 7 -> columns [1, 0, 1]
    _, user_col = dedupe_targets(torch.tensor([7, 3, 7]))
    users = torch.tensor(
        [[0.0, 1.0], [0.3, -0.2], [0.5, 0.9], [1.0, 0.0], [1.0, 1.0], [-0.4, 0.1]], requires_grad=True
    )
    targets = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    return {
        "users": users,
        "targets": targets,
        "target_index": user_col.repeat_interleave(2),
        "group_index": torch.arange(3).repeat_interleave(2),
        # group 0 ties (row 0 wins), group 1 row 3, group 2 row 4
        "advantages": torch.tensor([0.5, 0.5, -1.0, 1.0, 2.0, -2.0]),
    }


def test_item_loss_top1_clipping_and_duplicated_targets() -> None:
    c = _item_case()
    assert c["target_index"].tolist() == [1, 1, 0, 0, 1, 1]
    l_a = 1 - math.log(1 + math.e)  # rows 0 and 3 (see test_inbatch_logprob_by_hand)
    l_b = math.log(0.5)  # row 4
    # rho: row 0 1.5 (A=0.5, high clip -> 1.28*0.5), row 3 0.9 (A=1), row 4 0.5 (A=2, rho*A smaller)
    old = torch.tensor([l_a - math.log(1.5), 0.0, 0.0, l_a - math.log(0.9), l_b - math.log(0.5), 0.0])
    loss, stats = item_loss(
        c["users"], c["targets"], c["target_index"], c["group_index"], c["advantages"], old,
        tau=1.0, eps_low=EPS_LOW, eps_high=EPS_HIGH,
    )
    assert loss.item() == pytest.approx(-(0.64 + 0.9 + 1.0) / 3, rel=1e-6)
    assert float(stats["selected"]) == 3
    assert float(stats["clip_high"]) == pytest.approx(1 / 3)
    assert float(stats["clip_low"]) == 0.0
    assert float(stats["ratio_mean"]) == pytest.approx((1.5 + 0.9 + 0.5) / 3, rel=1e-6)

    loss.backward()
    ug, tg = c["users"].grad, c["targets"].grad
    assert ug is not None and tg is not None
    # unselected rows and the clipped row 0 get no gradient; rows 3 and 4 do
    assert torch.all(ug[[0, 1, 2, 5]] == 0)
    assert torch.all(ug[[3, 4]].abs().sum(dim=1) > 0)
    assert torch.all(tg.abs().sum(dim=1) > 0)
    # row 3: user (1,0) vs targets (1,0) (own, column 0) and (0,2). With rho*A unclipped the
    # loss is -rho*A/3, so dL/dlogp = -0.9/3; dlogp/du = (1-p_own)*d cos_own/du - p_other*d cos_other/du
    # at u=(1,0): d cos((1,0))/du = (0,0), d cos((0,1))/du = (0,1); p_other = 1/(1+e)
    p_other = 1 / (1 + math.e)
    assert ug[3].tolist() == pytest.approx([0.0, (-0.9 / 3) * (-p_other)], abs=1e-6)


def test_item_loss_negative_advantage_low_clip() -> None:
    # a single group whose best trajectory still has a negative advantage
    users = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    index = torch.tensor([0, 0])
    new = inbatch_logprob(users, targets, index, tau=1.0).detach()
    old = new - torch.log(torch.tensor([0.5, 1.0]))  # rho = 0.5 on row 0
    loss, stats = item_loss(
        users, targets, index, torch.tensor([0, 0]), torch.tensor([-1.0, -3.0]), old,
        tau=1.0, eps_low=EPS_LOW, eps_high=EPS_HIGH,
    )
    assert loss.item() == pytest.approx(0.8, rel=1e-6)  # -min(-0.5, -0.8)
    assert float(stats["clip_low"]) == 1.0
    loss.backward()
    assert users.grad is not None and torch.all(users.grad == 0)


def test_inbatch_logprob_gradcheck() -> None:
    torch.manual_seed(0)
    users = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    targets = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([0, 2, 2, 1])
    # the function computes in float32; compare against finite differences loosely
    assert torch.autograd.gradcheck(
        lambda u, t: inbatch_logprob(u, t, index, tau=0.7).double(), (users, targets),
        eps=1e-3, atol=1e-3, rtol=1e-2,
    )


# ---------------------------------------------------------------------- contrastive


def test_contrastive_loss_by_hand() -> None:
    users = torch.tensor([[2.0, 0.0], [1.0, 1.0]], requires_grad=True)
    targets = torch.tensor([[1.0, 0.0], [0.0, 3.0]], requires_grad=True)
    loss = contrastive_loss(users, targets, torch.tensor([0, 1]), tau=0.5)
    # user 0: scores [2, 0] -> CE log(1 + e^-2); user 1: scores [sqrt2, sqrt2] -> CE log 2
    assert loss.item() == pytest.approx((math.log(1 + math.exp(-2)) + math.log(2)) / 2, rel=1e-6)
    loss.backward()
    assert users.grad is not None and targets.grad is not None
    assert targets.grad.abs().sum() > 0


# ------------------------------------------------------------- logQ correction


def test_target_log_frequency_by_hand() -> None:
    # targets 0, 0, 0, 2 over 4 items: shares 3/4, (never: count 1)/4... normalised by 5
    log_q = target_log_frequency(torch.tensor([0, 0, 0, 2]), 4)
    assert log_q.exp().tolist() == pytest.approx([3 / 6, 1 / 6, 1 / 6, 1 / 6], rel=1e-6)


def test_logq_correction_by_hand_and_shift_invariance() -> None:
    users = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    index = torch.tensor([0, 1])
    log_q = torch.tensor([math.log(0.9), math.log(0.1)])
    got = inbatch_logprob(users, targets, index, tau=0.5, log_q=log_q)
    # scores [2, 0] and [sqrt2, sqrt2], each column minus its log q
    for row, target in ((0, 0), (1, 1)):
        s = [[2.0, 0.0], [math.sqrt(2), math.sqrt(2)]][row]
        z = [s[j] - float(log_q[j]) for j in range(2)]
        expected = z[target] - math.log(sum(math.exp(v) for v in z))
        assert float(got[row]) == pytest.approx(expected, rel=1e-6)
    # the popular column (q = 0.9) is pushed down, so its own target gets *less* mass and
    # the rare column's target more: the model must score popular items higher to match
    plain = inbatch_logprob(users, targets, index, tau=0.5)
    assert got[0] < plain[0] and got[1] > plain[1]
    # a constant shift of log q (uniform sampling) changes nothing
    same = inbatch_logprob(users, targets, index, tau=0.5, log_q=torch.full((2,), -3.0))
    torch.testing.assert_close(same, plain)
    loss = contrastive_loss(users, targets, index, tau=0.5, log_q=log_q)
    assert float(loss) == pytest.approx(-float(got.mean()), rel=1e-6)
    with pytest.raises(ValueError, match="log_q"):
        inbatch_logprob(users, targets, index, tau=0.5, log_q=torch.zeros(3))


def test_logq_correction_recovers_popularity_that_inbatch_softmax_hides() -> None:
    """One user context whose next item is drawn with p = (0.5, 0.2, 0.1, 0.1, 0.05,
    0.05), item embeddings learnt with in-batch negatives. The full softmax would put the
    popular item log(0.5/0.05) = 2.3 above the rare ones; in-batch negatives are drawn
    by popularity, so without the correction the learnt gap is far smaller (1.3 here),
    with it the gap comes back (3.6; cosine scores saturate, so not exactly 2.3)."""
    gen = torch.Generator().manual_seed(0)
    n_items, d = 6, 4
    probs = torch.tensor([0.5, 0.2, 0.1, 0.1, 0.05, 0.05])
    targets = torch.multinomial(probs, 4000, replacement=True, generator=gen)
    log_q_all = target_log_frequency(targets, n_items)
    user = torch.tensor([[1.0, 0.0, 0.0, 0.0]])  # one user context: p(item | user) = probs

    def train(correct: bool) -> torch.Tensor:
        torch.manual_seed(0)
        items = torch.nn.Parameter(torch.randn(n_items, d) * 0.1)
        opt = torch.optim.Adam([items], lr=0.05)
        for start in range(0, 4000, 8):
            batch = targets[start : start + 8]
            uniq, col = dedupe_targets(batch)
            loss = contrastive_loss(user.expand(len(batch), d), items[uniq], col, tau=0.5,
                                    log_q=log_q_all[uniq] if correct else None)
            opt.zero_grad()
            loss.backward()
            opt.step()
        from rrec.model.item_table import score

        return score(user, items.detach(), 0.5)[0]

    corrected, plain = train(True), train(False)
    gap, plain_gap = float(corrected[0] - corrected[4:].mean()), float(plain[0] - plain[4:].mean())
    assert gap > math.log(0.5 / 0.05) and gap > plain_gap + 1.5, (gap, plain_gap)
