"""Validation quality around the models: on the plane through three recipes, along a line.

Model-soup papers (Wortsman et al., 2022; thesis Fig. 4.5) show where merged
models land relative to the models they came from by drawing validation
accuracy as contours over the plane through three of them. fishrec does the
same with NDCG@10 and the next-item loss:

- `Plane`: an orthonormal basis (Gram-Schmidt) of the plane through three
  weight vectors; `coords` projects a model onto it, `point` goes back;
- `Probe`: a seeded subset of validation users, scored quickly (full ranking,
  whole history excluded, as everywhere) and the mean next-item loss;
- `plane_landscape`: the probe on a grid over the plane (a point of the plane
  is a model too: every weight vector on it can be loaded and evaluated);
- `line_profile`: the probe along θ(t) = (1 - t) θ_a + t θ_b, e.g. from the best
  recipe to the merged model: a dip in the middle is a loss barrier.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from training.batching import pad_left
from training.evaluate import build_candidates, evaluate_scorer, model_scorer
from training.model import SequenceRecommender
from training.splits import EvalSplit, Split

StateDict = Mapping[str, Tensor]


def flat_weights(state: StateDict) -> Tensor:
    """All floating-point parameters as one vector, in name order."""
    return torch.cat(
        [state[k].double().flatten() for k in sorted(state) if state[k].is_floating_point()]
    )


def unflatten(vector: Tensor, template: StateDict) -> dict[str, Tensor]:
    """The state with `template`'s names, shapes and dtypes and the values of `vector`."""
    out: dict[str, Tensor] = {}
    offset = 0
    for name in sorted(template):
        tensor = template[name]
        if not tensor.is_floating_point():
            out[name] = tensor.clone()
            continue
        size = tensor.numel()
        out[name] = vector[offset : offset + size].reshape(tensor.shape).to(tensor.dtype)
        offset += size
    if offset != vector.numel():
        raise ValueError(f"vector has {vector.numel()} values, the template {offset}")
    return {name: out[name] for name in template}


@dataclass(frozen=True)
class Plane:
    """The plane through three weight vectors: origin the first, orthonormal u and v."""

    origin: Tensor
    u: Tensor
    v: Tensor

    @classmethod
    def through(cls, anchors: Sequence[Tensor]) -> Plane:
        origin, second, third = anchors
        u = second - origin
        u = u / u.norm().clamp_min(1e-12)
        v = third - origin
        v = v - (v @ u) * u
        return cls(origin, u, v / v.norm().clamp_min(1e-12))

    def coords(self, point: Tensor) -> tuple[float, float]:
        offset = point - self.origin
        return float(offset @ self.u), float(offset @ self.v)

    def point(self, x: float, y: float) -> Tensor:
        return self.origin + x * self.u + y * self.v


@dataclass
class Probe:
    """A fixed subset of validation users for many quick evaluations."""

    split: EvalSplit
    candidates: Any  # CandidateSets of the subset
    batch_size: int = 512

    def score(self, model: SequenceRecommender) -> dict[str, float]:
        """{"ndcg@10": full-ranking NDCG@10, "loss": mean next-item cross-entropy}."""
        was_training = model.training
        model.eval()
        try:
            result = evaluate_scorer(
                model_scorer(model),
                self.split,
                self.candidates,
                batch_size=self.batch_size,
                max_history=model.config.max_len,
            )
            return {"ndcg@10": result.metrics["full"]["ndcg@10"], "loss": self._loss(model)}
        finally:
            model.train(was_training)

    def _loss(self, model: SequenceRecommender) -> float:
        total = 0.0
        with torch.inference_mode():
            for start in range(0, len(self.split), self.batch_size):
                rows = range(start, min(start + self.batch_size, len(self.split)))
                histories = pad_left([self.split.histories[i] for i in rows], model.config.max_len)
                targets = torch.as_tensor(self.split.targets[list(rows)]) - 1  # column of item
                logits = model.logits(histories)
                total += float(F.cross_entropy(logits, targets, reduction="sum"))
        return total / len(self.split)


