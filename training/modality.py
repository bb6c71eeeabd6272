"""The modality adaptor: frozen text features -> item vectors of the recommender.

A mixture of whitening experts, as in UniSRec (Hou et al., KDD 2022) and ANT
(Peng, Parthasarathy, Ning, "Multi-modality Meets Re-learning"): expert k
"whitens" a feature x with a learned shift and projection, (x - b_k) W_k, and a
softmax gate on x mixes the experts:

    adaptor(x) = Σ_k softmax(x G)_k · (dropout(x) - b_k) W_k

The features themselves stay frozen (they are a buffer of the backbone, not a
parameter); only b, W and G learn. The gate starts at zero, so training starts
from the plain average of the experts.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class WhiteningMixture(nn.Module):
    """(N, F) features -> (N, D) item vectors through `experts` whitening experts."""

    def __init__(
        self,
        feature_dim: int,
        hidden_size: int,
        experts: int = 4,
        dropout: float = 0.2,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if feature_dim < 1 or hidden_size < 1 or experts < 1:
            raise ValueError(
                f"feature_dim, hidden_size and experts must be >= 1, got "
                f"{feature_dim}, {hidden_size}, {experts}"
            )
        self.init_std = init_std
        self.bias = nn.Parameter(torch.zeros(experts, feature_dim))  # b_k
        self.weight = nn.Parameter(torch.zeros(experts, feature_dim, hidden_size))  # W_k
        self.gate = nn.Parameter(torch.zeros(feature_dim, experts))  # G
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.bias)
        nn.init.normal_(self.weight, std=self.init_std)
        nn.init.zeros_(self.gate)

    def forward(self, features: Tensor) -> Tensor:
        experts, feature_dim, hidden = self.weight.shape
        x = self.dropout(features)  # (N, F)
        # (x - b_k) W_k = x W_k - b_k W_k: never materialises an (N, K, F) tensor.
        projected = x @ self.weight.permute(1, 0, 2).reshape(feature_dim, experts * hidden)
        shifts = torch.einsum("kf,kfd->kd", self.bias, self.weight)  # (K, D)
        outputs = projected.view(-1, experts, hidden) - shifts  # (N, K, D)
        gate = torch.softmax(features @ self.gate, dim=-1)  # (N, K)
        return torch.einsum("nk,nkd->nd", gate, outputs)  # (N, D)
