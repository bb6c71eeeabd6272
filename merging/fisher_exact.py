"""Per-sequence Fisher terms: the exact full-vocabulary identity and the item-list engines.

With logits z = W h + b (W: rows 1..N of the item embedding E, tied with the
input), the gradient of log p_j for one sequence is

    g_j = (e_j − p) ⊗ h   on the output rows of W,
          (e_j − p)       on b,
        + Jᵀ u_j          through the hidden state h,  J = ∂h/∂θ, u_j = w_j − w̄.

Squaring and summing g_j² with weights splits into three parts (docs/merging.md, "The exact Fisher identity"):
the closed-form output-layer part, the Jacobian part Σ_k c_k (Jᵀ a_k)², and
the cross term 2 h_d Σ_k A[k, i] (Jᵀ a_k)[i, d] on the rows of W that are also
input rows of this sequence. The exact estimator takes a_r = q_r, c_r = λ_r from
the eigendecomposition of C = Σ_j p_j u_j u_jᵀ (D VJPs, no sampling error); the
item-list estimators take a_k = u_{j_k}, c_k = their weight.

VJPs are taken with respect to the *looked-up* input embeddings rather than the
whole table E: the Jacobian of E is non-zero only on the rows of the items in
the sequence, so it costs O(L·D) per VJP instead of O(N·D), and the padding row
never receives gradient. The `autograd` engine is the brute-force reference: a
dense VJP of log p through `model.logits` per item.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from merging.fisher_accumulator import FisherAccumulator, parameter_name
from training.model import PAD_ID, HiddenState, SequenceRecommender

# (p (N,) float64 on CPU) -> (columns (K,), weights (K,)): the items of one sequence.
ItemSelector = Callable[[Tensor], tuple[Tensor, Tensor]]

# The fused CPU attention kernel has no vmap batching rule (functorch falls back to
# a slow loop and warns); the math backend is plain matmuls and softmax, which vmap.
_VMAP_ATTENTION = [SDPBackend.MATH]


class Linearisation:
    """One sequence's forward pass, ready for VJPs of its hidden state h.

    The VJP is taken with respect to every parameter but the item embedding E,
    and with respect to a zero offset added to the looked-up input embeddings:
    that offset's gradient, summed per item id, is E's gradient.
    """

    def __init__(self, model: SequenceRecommender, history: Tensor) -> None:
        if model.config.modality:
            raise ValueError("the linearisation assumes ID-only items (W = the ID table)")
        self.model = model
        wrapper = HiddenState(model)
        embedding_name = parameter_name(model, model.item_embedding.weight)
        table = model.item_embedding.weight.detach()
        # h does not depend on the output bias: its VJP would be K x N zeros.
        constant = {embedding_name, parameter_name(model, model.output_bias)}
        params = {n: p.detach() for n, p in model.named_parameters() if n not in constant}
        self.input_ids = model.prediction_input(history)[0]  # (L',) ids the embedding looks up
        offset = table.new_zeros(1, len(self.input_ids), table.shape[1])  # (1, L', D)
        current: dict[str, Tensor] = {}

        def add_offset(module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
            return output + current["offset"]

        def hidden(values: dict[str, Tensor], delta: Tensor) -> Tensor:
            current["offset"] = delta
            state = {f"model.{n}": v for n, v in values.items()}
            state[f"model.{embedding_name}"] = table
            return functional_call(wrapper, state, (history,))[0]  # (D,)

        handle = model.item_embedding.register_forward_hook(add_offset)
        try:
            with sdpa_kernel(_VMAP_ATTENTION):
                h, self._vjp = vjp(hidden, params, offset)
        finally:
            handle.remove()
        self.h = h.detach()  # (D,)
        with torch.no_grad():
            self.p = torch.softmax(model.score(self.h), dim=-1)  # (N,)

    def pullback(self, cotangents: Tensor) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """Jᵀ a for each row a of `cotangents` (K, D).

        Returns (per-parameter gradients (K, ...) of every parameter but E,
        the item ids of E's non-zero rows (U,), E's gradient on those rows (K, U, D)).
        """
        grads, offset_grad = vmap(self._vjp)(cotangents)  # offset_grad: (K, 1, L', D)
        rows, inverse = torch.unique(self.input_ids, return_inverse=True)
        per_row = offset_grad.new_zeros(len(cotangents), len(rows), offset_grad.shape[-1])
        per_row.index_add_(1, inverse, offset_grad[:, 0])  # repeated items add up
        keep = rows != PAD_ID  # nn.Embedding never updates the padding row
        return grads, rows[keep], per_row[:, keep]

    def output_columns(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """(mask over rows that are items 1..N, their logits columns)."""
        is_item = (rows >= 1) & (rows <= self.model.config.num_items)
        return is_item, rows[is_item] - 1


def _chunks(count: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]


def _selected(select: ItemSelector, p: Tensor) -> tuple[Tensor, Tensor]:
    items, weights = select(p.detach().double().cpu())
    return items.to(p.device), weights.to(device=p.device, dtype=p.dtype)


def exact_identity(
    model: SequenceRecommender,
    history: Tensor,
    rank: int | None,
    accumulator: FisherAccumulator,
    items: int | None = None,
    generator: torch.Generator | None = None,
) -> None:
    """Add one sequence's full-vocabulary Fisher (docs/merging.md, "The exact Fisher identity") in D (or `rank`) VJPs.

    `items` (the `truncated:K` estimator) builds the covariance C from the K most
    probable items exactly and the rest from K draws (`_covariance`): O(K D²)
    instead of O(N D²), unbiased, the draws from `generator`.
    """
    lin = Linearisation(model, history)
    h, p = lin.h, lin.p
    weight = model.output_weight().detach()  # (N, D)
    mean = p @ weight  # w̄
    cov = _covariance(weight, p, mean, items, generator)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # ascending
    eigenvalues = eigenvalues.flip(0).clamp_min(0.0)
    eigenvectors = eigenvectors.flip(1)
    keep = len(eigenvalues) if rank is None else min(rank, len(eigenvalues))
    total = float(eigenvalues.sum())
    accumulator.dropped_mass += float(eigenvalues[keep:].sum()) / total if total > 0 else 0.0
    lam = eigenvalues[:keep].to(h.dtype)
    q = eigenvectors[:, :keep].to(h.dtype)  # (D, r)

    accumulator.add_output_terms(p * (1.0 - p), h)
    grads, rows, row_grads = lin.pullback(q.T)
    accumulator.add_jacobian_terms(lam, grads, rows, row_grads)
    # Cross term: 2 h_d p_k Σ_r (q_r·u_k) v_r[k, d] on rows k of W the sequence also reads.
    is_item, columns = lin.output_columns(rows)
    coeff = row_grads.new_zeros(keep, len(rows))
    coeff[:, is_item] = ((weight[columns] - mean) @ q).T * p[columns]
    accumulator.add_cross_terms(h, rows, row_grads, coeff)


def _covariance(
    weight: Tensor,
    p: Tensor,
    mean: Tensor,
    items: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """C = Σ_j p_j u_j u_jᵀ (float64, D×D), u_j = w_j − w̄; with `items` = K < N, estimated.

    The K most probable items exactly; the tail T (mass m_T) as its mean plus its
    spread: m_T ū ūᵀ, with m_T ū = −Σ_K p_j u_j known exactly (the u_j average to
    zero under p), plus (m_T / K) Σ_s (u_s − ū)(u_s − ū)ᵀ over K draws s from the
    tail in proportion to p: an unbiased estimate of C, so the Fisher it gives is
    unbiased too, and its sampling error averages out over the sequences.
    """
    if items is None or items >= len(p):
        u = weight - mean
        # The sum over N items as one matrix product in the model's precision (relative
        # error ~3e-7 at 7.7e5 items against float64, at a third of the time); the D×D
        # result and its eigenpairs in float64, where eigh is sensitive.
        return ((u * p[:, None]).T @ u).double()
    top = p.topk(items).indices
    u, q = weight[top] - mean, p[top]
    cov = ((u * q[:, None]).T @ u).double()
    tail = p.detach().to("cpu", torch.float64, copy=True)  # never p itself: it is zeroed below
    tail[top.cpu()] = 0.0
    tail_mass = float(tail.sum())
    if tail_mass <= 0.0:
        return cov
    tail_mean = -(q @ u).double() / tail_mass  # ū
    drawn = torch.multinomial(tail, items, replacement=True, generator=generator).to(p.device)
    spread = (weight[drawn] - mean).double() - tail_mean
    return (
        cov
        + tail_mass * torch.outer(tail_mean, tail_mean)
        + (tail_mass / items) * spread.T @ spread
    )


def structured_items(
    model: SequenceRecommender,
    history: Tensor,
    select: ItemSelector,
    accumulator: FisherAccumulator,
    max_gradients: int,
) -> None:
    """Add Σ_k w_k g(j_k)² for the items `select` picks: one VJP of h per item."""
    lin = Linearisation(model, history)
    h, p = lin.h, lin.p
    items, weights = _selected(select, p)
    weight = model.output_weight().detach()
    mean_embedding = p @ weight  # w̄ (D,)
    # Output layer, Σ_k w_k (δ_{j_k,i} − p_i)² = m_i (1 − 2 p_i) + p_i² Σ_k w_k.
    picked = torch.zeros_like(p).index_add_(0, items, weights)
    accumulator.add_output_terms(picked * (1.0 - 2.0 * p) + p.square() * weights.sum(), h)
    for part in _chunks(len(items), max_gradients):
        chunk, w = items[part], weights[part]
        grads, rows, row_grads = lin.pullback(weight[chunk] - mean_embedding)
        accumulator.add_jacobian_terms(w, grads, rows, row_grads)
        # Cross term: 2 h_d Σ_k w_k (δ_{j_k,i} − p_i) (Jᵀ u_{j_k})[i, d].
        is_item, columns = lin.output_columns(rows)
        coeff = row_grads.new_zeros(len(chunk), len(rows))
        hits = (chunk[:, None] == columns[None, :]).to(p.dtype)  # (K, U')
        coeff[:, is_item] = w[:, None] * (hits - p[columns][None, :])
        accumulator.add_cross_terms(h, rows, row_grads, coeff)


def autograd_items(
    model: SequenceRecommender,
    history: Tensor,
    select: ItemSelector,
    accumulator: FisherAccumulator,
    max_gradients: int,
) -> None:
    """Brute force: the full gradient of log p_j through `model.logits`, item by item."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def log_probabilities(values: dict[str, Tensor]) -> Tensor:
        return torch.log_softmax(functional_call(model, values, (history,))[0], dim=-1)

    with sdpa_kernel(_VMAP_ATTENTION):
        log_p, pullback = vjp(log_probabilities, params)
    items, weights = _selected(select, log_p.detach().exp())
    for part in _chunks(len(items), max_gradients):
        cotangents = F.one_hot(items[part], len(log_p)).to(log_p.dtype)  # (K, N)
        (grads,) = vmap(pullback)(cotangents)
        accumulator.add_dense(weights[part], grads)


