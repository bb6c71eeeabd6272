"""Merging: the formula's identities, every method, and checkpoints in and out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from merging.fisher import FisherConfig, checkpoint_fisher
from merging.fisher_file import save_fisher
from merging.main import main
from merging.merge import MergeConfig, merge_checkpoints, run_merge
from merging.regmean import compute_grams
from merging.strategies import MERGE_METHODS, MergeInputs, search_coefficients
from merging.weighting import merge_state_dicts
from training.checkpoint import write_checkpoint
from training.evaluate import Evaluator
from training.files import sha256_file
from training.model import ModelConfig, build_model
from training.run_folder import load_run_checkpoint
from training.sequence_data import SequenceData

StateDict = dict[str, torch.Tensor]
TINY = ModelConfig(num_items=15, hidden_size=8, num_heads=2, num_layers=1, max_len=5)


def states(count: int) -> list[StateDict]:
    """State dicts of `count` different tiny models (no tensor left at its zero init)."""
    generator = torch.Generator().manual_seed(count)
    return [
        {
            name: t + torch.randn(t.shape, generator=generator)
            for name, t in build_model(TINY, seed=seed).state_dict().items()
        }
        for seed in range(count)
    ]


def gram_means(state: StateDict) -> StateDict:
    """Mean input Grams of the tiny model with this state, on a few random histories."""
    model = build_model(TINY, seed=0)
    model.load_state_dict(state)
    generator = np.random.default_rng(0)
    sequences = [generator.integers(1, 16, size=n) for n in (2, 4, 6, 3)]
    sums, rows = compute_grams(model, sequences)
    return {k: g / rows for k, g in sums.items()}


def random_fishers(models: list[StateDict], seed: int = 0) -> list[StateDict]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {name: torch.rand(t.shape, generator=generator) for name, t in state.items()}
        for state in models
    ]


def distance_scorer(target: StateDict):
    """A stand-in for validation NDCG@10: higher when closer to `target`."""

    def score(state: StateDict) -> float:
        return -sum(float((state[k] - target[k]).square().sum()) for k in target)

    return score


def assert_states_close(a: StateDict, b: StateDict, **tolerance) -> None:
    assert list(a) == list(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name, **tolerance)


# ---- the formula ----------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_merging_identical_models_returns_them(method: str) -> None:
    model = states(1)[0]
    grams = gram_means(model)
    inputs = MergeInputs(
        states=[model] * 3,
        labels=["a", "b", "c"],
        fishers=random_fishers([model] * 3),
        scorer=distance_scorer(model),
        base=states(2)[1],
        grams=[grams] * 3,
    )
    # TIES keeps every coordinate at density 1; below, trimming changes the models.
    outcome = run_merge(inputs, MergeConfig(method=method, ties_density=1.0))
    assert_states_close(outcome.state, model, rtol=1e-6, atol=1e-7)


def test_equal_fishers_give_the_uniform_average() -> None:
    models = states(3)
    fisher = random_fishers(models[:1])[0]
    uniform = merge_state_dicts(models)
    assert_states_close(merge_state_dicts(models, fishers=[fisher] * 3), uniform)
    for name in uniform:
        torch.testing.assert_close(uniform[name], sum(m[name] for m in models) / 3)


def test_a_dominant_fisher_wins_its_coordinate() -> None:
    a, b = states(2)
    fisher_a = {n: torch.ones_like(t) for n, t in a.items()}
    fisher_b = {n: torch.ones_like(t) for n, t in b.items()}
    fisher_b["output_bias"][3] = 1e9
    fisher_a["blocks.0.ffn.fc_in.weight"][1, 2] = 1e9
    merged = merge_state_dicts([a, b], fishers=[fisher_a, fisher_b])
    torch.testing.assert_close(merged["output_bias"][3], b["output_bias"][3])
    torch.testing.assert_close(
        merged["blocks.0.ffn.fc_in.weight"][1, 2], a["blocks.0.ffn.fc_in.weight"][1, 2]
    )
    torch.testing.assert_close(
        merged["output_bias"][4], (a["output_bias"][4] + b["output_bias"][4]) / 2
    )


def test_the_floor_makes_uninformed_coordinates_fall_back_to_the_average() -> None:
    models = states(3)
    fishers = random_fishers(models)
    for fisher in fishers:
        fisher["position_embedding.weight"].zero_()
    lam = [0.2, 0.3, 0.5]
    merged = merge_state_dicts(models, lam, fishers, fisher_floor=1e-6)
    average = merge_state_dicts(models, lam)
    name = "position_embedding.weight"
    torch.testing.assert_close(merged[name], average[name])
    assert not torch.allclose(merged["output_bias"], average["output_bias"])


def test_results_do_not_depend_on_the_order_of_models() -> None:
    models = states(3)
    fishers = random_fishers(models)
    lam = [0.5, 0.2, 0.3]
    order = [2, 0, 1]
    merged = merge_state_dicts(models, lam, fishers)
    shuffled = merge_state_dicts(
        [models[i] for i in order], [lam[i] for i in order], [fishers[i] for i in order]
    )
    assert_states_close(merged, shuffled)


def test_coefficients_weight_the_models() -> None:
    a, b = states(2)
    fishers = random_fishers([a, b])
    assert_states_close(merge_state_dicts([a, b], [1.0, 0.0], fishers), a)
    assert_states_close(
        merge_state_dicts([a, b], [3.0, 1.0]), merge_state_dicts([a, b], [0.75, 0.25])
    )
    for bad in ([1.0], [-1.0, 2.0], [0.0, 0.0], [float("nan"), 1.0]):
        with pytest.raises(ValueError, match="coefficients"):
            merge_state_dicts([a, b], bad)


def test_normalisation_removes_the_scale_of_a_fisher() -> None:
    a, b = states(2)
    fa, fb = random_fishers([a, b])
    scaled_b = {n: 1000.0 * t for n, t in fb.items()}
    plain = merge_state_dicts([a, b], fishers=[fa, fb], normalize_fishers=True)
    assert_states_close(
        merge_state_dicts([a, b], fishers=[fa, scaled_b], normalize_fishers=True), plain
    )
    assert not torch.allclose(
        merge_state_dicts([a, b], fishers=[fa, scaled_b])["output_bias"], plain["output_bias"]
    )


def test_parameter_name_mismatch_is_an_error_naming_the_keys() -> None:
    a, b = states(2)
    del b["output_bias"]
    with pytest.raises(ValueError, match="output_bias"):
        merge_state_dicts([a, b])
    a, b = states(2)
    fishers = random_fishers([a, b])
    fishers[1]["extra.weight"] = fishers[1].pop("blocks.0.ffn.fc_in.bias")
    with pytest.raises(ValueError, match=r"extra\.weight.*|blocks\.0\.ffn\.fc_in\.bias"):
        merge_state_dicts([a, b], fishers=fishers)


def test_buffers_are_kept_when_equal_and_refused_when_not() -> None:
    a, b = states(2)
    a["steps"] = torch.tensor([3, 4])
    b["steps"] = torch.tensor([3, 4])
    merged = merge_state_dicts([a, b])
    assert torch.equal(merged["steps"], a["steps"]) and list(merged) == list(a)
    b["steps"] = torch.tensor([3, 5])
    with pytest.raises(ValueError, match="steps"):
        merge_state_dicts([a, b])


# ---- methods ---------------------------------------------------------------------------


def test_greedy_soup_adds_models_while_validation_does_not_drop() -> None:
    base = states(1)[0]
    target = {n: t + 1.0 for n, t in base.items()}
    close = {n: t + 0.95 for n, t in base.items()}  # the best alone
    helper = {n: t + 1.1 for n, t in base.items()}  # worse alone; with `close`: near the target
    far = {n: t - 5.0 for n, t in base.items()}  # ranked last, would hurt the soup
    inputs = MergeInputs(
        [far, helper, close], ["far", "helper", "close"], scorer=distance_scorer(target)
    )
    outcome = run_merge(inputs, MergeConfig(method="greedy"))
    assert outcome.info["selected"] == ["close", "helper"]
    assert outcome.coefficients == [0.0, 0.5, 0.5]
    assert_states_close(outcome.state, {n: t + 1.025 for n, t in base.items()})
    assert [t["kept"] for t in outcome.info["trials"]] == [True, True, False]


def test_search_uses_a_grid_for_two_models() -> None:
    a, b = states(2)
    target = merge_state_dicts([a, b], [0.3, 0.7])
    inputs = MergeInputs([a, b], ["a", "b"], fishers=None, scorer=distance_scorer(target))
    outcome = run_merge(inputs, MergeConfig(method="uniform", search=True))
    assert outcome.coefficients == pytest.approx([0.3, 0.7])
    assert len(outcome.info["search"]) == 11


def test_search_uses_seeded_dirichlet_draws_for_more_models() -> None:
    models = states(3)
    fishers = random_fishers(models)
    target = merge_state_dicts(models, [0.6, 0.3, 0.1], fishers)
    config = MergeConfig(method="fisher", search=True, dirichlet_samples=12, seed=4)
    inputs = MergeInputs(models, ["a", "b", "c"], fishers, scorer=distance_scorer(target))
    first, second = run_merge(inputs, config), run_merge(inputs, config)
    assert first.coefficients == second.coefficients
    trials = first.info["search"]
    assert len(trials) == 13 and trials[0]["coefficients"] == pytest.approx([1 / 3] * 3)
    assert all(sum(t["coefficients"]) == pytest.approx(1.0) for t in trials)
    best = max(trials, key=lambda t: t["score"])
    assert first.coefficients == best["coefficients"]
    coefficients, _ = search_coefficients(
        lambda lam: merge_state_dicts(models, lam, fishers), distance_scorer(target), 3, config
    )
    assert coefficients == first.coefficients


def test_methods_that_need_data_or_fishers_say_so() -> None:
    models = states(2)
    inputs = MergeInputs(models, ["a", "b"])
    with pytest.raises(ValueError, match="--data"):
        run_merge(inputs, MergeConfig(method="greedy"))
    with pytest.raises(ValueError, match="--fishers"):
        run_merge(inputs, MergeConfig(method="fisher"))
    with pytest.raises(ValueError, match="--fishers"):
        run_merge(inputs, MergeConfig(method="fisher_grouped"))
    with pytest.raises(ValueError, match="Grams"):
        run_merge(inputs, MergeConfig(method="regmean"))
    for method in ("task_arithmetic", "ties"):
        with pytest.raises(ValueError, match="--base"):
            run_merge(inputs, MergeConfig(method=method))
    with pytest.raises(ValueError, match="unknown merge method"):
        MergeConfig(method="slerp")


# ---- checkpoints -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def recipe_runs(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two checkpoints of one architecture: the trained run and a perturbed copy of it."""
    source = load_run_checkpoint(trained_run)
    other = tmp_path_factory.mktemp("perturbed") / "ckpt"
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in source.model.parameters():
            param.add_(0.01 * torch.randn(param.shape, generator=generator))
    write_checkpoint(other, source.model, source.config, {**source.info, "recipe": "perturbed"})
    return [trained_run, other]


