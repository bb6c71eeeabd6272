"""KDSR (Hu, Liu, Li, Kan, "Lightweight Modality Adaptation to Sequential Recommendation
via Correlation Supervision", ECIR 2024).

The text encoder is a frozen teacher; the student is the backbone's own item
representation (`model.item_representations()`), so a KDSR checkpoint has
exactly the parameters of a plain one and joins the merge pool. Besides the
backbone's plain objective, two correlation supervisions on the items of each
batch (at most `max_items` of those that have text, picked at random):

- holistic: each item's softmax over its cosine similarities to the other items,
  student vs teacher (text features), both at temperature τ; the loss is the
  KL divergence KL(teacher ‖ student), averaged over the items;
- dissected: the teacher feature is cut into `subspaces` slices; the vector of
  slice-wise cosines of an item pair is quantised into one of `codes`
  correlation codes by k-means (fitted once, on seeded random pairs, before
  training); a small classifier (owned by the recipe, not the backbone)
  predicts the pair's code from |h_i − h_j| of the student's vectors
  (cross-entropy over all pairs of the picked items).

Asynchronous learning: the modality adaptor of a model with text
(item_representation id+text or text) learns at `modality_lr_scale` times the
learning rate, so the text information it carries is not overwritten as fast
as the sequence encoder learns (the official code slows its modality tables
the same way). A plain ID model has no modality parameters: there the
correlations are distilled into the ID embeddings at the full rate.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.batching import Batch
from training.item_features import ItemFeatures
from training.model import PAD_ID, ModelConfig, SequenceRecommender
from training.recipe_params import KDSRParams
from training.recipes.base import Recipe, RecipeOutput, RecipeParams
from training.recipes.contrastive import EpochMeans

log = logging.getLogger(__name__)

ADAPTOR_PREFIX = "item_adaptor."


class FeatureRecipe(Recipe):
    """A recipe that learns from the item features: `build_recipe` hands them over."""

    def __init__(
        self,
        params: RecipeParams,
        model_config: ModelConfig,
        train: Sequence[np.ndarray],
        features: ItemFeatures,
    ) -> None:
        super().__init__(params, model_config, train)
        if features.num_items != model_config.num_items:
            raise ValueError(
                f"recipe {self.name!r}: the features cover {features.num_items} items, "
                f"the model scores {model_config.num_items}"
            )

    def lr_scales(self, model: SequenceRecommender) -> dict[str, float]:
        """Learning-rate factors of backbone parameters, by name (default: none)."""
        return {}


# ---- the losses, as pure functions ----------------------------------------------------------


def cosine_matrix(x: Tensor) -> Tensor:
    """(M, F) -> (M, M) cosine similarities of the rows."""
    x = F.normalize(x, dim=-1)
    return x @ x.T


def _off_diagonal(matrix: Tensor) -> Tensor:
    """(M, M) -> (M, M - 1): every row without its diagonal entry."""
    m = matrix.shape[0]
    keep = ~torch.eye(m, dtype=torch.bool, device=matrix.device)
    return matrix[keep].view(m, m - 1)


def holistic_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Mean over items i of KL(softmax_j(cos_T(i, j) / τ) ‖ softmax_j(cos_S(i, j) / τ)), j ≠ i."""
    if student.shape[0] != teacher.shape[0] or student.shape[0] < 2:
        raise ValueError(
            f"need the same M >= 2 items, got {student.shape[0]} and {teacher.shape[0]}"
        )
    log_q = F.log_softmax(_off_diagonal(cosine_matrix(student)) / temperature, dim=-1)
    log_p = F.log_softmax(_off_diagonal(cosine_matrix(teacher)) / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def subspace_cosines(a: Tensor, b: Tensor, subspaces: int) -> Tensor:
    """(P, F) x 2 -> (P, S): cosine of each pair within each of S feature slices.

    Slices are as equal as possible (torch.tensor_split); a zero slice has cosine 0.
    """
    if a.shape[-1] < subspaces:
        raise ValueError(f"{subspaces} subspaces need features of width >= {subspaces}")
    parts = zip(a.tensor_split(subspaces, -1), b.tensor_split(subspaces, -1), strict=True)
    return torch.stack([F.cosine_similarity(x, y, dim=-1, eps=1e-8) for x, y in parts], -1)


def assign_codes(vectors: Tensor, centroids: Tensor) -> Tensor:
    """(P, S) correlation vectors -> (P,) index of the nearest centroid (K, S)."""
    return torch.cdist(vectors.double(), centroids.double()).argmin(-1)


def fit_codes(
    features: Tensor,
    mask: Tensor,
    subspaces: int,
    codes: int,
    pairs: int,
    iterations: int,
    seed: int,
) -> Tensor:
    """(codes, subspaces) k-means centroids of the slice-cosine vectors of random item pairs.

    Deterministic for a seed: seeded pairs, the first `codes` distinct vectors as
    initial centroids, Lloyd iterations in float64; an empty cluster keeps its centroid.
    """
    items = torch.nonzero(mask.bool()).squeeze(-1).cpu()
    if len(items) < 2:
        raise ValueError("the correlation codes need at least 2 items with text")
    generator = torch.Generator().manual_seed(seed)
    first = items[torch.randint(len(items), (pairs,), generator=generator)]
    offset = torch.randint(1, len(items), (pairs,), generator=generator)
    second = items[(torch.searchsorted(items, first) + offset) % len(items)]  # never == first
    cpu = features.detach().cpu().double()
    vectors = subspace_cosines(cpu[first], cpu[second], subspaces)  # (P, S)
    distinct = torch.unique(vectors, dim=0)
    if len(distinct) < codes:
        raise ValueError(f"{codes} codes but only {len(distinct)} distinct pair correlations")
    centroids = distinct[torch.randperm(len(distinct), generator=generator)[:codes]].clone()
    for _ in range(iterations):
        assigned = assign_codes(vectors, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assigned, vectors)
        counts = torch.bincount(assigned, minlength=codes).double()
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
    return centroids.float()


def dissected_loss(
    classifier: nn.Module, student: Tensor, teacher: Tensor, centroids: Tensor, subspaces: int
) -> Tensor:
    """Cross-entropy of the teacher's correlation code of every pair i < j from |h_i − h_j|."""
    first, second = torch.triu_indices(len(student), len(student), offset=1, device=student.device)
    with torch.no_grad():
        targets = assign_codes(
            subspace_cosines(teacher[first], teacher[second], subspaces), centroids
        )
    logits = classifier((student[first] - student[second]).abs())  # (P, codes)
    return F.cross_entropy(logits, targets)


# ---- the recipe -------------------------------------------------------------------------------


class KDSR(FeatureRecipe):
    name = "kdsr"
    Params = KDSRParams
    params: KDSRParams
    teacher: Tensor
    has_text: Tensor
    centroids: Tensor

    def __init__(
        self,
        params: RecipeParams,
        model_config: ModelConfig,
        train: Sequence[np.ndarray],
        features: ItemFeatures,
    ) -> None:
        super().__init__(params, model_config, train, features)
        p = self.params
        vectors = torch.from_numpy(features.vectors).float()
        has_text = torch.from_numpy(features.mask).bool()
        # Index i is internal id i: a zero row for padding in front, none needed for [MASK].
        self.register_buffer("teacher", F.pad(vectors, (0, 0, 1, 0)), persistent=False)
        self.register_buffer("has_text", F.pad(has_text, (1, 0)), persistent=False)
        centroids = fit_codes(
            vectors, has_text, p.subspaces, p.codes, p.kmeans_pairs, p.kmeans_iterations, p.seed
        )
        self.register_buffer("centroids", centroids)
        # A fixed seed: the recipe is built after the model, from whatever state the
        # global RNG is in, and a run must start the same way every time.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(p.seed)
            d = model_config.hidden_size
            self.classifier = nn.Sequential(
                nn.Linear(d, p.classifier_hidden),
                nn.ReLU(),
                nn.Linear(p.classifier_hidden, p.codes),
            )
        self.logs = EpochMeans()

    def lr_scales(self, model: SequenceRecommender) -> dict[str, float]:
        scales = {
            name: self.params.modality_lr_scale
            for name, _ in model.named_parameters()
            if name.startswith(ADAPTOR_PREFIX)
        }
        if not scales:
            log.info("kdsr: the model has no modality adaptor; every parameter learns at full rate")
        return scales

    def batch_items(self, items: Tensor) -> Tensor:
        """The distinct items of a batch that have text, at most `max_items` (random subset)."""
        ids = torch.unique(items)
        ids = ids[(ids != PAD_ID) & (ids <= self.model_config.num_items)]
        ids = ids[self.has_text[ids]]
        if len(ids) > self.params.max_items:
            pick = torch.randperm(len(ids), device=ids.device)[: self.params.max_items]
            ids = ids[pick.sort().values]
        return ids

    def correlation_loss(self, model: SequenceRecommender, items: Tensor) -> Tensor:
        """The weighted holistic + dissected terms on the batch's items (0 with < 2 items)."""
        ids = self.batch_items(items)
        if len(ids) < 2:
            return items.new_zeros((), dtype=torch.float32)
        student = model.item_representations()[ids]  # (M, D)
        teacher = self.teacher[ids]  # (M, F)
        p = self.params
        holistic = holistic_loss(student, teacher, p.temperature)
        dissected = dissected_loss(self.classifier, student, teacher, self.centroids, p.subspaces)
        self.logs.add("holistic_loss", holistic)
        self.logs.add("dissected_loss", dissected)
        return p.holistic_weight * holistic + p.dissected_weight * dissected

    def loss(self, model: SequenceRecommender, batch: Batch) -> RecipeOutput:
        base = self.base_loss(model, batch.items)
        extra = self.correlation_loss(model, batch.items)
        total = base + extra
        self.logs.add("correlation_share", extra.detach() / total.detach())
        return RecipeOutput(total)

    def epoch_end(self) -> dict[str, float]:
        return {f"recipe/{name}": value for name, value in self.logs.pop().items()}
