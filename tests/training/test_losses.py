"""Loss functions: InfoNCE, the chunked full cross-entropy and the logQ-corrected sampled softmax."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from tests.support import tiny_experiment
from training.batching import Batch
from training.losses import (
    POPULARITY_EXPONENT,
    Sampling,
    distinct_target_pairs,
    info_nce,
    info_nce_from_similarity,
    item_counts,
    linear_cross_entropy,
    log_frequency,
    log_proposal,
    negative_pairs,
    negative_pool,
    sampled_logits,
    similarity_matrix,
)
from training.model import ModelConfig, build_model
from training.recipes import RecipeParams, build_recipe
from training.run import train


def rows_of(weight: torch.Tensor):
    """Output vectors of item ids 1..N from an (N, D) weight, as `item_rows` gives them."""
    return lambda ids: weight[ids - 1]


def hand_info_nce(
    views: list[list[float]], temperature: float, weights: list[list[float]] | None = None
) -> float:
    """Plain-Python InfoNCE: views[0:B] are z1, views[B:2B] are z2; (i, i+B) are positives."""
    n = len(views)
    half = n // 2

    def dot(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    total = 0.0
    for i in range(n):
        p = (i + half) % n
        positive = math.exp(dot(views[i], views[p]) / temperature)
        negatives = sum(
            (weights[i][j] if weights else 1.0) * math.exp(dot(views[i], views[j]) / temperature)
            for j in range(n)
            if j not in (i, p)
        )
        total += -math.log(positive / (positive + negatives))
    return total / n


Z1 = [[1.0, 0.0], [0.5, -1.0]]
Z2 = [[0.8, 0.3], [0.0, -1.5]]


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_info_nce_equals_hand_computation(temperature: float) -> None:
    value = info_nce(torch.tensor(Z1), torch.tensor(Z2), temperature)
    assert float(value) == pytest.approx(hand_info_nce(Z1 + Z2, temperature), rel=1e-6)


def test_info_nce_matches_the_official_cross_entropy_form() -> None:
    # DuoRec/CL4SRec code: logits = [positive, negatives without self and positive], label 0.
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, 8), torch.randn(5, 8)
    sim = torch.cat([z1, z2]) @ torch.cat([z1, z2]).T / 0.7
    n = 10
    positive = torch.cat([torch.diag(sim, 5), torch.diag(sim, -5)])[:, None]
    negatives = sim[negative_pairs(5)].reshape(n, -1)
    expected = F.cross_entropy(
        torch.cat([positive, negatives], 1), torch.zeros(n, dtype=torch.long)
    )
    assert torch.allclose(info_nce(z1, z2, 0.7), expected, atol=1e-6)


def test_negative_weights_scale_and_drop_negatives_exactly() -> None:
    weights = [[1.0, 0.0, 1.0, 0.25] for _ in range(4)]
    value = info_nce(
        torch.tensor(Z1), torch.tensor(Z2), 1.0, negative_weights=torch.tensor(weights)
    )
    assert float(value) == pytest.approx(hand_info_nce(Z1 + Z2, 1.0, weights), rel=1e-6)


def test_dropped_negative_has_no_gradient_and_no_nan() -> None:
    # Huge norms: with "dot", self-similarity dwarfs everything; it must not underflow the rest.
    z1 = (torch.randn(3, 4) * 30).requires_grad_()
    z2 = (torch.randn(3, 4) * 30).requires_grad_()
    weights = torch.ones(6, 6)
    weights[0, 1] = 0.0  # view 1 is no negative of view 0
    loss = info_nce_from_similarity(similarity_matrix(z1, z2), 1.0, weights)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()


def test_all_negatives_dropped_leaves_zero_loss() -> None:
    z1, z2 = torch.randn(3, 4), torch.randn(3, 4)
    assert float(info_nce(z1, z2, negative_weights=torch.zeros(6, 6))) == pytest.approx(0.0)


def test_cosine_similarity_ignores_scale() -> None:
    z1, z2 = torch.randn(4, 6), torch.randn(4, 6)
    a = info_nce(z1, z2, 0.2, "cos")
    b = info_nce(3 * z1, 5 * z2, 0.2, "cos")
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(info_nce(z1, z2), info_nce(3 * z1, 5 * z2))


def test_distinct_target_pairs_marks_same_targets() -> None:
    allowed = distinct_target_pairs(torch.tensor([4, 4, 9]))
    assert allowed.shape == (6, 6)
    for i in range(6):
        for j in range(6):
            assert bool(allowed[i, j]) == ((i % 3 == 2) != (j % 3 == 2)), (i, j)


def test_negative_pairs_excludes_self_and_positive() -> None:
    keep = negative_pairs(3)
    assert keep.sum() == 6 * 4
    for i in range(6):
        assert not keep[i, i] and not keep[i, (i + 3) % 6]


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="views"):
        info_nce(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="similarity"):
        info_nce(torch.randn(3, 4), torch.randn(3, 4), similarity="l2")
    with pytest.raises(ValueError, match="2B, 2B"):
        info_nce_from_similarity(torch.randn(3, 3))


# ---- the chunked linear cross-entropy --------------------------------------------------


@pytest.mark.parametrize(
    ("chunk", "item_block"),
    [(7 * 30, 8192), (1 << 20, 8192), (7 * 8, 8), (1 << 20, 7)],
    ids=["many-row-chunks", "one-chunk", "rows-and-item-blocks", "item-blocks"],
)
def test_linear_cross_entropy_equals_the_materialised_loss_and_gradients(
    monkeypatch: pytest.MonkeyPatch, chunk: int, item_block: int
) -> None:
    import training.losses

    monkeypatch.setattr(training.losses, "LOGIT_CHUNK_ELEMENTS", chunk)
    # Catalogues wider than a block take the two-sweep path (30 items = 4-5 blocks).
    monkeypatch.setattr(training.losses, "ITEM_BLOCK", item_block)
    torch.manual_seed(0)
    h = torch.randn(100, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(30, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(30, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 30, (100,))
    reference = F.cross_entropy(h @ w.T + b, y)
    expected = torch.autograd.grad(2.5 * reference, (h, w, b))
    loss = linear_cross_entropy(h, w, b, y)
    got = torch.autograd.grad(2.5 * loss, (h, w, b))
    assert loss.item() == pytest.approx(reference.item(), rel=1e-12)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_linear_cross_entropy_under_bf16_autocast_is_close() -> None:
    torch.manual_seed(1)
    h = torch.randn(64, 16, requires_grad=True)
    w = (0.3 * torch.randn(50, 16)).requires_grad_()
    b = torch.zeros(50, requires_grad=True)
    y = torch.randint(0, 50, (64,))
    reference = F.cross_entropy(h @ w.T + b, y)
    expected = torch.autograd.grad(reference, (h, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, b, y)
    got = torch.autograd.grad(loss, (h, w))
    assert loss.dtype == torch.float32 and got[0].dtype == torch.float32
    assert loss.item() == pytest.approx(reference.item(), rel=2e-2)
    for g, e in zip(got, expected, strict=True):
        assert (g - e).norm() / e.norm() < 3e-2  # bf16 has 8 mantissa bits


@pytest.mark.parametrize("item_block", [8192, 2])
def test_linear_cross_entropy_without_gradients(
    monkeypatch: pytest.MonkeyPatch, item_block: int
) -> None:
    import training.losses

    monkeypatch.setattr(training.losses, "ITEM_BLOCK", item_block)
    h, w, b = torch.randn(5, 4), torch.randn(6, 4), torch.randn(6)
    y = torch.tensor([0, 5, 2, 2, 1])
    loss = linear_cross_entropy(h, w, b, y)
    assert not loss.requires_grad
    assert loss.item() == pytest.approx(F.cross_entropy(h @ w.T + b, y).item(), rel=1e-6)


# ---- the sampled softmax with logQ correction ----------------------------------------


def tiny_catalogue(items: int = 8, rows: int = 6, seed: int = 0):  # type: ignore[no-untyped-def]
    """Float64 states (M, D), output layer (N, D) + (N,), and Zipf-like counts (N,)."""
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(rows, 4, dtype=torch.float64, generator=g)
    weight = 0.7 * torch.randn(items, 4, dtype=torch.float64, generator=g)
    counts = (200.0 / torch.arange(1, items + 1, dtype=torch.float64)).round()
    # Popular items score higher, as in real data: a popularity proposal then matters.
    bias = 0.5 * counts.log()
    return states, weight, bias, counts


def draw_targets(counts: torch.Tensor, rows: int) -> torch.Tensor:
    """Item ids drawn from the training frequency, as a batch's targets are."""
    return torch.multinomial(counts / counts.sum(), rows, replacement=True) + 1


