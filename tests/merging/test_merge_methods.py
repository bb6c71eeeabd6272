"""The merge methods beyond averaging: task arithmetic, TIES, RegMean, per-group Fisher.

Each is checked against its definition on tiny tensors or tiny models; the
formula's identities shared by every method live in tests/merging/test_merge.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from merging.fisher import FisherConfig, compute_fisher
from merging.fisher_file import load_fisher, save_fisher
from merging.merge import MergeConfig, run_merge
from merging.regmean import compute_grams, regmean_linear
from merging.strategies import MergeInputs, parameter_group
from merging.task_vectors import ties_vector, trimmed
from tests.merging.test_merge import (
    TINY,
    assert_states_close,
    distance_scorer,
    random_fishers,
    states,
)
from training.model import ModelConfig, build_model

StateDict = dict[str, torch.Tensor]


# ---- task vectors ---------------------------------------------------------------------


def test_task_arithmetic_adds_scaled_task_vectors_to_the_base() -> None:
    base, *models = states(3)
    inputs = MergeInputs(models, ["a", "b"], base=base)
    average = run_merge(inputs, MergeConfig(method="uniform")).state
    # s = 1 with λ summing to 1 is the plain average of the models...
    assert_states_close(run_merge(inputs, MergeConfig(method="task_arithmetic")).state, average)
    # ...and s = 2 goes twice as far from the base along the mean task vector.
    doubled = run_merge(inputs, MergeConfig(method="task_arithmetic", task_scale=2.0)).state
    for name, value in doubled.items():
        expected = base[name] + 2 * (average[name] - base[name])
        torch.testing.assert_close(value, expected, msg=name)


def test_ties_trims_elects_the_sign_and_averages_the_agreeing_values() -> None:
    first = torch.tensor([3.0, -1.0, 0.5, 0.0])
    second = torch.tensor([-2.0, -4.0, 1.0, 0.1])
    assert trimmed(first, 0.5).tolist() == [3.0, -1.0, 0.0, 0.0]
    assert trimmed(second, 0.5).tolist() == [-2.0, -4.0, 0.0, 0.0]
    # Coordinate 0: 3 - 2 > 0 elects +, only 3 agrees. Coordinate 1: both negative.
    merged = ties_vector([first, second], [0.5, 0.5], density=0.5)
    assert merged.tolist() == [3.0, -2.5, 0.0, 0.0]


def test_ties_merge_of_checkpoint_states_stays_at_the_base_where_all_is_trimmed() -> None:
    base, *models = states(3)
    inputs = MergeInputs(models, ["a", "b"], base=base)
    merged = run_merge(inputs, MergeConfig(method="ties", ties_density=0.1)).state
    changed = sum(int((merged[n] != base[n]).sum()) for n in base if base[n].is_floating_point())
    total = sum(base[n].numel() for n in base if base[n].is_floating_point())
    # At most 10% of each tensor moves per model (rounded up per tensor), so at most ~20%.
    assert 0 < changed <= 0.2 * total + 2 * len(base)


def test_task_vector_search_picks_the_scale_on_validation() -> None:
    base, *models = states(3)
    target = {n: base[n] + 1.5 * (models[0][n] - base[n]) for n in base}
    inputs = MergeInputs(
        [models[0], models[0]], ["a", "b"], base=base, scorer=distance_scorer(target)
    )
    outcome = run_merge(inputs, MergeConfig(method="task_arithmetic", search=True, grid_points=5))
    assert [t["scale"] for t in outcome.info["search"]] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert outcome.info["scale"] == 1.5


def test_a_base_of_another_architecture_is_refused() -> None:
    models = states(2)
    other = build_model(ModelConfig(num_items=15, hidden_size=16, num_layers=1, max_len=5))
    inputs = MergeInputs(models, ["a", "b"], base=other.state_dict())
    with pytest.raises(ValueError, match="base shape"):
        run_merge(inputs, MergeConfig(method="task_arithmetic"))


# ---- RegMean --------------------------------------------------------------------------


def _layer_problem(seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(40, 5, generator=generator, dtype=torch.float64) + m for m in range(2)]
    weights = [torch.randn(3, 5, generator=generator, dtype=torch.float64) for _ in range(2)]
    biases = [torch.randn(3, generator=generator, dtype=torch.float64) for _ in range(2)]
    return inputs, weights, biases


def _mean_gram(x: torch.Tensor) -> torch.Tensor:
    augmented = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    return augmented.T @ augmented / len(x)


def test_regmean_is_the_least_squares_layer_for_both_models_inputs() -> None:
    inputs, weights, biases = _layer_problem(0)
    grams = [_mean_gram(x) for x in inputs]
    weight, bias = regmean_linear(weights, biases, grams, [0.5, 0.5], alpha=1.0)
    # Reference: one linear fit of every model's outputs on its own inputs.
    design = torch.cat([torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) for x in inputs])
    targets = torch.cat([x @ w.T + b for x, w, b in zip(inputs, weights, biases, strict=True)])
    solution = torch.linalg.lstsq(design, targets).solution.T  # (3, 6)
    torch.testing.assert_close(weight, solution[:, :-1])
    torch.testing.assert_close(bias, solution[:, -1])


def test_regmean_without_off_diagonals_is_a_per_column_weighted_average() -> None:
    inputs, weights, _ = _layer_problem(1)
    grams = [_mean_gram(x) for x in inputs]
    weight, bias = regmean_linear(weights, [None, None], grams, [0.5, 0.5], alpha=0.0)
    assert bias is None
    diag = [torch.diagonal(g)[:-1] for g in grams]
    expected = (weights[0] * diag[0] + weights[1] * diag[1]) / (diag[0] + diag[1])
    torch.testing.assert_close(weight, expected)


def test_an_input_column_no_model_saw_keeps_the_average() -> None:
    inputs, weights, biases = _layer_problem(2)
    for x in inputs:
        x[:, 2] = 0.0  # a dead unit feeding the layer
    grams = [_mean_gram(x) for x in inputs]
    weight, _ = regmean_linear(weights, biases, grams, [0.5, 0.5], alpha=0.9)
    torch.testing.assert_close(weight[:, 2], (weights[0][:, 2] + weights[1][:, 2]) / 2)
    assert torch.isfinite(weight).all()


def _sequences(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 16, size=int(rng.integers(2, 7))) for _ in range(count)]


@pytest.mark.parametrize("block", ["sasrec", "prenorm"])
def test_grams_exclude_padding_and_add_over_shards(block: str) -> None:
    config = ModelConfig(
        num_items=15,
        backbone="sasrec",
        hidden_size=8,
        num_heads=2,
        num_layers=2,
        max_len=5,
        block=block,
    )
    model = build_model(config, seed=0)
    sequences = _sequences(9)
    batched, rows = compute_grams(model, sequences, batch_size=4)  # padded batches
    assert rows == sum(min(len(s) - 1, 5) for s in sequences)
    one_by_one = [compute_grams(model, [s], batch_size=1) for s in sequences]  # no padding
    assert rows == sum(r for _, r in one_by_one)
    for key, gram in batched.items():
        # float32 states: padded and unpadded kernels round differently.
        torch.testing.assert_close(
            gram, sum(g[key] for g, _ in one_by_one), msg=key, rtol=1e-4, atol=1e-5
        )
        # The constant input 1 counts every row once.
        assert gram[-1, -1] == rows
    dim = config.hidden_size
    query, keys_values = (
        batched[f"blocks.0.attn.qkv.weight[0:{dim}]"],
        batched[f"blocks.0.attn.qkv.weight[{dim}:{3 * dim}]"],
    )
    # SASRec's block reads keys/values from x and queries from LN(x); pre-norm reads LN(x) for all.
    assert torch.allclose(query, keys_values) == (block == "prenorm")
    assert {k.split("[")[0] for k in batched} == {
        f"blocks.{i}.{layer}.weight"
        for i in range(2)
        for layer in ("attn.qkv", "attn.proj", "ffn.fc_in", "ffn.fc_out")
    }


def test_fisher_files_carry_the_grams_and_regmean_reads_them(tmp_path) -> None:
    models = [build_model(TINY, seed=s) for s in (0, 1)]
    sequences = _sequences(12, seed=1)
    files = []
    for index, model in enumerate(models):
        halves = [
            compute_fisher(model, sequences[:5], FisherConfig(), ids=range(5)),
            compute_fisher(model, sequences[5:], FisherConfig(), ids=range(5, 12)),
        ]
        whole = compute_fisher(model, sequences, FisherConfig())
        total = sum(halves)
        assert total.gram_rows == whole.gram_rows
        for key in whole.grams:
            torch.testing.assert_close(total.grams[key], whole.grams[key])
        files.append(tmp_path / f"{index}.safetensors")
        save_fisher(files[-1], whole.file_tensors(), {"estimator": "exact"})
    loaded = [load_fisher(path) for path in files]
    assert set(loaded[0].tensors) == set(models[0].state_dict()) - {
        n for n, _ in models[0].named_buffers()
    }
    assert loaded[0].grams and all(not k.startswith("gram:") for k in loaded[0].tensors)
    inputs = MergeInputs(
        [m.state_dict() for m in models],
        ["a", "b"],
        fishers=[f.tensors for f in loaded],
        grams=[f.grams for f in loaded],
        parameter_names={n for n, _ in models[0].named_parameters()},
    )
    merged = run_merge(inputs, MergeConfig(method="regmean")).state
    fisher = run_merge(inputs, MergeConfig(method="fisher")).state
    name = "blocks.0.ffn.fc_in.weight"
    assert not torch.allclose(merged[name], fisher[name])  # linear layers: RegMean
    torch.testing.assert_close(
        merged["position_embedding.weight"], fisher["position_embedding.weight"]
    )


def test_grams_can_be_turned_off() -> None:
    result = compute_fisher(build_model(TINY, seed=0), _sequences(3), FisherConfig(grams=False))
    assert result.grams == {} and result.gram_rows == 0


# ---- Fisher with per-group coefficients ------------------------------------------------


def test_parameter_groups() -> None:
    names = build_model(TINY, seed=0).state_dict()
    groups = {n: parameter_group(n) for n in names}
    assert groups["item_embedding.weight"] == groups["output_bias"] == "items"
    assert groups["position_embedding.weight"] == "positions"
    assert groups["blocks.0.attn.qkv.weight"] == "block0"
    assert groups["final_norm.weight"] == "other"


def test_group_coefficients_pick_each_groups_model() -> None:
    models = states(2)
    inputs = MergeInputs(models, ["a", "b"], fishers=random_fishers(models))
    config = MergeConfig(
        method="fisher_grouped", group_coefficients={"items": [1.0, 0.0], "block0": [0.0, 1.0]}
    )
    merged = run_merge(inputs, config).state
    torch.testing.assert_close(merged["item_embedding.weight"], models[0]["item_embedding.weight"])
    torch.testing.assert_close(
        merged["blocks.0.ffn.fc_in.weight"], models[1]["blocks.0.ffn.fc_in.weight"]
    )
    plain = run_merge(inputs, MergeConfig(method="fisher")).state
    torch.testing.assert_close(
        merged["position_embedding.weight"], plain["position_embedding.weight"]
    )
    with pytest.raises(ValueError, match="unknown groups"):
        run_merge(inputs, MergeConfig(method="fisher_grouped", group_coefficients={"head": [1, 0]}))


def test_group_search_never_scores_below_the_uniform_start() -> None:
    models = states(2)
    target = {n: models[0][n] if parameter_group(n) == "items" else models[1][n] for n in models[0]}
    inputs = MergeInputs(
        models, ["a", "b"], fishers=random_fishers(models), scorer=distance_scorer(target)
    )
    searched = run_merge(inputs, MergeConfig(method="fisher_grouped", search=True, grid_points=3))
    uniform = run_merge(inputs, MergeConfig(method="fisher_grouped"))
    score = distance_scorer(target)
    assert score(searched.state) > score(uniform.state)
    assert searched.info["group_coefficients"]["items"] == [1.0, 0.0]
    assert set(searched.info["search"]) == {"items", "positions", "block0", "other"}


# ---- rare items -----------------------------------------------------------------------


def test_rows_of_items_no_model_informs_fall_back_to_the_average() -> None:
    """A rare item's embedding row gets (almost) no Fisher in any model.

    The floor applies after normalisation: a row below it in every model is the
    λ-weighted average; a row one model informs (above the floor) follows it.
    """
    models = states(2)
    fishers = [{n: torch.ones_like(t) for n, t in m.items()} for m in models]
    rare, informed = 3, 4
    for fisher in fishers:
        fisher["item_embedding.weight"][rare] = 0.0
    fishers[0]["item_embedding.weight"][informed] = 1e-3
    fishers[1]["item_embedding.weight"][informed] = 0.0
    for normalize in (False, True):
        config = MergeConfig(method="fisher", fisher_floor=1e-6, normalize_fishers=normalize)
        merged = run_merge(MergeInputs(models, ["a", "b"], fishers=fishers), config).state
        rows = [m["item_embedding.weight"] for m in models]
        torch.testing.assert_close(
            merged["item_embedding.weight"][rare], (rows[0][rare] + rows[1][rare]) / 2
        )
        # 1e-3 against the floor 1e-6: model 0 gets ~99.9% of the weight.
        torch.testing.assert_close(
            merged["item_embedding.weight"][informed], rows[0][informed], atol=0.01, rtol=0
        )


def test_normalisation_lets_a_model_with_small_fishers_count_on_rare_rows() -> None:
    models = states(2)
    fishers = [{n: torch.ones_like(t) for n, t in m.items()} for m in models]
    fishers[1] = {n: 1000 * f for n, f in fishers[1].items()}  # model 1: larger Fisher everywhere
    name = "item_embedding.weight"
    raw = run_merge(
        MergeInputs(models, ["a", "b"], fishers=fishers), MergeConfig(method="fisher")
    ).state
    normalised = run_merge(
        MergeInputs(models, ["a", "b"], fishers=fishers),
        MergeConfig(method="fisher", normalize_fishers=True),
    ).state
    torch.testing.assert_close(raw[name], models[1][name], atol=0.01, rtol=0)
    torch.testing.assert_close(normalised[name], (models[0][name] + models[1][name]) / 2)
