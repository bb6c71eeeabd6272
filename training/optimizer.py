"""The optimiser of a training run: AdamW parameter groups, the schedule, gradient clipping.

Separate from the loop (training/trainer.py) because benchmarks build the same
optimiser around a bare model and recipe, and the schedule is a pure function
of the step that tests can check on its own.

With `train.sparse_items` the item table's gradient is sparse (the rows a step
touched) and `SparseItemsOptimizer` updates those rows only, with torch's lazy
Adam (`SparseAdam`: a row's moments advance when the row is touched), beside
AdamW for every other parameter: the update no longer touches all N x D values.
"""

from __future__ import annotations

import math
from typing import Any

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
    modules: list[nn.Module],
    cfg: TrainConfig,
    lr_scales: dict[str, float] | None = None,
    sparse: nn.Parameter | None = None,
) -> torch.optim.AdamW | SparseItemsOptimizer:
    """AdamW; weight decay on weight matrices only (not on biases, norms or embeddings).

    Frozen parameters (requires_grad False) get no group. `lr_scales` maps names of
    the first module's parameters to a learning-rate factor (KDSR's slower
    adaptor): they get groups of their own with an `lr_scale` key. `sparse` (the
    item table of `train.sparse_items`, whose gradients are sparse) goes to lazy
    Adam instead, with the same learning rate and betas (and no decay, as for
    every embedding).
    """
    scales = lr_scales or {}
    unknown = sorted(set(scales) - {name for name, _ in modules[0].named_parameters()})
    if unknown:
        raise ValueError(f"lr_scales names parameters the model does not have: {unknown}")
    decay, no_decay = [], []
    scaled: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for index, module in enumerate(modules):
        for name, param in module.named_parameters():
            if not param.requires_grad or param is sparse:
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
    dense = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    if sparse is None:
        return dense
    return SparseItemsOptimizer(dense, torch.optim.SparseAdam([sparse], lr=cfg.lr, betas=cfg.betas))


class SparseItemsOptimizer:
    """AdamW for the dense parameters and lazy Adam for the item table, as one optimiser.

    The loop, the schedule and checkpoints see one list of `param_groups` (the
    dense ones, then the table's) and one state dict in torch's layout, the
    table's parameters numbered after the dense ones.
    """

    def __init__(self, dense: torch.optim.AdamW, table: torch.optim.SparseAdam) -> None:
        self.dense, self.table = dense, table

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.dense.param_groups + self.table.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.dense.zero_grad(set_to_none=set_to_none)
        self.table.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.dense.step()
        self.table.step()

    def state_dict(self) -> dict[str, Any]:
        dense, table = self.dense.state_dict(), self.table.state_dict()
        offset = sum(len(group["params"]) for group in dense["param_groups"])
        groups = [dict(g) for g in dense["param_groups"]] + [
            {**g, "params": [i + offset for i in g["params"]]} for g in table["param_groups"]
        ]
        state = {**dense["state"], **{i + offset: v for i, v in table["state"].items()}}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        count = len(self.dense.param_groups)
        groups = state_dict["param_groups"]
        offset = sum(len(group["params"]) for group in groups[:count])
        state = {int(i): v for i, v in state_dict["state"].items()}
        self.dense.load_state_dict(
            {
                "state": {i: v for i, v in state.items() if i < offset},
                "param_groups": groups[:count],
            }
        )
        table_groups = [{**g, "params": [i - offset for i in g["params"]]} for g in groups[count:]]
        table_state = {i - offset: v for i, v in state.items() if i >= offset}
        self.table.load_state_dict({"state": table_state, "param_groups": table_groups})


def clip_gradients(params: list[nn.Parameter], max_norm: float) -> None:
    """Scale the gradients so that their global norm is at most `max_norm`.

    torch's `clip_grad_norm_` for dense gradients; a sparse one (the item table's
    under `sparse_items`) is coalesced and counted by its values, as a dense
    gradient with zero rows elsewhere would be.
    """
    if not any(p.grad is not None and p.grad.is_sparse for p in params):
        nn.utils.clip_grad_norm_(params, max_norm)
        return
    for p in params:
        if p.grad is not None and p.grad.is_sparse:
            p.grad = p.grad.coalesce()
    norms = [
        torch.linalg.vector_norm(p.grad._values() if p.grad.is_sparse else p.grad)
        for p in params
        if p.grad is not None
    ]
    scale = (max_norm / (torch.linalg.vector_norm(torch.stack(norms)) + 1e-6)).clamp(max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad = p.grad * scale if p.grad.is_sparse else p.grad.mul_(scale)