def sampling(counts: torch.Tensor, sampler: str, n: int, in_batch: bool) -> Sampling:
    return Sampling(n, log_proposal(counts, sampler), log_frequency(counts) if in_batch else None)


@pytest.mark.parametrize(
    ("sampler", "n", "in_batch"),
    [
        ("uniform", 16, False),
        ("popularity", 16, False),
        ("popularity", 16, True),
        ("uniform", 0, True),
    ],
)
def test_corrected_negatives_estimate_the_partition_sum_without_bias(
    sampler: str, n: int, in_batch: bool
) -> None:
    # The full cross-entropy in expectation: the pool's sum of exp(corrected logit) is
    # an unbiased estimate of the sum of exp over every item but the row's target.
    torch.manual_seed(0)
    states, weight, bias, counts = tiny_catalogue()
    setting = sampling(counts, sampler, n, in_batch)
    estimates, exacts = [], []
    for _ in range(3000):
        targets = draw_targets(counts, len(states))
        pool, log_weight = negative_pool(targets, setting)
        logits = sampled_logits(states, rows_of(weight), bias, targets, pool, log_weight)
        estimates.append(logits[:, 1:].exp().sum(1))
        full = (states @ weight.T + bias).exp()
        exacts.append(full.sum(1) - full.gather(1, targets[:, None] - 1)[:, 0])
    estimate, exact = torch.stack(estimates).mean(), torch.stack(exacts).mean()
    assert float(estimate) == pytest.approx(float(exact), rel=0.02)


