"""Contrastive loss functions: InfoNCE against hand computations and the official formulation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.losses import (
    distinct_target_pairs,
    info_nce,
    info_nce_from_similarity,
    linear_cross_entropy,
    negative_pairs,
    similarity_matrix,
)


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


@pytest.mark.parametrize("chunk", [7 * 30, 1 << 20], ids=["many-chunks", "one-chunk"])
def test_linear_cross_entropy_equals_the_materialised_loss_and_gradients(
    monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    import training.losses

    monkeypatch.setattr(training.losses, "LOGIT_CHUNK_ELEMENTS", chunk)
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


def test_linear_cross_entropy_without_gradients() -> None:
    h, w, b = torch.randn(5, 4), torch.randn(6, 4), torch.randn(6)
    y = torch.tensor([0, 5, 2, 2, 1])
    loss = linear_cross_entropy(h, w, b, y)
    assert not loss.requires_grad
    assert loss.item() == pytest.approx(F.cross_entropy(h @ w.T + b, y).item(), rel=1e-6)
