"""RegMean (Jin et al., ICLR 2023): merging linear layers in closed form from input Grams.

For a linear layer y = W x + b that model m applies to inputs X_m (rows: the
states one pass over training sequences feeds it), RegMean picks the W that
reproduces every model's outputs on its own inputs as well as possible:

    W* = argmin_W Σ_m λ_m ||X_m W^T - X_m W_m^T||²  =  (Σ_m λ_m W_m G_m) (Σ_m λ_m G_m)^-1

with G_m = X_m^T X_m / rows the model's (mean) Gram matrix of inputs. fishrec
appends a constant 1 to every input, so the bias is merged in the same solve
(W and b are one matrix [W | b]). As in the paper, the off-diagonal entries of
each Gram are scaled by `alpha` (< 1 keeps the solve well conditioned and moves
toward a per-input-column weighted average; alpha = 0 is exactly that).

The Grams come from the Fisher pass (merging/fisher.py computes them over the
same training sequences) and are stored in the Fisher file as "gram:" tensors.
Keys name the weight and the rows of it that read the input:
`blocks.0.ffn.fc_in.weight[0:64]`. SASRec's block computes queries from LN(x) and
keys/values from x with one projection, so its `qkv` weight has two Grams
(rows 0:D and D:3D). Only the transformer's linear layers (blocks and head) are
merged this way; embeddings, norms and the output bias are merged by the caller.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from training.batching import pad_left
from training.model import PAD_ID, SelfAttention, SequenceRecommender

GRAM_PREFIX = "gram:"
_KEY = re.compile(r"^(?P<weight>.+\.weight)\[(?P<start>\d+):(?P<stop>\d+)\]$")


def gram_key(weight: str, start: int, stop: int) -> str:
    return f"{weight}[{start}:{stop}]"


def parse_gram_key(key: str) -> tuple[str, int, int]:
    """'blocks.0.attn.qkv.weight[64:192]' -> ('blocks.0.attn.qkv.weight', 64, 192)."""
    match = _KEY.match(key)
    if match is None:
        raise ValueError(f"{key!r} is not a Gram key (weight name followed by [start:stop])")
    return match["weight"], int(match["start"]), int(match["stop"])


def _augmented(x: Tensor) -> Tensor:
    """Rows (n, D) -> (n, D + 1) with a trailing 1: the bias column."""
    return torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)


class GramAccumulator:
    """Sums X^T X (inputs with a 1 appended) of the transformer's linear layers.

    Hooks every nn.Linear under `blocks.` and `head.` and the attention module
    (whose query and key/value inputs may differ). `rows` must be set to the
    (B, L) mask of real positions before each forward, so padding never counts.
    """

    def __init__(self, model: SequenceRecommender) -> None:
        self.sums: dict[str, Tensor] = {}
        self.rows = 0
        self.mask: Tensor | None = None
        self._handles: list[Any] = []
        for name, module in model.named_modules():
            if not name.startswith(("blocks.", "head")):
                continue
            if isinstance(module, SelfAttention):
                self._hook_attention(name, module)
            elif isinstance(module, nn.Linear) and not name.endswith("attn.qkv"):
                self._hook_linear(name, module)

    def _add(self, key: str, x: Tensor) -> None:
        if self.mask is None:
            raise RuntimeError("set GramAccumulator.mask before the forward pass")
        rows = _augmented(x[self.mask].double())  # real positions only
        gram = rows.T @ rows
        self.sums[key] = self.sums[key] + gram if key in self.sums else gram

    def _hook_linear(self, name: str, module: nn.Linear) -> None:
        key = gram_key(f"{name}.weight", 0, module.out_features)
        self._handles.append(
            module.register_forward_hook(lambda m, args, out: self._add(key, args[0]))
        )

    def _hook_attention(self, name: str, module: SelfAttention) -> None:
        dim = module.qkv.in_features
        query = gram_key(f"{name}.qkv.weight", 0, dim)
        keys_values = gram_key(f"{name}.qkv.weight", dim, 3 * dim)

        def hook(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0]
            context = kwargs.get("context", args[3] if len(args) > 3 else None)
            queries = kwargs.get("queries", args[2] if len(args) > 2 else None)
            if queries is not None:
                raise RuntimeError("Grams are collected on every position (queries=None)")
            self._add(query, x)
            self._add(keys_values, x if context is None else context)

        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def compute_grams(
    model: SequenceRecommender, sequences: Sequence[np.ndarray], batch_size: int = 64
) -> tuple[dict[str, Tensor], int]:
    """(Gram sums, rows) over the histories of `sequences` (each: history then next item).

    The model reads each history as it does to predict (its prediction input) and
    every real position's input to every linear layer is a row.
    """
    accumulator = GramAccumulator(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            order = np.argsort([len(s) for s in sequences], kind="stable")  # little padding
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                histories = pad_left([sequences[r][:-1] for r in rows]).to(device)
                items = model.prediction_input(histories)
                accumulator.mask = items != PAD_ID
                accumulator.rows += int(accumulator.mask.sum())
                model.encode(items)
    finally:
        accumulator.remove()
        model.train(was_training)
    return accumulator.sums, accumulator.rows


def _scaled(gram: Tensor, alpha: float) -> Tensor:
    """Off-diagonal entries times alpha (the paper's regularisation toward the diagonal)."""
    diagonal = torch.diag(torch.diagonal(gram))
    return alpha * gram + (1.0 - alpha) * diagonal


def regmean_linear(
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    grams: Sequence[Tensor],
    coefficients: Sequence[float],
    alpha: float,
) -> tuple[Tensor, Tensor | None]:
    """Merged (rows of W, rows of b) of one layer from each model's rows and mean Gram.

    weights: (R, D) per model; biases: (R,) or None; grams: (D + 1, D + 1), the
    last row/column belonging to the constant input 1. Input columns no model
    ever saw non-zero (dead units) keep the λ-weighted average.
    """
    with_bias = biases[0] is not None
    # [W | b] per model, and the Grams of the inputs these columns read.
    joined = [
        torch.cat([w.double(), b.double()[:, None]], 1) if b is not None else w.double()
        for w, b in zip(weights, biases, strict=True)
    ]
    used = [
        _scaled(g.double(), alpha) if with_bias else _scaled(g.double(), alpha)[:-1, :-1]
        for g in grams
    ]
    numerator = sum(lam * j @ g for j, g, lam in zip(joined, used, coefficients, strict=True))
    denominator = sum(lam * g for g, lam in zip(used, coefficients, strict=True))
    merged = sum(lam * j for j, lam in zip(joined, coefficients, strict=True)) / sum(coefficients)
    assert isinstance(numerator, Tensor) and isinstance(denominator, Tensor)
    assert isinstance(merged, Tensor)
    seen = torch.diagonal(denominator) > 0
    # W B = A on the seen columns: solve B W^T = A^T (B is symmetric).
    inner = denominator[seen][:, seen]
    merged[:, seen] = torch.linalg.solve(inner, numerator[:, seen].T).T
    if with_bias:
        return merged[:, :-1], merged[:, -1]
    return merged, None


def regmean_state(
    states: Sequence[dict[str, Tensor]],
    grams: Sequence[dict[str, Tensor]],
    coefficients: Sequence[float],
    alpha: float,
) -> dict[str, Tensor]:
    """The RegMean weights and biases of every layer the Grams cover (other entries: none).

    `grams`: per model, mean Grams keyed by `gram_key` (as stored in Fisher files).
    """
    keys = sorted(grams[0])
    for index, other in enumerate(grams[1:], start=1):
        if sorted(other) != keys:
            raise ValueError(f"model {index}'s Grams cover other layers than model 0's")
    merged: dict[str, Tensor] = {}
    for key in keys:
        weight_name, start, stop = parse_gram_key(key)
        if weight_name not in states[0]:
            raise ValueError(f"Gram {key!r} names no parameter of the models")
        bias_name = weight_name.removesuffix("weight") + "bias"
        has_bias = bias_name in states[0]
        rows = slice(start, stop)
        weight, bias = regmean_linear(
            [s[weight_name][rows] for s in states],
            [s[bias_name][rows] if has_bias else None for s in states],
            [g[key] for g in grams],
            coefficients,
            alpha,
        )
        dtype = states[0][weight_name].dtype
        target = merged.setdefault(weight_name, states[0][weight_name].clone())
        target[rows] = weight.to(dtype)
        if bias is not None:
            merged.setdefault(bias_name, states[0][bias_name].clone())[rows] = bias.to(dtype)
    return merged
