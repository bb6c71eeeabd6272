"""Losses as pure functions of a model and tensors.

The plain objectives (Cloze for BERT4Rec, next-item for SASRec) live here, and
every contrastive recipe adds its own term to them (training/recipes/).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from training.model import PAD_ID, SequenceRecommender


def cloze_mask(
    items: Tensor, mask_prob: float, mask_id: int, last_prob: float = 0.0
) -> tuple[Tensor, Tensor]:
    """BERT4Rec masking: replace a random `mask_prob` share of real items by [MASK].

    Returns (inputs, labels) with labels = the original id where masked, else 0.
    Every non-empty row gets at least one mask (its newest item when the draw
    picked none). With probability `last_prob` a row masks only its newest item,
    which is exactly the inference task (history + [MASK]).
    """
    real = items != PAD_ID  # (B, L)
    masked = (torch.rand(items.shape, device=items.device) < mask_prob) & real
    # Left padding: the newest item is always in the last column.
    only_last = torch.rand(items.shape[0], device=items.device) < last_prob
    none_picked = ~masked.any(dim=1)
    last = torch.zeros_like(masked)
    last[:, -1] = real[:, -1]
    masked = torch.where((only_last | none_picked)[:, None], last, masked)
    inputs = torch.where(masked, torch.full_like(items, mask_id), items)
    labels = torch.where(masked, items, torch.zeros_like(items))
    return inputs, labels


# Logit elements computed at once by `linear_cross_entropy`: 4 MiB in float32 stays in
# cache between the matmul, the softmax and the gradient (2.5x faster than 64 MiB here).
LOGIT_CHUNK_ELEMENTS = 1 << 20
# Items per block: a larger catalogue is processed in blocks of this many columns, so
# that a block of rows stays wide enough (128 at 2^20 elements) to reuse each block of
# W; cutting rows alone left 4 rows per chunk at 2.3e5 items, streaming W 1600 times.
ITEM_BLOCK = 8192


def linear_cross_entropy(states: Tensor, weight: Tensor, bias: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of softmax(states W^T + b) at `labels`, without all the logits.

    Equal to `F.cross_entropy(states @ weight.T + bias, labels)`. The full (M, N)
    logits (128 users x 200 positions x 3416 items on ML-1M: 350 MB, and as much
    again for their gradient) are never held: blocks of rows x items are computed
    one at a time and each block's gradient is taken while its logits exist. A
    catalogue wider than ITEM_BLOCK is swept twice per row block: once for the
    log-sum-exp (running max and sum), once for the gradient. Under bf16 autocast
    the matmuls run in bfloat16 and the softmax in float32.
    """
    return _LinearCrossEntropy.apply(states, weight, bias, labels)


def _item_blocks(num_items: int) -> list[slice]:
    """Column blocks; up to 2 x ITEM_BLOCK items stay one block (one sweep, >= 64 rows)."""
    if num_items <= 2 * ITEM_BLOCK:
        return [slice(0, num_items)]
    return [slice(c, min(c + ITEM_BLOCK, num_items)) for c in range(0, num_items, ITEM_BLOCK)]


