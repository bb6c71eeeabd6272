"""Running sums of per-sequence Fisher diagonals: what every estimator adds its terms to.

Each estimator in merging/fisher.py (and the engines of merging/fisher_exact.py)
computes one sequence's squared-gradient terms and adds them here; the sums stay
in float64 and are keyed by parameter name, so shards computed apart (Ray tasks)
add up exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from training.model import SequenceRecommender


def parameter_name(model: nn.Module, tensor: Tensor) -> str:
    for name, param in model.named_parameters():
        if param is tensor:
            return name
    raise ValueError("the model does not own this tensor as a parameter")


class FisherAccumulator:
    """Running float64 sums of per-sequence Fisher diagonals, keyed by parameter name."""

    # Output-layer terms wait in a buffer of this many sequences, then go in as one matrix
    # product: one pass over the N x D rows per buffer, not per sequence.
    OUTPUT_BUFFER = 32

    def __init__(self, model: SequenceRecommender) -> None:
        self._sums = {
            name: torch.zeros_like(p, dtype=torch.float64) for name, p in model.named_parameters()
        }
        self._direct: list[Tensor] = []  # (N,) per waiting sequence
        self._h_squared: list[Tensor] = []  # (D,) per waiting sequence
        # The closed-form parts (exact, structured) need W to be the ID table; models
        # with text only run the dense engines (merging/fisher.py refuses the others).
        self.embedding = (
            "" if model.config.modality else parameter_name(model, model.item_embedding.weight)
        )
        self.bias = parameter_name(model, model.output_bias)
        self.num_items = model.config.num_items
        self.dropped_mass = 0.0

    @property
    def sums(self) -> dict[str, Tensor]:
        """The float64 sums, keyed by parameter name (waiting output terms added first)."""
        self._flush_output_terms()
        return self._sums

    def add_output_terms(self, direct: Tensor, h: Tensor) -> None:
        """Closed-form output-layer part: `direct` (N,) on b, direct ⊗ h² on W."""
        self._direct.append(direct.detach())
        self._h_squared.append(h.detach().square())
        if len(self._direct) >= self.OUTPUT_BUFFER:
            self._flush_output_terms()

    def _flush_output_terms(self) -> None:
        """Σ_s direct_s ⊗ h_s² for the waiting sequences as one (N, S) x (S, D) product.

        In the inputs' precision (float32: relative error ~1e-7 over S terms), added
        to the float64 sums once per buffer.
        """
        if not self._direct:
            return
        direct, h_squared = (
            torch.stack(self._direct),
            torch.stack(self._h_squared),
        )  # (S, N), (S, D)
        self._direct.clear()
        self._h_squared.clear()
        self._sums[self.bias] += direct.double().sum(0)
        rows = self._sums[self.embedding][1 : self.num_items + 1]
        rows += (direct.T @ h_squared).double()

    def add_jacobian_terms(
        self, weights: Tensor, grads: dict[str, Tensor], rows: Tensor, row_grads: Tensor
    ) -> None:
        """Σ_k weights_k (Jᵀ a_k)²: `grads` (K, ...) per parameter, `row_grads` (K, U, D)."""
        for name, g in grads.items():
            self._sums[name] += torch.einsum("k,k...->...", weights, g.square()).double()
        squares = torch.einsum("k,kud->ud", weights, row_grads.square())
        self._sums[self.embedding].index_add_(0, rows, squares.double())

    def add_cross_terms(self, h: Tensor, rows: Tensor, row_grads: Tensor, coeff: Tensor) -> None:
        """2 h_d Σ_k coeff[k, u] (Jᵀ a_k)[row u, d] on the input rows that are also output rows."""
        cross = 2.0 * h[None, :] * torch.einsum("ku,kud->ud", coeff, row_grads)
        self._sums[self.embedding].index_add_(0, rows, cross.double())

    def add_dense(self, weights: Tensor, grads: dict[str, Tensor]) -> None:
        """Σ_k weights_k g_k² for full per-item gradients (K, ...) of every parameter."""
        for name, g in grads.items():
            self._sums[name] += torch.einsum("k,k...->...", weights, g.square()).double()
