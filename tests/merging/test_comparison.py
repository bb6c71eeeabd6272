"""The merge's references: the output ensemble and the paired test against the best recipe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from merging.ensemble import ensemble_max_len, ensemble_scorer
from merging.significance import paired_comparison
from training.model import ModelConfig, build_model


def model(seed: int, num_items: int = 30, max_len: int = 8):
    config = ModelConfig(num_items=num_items, backbone="sasrec", hidden_size=16, max_len=max_len)
    return build_model(config, seed=seed).eval()


def test_ensemble_scores_the_mean_log_probability() -> None:
    a, b = model(0), model(1, max_len=12)
    history = torch.tensor([[0, 0, 4, 7, 9, 2, 3, 5, 6, 8, 1, 11]])
    scores = ensemble_scorer([a, b])(history)
    expected = (
        torch.log_softmax(a.logits(history), -1) + torch.log_softmax(b.logits(history), -1)
    ) / 2
    torch.testing.assert_close(scores, expected)
    assert ensemble_max_len([a, b]) == 12
    # One member: its own ranking.
    alone = ensemble_scorer([a])(history)
    assert torch.equal(alone.argsort(descending=True), a.logits(history).argsort(descending=True))


def test_ensemble_refuses_mixed_catalogues_and_an_empty_pool() -> None:
    with pytest.raises(ValueError, match="different catalogues"):
        ensemble_scorer([model(0), model(1, num_items=31)])
    with pytest.raises(ValueError, match="at least one"):
        ensemble_scorer([])


def test_paired_comparison_finds_a_real_difference_and_no_phantom_one() -> None:
    rng = np.random.default_rng(0)
    b = (rng.random(4000) < 0.2).astype(float)
    better = np.where(rng.random(4000) < 0.1, 1.0, b)  # 10% of users flipped to a hit
    result = paired_comparison(better, b)
    assert result.difference > 0 and result.ci_low > 0
    assert result.p_ttest < 1e-6 and result.p_bootstrap < 0.01
    assert result.relative == pytest.approx(result.difference / b.mean())
    same = paired_comparison(b, b)
    assert same.difference == 0 and same.p_ttest == 1.0 and same.p_bootstrap == 1.0
    noise = paired_comparison(rng.permutation(b), b)  # same marginal, no real gain
    assert noise.ci_low < 0 < noise.ci_high or noise.p_ttest > 0.01


def test_paired_comparison_rejects_unpaired_input() -> None:
    with pytest.raises(ValueError, match="one length"):
        paired_comparison(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="at least 2"):
        paired_comparison(np.zeros(1), np.zeros(1))