@pytest.fixture(scope="module")
def fisher_files(
    recipe_runs: list[Path], small_data: SequenceData, tmp_path_factory: pytest.TempPathFactory
) -> list[Path]:
    folder = tmp_path_factory.mktemp("fishers")
    paths = []
    for index, run in enumerate(recipe_runs):
        result, meta = checkpoint_fisher(
            run, small_data, FisherConfig(estimator="exact", num_sequences=16)
        )
        paths.append(folder / f"{index}.safetensors")
        save_fisher(paths[-1], result.file_tensors(), meta)
    return paths


def test_fisher_merge_of_checkpoints_writes_a_checkpoint_that_evaluates(
    recipe_runs: list[Path], fisher_files: list[Path], small_data: SequenceData, tmp_path: Path
) -> None:
    out = tmp_path / "merged"
    config = MergeConfig(method="fisher", search=True, grid_points=3)
    result = merge_checkpoints(recipe_runs, out, config, fisher_files, small_data)
    merged = load_run_checkpoint(out)
    merge = merged.info["merge"]
    assert merge["method"] == "fisher" and merge["estimator"] == "exact"
    assert len(merge["search"]) == 3 and merge["coefficients"] in [
        t["coefficients"] for t in merge["search"]
    ]
    shas = [i["sha256"] for i in merge["inputs"]]
    assert shas[0] == sha256_file(recipe_runs[0] / "best" / "model.safetensors")
    assert shas[1] == sha256_file(recipe_runs[1] / "model.safetensors")
    assert merged.info["data_fingerprint"] == small_data.fingerprint
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == result.metrics
    valid = Evaluator(small_data.split()).evaluate_model(merged.model, "valid").metrics
    assert valid["full"]["ndcg@10"] == pytest.approx(metrics["model"]["valid"]["full"]["ndcg@10"])


