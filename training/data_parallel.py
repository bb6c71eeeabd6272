"""What the training loop needs to run data-parallel: a rank's place, and a DDP-wrappable loss.

training/distributed.py starts the Ray Train workers; each runs the ordinary
`Trainer` with a `Parallel` place. `Objective` is also the single-process
loss module, so the loop is the same with or without DDP around it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from training.batching import Batch
from training.model import SequenceRecommender
from training.recipes import Recipe


@dataclass(frozen=True)
class Parallel:
    """This process's place in a data-parallel run (training/distributed.py).

    Every rank draws the same global batches and trains on its own rows of each;
    `objective` is the DDP-wrapped loss, so gradients are averaged across ranks
    in backward. Only rank 0 validates and writes the run folder; the others
    learn from it whether to stop.
    """

    rank: int
    world_size: int

    @property
    def writer(self) -> bool:
        return self.rank == 0

    def shard(self, batch: Batch) -> Batch:
        """This rank's rows of a global batch (a batch smaller than the world repeats rows)."""
        rows = torch.arange(self.rank, batch.items.shape[0], self.world_size)
        if not len(rows):
            rows = torch.tensor([self.rank % batch.items.shape[0]])
        return Batch(batch.items[rows], batch.index[rows])

    def mean(self, value: float) -> float:
        """The mean of `value` over the ranks."""
        import torch.distributed as dist

        total = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(total)
        return float(total) / self.world_size

    def from_writer(self, value: Any) -> Any:
        """Rank 0's `value`, on every rank."""
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


class Objective(nn.Module):
    """The recipe's loss of the model as one module's forward, which DDP can wrap.

    DDP all-reduces the gradients of the parameters its module's forward used;
    recipes call `model.encode`, not `model.forward`, so the model and the
    recipe's own modules are wrapped together here.
    """

    def __init__(self, model: SequenceRecommender, recipe: Recipe) -> None:
        super().__init__()
        self.model, self.recipe = model, recipe

    def forward(self, batch: Batch) -> Tensor:
        return self.recipe.loss(self.model, batch).loss


def wrap_for_ddp(objective: nn.Module, recipe: Recipe) -> nn.Module:
    """`objective` under DDP (Ray Train's): rank 0's weights broadcast, gradients averaged.

    A recipe's own modules may sit out a step (a gate, a classifier); the
    backbone's parameters are all used by every loss.
    """
    from ray.train.torch import prepare_model

    own = any(p.requires_grad for p in recipe.parameters())
    return prepare_model(objective, parallel_strategy_kwargs={"find_unused_parameters": own})
