"""Noise levels and schedules: stratification, clamping, empirical rates of the mixed formula."""

from __future__ import annotations

import math

import pytest
import torch

from bard_core.noise import block_levels, get_schedule, mixed_probabilities, ordinary_token_ids


def test_levels_are_stratified_one_per_stratum():
    g = torch.Generator().manual_seed(0)
    for n in (1, 3, 8, 32):
        for _ in range(20):
            t = block_levels(n, 1e-9, g)
            assert torch.equal(torch.floor(t * n).long().sort().values, torch.arange(n))


def test_levels_are_clamped_to_t_min():
    g = torch.Generator().manual_seed(0)
    t = torch.cat([block_levels(32, 0.05, g) for _ in range(50)])
    assert t.min().item() == pytest.approx(0.05) and t.max() <= 1.0
    assert (1 / t).max() <= 20.0 + 1e-4


def test_levels_are_shuffled_over_blocks():
    g = torch.Generator().manual_seed(1)
    firsts = torch.stack([block_levels(4, 0.05, g)[0] for _ in range(400)])
    assert (firsts > 0.75).float().mean() > 0.15  # the first block is not always the least noisy


def test_mixed_probabilities_at_half():
    p_mask, p_sub, p_keep = mixed_probabilities(torch.tensor(0.5))
    assert p_mask.item() == pytest.approx(1 - math.cos(math.pi / 4))
    assert p_sub.item() == pytest.approx(math.sin(math.pi / 4) + math.cos(math.pi / 4) - 1)
    assert p_keep.item() == pytest.approx(1 - math.sin(math.pi / 4))
    assert (p_mask + p_sub + p_keep).item() == pytest.approx(1.0)


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9, 1.0])
def test_mixed_rates_match_the_formula(t):
    n = 200_000
    mask_id, x0 = 7, torch.full((n,), 100)
    substitutes = torch.arange(8, 60)  # ordinary tokens; 100 is not among them, so a substitute always differs
    g = torch.Generator().manual_seed(int(t * 100))
    xt = get_schedule("mixed")(x0, torch.full((n,), t), mask_id, substitutes, g)
    p_mask, p_sub, p_keep = (p.item() for p in mixed_probabilities(torch.tensor(t)))
    bound = 5 * math.sqrt(0.25 / n)  # 5 sigma of a Bernoulli mean
    assert abs((xt == mask_id).float().mean().item() - p_mask) < bound
    assert abs(torch.isin(xt, substitutes).float().mean().item() - p_sub) < bound
    assert abs((xt == 100).float().mean().item() - p_keep) < bound


@pytest.mark.parametrize("t", [0.2, 0.7])
def test_mask_rate_matches_t(t):
    n = 100_000
    g = torch.Generator().manual_seed(3)
    xt = get_schedule("mask")(torch.full((n,), 100), torch.full((n,), t), 7, torch.arange(8, 60), g)
    assert abs((xt == 7).float().mean().item() - t) < 5 * math.sqrt(0.25 / n)
    assert set(xt.unique().tolist()) <= {7, 100}


def test_substitutes_never_draw_special_or_mask_tokens():
    specials = {0, 1, 2, 3, 4, 5, 6, 7}
    ids = ordinary_token_ids(50, specials)
    assert not set(ids.tolist()) & specials and len(ids) == 42
    g = torch.Generator().manual_seed(0)
    xt = get_schedule("mixed")(torch.full((50_000,), 20), torch.ones(50_000), 7, ids, g)
    assert not set(xt.unique().tolist()) & (specials - {7})


def test_unknown_schedule_lists_the_valid_ones():
    with pytest.raises(ValueError, match="mask, mixed"):
        get_schedule("gaussian")
