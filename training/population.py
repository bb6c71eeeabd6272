"""Population training: pool members that train at once and are pulled toward their mean.

PAPA (Jolicoeur-Martineau et al., TMLR 2024): every `exchange_every` optimiser
steps, each member moves toward the population's mean,

    w_i <- (1 - pull) w_i + pull * mean_j(w_j),

so members keep their own initialisation, data order, dropout and objective
(they stay different enough for their ensemble to gain) while the pull keeps
them in one basin of the loss (close enough for their average to keep the
gain). `pull` 0 is independent training, bit for bit.

Each member is a Ray actor holding its own `Trainer` (one process, its own
threads): the driver advances every member `exchange_every` steps, gathers
their weights through the object store, and sends the mean back. That is the
job's own distribution: on a cluster the members run on any nodes. Only the
model's parameters are pulled; each member keeps its optimiser state and its
recipe's own modules (projection heads, gates), which have no counterpart in
the others.

Members must take the same number of steps per epoch (same training sequences
and batch size), so that exchanges fall at the same point of every member's
epoch; a member that stops early (patience) leaves the population and the rest
go on without it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from training.sequence_data import SequenceData

log = logging.getLogger(__name__)
# Called in the member's own process once it has trained: (name, run folder) -> None.
# The job uploads the run to its artifact store from there (members may sit on any node).
FinishHook = Callable[[str, Path], None]


@dataclass(frozen=True)
class MemberSpec:
    """One member of a population: its experiment (JSON-able), run folder and start."""

    name: str
    experiment: dict[str, Any]
    run_dir: str
    init: str | None = None


class Member:
    """A pool member that trains a few steps at a time (the body of a Ray actor)."""

    def __init__(
        self,
        spec: MemberSpec,
        load_data: Callable[[], SequenceData],
        threads: int,
        resume: bool,
        on_finish: FinishHook | None = None,
    ) -> None:
        import torch

        from training.config import ExperimentConfig
        from training.trainer import Trainer

        torch.set_num_threads(max(1, threads))
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        config = ExperimentConfig.model_validate(spec.experiment)
        self.name = spec.name
        self.trainer = Trainer(
            config,
            load_data(),
            Path(spec.run_dir),
            init=Path(spec.init) if spec.init else None,
        )
        self.trainer.begin(resume=resume)
        self.steps: Iterator[float] | None = None
        self.on_finish = on_finish

    def steps_per_epoch(self) -> tuple[int, int]:
        """What decides the steps of an epoch: training sequences and batch size."""
        return len(self.trainer.train_sequences), self.trainer.cfg.batch_size

    def advance(self, steps: int) -> bool:
        """Take `steps` optimiser steps (crossing epoch ends); True once training is done.

        An epoch's bookkeeping (validation, last/, early stopping) runs when the
        step after its last one is asked for, so it sees the weights after that
        exchange's pull.
        """
        taken = 0
        while taken < steps and not self.trainer.done:
            if self.steps is None:
                self.steps = self.trainer.epoch_steps(self.trainer.state.epoch)
            if next(self.steps, None) is None:
                self.steps = None  # the epoch ended: validated and saved, no step taken
            else:
                taken += 1
        return self.trainer.done

    def progress(self) -> float:
        """Share of this member's optimiser steps taken (0 at the start, 1 at the end)."""
        return self.trainer.state.step / self.trainer.total_steps

    def weights(self) -> dict[str, np.ndarray]:
        return {
            name: parameter.detach().cpu().numpy()
            for name, parameter in self.trainer.model.named_parameters()
        }

    def pull(self, mean: dict[str, np.ndarray], strength: float) -> None:
        import torch

        with torch.no_grad():
            for name, parameter in self.trainer.model.named_parameters():
                target = torch.from_numpy(mean[name]).to(parameter.device, parameter.dtype)
                parameter.lerp_(target, strength)

    def finish(self) -> dict[str, Any]:
        result = self.trainer.end()
        assert result is not None
        if self.on_finish is not None:
            self.on_finish(self.name, result.run_dir)
        return {
            "run_dir": str(result.run_dir),
            "best_epoch": result.best_epoch,
            "best_score": result.best_score,
            "history": result.history,
            "metrics": result.metrics,
        }


