"""The training loop: batches, AdamW, schedule, early stopping, checkpoints, resume.

A run folder holds:

    best/          checkpoint of the best validation epoch (what evaluation, Fisher,
                   merging and export read)
    last/          checkpoint of the newest epoch + optimizer and recipe state +
                   trainer.json: what `--resume` continues from
    config.yaml    the resolved experiment configuration
    history.json   one entry per epoch: loss, throughput, validation metrics, recipe logs
    metrics.json   valid/test metrics of the best model and MostPop (docs/architecture.md)

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
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn
from tqdm.auto import tqdm

from training.batching import Batch, iterate_batches
from training.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    load_state_dict_strict,
    optimizer_from_tensors,
    optimizer_to_tensors,
    read_manifest,
    read_tensors,
    write_checkpoint,
    write_json,
)
from training.config import ExperimentConfig, TrainConfig
from training.data import SequenceData
from training.evaluate import Evaluator
from training.features import ItemFeatures, load_item_features
from training.model import ModelConfig, SequenceRecommender, build_model
from training.recipes import FeatureRecipe, Recipe, build_recipe, needs_features
from training.transfer import Transfer, frozen_parameters, load_features_into, transfer_model

log = logging.getLogger(__name__)

BEST, LAST = "best", "last"
SELECTION_METRIC = ("full", "ndcg@10")
EpochCallback = Callable[[dict[str, Any]], None]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint folder, or a run folder whose best/ is one."""
    path = Path(path)
    if (path / "checkpoint.json").is_file():
        return path
    if (path / BEST / "checkpoint.json").is_file():
        return path / BEST
    raise CheckpointError(f"{path}: neither a checkpoint nor a run folder with {BEST}/")


def load_run_checkpoint(path: Path, device: str | torch.device = "cpu") -> Checkpoint:
    return load_checkpoint(resolve_checkpoint(path), device)


def epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def learning_rate_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then constant, linear or cosine decay to 10% at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    if cfg.schedule == "linear":
        return 1.0 - 0.9 * progress
    if cfg.schedule == "cosine":
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def build_optimizer(
    modules: list[nn.Module], cfg: TrainConfig, lr_scales: dict[str, float] | None = None
) -> torch.optim.AdamW:
    """AdamW; weight decay on weight matrices only (not on biases, norms or embeddings).

    Frozen parameters (requires_grad False) get no group. `lr_scales` maps names of
    the first module's parameters to a learning-rate factor (KDSR's slower
    adaptor): they get groups of their own with an `lr_scale` key.
    """
    scales = lr_scales or {}
    unknown = sorted(set(scales) - {name for name, _ in modules[0].named_parameters()})
    if unknown:
        raise ValueError(f"lr_scales names parameters the model does not have: {unknown}")
    decay, no_decay = [], []
    scaled: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for index, module in enumerate(modules):
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            is_matrix = param.ndim >= 2 and "embedding" not in name
            scale = scales.get(name, 1.0) if index == 0 else 1.0
            if scale != 1.0:
                scaled.setdefault((is_matrix, scale), []).append(param)
                continue
            (decay if is_matrix else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    for (is_matrix, scale), params in scaled.items():
        decay_rate = cfg.weight_decay if is_matrix else 0.0
        groups.append({"params": params, "weight_decay": decay_rate, "lr_scale": scale})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


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
        self.evaluator = Evaluator(
            self.split, seed=self.cfg.eval_seed, batch_size=self.cfg.eval_batch_size
        )
        self.init, self.transfer = init, transfer
        self.features = self._item_features()
        self.model = self._initial_model(init).to(self.device)
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
        self.optimizer = build_optimizer([self.model, self.recipe], self.cfg, scales)
        self.objective: nn.Module = Objective(self.model, self.recipe)
        if parallel is not None:
            from ray.train.torch import prepare_model

            # Broadcasts rank 0's weights, then averages gradients in every backward.
            # A recipe's own modules may sit out a step (a gate, a classifier); the
            # backbone's parameters are all used by every loss.
            own = any(p.requires_grad for p in self.recipe.parameters())
            self.objective = prepare_model(
                self.objective, parallel_strategy_kwargs={"find_unused_parameters": own}
            )
        steps_per_epoch = math.ceil(len(self.train_sequences) / self.cfg.batch_size)
        self.total_steps = max(1, steps_per_epoch * self.cfg.epochs)
        self.state = TrainState(history=[])

    def _item_features(self) -> ItemFeatures | None:
        """The data's item features, read when the recipe or a new model with text needs them."""
        new_text_model = self.init is None and (
            self.transfer is not None or self.config.model.item_representation != "id"
        )
        if not (new_text_model or needs_features(self.config.recipe.name)):
            return None
        data = self.config.data
        return load_item_features(data.path, data.features, self.data)

    def _new_model(self) -> SequenceRecommender:
        spec = self.config.model.model_dump()
        if spec["item_representation"] == "id":
            spec.update(feature_dim=0)
            return build_model(
                ModelConfig(num_items=self.data.num_items, **spec), seed=self.cfg.seed
            )
        assert self.features is not None
        if spec["feature_dim"] not in (None, self.features.dim):
            raise ValueError(
                f"model.feature_dim is {spec['feature_dim']}, the features have {self.features.dim}"
            )
        spec.update(feature_dim=self.features.dim)
        model = build_model(ModelConfig(num_items=self.data.num_items, **spec), seed=self.cfg.seed)
        load_features_into(model, self.features)
        return model

    def _initial_model(self, init: Path | None) -> SequenceRecommender:
        if self.transfer is not None:
            assert self.features is not None
            source = load_run_checkpoint(self.transfer.source)
            log.info("transferring %s (%s)", source.path, self.transfer.adaptation)
            model = transfer_model(
                source.model, self.features, self.transfer.adaptation, self.cfg.seed
            )
            if frozen_parameters(model):
                log.info("frozen: %s", ", ".join(frozen_parameters(model)))
            return model.train()
        if init is None:
            return self._new_model()
        checkpoint = load_run_checkpoint(init)
        fingerprint = checkpoint.info.get("data_fingerprint")
        if fingerprint and fingerprint != self.data.fingerprint:
            raise ValueError(
                f"--init {init} was trained on data {fingerprint}, this run uses {self.data.fingerprint}: "
                "item ids would not mean the same items"
            )
        log.info("starting from the weights of %s", checkpoint.path)
        return checkpoint.model.train()

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
            nn.utils.clip_grad_norm_(params, self.cfg.clip_grad_norm)
        factor = learning_rate_factor(self.state.step, self.total_steps, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.lr * factor * group.get("lr_scale", 1.0)
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
