import math

import pytest
import torch

from rrec.metrics import (
    mask_history,
    pad_histories,
    paired_difference,
    ranking_metrics,
    target_ranks,
)


def _brute_rank(scores: list[float], target: int, history: list[int]) -> int:
    masked = [float("-inf") if i in history else s for i, s in enumerate(scores)]
    t = masked[target]
    return sum(1 for i, s in enumerate(masked) if i != target and s >= t) + 1


def test_ranks_and_metrics_match_brute_force_with_ties():
    g = torch.Generator().manual_seed(0)
    n, items = 200, 37
    # coarse integer scores force many ties
    scores = torch.randint(0, 6, (n, items), generator=g).float()
    targets = torch.randint(0, items, (n,), generator=g)
    histories = []
    for row in range(n):
        k = int(torch.randint(0, 6, (1,), generator=g))
        h = [int(x) for x in torch.randperm(items, generator=g)[:k] if int(x) != int(targets[row])]
        histories.append(h)
    ranks = target_ranks(scores, targets, pad_histories(histories))
    expected = [_brute_rank(scores[r].tolist(), int(targets[r]), histories[r]) for r in range(n)]
    assert ranks.tolist() == expected

    m = ranking_metrics(ranks, ks=(1, 5, 10, 20))
    for k in (1, 5, 10, 20):
        hit = sum(1 for r in expected if r <= k) / n
        ndcg = sum(1 / math.log2(r + 1) for r in expected if r <= k) / n
        assert math.isclose(m[f"hit@{k}"], hit, rel_tol=1e-12)
        assert math.isclose(m[f"ndcg@{k}"], ndcg, rel_tol=1e-12)


def test_all_equal_scores_rank_last_not_first():
    scores = torch.zeros(1, 10)
    assert target_ranks(scores, torch.tensor([3])).item() == 10


def test_history_masking_moves_target_up():
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0]])
    target = torch.tensor([2])
    assert target_ranks(scores, target).item() == 3
    assert target_ranks(scores, target, pad_histories([[0, 1]])).item() == 1
    masked = mask_history(scores, pad_histories([[0, 1]]))
    assert torch.isinf(masked[0, :2]).all() and masked[0, 2] == 3.0
    assert scores[0, 0] == 5.0  # the input is not modified


def test_target_first_gives_perfect_metrics():
    scores = torch.eye(4) * 10
    m = ranking_metrics(target_ranks(scores, torch.arange(4)), ks=(1,))
    assert m == {"hit@1": 1.0, "ndcg@1": 1.0}


def test_paired_difference_known_answers():
    """b minus a on the same examples, averaged over seeds, with a bootstrap interval."""
    same = [{1: 3, 2: 40}, {1: 1, 2: 5}]
    assert paired_difference(same, same) == (0.0, (0.0, 0.0), 0, 2)
    # b puts every target first where a put it second: 1 - 1/log2(3) on every example
    a, b = [{i: 2 for i in range(50)}], [{i: 1 for i in range(50)}]
    diff, (low, high), ahead, n = paired_difference(a, b)
    assert diff == pytest.approx(1 - 1 / math.log2(3)) and low == pytest.approx(diff) == high
    assert (ahead, n) == (1, 50)
    # seed 0: b gains 1.0 on example 0 only; seed 1: b loses 0.5 on example 1 only
    a = [{0: 100, 1: 1}, {0: 1, 1: 3}]
    b = [{0: 1, 1: 1}, {0: 1, 1: 100}]
    diff, (low, high), ahead, _ = paired_difference(a, b, resamples=500)
    assert diff == pytest.approx((1.0 - 0.5) / 4) and ahead == 1
    assert low < diff < high  # two examples that differ: the interval has width
    with pytest.raises(ValueError, match="same examples"):
        paired_difference([{1: 1}], [{2: 1}])
    with pytest.raises(ValueError, match="same number of seeds"):
        paired_difference([{1: 1}], [{1: 1}, {1: 2}])