def test_a_fisher_of_another_checkpoint_is_refused(
    recipe_runs: list[Path], fisher_files: list[Path], tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="order of --checkpoints"):
        merge_checkpoints(
            recipe_runs, tmp_path / "m", MergeConfig(method="fisher"), fisher_files[::-1]
        )


def test_other_architectures_are_refused(recipe_runs: list[Path], tmp_path: Path) -> None:
    config = ModelConfig(num_items=200, hidden_size=16, num_heads=2, max_len=20)
    write_checkpoint(tmp_path / "small", build_model(config, seed=0), config)
    with pytest.raises(ValueError, match="hidden_size"):
        merge_checkpoints([recipe_runs[0], tmp_path / "small"], tmp_path / "m")


def test_cli_greedy_merge_then_fine_tune(
    recipe_runs: list[Path], small_data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "greedy"
    argv = ["merge", "--checkpoints", *map(str, recipe_runs), "--data", str(small_data_dir)]
    assert main([*argv, "--method", "greedy", "--out", str(out)]) == 0
    greedy = load_run_checkpoint(out).info["merge"]
    assert greedy["method"] == "greedy" and greedy["selected"]
    tuned = tmp_path / "tuned"
    assert main([*argv, "--method", "uniform", "--finetune-epochs", "1", "--out", str(tuned)]) == 0
    merged = load_run_checkpoint(tuned / "merged")
    final = load_run_checkpoint(tuned)  # the run folder's best/
    assert final.info["init"] == str(tuned / "merged")
    assert final.info["recipe"] == merged.config.backbone  # the plain objective
    changed = any(
        not torch.equal(p, q)
        for p, q in zip(final.model.parameters(), merged.model.parameters(), strict=True)
    )
    assert changed
    assert main([*argv, "--method", "fisher", "--out", str(tmp_path / "x")]) == 2  # no --fishers


def test_cli_task_vector_and_regmean_merges_of_checkpoints(
    recipe_runs: list[Path], fisher_files: list[Path], small_data_dir: Path, tmp_path: Path
) -> None:
    argv = ["merge", "--checkpoints", *map(str, recipe_runs), "--data", str(small_data_dir)]
    # The trained run is the base of the perturbed copy: TIES keeps 20% of the perturbation.
    ties = tmp_path / "ties"
    base = ["--base", str(recipe_runs[0])]
    assert main([*argv, *base, "--method", "ties", "--search", "--out", str(ties)]) == 0
    merged = load_run_checkpoint(ties)
    info = merged.info["merge"]
    assert info["method"] == "ties" and info["base"]["path"].startswith(str(recipe_runs[0]))
    assert info["scale"] in [t["scale"] for t in info["search"]]
    assert json.loads((ties / "metrics.json").read_text())["model"]["valid"]["full"]["ndcg@10"] >= 0
    assert main([*argv, "--method", "ties", "--out", str(tmp_path / "y")]) == 2  # no --base
    regmean = tmp_path / "regmean"
    fishers = ["--fishers", *map(str, fisher_files)]
    assert main([*argv, *fishers, "--method", "regmean", "--out", str(regmean)]) == 0
    assert load_run_checkpoint(regmean).info["merge"]["method"] == "regmean"
    grouped = ["--group-coefficients", "items=1,0", "--method", "fisher_grouped"]
    assert main([*argv, *fishers, *grouped, "--out", str(tmp_path / "g")]) == 0
    info = load_run_checkpoint(tmp_path / "g").info["merge"]
    assert info["group_coefficients"]["items"] == [1.0, 0.0]