def batch_shortcut_items(
    model: SequenceRecommender,
    histories: Tensor,
    selectors: list[ItemSelector],
    accumulator: FisherAccumulator,
) -> None:
    """APPROXIMATE (thesis): Σ_k (Σ_b √w_bk ∇ log p_b(j_bk))², one backward per draw slot k.

    Squaring the batch sum adds the cross-sequence products Σ_{b≠b'} g_b g_b',
    which per-sequence estimation does not have.
    """
    names = [name for name, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    with torch.enable_grad():
        log_p = torch.log_softmax(model.logits(histories), dim=-1)  # (B, N)
        probabilities = log_p.detach().exp()
        picks = [_selected(pick, p) for pick, p in zip(selectors, probabilities, strict=True)]
        slots = max(len(items) for items, _ in picks)
        for k in range(slots):
            terms = [
                weights[k].sqrt() * log_p[b, items[k]]
                for b, (items, weights) in enumerate(picks)
                if k < len(items)
            ]
            grads = torch.autograd.grad(
                torch.stack(terms).sum(), params, retain_graph=k < slots - 1, allow_unused=True
            )
            dense = {
                name: (torch.zeros_like(p) if g is None else g)[None]
                for name, p, g in zip(names, params, grads, strict=True)
            }
            accumulator.add_dense(torch.ones(1, dtype=log_p.dtype, device=log_p.device), dense)
