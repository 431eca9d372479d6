import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F

from vlp.objectives.ipot import cosine_cost, ipot, ot_distance


def _padded_cosine_batch(lengths: list[tuple[int, int]], dim: int = 32, seed: int = 0):
    """Cosine costs between random word and region vectors, padded to the longest; padding holds junk."""
    gen = torch.Generator().manual_seed(seed)
    n_max = max(n for n, _ in lengths)
    m_max = max(m for _, m in lengths)
    words = torch.randn(len(lengths), n_max, dim, generator=gen)
    regions = torch.randn(len(lengths), m_max, dim, generator=gen)
    # Correlate some words with some regions so the optimal plan is far from uniform.
    regions[:, :n_max] += 1.5 * words[:, : min(n_max, m_max)]
    x_mask = torch.zeros(len(lengths), n_max, dtype=torch.bool)
    y_mask = torch.zeros(len(lengths), m_max, dtype=torch.bool)
    for i, (n, m) in enumerate(lengths):
        x_mask[i, :n] = True
        y_mask[i, :m] = True
    return cosine_cost(words, regions), x_mask, y_mask


def _emd(cost: torch.Tensor) -> float:
    n, m = cost.shape
    return float(ot.emd2(np.full(n, 1.0 / n), np.full(m, 1.0 / m), cost.double().numpy()))


def test_cosine_cost_hand_values():
    x = torch.tensor([[[2.0, 0.0], [0.0, 3.0]]])
    y = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0]]])
    half = 1 - 1 / 2**0.5
    expected = torch.tensor([[[0.0, 1.0, 2.0, half], [1.0, 0.0, 1.0, half]]])
    assert torch.allclose(cosine_cost(x, y), expected, atol=1e-6)


def test_single_row_plan_spreads_uniformly():
    # One source point must send its whole mass evenly to the 3 targets: the distance is the mean cost.
    cost = torch.tensor([[[0.2, 0.5, 0.8]]])
    mask_x, mask_y = torch.ones(1, 1, dtype=torch.bool), torch.ones(1, 3, dtype=torch.bool)
    plan = ipot(cost, mask_x, mask_y)
    assert torch.allclose(plan, torch.full((1, 1, 3), 1 / 3), atol=1e-6)
    assert ot_distance(cost, mask_x, mask_y).item() == pytest.approx(0.5, abs=1e-6)


def test_permutation_cost_gives_the_matching():
    # Zero cost on an anti-diagonal: exact OT is 0 and the plan is that permutation with mass 1/3 each.
    cost = torch.ones(1, 3, 3) - torch.eye(3).flip(1).unsqueeze(0)
    mask = torch.ones(1, 3, dtype=torch.bool)
    plan = ipot(cost, mask, mask)
    assert torch.allclose(plan[0], torch.eye(3).flip(1) / 3, atol=1e-4)
    assert ot_distance(cost, mask, mask).item() == pytest.approx(0.0, abs=1e-4)


def test_matches_exact_ot_within_one_percent_at_defaults():
    lengths = [(20, 36), (12, 36), (20, 10), (5, 30), (17, 23), (8, 8), (3, 36), (20, 36)] * 4
    cost, x_mask, y_mask = _padded_cosine_batch(lengths)
    distance = ot_distance(cost, x_mask, y_mask)  # beta 0.5, 50 iterations
    exact = torch.tensor([_emd(cost[i, :n, :m]) for i, (n, m) in enumerate(lengths)])
    relative = ((distance.double() - exact) / exact).abs()
    assert relative.max().item() <= 0.01


def test_plan_has_the_uniform_marginals():
    lengths = [(7, 11), (4, 9), (10, 3)]
    cost, x_mask, y_mask = _padded_cosine_batch(lengths, seed=3)
    plan = ipot(cost, x_mask, y_mask, iterations=200)
    for i, (n, m) in enumerate(lengths):
        assert torch.allclose(plan[i, :n].sum(1), torch.full((n,), 1 / n), rtol=1e-3)
        assert torch.allclose(plan[i, :, :m].sum(0), torch.full((m,), 1 / m), rtol=1e-3)


def test_padding_changes_nothing():
    lengths = [(6, 9), (4, 12), (9, 5)]
    cost, x_mask, y_mask = _padded_cosine_batch(lengths, seed=1)
    alone = [
        ot_distance(cost[i : i + 1, :n, :m], x_mask[i : i + 1, :n], y_mask[i : i + 1, :m])
        for i, (n, m) in enumerate(lengths)
    ]
    # Pad further with large junk costs: extra rows and columns must get no mass and change no distance.
    padded_cost = F.pad(cost, (0, 4, 0, 3), value=-7.0)
    padded_x = F.pad(x_mask, (0, 3), value=False)
    padded_y = F.pad(y_mask, (0, 4), value=False)
    plan = ipot(padded_cost, padded_x, padded_y)
    batched = ot_distance(padded_cost, padded_x, padded_y)
    assert torch.allclose(batched, torch.cat(alone), atol=1e-6)
    joint = padded_x.unsqueeze(2) & padded_y.unsqueeze(1)
    assert plan[~joint].abs().max().item() == 0.0


def test_gradient_flows_through_the_cost_only():
    cost, x_mask, y_mask = _padded_cosine_batch([(5, 7), (3, 7)], seed=2)
    cost = cost.detach().requires_grad_(True)
    distance = ot_distance(cost, x_mask, y_mask)
    distance.sum().backward()
    plan = ipot(cost, x_mask, y_mask)
    assert not plan.requires_grad
    # With the plan held constant, d<plan, cost>/d cost is the plan itself (zero at padding).
    assert torch.allclose(cost.grad, plan, atol=0, rtol=0)


def test_example_without_real_positions_is_zero_not_nan():
    cost = torch.rand(2, 4, 5)
    x_mask = torch.tensor([[True, True, False, False], [False, False, False, False]])
    y_mask = torch.ones(2, 5, dtype=torch.bool)
    distance = ot_distance(cost, x_mask, y_mask)
    assert torch.isfinite(distance).all()
    assert distance[1].item() == 0.0


def test_large_costs_do_not_underflow():
    cost, x_mask, y_mask = _padded_cosine_batch([(6, 9), (4, 12)], seed=4)
    base = ot_distance(cost, x_mask, y_mask)
    shifted = ot_distance(cost + 100.0, x_mask, y_mask)
    assert torch.allclose(shifted, base + 100.0, atol=1e-4)


def test_low_precision_cost_is_solved_in_fp32():
    cost, x_mask, y_mask = _padded_cosine_batch([(6, 9)], seed=5)
    plan = ipot(cost.bfloat16(), x_mask, y_mask)
    assert plan.dtype == torch.float32
    assert torch.isfinite(plan).all()


def test_bad_options_are_rejected():
    cost = torch.rand(1, 2, 3)
    mask_x, mask_y = torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="beta > 0"):
        ipot(cost, mask_x, mask_y, beta=0.0)
    with pytest.raises(ValueError, match="masks"):
        ipot(cost, mask_y, mask_x)
