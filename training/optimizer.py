"""The optimiser of a training run: AdamW parameter groups and the learning-rate schedule.

Separate from the loop (training/trainer.py) because benchmarks build the same
optimiser around a bare model and recipe, and the schedule is a pure function
of the step that tests can check on its own.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from training.config import TrainConfig


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


def apply_schedule(
    optimizer: torch.optim.Optimizer, step: int, total: int, cfg: TrainConfig
) -> None:
    """Set every group's rate for `step`; a group's `lr_scale` keeps its factor."""
    factor = learning_rate_factor(step, total, cfg)
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr * factor * group.get("lr_scale", 1.0)


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