def _log_sum_exp(
    h: Tensor, w: Tensor, bias: Tensor, blocks: list[slice], acc: torch.dtype
) -> Tensor:
    """(m,) log sum_j exp(h w_j + b_j), one item block at a time (running max and sum)."""
    top = torch.full((h.shape[0],), float("-inf"), dtype=acc, device=h.device)
    total = torch.zeros_like(top)
    for cols in blocks:
        logits = torch.addmm(bias[cols], h, w[cols].T).to(acc)
        new_top = torch.maximum(top, logits.max(dim=1).values)
        total = total * torch.exp(top - new_top) + torch.exp(logits - new_top[:, None]).sum(1)
        top = new_top
    return top + torch.log(total)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, states: Tensor, weight: Tensor, bias: Tensor, labels: Tensor) -> Tensor:  # type: ignore[override]
        device = states.device.type
        low = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        grads = any(ctx.needs_input_grad[:3])
        acc = torch.promote_types(torch.float32, states.dtype)  # softmax and sums
        with torch.autocast(device, enabled=False):
            w = weight.detach().to(low or weight.dtype)
            b = bias.detach().to(w.dtype)
            h_all = states.detach()
            blocks = _item_blocks(weight.shape[0])
            rows = max(1, LOGIT_CHUNK_ELEMENTS // (blocks[0].stop - blocks[0].start))
            total = states.new_zeros((), dtype=acc)
            grad_h = torch.empty_like(h_all, dtype=acc) if grads else None
            grad_w = torch.zeros_like(weight, dtype=acc) if grads else None
            grad_b = torch.zeros_like(bias, dtype=acc) if grads else None
            for start in range(0, h_all.shape[0], rows):
                h = h_all[start : start + rows].to(w.dtype)
                y = labels[start : start + rows]
                if not grads:
                    target = ((h * w[y]).sum(1) + b[y]).to(acc)
                    total += (_log_sum_exp(h, w, b, blocks, acc) - target).sum()
                    continue
                # One block: the logits of the log-sum-exp are the gradient's (one pass).
                lse = _log_sum_exp(h, w, b, blocks, acc) if len(blocks) > 1 else None
                target = torch.empty(len(y), dtype=acc, device=h.device)
                grad_rows = torch.zeros_like(h, dtype=acc)
                for cols in blocks:
                    logits = torch.addmm(b[cols], h, w[cols].T).to(acc)  # (m, c)
                    if lse is None:
                        lse = torch.logsumexp(logits, dim=1)
                    inside = (y >= cols.start) & (y < cols.stop)
                    picked = (inside.nonzero()[:, 0], y[inside] - cols.start)
                    target[inside] = logits[picked]
                    # d(loss sum)/d(logits) = softmax - onehot, in the logits' memory.
                    g = logits.sub_(lse[:, None]).exp_()
                    g[picked] -= 1.0
                    grad_b[cols] += g.sum(0)
                    g = g.to(w.dtype)
                    grad_rows += g @ w[cols]
                    grad_w[cols] += g.T @ h
                total += (lse - target).sum()
                grad_h[start : start + rows] = grad_rows
        count = max(1, states.shape[0])
        if grads:
            ctx.save_for_backward(grad_h, grad_w, grad_b)
            ctx.dtypes = (states.dtype, weight.dtype, bias.dtype)
        ctx.count = count
        return total / count

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_out / ctx.count
        dtypes = ctx.dtypes
        return (
            (grad_h * scale).to(dtypes[0]),
            (grad_w * scale).to(dtypes[1]),
            (grad_b * scale).to(dtypes[2]),
            None,
        )


# ---- sampled softmax for large catalogues ---------------------------------------------

# The popularity proposal is q_j ∝ (count_j + 1)^0.75. The +1 keeps every item drawable
# (the estimate below is unbiased only where q_j > 0, cold items included); the 0.75
# (word2vec's) flattens the head so that tail items still come up as negatives.
POPULARITY_EXPONENT = 0.75


def item_counts(sequences: Sequence[np.ndarray], num_items: int) -> Tensor:
    """(N,) float64: how often each item 1..N occurs in `sequences` (ids outside are ignored)."""
    counts = np.zeros(num_items + 1)
    # In slices, so that one copy of all interactions never has to exist at once.
    for start in range(0, len(sequences), 4096):
        flat = np.concatenate(
            [np.asarray(s, dtype=np.int64) for s in sequences[start : start + 4096]]
        )
        counts += np.bincount(flat, minlength=num_items + 1)[: num_items + 1]
    return torch.from_numpy(counts[1:])


def log_proposal(counts: Tensor, sampler: str) -> Tensor:
    """(N,) float32 log q_j: the distribution the sampled negatives are drawn from."""
    if sampler == "uniform":
        weights = torch.ones_like(counts)
    elif sampler == "popularity":
        weights = (counts + 1.0) ** POPULARITY_EXPONENT
    else:
        raise ValueError(f"sampler must be 'uniform' or 'popularity', got {sampler!r}")
    return (weights / weights.sum()).log().float()


def log_frequency(counts: Tensor) -> Tensor:
    """(N,) float32 log p_j: each item's share of the training items, unsmoothed.

    The targets of a batch are (nearly) draws from p, so this is what corrects
    in-batch negatives; an item never trained on has p = 0 and never is one.
    """
    return (counts / counts.sum()).log().float()


@dataclass(frozen=True)
class Sampling:
    """A sampled softmax in place of the full one; see `negative_pool`."""

    negatives: int  # n: items drawn per batch from the proposal, shared by its rows
    log_proposal: Tensor  # (N,) log q_j of items 1..N
    log_frequency: Tensor | None = None  # (N,) log p_j; given: in-batch negatives too


def negative_pool(targets: Tensor, sampling: Sampling) -> tuple[Tensor, Tensor]:
    """The negatives a batch shares and their log-weights: (K,) item ids, (K,) log w.

    The pool holds n draws (with replacement) from q and, with in-batch negatives,
    each distinct target of the batch once with its count c_j. For a row, item j
    is expected E_j = n q_j + (M - 1) p_j times among the draws and the *other*
    M - 1 targets (its own target is masked anyway), so with log w = log c - log E
    the pool's sum of w_j exp(s_j) is an unbiased estimate of the sum of exp(s_j)
    over the catalogue (importance sampling, Bengio & Senecal 2008; the logQ
    correction of Yi et al. 2019), provided the targets follow p. One formula for
    both sources: E_j is the mixture's expected count, so none is counted twice.
    """
    n, q = sampling.negatives, sampling.log_proposal.exp()
    drawn = torch.multinomial(q, n, replacement=True) + 1 if n > 0 else targets[:0]
    items, counts = [drawn], [torch.ones_like(drawn)]
    if sampling.log_frequency is not None:
        # Distinct targets with their counts: the same sum as one column per row, fewer columns.
        unique, count = torch.unique(targets, return_counts=True)
        items.append(unique)
        counts.append(count)
    pool = torch.cat(items)
    expected = n * q[pool - 1]
    if sampling.log_frequency is not None:
        expected = expected + (len(targets) - 1) * sampling.log_frequency[pool - 1].exp()
    return pool, torch.cat(counts).to(q.dtype).log() - expected.log()


def sampled_logits(
    states: Tensor,
    rows: Callable[[Tensor], Tensor],
    bias: Tensor,
    targets: Tensor,
    pool: Tensor,
    log_weight: Tensor,
) -> Tensor:
    """(M, 1 + K): each row's target logit, then the pool's logits plus their log-weights.

    `rows(ids)` gives the output vectors of item ids (`SequenceRecommender.item_rows`):
    only the targets' and the pool's are read. The target keeps its exact logit,
    so cross-entropy at column 0 is the full cross-entropy with only the
    negatives' part of the partition sum estimated (correcting the target too
    would bias it). Pool entries equal to a row's target are masked (-inf): they
    are that row's positive, not a negative.
    """
    positive = (states * rows(targets)).sum(-1) + bias[targets - 1]  # (M,)
    negative = states @ rows(pool).T + bias[pool - 1] + log_weight  # (M, K)
    negative = negative.masked_fill(pool[None, :] == targets[:, None], float("-inf"))
    return torch.cat([positive[:, None], negative], dim=1)


def item_cross_entropy(
    model: SequenceRecommender, states: Tensor, targets: Tensor, sampling: Sampling | None = None
) -> Tensor:
    """Mean cross-entropy of `targets` (M,) item ids given `states` (M, D).

    sampling None: softmax over the whole catalogue (chunked, exact). Otherwise a
    sampled softmax with logQ correction, for catalogues too large for that.
    """
    if sampling is None:
        return linear_cross_entropy(states, model.output_weight(), model.output_bias, targets - 1)
    pool, log_weight = negative_pool(targets, sampling)
    logits = sampled_logits(states, model.item_rows, model.output_bias, targets, pool, log_weight)
    return F.cross_entropy(logits, torch.zeros_like(targets))


def cloze_loss(
    model: SequenceRecommender,
    items: Tensor,
    mask_prob: float = 0.2,
    last_prob: float = 0.0,
    sampling: Sampling | None = None,
) -> Tensor:
    """BERT4Rec's objective: predict masked items from both sides."""
    inputs, labels = cloze_mask(items, mask_prob, model.config.mask_id, last_prob)
    states = model.encode(inputs)  # (B, L, D)
    picked = labels != PAD_ID
    return item_cross_entropy(model, states[picked], labels[picked], sampling)


def next_item_loss(
    model: SequenceRecommender, items: Tensor, sampling: Sampling | None = None
) -> Tensor:
    """SASRec's objective: at every position predict the following item."""
    inputs, targets = items[:, :-1], items[:, 1:]
    states = model.encode(inputs)  # (B, L-1, D)
    # A position predicts only when both it and its target are real items.
    picked = (targets != PAD_ID) & (inputs != PAD_ID)
    return item_cross_entropy(model, states[picked], targets[picked], sampling)


# ---- contrastive terms (CL4SRec, DuoRec, EHRec) ---------------------------------------


def similarity_matrix(z1: Tensor, z2: Tensor, similarity: str = "dot") -> Tensor:
    """Similarities of all 2B views of a batch: z = [z1; z2], (B, D) x 2 -> (2B, 2B).

    "dot" is the official CL4SRec/DuoRec choice; "cos" normalises the views first.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"views must both be (B, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if similarity not in ("dot", "cos"):
        raise ValueError(f"similarity must be 'dot' or 'cos', got {similarity!r}")
    z = torch.cat([z1, z2])  # (2B, D)
    if similarity == "cos":
        z = F.normalize(z, dim=-1)
    return z @ z.T


def negative_pairs(batch_size: int, device: torch.device | None = None) -> Tensor:
    """(2B, 2B) bool: the in-batch negatives of each view (not itself, not its positive)."""
    n = 2 * batch_size
    index = torch.arange(n, device=device)
    positive = (index + batch_size) % n
    keep = ~torch.eye(n, dtype=torch.bool, device=device)
    keep[index, positive] = False
    return keep


def distinct_target_pairs(targets: Tensor) -> Tensor:
    """(2B, 2B) bool: True where the two views belong to sequences with different targets.

    Views of two sequences with the same target are semantic positives (DuoRec),
    so they must not serve as each other's negatives.
    """
    different = targets[:, None] != targets[None, :]  # (B, B)
    return different.repeat(2, 2)


def info_nce_from_similarity(
    similarity: Tensor, temperature: float = 1.0, negative_weights: Tensor | None = None
) -> Tensor:
    """InfoNCE over 2B views whose positive pairs are (i, i + B), from their similarities.

    For view i with positive p and logits s = similarity / temperature:
        loss_i = -s_ip + log(exp(s_ip) + sum_j w_ij exp(s_ij))
    over the in-batch negatives j (every other view but i's positive), with
    w_ij = 1 by default. `negative_weights` (2B, 2B) in [0, 1] scales (soft-)removes
    negatives: 0 drops one exactly (same-target samples, EHRec's threshold).
    """
    n = similarity.shape[0]
    if similarity.shape != (n, n) or n % 2:
        raise ValueError(f"similarity must be (2B, 2B), got {tuple(similarity.shape)}")
    logits = similarity / temperature
    index = torch.arange(n, device=logits.device)
    positive = logits[index, (index + n // 2) % n]  # (2B,)
    weights = negative_pairs(n // 2, logits.device).to(logits.dtype)
    if negative_weights is not None:
        weights = weights * negative_weights
    # A weighted log-sum-exp: the shift m is the largest logit that counts, so an
    # excluded pair (e.g. a view with itself under "dot") cannot underflow the rest,
    # and a weight of exactly 0 contributes neither value nor NaN gradient.
    counted = logits.masked_fill(weights <= 0, float("-inf"))
    shift = torch.maximum(positive, counted.max(dim=1).values).detach()
    total = torch.exp(positive - shift) + (weights * torch.exp(counted - shift[:, None])).sum(1)
    return (torch.log(total) + shift - positive).mean()


def info_nce(
    z1: Tensor,
    z2: Tensor,
    temperature: float = 1.0,
    similarity: str = "dot",
    negative_weights: Tensor | None = None,
) -> Tensor:
    """InfoNCE with in-batch negatives (NT-Xent): row i of z1 and of z2 are a positive pair."""
    return info_nce_from_similarity(
        similarity_matrix(z1, z2, similarity), temperature, negative_weights
    )
