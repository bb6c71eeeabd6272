"""The training loop: batches, AdamW, schedule, early stopping, checkpoints, resume.

A `Trainer` trains one model with one recipe into one run folder (its layout:
training/run_folder.py). Around the loop: the starting model
(training/initial_model.py), the optimiser and schedule (training/optimizer.py)
and a rank's place in a data-parallel run (training/data_parallel.py).

Every epoch starts from a seed derived from (seed, epoch), so a run resumed
after epoch e continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from training.batching import iterate_batches
from training.checkpoint import (
    load_state_dict_strict,
    optimizer_from_tensors,
    optimizer_to_tensors,
    read_manifest,
    read_tensors,
    write_checkpoint,
    write_json,
)
from training.config import ExperimentConfig
from training.data_parallel import Objective, Parallel, wrap_for_ddp
from training.evaluate import Evaluator
from training.initial_model import initial_model, item_features_for
from training.optimizer import apply_schedule, build_optimizer, clip_gradients
from training.recipes import FeatureRecipe, Recipe, build_recipe
from training.run_folder import BEST, LAST, load_run_checkpoint
from training.sequence_data import SequenceData
from training.transfer import Transfer

log = logging.getLogger(__name__)

SELECTION_METRIC = ("full", "ndcg@10")
EpochCallback = Callable[[dict[str, Any]], None]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


T = TypeVar("T")
# Tags the bootstrap's stream apart from the epochs' (epoch_seed(seed, epoch)).
BOOTSTRAP_STREAM = 2**31 - 1


def bootstrap_users(sequences: list[T], seed: int) -> list[T]:
    """As many sequences as given, drawn with replacement (a pool member's own data view).

    The count stays, so members with and without a bootstrap take the same steps
    per epoch (a population exchanges at the same points of every member's epoch).
    """
    rng = np.random.default_rng(epoch_seed(seed, BOOTSTRAP_STREAM))
    return [sequences[i] for i in rng.integers(0, len(sequences), size=len(sequences))]


@dataclass
class TrainState:
    """What the loop carries from epoch to epoch (saved in last/trainer.json)."""

    epoch: int = 0  # epochs finished
    step: int = 0
    best_score: float = -1.0
    best_epoch: int = -1
    bad_epochs: int = 0
    stopped: bool = False
    history: list[dict[str, Any]] | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    best_score: float
    metrics: dict[str, Any]
    history: list[dict[str, Any]]


class Trainer:
    """Trains one model with one recipe on one data set into one run folder."""

    def __init__(
        self,
        config: ExperimentConfig,
        data: SequenceData,
        run_dir: Path,
        init: Path | None = None,
        on_epoch: EpochCallback | None = None,
        transfer: Transfer | None = None,
        parallel: Parallel | None = None,
    ) -> None:
        if init is not None and transfer is not None:
            raise ValueError("start from --init or from --transfer-from, not both")
        self.config = config
        self.cfg = config.train
        self.data = data
        self.run_dir = Path(run_dir)
        self.on_epoch = on_epoch
        self.parallel = parallel
        self.writer = parallel is None or parallel.writer
        self.device = resolve_device(self.cfg.device)
        if self.cfg.num_threads:
            torch.set_num_threads(self.cfg.num_threads)
        self.split = data.split()
        # A sequence of one item has nothing to predict from.
        self.train_sequences = [seq for seq in self.split.train if len(seq) >= 2]
        if not self.train_sequences:
            raise ValueError("no training sequence has two or more items")
        if self.cfg.user_bootstrap:
            self.train_sequences = bootstrap_users(self.train_sequences, self.cfg.seed)
        self.evaluator = Evaluator(
            self.split, seed=self.cfg.eval_seed, batch_size=self.cfg.eval_batch_size
        )
        self.init, self.transfer = init, transfer
        self.features = item_features_for(config, data, init, transfer)
        self.model = initial_model(config, data, self.features, init, transfer).to(self.device)
        self.model_config = self.model.config
        if self.cfg.compile:
            # In place, block by block: parameter names (checkpoints, Fisher, merge) stay.
            for block in self.model.blocks:
                block.compile(dynamic=True)
        self.recipe: Recipe = build_recipe(
            config.recipe.name,
            config.recipe.params,
            self.model_config,
            self.train_sequences,
            self.features,
        ).to(self.device)
        scales = (
            self.recipe.lr_scales(self.model) if isinstance(self.recipe, FeatureRecipe) else None
        )
        self.optimizer = build_optimizer(
            [self.model, self.recipe], self.cfg, scales, self._sparse_item_table()
        )
        self.objective: nn.Module = Objective(self.model, self.recipe)
        if parallel is not None:
            self.objective = wrap_for_ddp(self.objective, self.recipe)
        steps_per_epoch = math.ceil(len(self.train_sequences) / self.cfg.batch_size)
        self.total_steps = max(1, steps_per_epoch * self.cfg.epochs)
        self.state = TrainState(history=[])

    def _sparse_item_table(self) -> nn.Parameter | None:
        """`train.sparse_items`: the item table, made to take sparse gradients; else None."""
        if not self.cfg.sparse_items:
            return None
        if self.recipe.sampling() is None:
            raise ValueError(
                "train.sparse_items needs a sampled softmax (recipe negatives > 0 or "
                "in_batch_negatives): the full softmax reads every item's row at every step"
            )
        if self.model_config.modality or isinstance(self.recipe, FeatureRecipe):
            raise ValueError(
                "train.sparse_items is for ID-only models: item features make every row "
                "depend on the shared adaptor, so every step reaches every row"
            )
        self.model.item_embedding.sparse = True
        return self.model.item_embedding.weight

    # ---- persistence ---------------------------------------------------------------

    def checkpoint_info(self, epoch: int) -> dict[str, Any]:
        return {
            "recipe": self.config.recipe.name,
            "recipe_params": self.recipe.params.model_dump(),
            "epoch": epoch,
            "seed": self.cfg.seed,
            "data_fingerprint": self.data.fingerprint,
            "init": str(self.init) if self.init else None,
            # Only with modality or transfer, so plain checkpoints keep their exact info.
            **({"transfer": self.transfer.to_json()} if self.transfer else {}),
            **({"features": self.features_info()} if self.features is not None else {}),
        }

    def features_info(self) -> dict[str, Any]:
        assert self.features is not None
        return {
            "encoder": self.features.encoder,
            "dim": self.features.dim,
            "vocab_sha256": self.features.vocab_sha256,
        }

    def save_last(self) -> None:
        tensors, meta = optimizer_to_tensors(self.optimizer)
        write_checkpoint(
            self.run_dir / LAST,
            self.model,
            self.model_config,
            self.checkpoint_info(self.state.epoch),
            extra_tensors={
                "optimizer.safetensors": tensors,
                "recipe.safetensors": self.recipe.state_dict(),
            },
            extra_json={"optimizer.json": meta, "trainer.json": self.state.to_json()},
        )

    def save_best(self) -> None:
        write_checkpoint(
            self.run_dir / BEST,
            self.model,
            self.model_config,
            self.checkpoint_info(self.state.epoch),
        )

    def restore_last(self, folder: Path | None = None) -> bool:
        """Continue from last/ (or `folder`, a copy of one) if it exists; returns whether it did."""
        last = folder or self.run_dir / LAST
        if not (last / "checkpoint.json").is_file():
            return False
        read_manifest(last)  # verifies every checksum before anything is loaded
        if (
            read_manifest(last, verify=False)["info"].get("data_fingerprint")
            != self.data.fingerprint
        ):
            raise ValueError(f"{last} was trained on other data; start a new run folder")
        load_state_dict_strict(
            self.model, read_tensors(last, "model.safetensors", verify=False), str(last)
        )
        self.recipe.load_state_dict(read_tensors(last, "recipe.safetensors", verify=False))
        meta = json.loads((last / "optimizer.json").read_text())
        optimizer_from_tensors(
            self.optimizer, read_tensors(last, "optimizer.safetensors", verify=False), meta
        )
        self.state = TrainState(**json.loads((last / "trainer.json").read_text()))
        log.info("resuming %s after epoch %d", self.run_dir, self.state.epoch)
        return True

    # ---- the loop ------------------------------------------------------------------

    def fit(self, resume: bool = False, restore: Path | None = None) -> TrainResult | None:
        """Train to the end; `restore`: a copy of last/ to continue from (Ray Train's).

        Returns None on the ranks of a data-parallel run that do not write.
        """
        self.begin(resume, restore)
        while not self.done:
            self.run_epoch(self.state.epoch)
        return self.end()

    def begin(self, resume: bool = False, restore: Path | None = None) -> None:
        """Write the run's config; continue from last/ or start (validating epoch 0)."""
        if self.writer:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(
                yaml.safe_dump(self.config.model_dump(mode="json"), sort_keys=False)
            )
        if not ((restore and self.restore_last(restore)) or (resume and self.restore_last())):
            self.state = TrainState(history=[])
            if self.cfg.validate_initial and self.writer:
                self.validate_start()

    @property
    def done(self) -> bool:
        return self.state.epoch >= self.cfg.epochs or self.state.stopped

    def end(self) -> TrainResult | None:
        if not self.writer:
            return None
        if not (self.run_dir / BEST / "checkpoint.json").is_file():
            self.save_best()  # zero epochs: the initial model is the result
        return self.finish()

    def run_epoch(self, epoch: int) -> None:
        for _ in self.epoch_steps(epoch):
            pass

    def epoch_steps(self, epoch: int) -> Iterator[float]:
        """One epoch, a step per iteration (yields the step's loss), then its bookkeeping.

        A generator so that a population of members (training/population.py) can
        advance each member a few steps at a time and exchange weights in between.
        """
        seed = epoch_seed(self.cfg.seed, epoch)
        rank = self.parallel.rank if self.parallel else 0
        # Ranks share the batch order (numpy) but draw their own masks and dropout.
        torch.manual_seed(seed if rank == 0 else epoch_seed(seed, rank))
        rng = np.random.default_rng(seed)
        self.model.train()
        self.recipe.train()
        start, seen, losses = time.perf_counter(), 0, []
        batches = iterate_batches(
            self.train_sequences,
            self.cfg.batch_size,
            self.recipe.window_length(),
            self.cfg.window,
            rng,
            self.cfg.length_grouping,
        )
        total = math.ceil(len(self.train_sequences) / self.cfg.batch_size)
        bar = tqdm(
            batches,
            total=total,
            desc=f"epoch {epoch + 1}/{self.cfg.epochs}",
            disable=not (self.cfg.progress and self.writer),
            leave=False,
        )
        for batch in bar:
            local = self.parallel.shard(batch) if self.parallel else batch
            loss = self.train_step(local.to(self.device))
            losses.append(loss)
            seen += batch.items.shape[0]
            bar.set_postfix(loss=f"{loss:.4f}", seq_s=f"{seen / (time.perf_counter() - start):.0f}")
            yield loss
        self.end_epoch(epoch, losses, seen, time.perf_counter() - start)

    def end_epoch(self, epoch: int, losses: list[float], seen: int, elapsed: float) -> None:
        """Log, validate when due (early stopping), save last/, call on_epoch."""
        entry: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": self.parallel.mean(float(np.mean(losses)))
            if self.parallel
            else float(np.mean(losses)),
            "seconds": elapsed,
            "sequences_per_second": seen / elapsed,
            "lr": self.optimizer.param_groups[0]["lr"],
            **self.recipe.epoch_end(),
            **({"workers": self.parallel.world_size} if self.parallel else {}),
        }
        self.state.epoch = epoch + 1
        due = self.state.epoch % self.cfg.eval_every == 0 or self.state.epoch == self.cfg.epochs
        if due and self.writer:
            self.validate(entry)
        if self.parallel:
            self.state.stopped = self.parallel.from_writer(self.state.stopped)
        self.state.history = [*(self.state.history or []), entry]
        if self.writer:
            self.save_last()
            log.info("epoch %d: %s", epoch + 1, _describe(entry))
        if self.on_epoch:
            self.on_epoch(entry)

    def validate_start(self) -> None:
        """Epoch 0: the starting model is the best until an epoch beats it."""
        entry: dict[str, Any] = {"epoch": 0}
        self.validate(entry)
        self.state.history = [entry]
        log.info("epoch 0 (start): %s", _describe(entry))

    def train_step(self, batch: Any) -> float:
        with torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16"
        ):
            loss = self.objective(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {self.state.step}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.clip_grad_norm:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            clip_gradients(params, self.cfg.clip_grad_norm)
        apply_schedule(self.optimizer, self.state.step, self.total_steps, self.cfg)
        self.optimizer.step()
        self.state.step += 1
        return float(loss.detach())

    def validate(self, entry: dict[str, Any]) -> None:
        start = time.perf_counter()
        result = self.evaluator.evaluate_model(self.model, "valid")
        setting, metric = SELECTION_METRIC
        score = result.metrics[setting][metric]
        entry["valid"] = result.metrics
        entry["eval_seconds"] = time.perf_counter() - start
        if score > self.state.best_score:
            self.state.best_score, self.state.best_epoch, self.state.bad_epochs = (
                score,
                self.state.epoch,
                0,
            )
            self.save_best()
        else:
            self.state.bad_epochs += 1
            if self.state.bad_epochs >= self.cfg.patience:
                log.info("early stop: no validation gain for %d evaluations", self.state.bad_epochs)
                self.state.stopped = True

    def finish(self) -> TrainResult:
        best = load_run_checkpoint(self.run_dir, self.device)
        document = self.evaluator.metrics_document(best.model)
        document["best_epoch"] = self.state.best_epoch
        write_json(self.run_dir / "metrics.json", document)
        write_json(self.run_dir / "history.json", self.state.history or [])
        return TrainResult(
            self.run_dir,
            self.state.best_epoch,
            self.state.best_score,
            document,
            self.state.history or [],
        )


def _describe(entry: dict[str, Any]) -> str:
    parts = []
    if "loss" in entry:
        parts += [f"loss {entry['loss']:.4f}", f"{entry['sequences_per_second']:.0f} seq/s"]
    if "valid" in entry:
        parts.append(f"valid ndcg@10 {entry['valid']['full']['ndcg@10']:.4f}")
    parts += [f"{k} {v:.4g}" for k, v in entry.items() if k.startswith("recipe/")]
    return ", ".join(parts)
