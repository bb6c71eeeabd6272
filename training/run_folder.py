"""The run folder a training run writes, and how readers find its checkpoint.

A run folder holds:

    best/          checkpoint of the best validation epoch (what evaluation, Fisher,
                   merging and export read)
    last/          checkpoint of the newest epoch + optimizer and recipe state +
                   trainer.json: what `--resume` continues from
    config.yaml    the resolved experiment configuration
    history.json   one entry per epoch: loss, throughput, validation metrics, recipe logs
    metrics.json   valid/test metrics of the best model and MostPop (docs/architecture.md)

The trainer (training/trainer.py) writes it; everything downstream reads it
through `load_run_checkpoint`, which also takes a bare checkpoint folder. Kept
apart from the trainer so that readers do not import the training loop.
"""

from __future__ import annotations

from pathlib import Path

import torch

from training.checkpoint import Checkpoint, CheckpointError, load_checkpoint

BEST, LAST = "best", "last"


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