def uncorrected_as_uniform(log_weight: torch.Tensor, n: int, items: int) -> torch.Tensor:
    """Popularity draws weighted as if they were uniform ones: count-corrected only."""
    return torch.full_like(log_weight, math.log(items / n))


def test_many_negatives_approach_the_full_cross_entropy_and_need_the_correction() -> None:
    torch.manual_seed(1)
    states, weight, bias, counts = tiny_catalogue(items=50, rows=32, seed=1)
    targets = draw_targets(counts, 32)
    full = F.cross_entropy(states @ weight.T + bias, targets - 1).item()
    n = 20_000
    errors = {}
    for name in ("uniform", "popularity"):
        pool, log_weight = negative_pool(targets, sampling(counts, name, n, False))
        logits = sampled_logits(states, rows_of(weight), bias, targets, pool, log_weight)
        errors[name] = abs(F.cross_entropy(logits, torch.zeros_like(targets)).item() - full)
        if name == "popularity":
            naive = uncorrected_as_uniform(log_weight, n, 50)
            logits = sampled_logits(states, rows_of(weight), bias, targets, pool, naive)
            errors["uncorrected"] = abs(
                F.cross_entropy(logits, torch.zeros_like(targets)).item() - full
            )
    assert errors["uniform"] < 0.01 and errors["popularity"] < 0.01, errors
    assert errors["uncorrected"] > 0.1 and errors["uncorrected"] > 20 * errors["popularity"], errors


def test_in_batch_negatives_are_masked_where_they_are_the_rows_target() -> None:
    states, weight, bias, counts = tiny_catalogue()
    targets = torch.tensor([3, 3, 5, 7])
    pool, log_weight = negative_pool(targets, sampling(counts, "uniform", 0, True))
    assert pool.tolist() == [3, 5, 7]  # one column per distinct target, with its count
    p = counts / counts.sum()
    assert float(log_weight[0]) == pytest.approx(math.log(2 / (3 * float(p[2]))))
    logits = sampled_logits(states[:4], rows_of(weight), bias, targets, pool, log_weight)
    negative = logits[:, 1:]
    assert negative.isinf().tolist() == [
        [True, False, False],
        [True, False, False],
        [False, True, False],
        [False, False, True],
    ]
    # With draws too: every entry equal to the row's target and only those are masked.
    torch.manual_seed(2)
    pool, log_weight = negative_pool(targets, sampling(counts, "popularity", 64, True))
    logits = sampled_logits(states[:4], rows_of(weight), bias, targets, pool, log_weight)
    assert torch.equal(logits[:, 1:].isinf(), pool[None, :] == targets[:, None])
    assert torch.isfinite(logits[:, 0]).all()
    assert torch.isfinite(F.cross_entropy(logits, torch.zeros_like(targets)))


