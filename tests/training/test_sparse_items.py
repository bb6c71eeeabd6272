"""`train.sparse_items`: lazy Adam on the rows of the item table a sampled-softmax step touches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support import tiny_experiment, train_killed_and_resumed
from training.batching import iterate_batches
from training.config import TrainConfig
from training.data_parallel import Objective
from training.model import ModelConfig, build_model
from training.optimizer import SparseItemsOptimizer, build_optimizer, clip_gradients
from training.recipes import build_recipe
from training.run import train
from training.synthetic import SyntheticConfig, generate


def trained(sparse: bool, batches: list[torch.Tensor], sequences: list) -> tuple:  # type: ignore[type-arg]
    """A fresh tiny SASRec after one sampled-softmax step per batch: its table after each step."""
    config = ModelConfig(
        num_items=300, backbone="sasrec", hidden_size=16, num_layers=1, num_heads=1, max_len=20
    )
    model = build_model(config, seed=0).train()
    recipe = build_recipe("sasrec", {"negatives": 16}, config, sequences, None)
    table = None
    if sparse:
        model.item_embedding.sparse = True
        table = model.item_embedding.weight
    optimizer = build_optimizer([model, recipe], TrainConfig(lr=1e-2), None, table)
    tables, grads = [model.item_embedding.weight.detach().clone()], []
    for step, batch in enumerate(batches):
        torch.manual_seed(step)  # the same negatives on both sides
        loss = Objective(model, recipe)(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients([p for g in optimizer.param_groups for p in g["params"]], 0.5)
        grad = model.item_embedding.weight.grad
        grads.append(grad.to_dense() if grad.is_sparse else grad.clone())
        optimizer.step()
        tables.append(model.item_embedding.weight.detach().clone())
    return model, optimizer, tables, grads


def test_lazy_adam_matches_adamw_on_the_first_step_then_moves_only_touched_rows() -> None:
    data = generate(SyntheticConfig(seed=1, num_users=200, num_items=300, mean_length=12))
    sequences = [s for s in data.split().train if len(s) >= 2]
    rng = np.random.default_rng(0)
    batches = iterate_batches(sequences, 16, 21, "last", rng)
    first, second = next(batches), next(batches)
    dense, _, dense_tables, dense_grads = trained(False, [first, second], sequences)
    sparse, optimizer, sparse_tables, sparse_grads = trained(True, [first, second], sequences)
    assert isinstance(optimizer, SparseItemsOptimizer)
    # The sparse gradient, clipped, is the dense one; so is the first step from zero
    # moments wherever the gradient is not tiny (SparseAdam adds eps before the bias
    # correction, AdamW after: they part only where |g| is near eps / sqrt(1 - beta2)).
    torch.testing.assert_close(dense_grads[0], sparse_grads[0], rtol=1e-5, atol=1e-9)
    clear = dense_grads[0].abs() > 1e-4
    assert clear.sum() > 100
    dense_step = (dense_tables[1] - dense_tables[0])[clear]
    sparse_step = (sparse_tables[1] - sparse_tables[0])[clear]
    assert dense_step.abs().mean() > 5e-3  # Adam's first step: about lr (1e-2) per value
    torch.testing.assert_close(dense_step, sparse_step, rtol=0, atol=1e-4)  # 1% of a step

    # The second step: lazy Adam moves at most the rows of that batch and its 16
    # negatives; AdamW also moves every row the first step left momentum on.
    def moved(tables: list[torch.Tensor]) -> int:
        return int((tables[2] != tables[1]).any(1).sum())

    in_second = len(torch.unique(second.items[second.items > 0]))
    assert moved(sparse_tables) <= in_second + 16
    assert moved(dense_tables) > moved(sparse_tables) + 10
    # Both optimisers' state makes one torch-style state dict, and loads back.
    state = optimizer.state_dict()
    assert len(state["state"]) == len(list(sparse.parameters()))
    optimizer.load_state_dict(state)
    assert optimizer.table.state_dict()["state"][0]["exp_avg"].shape == (302, 16)
    assert len(list(dense.parameters())) == len(list(sparse.parameters()))


def test_a_run_with_sparse_items_learns_resumes_and_refuses_what_it_cannot_do(
    small_data, tmp_path: Path
) -> None:
    config = tiny_experiment(
        train__epochs=3, train__sparse_items=True, recipe__params={"negatives": 64}
    )
    straight = train(config, small_data, tmp_path / "straight")
    history = straight.history
    assert history[-1]["loss"] < history[0]["loss"]
    assert straight.best_score > 0.02

    resumed = train_killed_and_resumed(config, small_data, tmp_path / "resumed")
    assert resumed.history[-1]["loss"] == pytest.approx(history[-1]["loss"], rel=1e-6)

    full_softmax = tiny_experiment(train__epochs=1, train__sparse_items=True)
    with pytest.raises(ValueError, match="needs a sampled softmax"):
        train(full_softmax, small_data, tmp_path / "full")
