"""Weight matching: permute one model's hidden units onto another's before averaging.

Two models trained from separate initialisations compute the same function up
to a relabelling of their hidden units, and averaging them unit by unit mixes
unrelated units (the loss barrier of the scratch pool). Weight matching (Git
Re-Basin, Ainsworth et al. 2023; for transformers Verma & Elbayad 2024) finds,
for every group of interchangeable units, the permutation of model B that best
matches model A's weights, by coordinate ascent over linear assignment problems.

The symmetries this model really has (training/model.py), each an exact one:

- `residual`: the D coordinates of the residual stream, shared by the item and
  position embeddings, every LayerNorm (its gain and bias are per coordinate, so
  a permutation commutes with it; a rotation does not: LayerNorm's gains and
  its mean over coordinates single out the basis), the input side of the
  attention and feed-forward layers, their output side, and the output layer
  (tied to the item embeddings). The item embedding matrix (N x D, N items with
  the same meaning in both models) is the strongest matching signal;
- `blocks.i.ffn`: the feed-forward layer's hidden units (ReLU/GELU act per unit);
- `blocks.i.qk`: the query and key coordinates of each head, together (q . k is
  what matters), within the head;
- `blocks.i.v`: the value coordinates of each head with the output projection's
  inputs, within the head.

Heads as wholes could also be swapped; that is left out (one head is the
default, so nothing is lost there). Item-text models (feature projections) are
refused: their extra layers are not covered.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

StateDict = dict[str, Tensor]
Axes = list[tuple[str, int]]  # (tensor name, axis) a permutation acts on


@dataclass(frozen=True)
class Group:
    """A set of interchangeable units: its size, the axes it permutes, its blocks."""

    name: str
    size: int
    axes: Axes
    block: int  # units only move within blocks of this size (a head); size for none


def _qkv_names(prefix: str) -> dict[str, str]:
    return {part: f"{prefix}.attn.{part}" for part in ("q", "k", "v")}


def split_attention(state: StateDict) -> StateDict:
    """qkv.weight/bias as separate q, k, v tensors (permuted apart, joined again after)."""
    out = {}
    for name, tensor in state.items():
        if ".attn.qkv." not in name:
            out[name] = tensor
            continue
        prefix, kind = name.split(".attn.qkv.")
        for part, chunk in zip("qkv", tensor.chunk(3, dim=0), strict=True):
            out[f"{prefix}.attn.{part}.{kind}"] = chunk
    return out


def join_attention(state: StateDict) -> StateDict:
    out = {}
    for name, tensor in state.items():
        if ".attn.q." in name:
            prefix, kind = name.split(".attn.q.")
            parts = [state[f"{prefix}.attn.{p}.{kind}"] for p in "qkv"]
            out[f"{prefix}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
        elif ".attn.k." not in name and ".attn.v." not in name:
            out[name] = tensor
    return out


def permutation_groups(state: StateDict, num_heads: int) -> list[Group]:
    """The model's symmetries as permutation groups over the split state's tensors."""
    split = split_attention(state)
    if any(name.startswith(("feature", "item_projection", "adapter")) for name in split):
        raise ValueError("alignment covers ID-only models; this one has item-feature layers")
    dim = split["item_embedding.weight"].shape[1]
    residual: Axes = [("item_embedding.weight", 1), ("position_embedding.weight", 1)]
    groups = []
    blocks = sorted({int(n.split(".")[1]) for n in split if n.startswith("blocks.")})
    for i in blocks:
        b = f"blocks.{i}"
        residual += [(f"{b}.ln_attn.weight", 0), (f"{b}.ln_attn.bias", 0)]
        residual += [(f"{b}.attn.{p}.weight", 1) for p in "qkv"]
        residual += [(f"{b}.attn.proj.weight", 0), (f"{b}.attn.proj.bias", 0)]
        residual += [(f"{b}.ln_ffn.weight", 0), (f"{b}.ln_ffn.bias", 0)]
        residual += [(f"{b}.ffn.fc_in.weight", 1), (f"{b}.ffn.fc_out.weight", 0)]
        residual += [(f"{b}.ffn.fc_out.bias", 0)]
        hidden = split[f"{b}.ffn.fc_in.weight"].shape[0]
        ffn: Axes = [(f"{b}.ffn.fc_in.weight", 0), (f"{b}.ffn.fc_in.bias", 0)]
        groups.append(Group(f"{b}.ffn", hidden, [*ffn, (f"{b}.ffn.fc_out.weight", 1)], hidden))
        head = dim // num_heads
        qk: Axes = [(f"{b}.attn.{p}.{k}", 0) for p in "qk" for k in ("weight", "bias")]
        groups.append(Group(f"{b}.qk", dim, qk, head))
        v: Axes = [(f"{b}.attn.v.weight", 0), (f"{b}.attn.v.bias", 0)]
        groups.append(Group(f"{b}.v", dim, [*v, (f"{b}.attn.proj.weight", 1)], head))
    for norm in ("embed_norm", "final_norm"):
        residual += [(f"{norm}.{k}", 0) for k in ("weight", "bias") if f"{norm}.{k}" in split]
    for name in ("head.0.weight",):  # the prediction head maps the stream onto itself
        if name in split:
            residual += [(name, 0), (name, 1), ("head.0.bias", 0)]
            residual += [(f"head.2.{k}", 0) for k in ("weight", "bias")]
    groups.insert(0, Group("residual", dim, residual, dim))
    known = {name for g in groups for name, _ in g.axes} | {"output_bias"}
    unknown = sorted(set(split) - known)
    if unknown:
        raise ValueError(f"alignment does not know how to permute {unknown}")
    return groups


def permute(state: StateDict, groups: list[Group], perms: dict[str, np.ndarray]) -> StateDict:
    """Apply `perms` (group name -> new order of its units) to a split state."""
    out = dict(state)
    for group in groups:
        order = torch.as_tensor(perms[group.name])
        for name, axis in group.axes:
            out[name] = out[name].index_select(axis, order)
    return out


def _cost(a: StateDict, b: StateDict, group: Group) -> np.ndarray:
    """C[i, j]: how well unit j of B matches unit i of A over every tensor the group touches."""
    cost = torch.zeros(group.size, group.size, dtype=torch.float64)
    for name, axis in group.axes:
        x = a[name].movedim(axis, 0).reshape(group.size, -1).double()
        y = b[name].movedim(axis, 0).reshape(group.size, -1).double()
        cost += x @ y.T
    return cost.numpy()


def _assign(cost: np.ndarray, block: int) -> np.ndarray:
    """The best permutation, moving units only within blocks (heads) of `block` units."""
    order = np.arange(len(cost))
    for start in range(0, len(cost), block):
        part = slice(start, start + block)
        _, columns = linear_sum_assignment(cost[part, part], maximize=True)
        order[part] = columns + start
    return order


def match_weights(
    reference: StateDict, other: StateDict, num_heads: int, iterations: int = 50, seed: int = 0
) -> tuple[StateDict, dict[str, np.ndarray]]:
    """`other` with its units permuted onto `reference`'s; and the permutations found.

    Coordinate ascent: each group's assignment is solved with the other groups'
    permutations held fixed, in a random order, until a sweep changes nothing.
    """
    a, b = split_attention(reference), split_attention(other)
    groups = permutation_groups(reference, num_heads)
    perms = {g.name: np.arange(g.size) for g in groups}
    # Start the stream from the embeddings alone: items mean the same in both models,
    # so their N x D tables match column by column without the other groups' noise.
    residual = groups[0]
    embeddings = Group("embeddings", residual.size, residual.axes[:2], residual.size)
    perms[residual.name] = _assign(_cost(a, b, embeddings), residual.size)
    rng = np.random.default_rng(seed)
    for sweep in range(iterations):
        changed = False
        # The first sweep solves the inner groups against that stream (re-solving the
        # stream while they are still unmatched would trade it for noise); later
        # sweeps visit every group in a random order.
        for index in range(1, len(groups)) if sweep == 0 else rng.permutation(len(groups)):
            group = groups[index]
            rest = {**perms, group.name: np.arange(group.size)}
            held = permute(b, groups, rest)
            order = _assign(_cost(a, held, group), group.block)
            if not np.array_equal(order, perms[group.name]):
                perms[group.name], changed = order, True
        if not changed:
            break
    return join_attention(permute(b, groups, perms)), perms


def apply_permutations(state: StateDict, perms: dict[str, np.ndarray], num_heads: int) -> StateDict:
    """The same permutations on another tensor set of the model's shape (e.g. its Fisher)."""
    return join_attention(
        permute(split_attention(state), permutation_groups(state, num_heads), perms)
    )
