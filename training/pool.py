"""How the merge pool is trained: the pool strategies, one registry.

A merge can only keep what its members share and gain from what they do not:
members that are nearly the same model gain nothing from merging, members from
separate starts cannot be averaged (a loss barrier lies between them). Each
strategy places the members somewhere on that trade-off:

- `finetune`: a shared base trained to convergence (early stopping, its best
  checkpoint), then every member continues from it at `recipe_lr`;
- `scratch`: every member from its own initialisation (the thesis's other setting);
- `spawn`: members share one trajectory for `spawn_epoch` epochs, then each trains
  on its own (its seed, data order, objective) for its epochs, at the
  experiment's rate (Frankle et al. 2020: children spawned after a short shared
  phase stay linearly connected while they diverge); spawn_epoch 0 is one shared
  initialisation;
- `population`: members train at once from their own initialisations (or, with
  `shared_init`, from one: no permutation between them to undo) and are
  pulled toward their mean every `exchange_every` steps (PAPA,
  training/population.py), as Ray actors; `pull_schedule: cosine` lets the
  pull fade to 0 over training (one basin early, room to differ late).

The merge job (`setting` in the pipeline config) and the benchmarks
(benchmarks/pool_sweep.py, benchmarks/merge_baselines.py) read the same config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from training.config import StrictModel

# name -> one line for the CLI, the docs and error messages
POOL_STRATEGIES: dict[str, str] = {
    "finetune": "members continue from one converged shared base at recipe_lr",
    "scratch": "every member from its own initialisation",
    "spawn": "members share the first spawn_epoch epochs, then train on their own",
    "population": "members train at once, pulled toward their mean every exchange_every steps",
}
PoolStrategy = Literal["finetune", "scratch", "spawn", "population"]

# name -> one line: how the population's pull changes over training (the CLI, the docs)
PULL_SCHEDULES: dict[str, str] = {
    "constant": "the same pull at every exchange",
    "cosine": "the pull decays from `pull` to 0 along a half cosine over the members' steps "
    "(one basin early, room to differ late)",
}
PullSchedule = Literal["constant", "cosine"]


class PoolSettings(StrictModel):
    """The settings of the strategies (the merge job's `pool:` block)."""

    spawn_epoch: int = Field(
        2, ge=0, description="spawn: epochs of the shared trajectory before members split"
    )
    # 0.05: as good as 0.01 on Beauty (3 seeds) and the only one of the two without a loss
    # barrier on ML-1M (docs/results/pool-strategies.md).
    pull: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="population: w <- (1 - pull) w + pull * mean at every exchange (0: none); "
        "what counts is the pull per epoch, 1 - (1 - pull)^(steps per epoch / exchange_every)",
    )
    exchange_every: int = Field(
        10, ge=1, description="population: optimiser steps between two exchanges"
    )
    pull_per_epoch: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="population: the pull compounded over one epoch; when set, it replaces "
        "pull, so that one value means the same on data sets of any size (None: use pull)",
    )
    pull_schedule: PullSchedule = Field(
        "constant",
        description="population: "
        + "; ".join(f"{name}: {line}" for name, line in PULL_SCHEDULES.items()),
    )
    shared_init: bool = Field(
        False,
        description="population: members start from one initialisation (the experiment's "
        "seed); their own seeds still set data order and dropout",
    )


class PoolConfig(PoolSettings):
    """A pool strategy with its settings (see training/pool.py)."""

    strategy: PoolStrategy = Field(
        "finetune", description="; ".join(f"{k}: {v}" for k, v in POOL_STRATEGIES.items())
    )

    @model_validator(mode="after")
    def _known(self) -> PoolConfig:
        if self.strategy not in POOL_STRATEGIES:  # Literal and registry must agree
            raise ValueError(f"unknown pool strategy {self.strategy!r}")
        if self.pull_schedule not in PULL_SCHEDULES:
            raise ValueError(f"unknown pull schedule {self.pull_schedule!r}")
        return self

    @property
    def shared_base(self) -> bool:
        """Whether members start from a shared base run (trained first)."""
        return self.strategy in ("finetune", "spawn")

    @property
    def spawns_from_last(self) -> bool:
        """Members start from the base's last epoch (its best/ otherwise)."""
        return self.strategy == "spawn" and self.spawn_epoch > 0

    def base_epochs(self, experiment_epochs: int) -> int | None:
        """Epochs of the shared base: the experiment's (early-stopped) or spawn_epoch."""
        if self.strategy == "finetune":
            return experiment_epochs
        if self.strategy == "spawn":
            return self.spawn_epoch
        return None

    def member_start(self, base_run: Path) -> Path:
        """Where members start: the base's best/ (finetune), its state at spawn_epoch (spawn).

        A spawn base of zero epochs has no last/: its best/ is the initial model.
        """
        from training.run_folder import LAST

        return Path(base_run) / LAST if self.spawns_from_last else Path(base_run)

    def member_init_seed(self, experiment_seed: int) -> int | None:
        """The initialisation seed every member shares, or None (each member its own)."""
        if self.strategy == "population" and self.shared_init:
            return experiment_seed
        return None

    def member_lr(self, experiment_lr: float, recipe_lr: float | None) -> float:
        """Only a fine-tune from a converged base lowers the rate (it must stay in the basin)."""
        if self.strategy == "finetune":
            return recipe_lr or experiment_lr
        return experiment_lr