def exchange_pull(pull_per_epoch: float, steps_per_epoch: int, exchange_every: int) -> float:
    """The pull per exchange that compounds to `pull_per_epoch` over one epoch.

    1 - (1 - pull)^(steps_per_epoch / exchange_every) = pull_per_epoch, so the same
    per-epoch pull means the same thing on data sets of different sizes (a fixed
    per-exchange pull is 4x weaker per epoch on ML-1M's 48 steps than on Beauty's 175).
    """
    if not 0.0 <= pull_per_epoch < 1.0:
        raise ValueError(f"pull_per_epoch must lie in [0, 1), got {pull_per_epoch}")
    exchanges = max(1.0, steps_per_epoch / exchange_every)
    return 1.0 - (1.0 - pull_per_epoch) ** (1.0 / exchanges)


def scheduled_pull(pull: float, schedule: str, progress: float) -> float:
    """The pull of an exchange at `progress` (share of the members' steps taken).

    `constant`: `pull` throughout; `cosine`: pull * (1 + cos(pi * progress)) / 2, from
    `pull` at the start to 0 at the end (training/pool.py PULL_SCHEDULES).
    """
    if schedule == "constant":
        return pull
    if schedule == "cosine":
        return pull * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    raise ValueError(f"unknown pull schedule {schedule!r}")


def population_mean(weights: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.mean([w[name] for w in weights], axis=0) for name in weights[0]}


def train_population(
    members: list[MemberSpec],
    load_data: Callable[[], SequenceData],
    pull: float,
    exchange_every: int,
    threads: int = 1,
    num_gpus: float = 0.0,
    resume: bool = False,
    on_finish: FinishHook | None = None,
    pull_per_epoch: float | None = None,
    pull_schedule: str = "constant",
) -> dict[str, dict[str, Any]]:
    """Train every member at once on Ray, pulling them toward their mean; name -> result.

    `pull_per_epoch` (when given) replaces `pull` by the per-exchange pull that
    compounds to it over an epoch of these members (`exchange_pull`).
    `pull_schedule` scales it at each exchange by the members' progress
    (`scheduled_pull`), read from the members' own step counts so that a resumed
    population continues the schedule where it stopped.

    Needs a running Ray (`ray.init` or the job's session). Each member is an
    actor with `threads` CPUs that loads the data itself (`load_data` is shipped
    to it: a picklable function); the driver only averages.
    """
    import ray

    if not members:
        raise ValueError("a population needs at least one member")
    if not 0.0 <= pull <= 1.0:
        raise ValueError(f"pull must lie in [0, 1], got {pull}")
    scheduled_pull(pull, pull_schedule, 0.0)  # an unknown schedule fails before any actor starts
    # Every member must be alive at once (they step together): on a cluster smaller
    # than members x threads, each actor reserves its share of the CPUs instead.
    cpus = min(float(threads), ray.cluster_resources().get("CPU", threads) / len(members))
    gpus = min(num_gpus, ray.cluster_resources().get("GPU", 0.0) / len(members))
    actor = ray.remote(Member).options(num_cpus=cpus, num_gpus=gpus)
    actors = {m.name: actor.remote(m, load_data, threads, resume, on_finish) for m in members}
    counts = set(ray.get([a.steps_per_epoch.remote() for a in actors.values()]))
    if pull_per_epoch is not None:
        sequences, batch_size = max(counts)
        pull = exchange_pull(pull_per_epoch, -(-sequences // batch_size), exchange_every)
        log.info("pull per epoch %.3g: %.4g per exchange", pull_per_epoch, pull)
    if pull > 0 and len(counts) > 1:
        raise ValueError(f"members take different numbers of steps per epoch: {sorted(counts)}")
    active = dict(actors)
    exchanges, start = 0, time.perf_counter()
    while active:
        done = ray.get([a.advance.remote(exchange_every) for a in active.values()])
        if pull > 0 and len(active) > 1:
            progress = ray.get(next(iter(active.values())).progress.remote())
            strength = scheduled_pull(pull, pull_schedule, progress)
            weights = ray.get([a.weights.remote() for a in active.values()])
            mean = ray.put(population_mean(weights))
            ray.get([a.pull.remote(mean, strength) for a in active.values()])
            exchanges += 1
        active = {
            n: a for (n, a), finished in zip(active.items(), done, strict=True) if not finished
        }
    results = dict(zip(actors, ray.get([a.finish.remote() for a in actors.values()]), strict=True))
    log.info(
        "population of %d: %d exchanges (pull %.3g every %d steps, %s) in %.0f s",
        len(members),
        exchanges,
        pull,
        exchange_every,
        pull_schedule,
        time.perf_counter() - start,
    )
    for a in actors.values():
        ray.kill(a)
    return results