def validation_probe(split: Split, users: int, seed: int = 0) -> Probe:
    """A seeded subset of `users` validation users (all of them if there are fewer)."""
    valid = split.valid
    rows = np.arange(len(valid))
    if users < len(valid):
        rows = np.sort(np.random.default_rng(seed).choice(len(valid), users, replace=False))
    subset = EvalSplit(
        users=valid.users[rows],
        histories=[valid.histories[i] for i in rows],
        targets=valid.targets[rows],
        seen=[valid.seen[i] for i in rows],
    )
    return Probe(subset, build_candidates(subset, split.popularity, seed))


def _scored(template: SequenceRecommender, state: StateDict, probe: Probe) -> dict[str, float]:
    template.load_state_dict(state)
    return probe.score(template)


def plane_landscape(
    anchors: Mapping[str, StateDict],
    others: Mapping[str, StateDict],
    template: SequenceRecommender,
    probe: Probe,
    grid_points: int = 7,
    margin: float = 0.25,
) -> dict[str, Any]:
    """The probe on a grid_points² grid over the plane through the three `anchors`.

    The grid spans every anchor's and every other model's projection, widened by
    `margin` of the span on each side. Returns the axes, the NDCG@10 and loss
    grids (rows: y) and the coordinates of each model.
    """
    if len(anchors) != 3:
        raise ValueError(f"a plane needs three anchor models, got {len(anchors)}")
    flats = {name: flat_weights(state) for name, state in {**anchors, **others}.items()}
    plane = Plane.through([flats[name] for name in anchors])
    points = {name: plane.coords(flat) for name, flat in flats.items()}
    axes = []
    for dim in range(2):
        low = min(p[dim] for p in points.values())
        high = max(p[dim] for p in points.values())
        pad = margin * max(high - low, 1e-6)
        axes.append(np.linspace(low - pad, high + pad, grid_points).tolist())
    model = copy.deepcopy(template)
    reference = next(iter(anchors.values()))
    ndcg, loss = [], []
    for y in axes[1]:
        scores = [_scored(model, unflatten(plane.point(x, y), reference), probe) for x in axes[0]]
        ndcg.append([s["ndcg@10"] for s in scores])
        loss.append([s["loss"] for s in scores])
    return {"x": axes[0], "y": axes[1], "ndcg@10": ndcg, "loss": loss, "points": points}


def line_profile(
    start: StateDict,
    end: StateDict,
    template: SequenceRecommender,
    probe: Probe,
    points: int = 15,
    extend: float = 0.2,
) -> dict[str, list[float]]:
    """The probe along θ(t) = (1 - t) start + t end, t from -extend to 1 + extend."""
    a, b = flat_weights(start), flat_weights(end)
    model = copy.deepcopy(template)
    ts = np.linspace(-extend, 1.0 + extend, points).tolist()
    scores = [_scored(model, unflatten((1 - t) * a + t * b, start), probe) for t in ts]
    return {
        "t": ts,
        "ndcg@10": [s["ndcg@10"] for s in scores],
        "loss": [s["loss"] for s in scores],
    }


def line_barrier(line: Mapping[str, Any], metric: str = "ndcg@10") -> tuple[float, float]:
    """The largest dip of a `line_profile` below the straight line between its ends.

    Frankle et al. (2020): sup_t (1 - t) f(0) + t f(1) - f(t), over the measured
    interior points; also relative to the straight line at that point. Negative:
    the whole line lies above the straight one (no barrier). Against the ends'
    mean instead, two members of unequal quality would make a monotone line look
    like a barrier.
    """
    t, values = line["t"], line[metric]
    straight = [(1 - x) * values[0] + x * values[-1] for x in t]
    dip, at = max((straight[i] - values[i], straight[i]) for i in range(1, len(t) - 1))
    return float(dip), float(dip / at)