def test_item_counts_and_proposals() -> None:
    counts = item_counts([np.array([1, 2, 2]), np.array([3, 2]), np.array([], dtype=int)], 4)
    assert counts.tolist() == [1, 3, 1, 0]
    uniform = log_proposal(counts, "uniform").exp()
    assert torch.allclose(uniform, torch.full((4,), 0.25))
    popularity = log_proposal(counts, "popularity").exp()
    expected = (counts + 1) ** POPULARITY_EXPONENT
    assert torch.allclose(popularity, (expected / expected.sum()).float())
    assert popularity[3] > 0  # an item never trained on can still be drawn
    assert log_frequency(counts).exp().tolist() == pytest.approx([0.2, 0.6, 0.2, 0.0])
    with pytest.raises(ValueError, match="sampler"):
        log_proposal(counts, "zipf")


# ---- the settings on the recipes -----------------------------------------------------

ROWS = [np.array([1 + (i % 29), 1 + (i * 7 % 29), 1 + (i * 11 % 30)]) for i in range(40)]


@pytest.mark.parametrize(
    ("name", "backbone"),
    [
        ("sasrec", "sasrec"),
        ("bert4rec", "bert4rec"),
        ("cl4srec", "sasrec"),
        ("duorec", "bert4rec"),
        ("ehrec", "sasrec"),
    ],
)
def test_recipes_take_the_sampled_softmax_and_keep_their_state_dicts(
    name: str, backbone: str
) -> None:
    tiny = ModelConfig(
        num_items=30, hidden_size=16, num_layers=1, num_heads=2, max_len=8, backbone=backbone
    )
    params = {"negatives": 16, "sampler": "popularity", "in_batch_negatives": True}
    plain = build_recipe(name, {}, tiny, ROWS)
    sampled = build_recipe(name, params, tiny, ROWS)
    assert plain.sampling() is None
    assert set(sampled.state_dict()) == set(plain.state_dict())  # buffers not persisted
    setting = sampled.sampling()
    assert setting is not None and setting.negatives == 16
    assert setting.log_frequency is not None and setting.log_proposal.shape == (30,)
    model = build_model(tiny, seed=0)
    items = torch.tensor([[0, 0, 4, 9, 2, 7, 1, 3, 5], [0, 0, 0, 0, 0, 6, 8, 10, 12]])
    items = items[:, -sampled.window_length() :]
    loss = sampled.loss(model, Batch(items, torch.tensor([0, 1]))).loss
    assert torch.isfinite(loss)
    loss.backward()


def test_sampler_settings_are_validated() -> None:
    assert RecipeParams().negatives == 0 and RecipeParams().sampler == "uniform"
    assert RecipeParams().in_batch_negatives is False
    for bad in ({"sampler": "zipf"}, {"negatives": -1}, {"in_batch_negatives": "maybe"}):
        with pytest.raises(ValidationError):
            RecipeParams.model_validate(bad)


def test_sampled_softmax_trains_a_useful_model(small_data, tmp_path: Path) -> None:
    config = tiny_experiment(
        train__epochs=2,
        train__validate_initial=True,
        recipe__params__negatives=256,
        recipe__params__sampler="popularity",
    )
    result = train(config, small_data, tmp_path / "sampled")
    scores = [e["valid"]["full"]["ndcg@10"] for e in result.history]
    mostpop = result.metrics["mostpop"]["valid"]["full"]["ndcg@10"]
    assert max(scores[1:]) > 1.6 * mostpop, (scores, mostpop)
    assert max(scores[1:]) > 4 * scores[0], scores
