"""Alignment, uniformity and error inconsistency; `fishrec compare`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from merging.main import main
from tests.support import tiny_experiment
from training.diagnostics import (
    alignment,
    compare_models,
    error_inconsistency,
    representation_quality,
    same_target_pairs,
    sequence_representations,
    uniformity,
)
from training.evaluate import Evaluator
from training.model import ModelConfig, build_model
from training.run_folder import load_run_checkpoint
from training.synthetic import SyntheticConfig, generate


def test_alignment_of_known_pairs() -> None:
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert float(alignment(z, 3 * z)) == pytest.approx(0.0, abs=1e-7)
    assert float(alignment(z, -z)) == pytest.approx(4.0)  # antipodal: distance 2
    assert float(alignment(z, z.flip(1))) == pytest.approx(2.0)  # orthogonal: distance sqrt(2)


def test_uniformity_of_known_points() -> None:
    # Two antipodal points: squared distance 4, so log exp(-2 * 4) = -8.
    assert float(uniformity(torch.tensor([[1.0, 0.0], [-2.0, 0.0]]))) == pytest.approx(-8.0)
    # Three points at 120 degrees: squared distance 3 for every pair.
    angles = torch.tensor([0.0, 2 * math.pi / 3, 4 * math.pi / 3])
    points = torch.stack([angles.cos(), angles.sin()], 1)
    assert float(uniformity(points)) == pytest.approx(-6.0, abs=1e-5)
    collapsed = torch.ones(5, 3)
    assert float(uniformity(collapsed)) == pytest.approx(0.0, abs=1e-6)  # the worst value
    with pytest.raises(ValueError, match="two"):
        uniformity(torch.ones(1, 3))


def test_same_target_pairs() -> None:
    first, second = same_target_pairs(np.array([4, 7, 4, 9, 4, 7]))
    assert sorted(zip(first.tolist(), second.tolist(), strict=True)) == [
        (0, 2),
        (0, 4),
        (1, 5),
        (2, 4),
    ]
    first, _ = same_target_pairs(np.array([4, 4, 4, 4, 4]), max_pairs=3)
    assert len(first) == 3
    assert len(same_target_pairs(np.array([1, 2, 3]))[0]) == 0


def test_error_inconsistency_counts_users_exactly_one_model_gets_right() -> None:
    a = np.array([1.0, 0.63, 0.5, 0.0, 1.0])
    b = np.array([1.0, 0.0, 1.0, 0.0, 0.2])
    # user 0 both, user 1 only A, user 2 only B (0.5 is not > 0.5), user 3 neither, user 4 only A
    assert error_inconsistency(a, b) == pytest.approx(3 / 5)
    assert error_inconsistency(a, a) == 0.0
    with pytest.raises(ValueError, match="same users"):
        error_inconsistency(a, b[:3])


def test_representations_do_not_depend_on_batching(trained_run: Path, small_data) -> None:
    model = load_run_checkpoint(trained_run).model.train()
    histories = small_data.split().test.histories[:50]
    whole = sequence_representations(model, histories, batch_size=512)
    pieces = sequence_representations(model, histories, batch_size=7)
    assert model.training  # its mode is given back
    assert torch.allclose(whole, pieces, atol=1e-5)  # evaluation mode: no dropout
    single = model.eval().hidden(torch.as_tensor(histories[3])[None]).detach()
    assert torch.allclose(whole[3], single[0], atol=1e-5)


def test_compare_models_and_representation_quality(trained_run: Path, small_data) -> None:
    trained = load_run_checkpoint(trained_run).model
    fresh = build_model(
        ModelConfig(num_items=small_data.num_items, **tiny_experiment().model.model_dump()), seed=5
    )
    evaluator = Evaluator(small_data.split())
    same = compare_models(trained, trained, evaluator)
    assert same.inconsistency == 0.0 and same.only_a == same.only_b == 0.0
    assert same.metrics_a == same.metrics_b
    other = compare_models(trained, fresh, evaluator)
    assert other.inconsistency == pytest.approx(other.only_a + other.only_b)
    assert other.only_a > other.only_b  # a trained model gets more users right than a random one
    quality = representation_quality(trained, small_data.split().test)
    assert math.isfinite(quality["alignment"]) and quality["uniformity"] < 0


def test_cli_compare(trained_run: Path, small_data_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "compare.json"
    code = main(
        [
            "compare",
            str(trained_run),
            str(trained_run / "best"),
            "--data",
            str(small_data_dir),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "error inconsistency" in printed and "uniformity" in printed
    document = json.loads(out.read_text())
    assert document["inconsistency"] == 0.0
    assert document["metrics_a"] == document["metrics_b"]


def test_cli_compare_refuses_other_data(trained_run: Path, tmp_path: Path, capsys) -> None:
    other = tmp_path / "other"
    generate(
        SyntheticConfig(seed=3, num_users=80, num_items=50, mean_length=8, max_length=12)
    ).save(other)
    assert main(["compare", str(trained_run), str(trained_run), "--data", str(other)]) == 2
    assert "items" in capsys.readouterr().err
