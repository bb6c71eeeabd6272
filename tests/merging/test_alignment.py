"""Weight matching: the model's symmetries are exact, and a permuted model is aligned back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from merging.alignment import (
    apply_permutations,
    join_attention,
    match_weights,
    permutation_groups,
    permute,
    split_attention,
)
from merging.merge import MergeConfig, merge_checkpoints
from training.checkpoint import write_checkpoint
from training.model import ModelConfig, build_model
from training.run_folder import load_run_checkpoint


def random_permutations(state, num_heads: int, seed: int):  # type: ignore[no-untyped-def]
    """A random permutation of every group, moving units only within their heads."""
    rng = np.random.default_rng(seed)
    perms = {}
    for group in permutation_groups(state, num_heads):
        order = np.arange(group.size)
        for start in range(0, group.size, group.block):
            order[start : start + group.block] = rng.permutation(group.block) + start
        perms[group.name] = order
    return perms


def permuted(state, perms, num_heads: int):  # type: ignore[no-untyped-def]
    split = split_attention(state)
    return join_attention(permute(split, permutation_groups(state, num_heads), perms))


@pytest.mark.parametrize(
    ("heads", "prediction_head", "block"),
    [(1, False, "sasrec"), (2, True, "prenorm"), (4, False, "sasrec")],
)
def test_permuted_units_compute_the_same_function_and_align_back_exactly(
    heads: int, prediction_head: bool, block: str
) -> None:
    config = ModelConfig(
        num_items=120,
        hidden_size=32,
        num_layers=2,
        num_heads=heads,
        max_len=16,
        feature_dim=0,
        prediction_head=prediction_head,
        block=block,
    )
    model = build_model(config, seed=0).eval()
    state = model.state_dict()
    perms = random_permutations(state, heads, seed=1)
    other = build_model(config, seed=9).eval()
    other.load_state_dict(permuted(state, perms, heads))
    history = torch.randint(1, 121, (6, 16))
    with torch.no_grad():
        torch.testing.assert_close(other(history), model(history), atol=1e-5, rtol=1e-5)
    assert not torch.equal(
        other.state_dict()["item_embedding.weight"], state["item_embedding.weight"]
    )
    aligned, found = match_weights(state, other.state_dict(), heads)
    for name, tensor in state.items():
        assert torch.equal(aligned[name], tensor), name
    # The permutations found are the inverses of the ones applied.
    for name, order in perms.items():
        assert np.array_equal(order[found[name]], np.arange(len(order))), name


def test_the_same_permutations_carry_over_to_a_fisher() -> None:
    config = ModelConfig(num_items=50, hidden_size=16, num_layers=1, max_len=8, feature_dim=0)
    state = build_model(config, seed=0).state_dict()
    perms = random_permutations(state, 1, seed=2)
    fisher = {name: torch.rand_like(t) for name, t in state.items()}
    # A Fisher is a tensor per parameter: it moves with its parameter's units.
    moved = apply_permutations(fisher, perms, 1)
    reference = permuted(fisher, perms, 1)
    for name in fisher:
        assert torch.equal(moved[name], reference[name])


def test_an_aligned_merge_of_a_model_and_its_permutation_is_the_model(tmp_path: Path) -> None:
    config = ModelConfig(num_items=60, hidden_size=16, num_layers=2, max_len=8, feature_dim=0)
    model = build_model(config, seed=0)
    twin = build_model(config, seed=1)
    twin.load_state_dict(
        permuted(model.state_dict(), random_permutations(model.state_dict(), 1, 3), 1)
    )
    write_checkpoint(tmp_path / "a", model, config, {"recipe": "sasrec"})
    write_checkpoint(tmp_path / "b", twin, config, {"recipe": "sasrec"})
    plain = merge_checkpoints(
        [tmp_path / "a", tmp_path / "b"], tmp_path / "plain", MergeConfig(method="uniform")
    )
    aligned = merge_checkpoints(
        [tmp_path / "a", tmp_path / "b"],
        tmp_path / "aligned",
        MergeConfig(method="uniform", align=True),
    )
    assert plain.info and aligned.info
    merged = load_run_checkpoint(tmp_path / "aligned").model.state_dict()
    averaged = load_run_checkpoint(tmp_path / "plain").model.state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(merged[name], tensor, atol=1e-6, rtol=0)
    assert not torch.allclose(
        averaged["item_embedding.weight"], model.state_dict()["item_embedding.weight"]
    )


def test_align_refuses_methods_it_cannot_permute(tmp_path: Path) -> None:
    config = ModelConfig(num_items=30, hidden_size=8, num_layers=1, max_len=8, feature_dim=0)
    for name, seed in (("a", 0), ("b", 1)):
        write_checkpoint(
            tmp_path / name, build_model(config, seed=seed), config, {"recipe": "sasrec"}
        )
    with pytest.raises(ValueError, match="align"):
        merge_checkpoints(
            [tmp_path / "a", tmp_path / "b"],
            tmp_path / "out",
            MergeConfig(method="task_arithmetic", align=True),
            base=tmp_path / "a",
        )
