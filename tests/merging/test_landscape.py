"""The weight plane, the probe and the line profile behind the report's landscape plots."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from merging.landscape import (
    Plane,
    flat_weights,
    line_profile,
    plane_landscape,
    unflatten,
    validation_probe,
)
from merging.pipeline.report import plot_line_profile, plot_weight_plane
from training.batching import pad_left
from training.evaluate import Evaluator
from training.run_folder import load_run_checkpoint
from training.sequence_data import SequenceData


@pytest.fixture(scope="module")
def models(trained_run: Path) -> list[dict[str, torch.Tensor]]:
    """The trained model and two perturbations of it: three points that span a plane."""
    state = load_run_checkpoint(trained_run).model.state_dict()
    generator = torch.Generator().manual_seed(0)
    noisy = [
        {
            n: t + 0.05 * torch.randn(t.shape, generator=generator) if t.is_floating_point() else t
            for n, t in state.items()
        }
        for _ in range(2)
    ]
    return [state, *noisy]


def test_the_plane_basis_is_orthonormal_and_maps_back(models) -> None:
    flats = [flat_weights(s) for s in models]
    plane = Plane.through(flats)
    assert float(plane.u @ plane.v) == pytest.approx(0.0, abs=1e-9)
    assert float(plane.u.norm()) == pytest.approx(1.0) == float(plane.v.norm())
    assert plane.coords(flats[0]) == (0.0, 0.0)
    x, y = plane.coords(flats[2])
    torch.testing.assert_close(plane.point(x, y), flats[2])  # an anchor lies on its plane
    restored = unflatten(flats[1], models[1])
    assert list(restored) == list(models[1])
    for name, tensor in models[1].items():
        torch.testing.assert_close(restored[name], tensor)


def test_the_probe_scores_ndcg_and_the_next_item_loss(
    trained_run: Path, small_data: SequenceData
) -> None:
    model = load_run_checkpoint(trained_run).model.eval()
    split = small_data.split()
    probe = validation_probe(split, users=10**6)  # more than there are: every user
    scores = probe.score(model)
    full = Evaluator(split).evaluate_model(model, "valid").metrics["full"]["ndcg@10"]
    assert scores["ndcg@10"] == pytest.approx(full)
    histories = pad_left(split.valid.histories, model.config.max_len)
    with torch.inference_mode():
        loss = F.cross_entropy(model.logits(histories), torch.as_tensor(split.valid.targets) - 1)
    assert scores["loss"] == pytest.approx(float(loss), rel=1e-5)
    subset = validation_probe(split, users=7, seed=3)
    assert len(subset.split) == 7 and subset.split.users.tolist() == sorted(
        subset.split.users.tolist()
    )


def test_the_line_profile_ends_at_the_two_models(
    trained_run: Path, small_data: SequenceData, models
) -> None:
    template = load_run_checkpoint(trained_run).model
    probe = validation_probe(small_data.split(), users=40)
    profile = line_profile(models[0], models[1], template, probe, points=5, extend=0.0)
    assert profile["t"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    for t, state in ((0, models[0]), (-1, models[1])):
        template.load_state_dict(state)
        assert profile["ndcg@10"][t] == pytest.approx(probe.score(template)["ndcg@10"])
        assert profile["loss"][t] == pytest.approx(probe.score(template)["loss"], rel=1e-5)


def test_the_landscape_grid_covers_every_model_and_is_plotted(
    trained_run: Path, small_data: SequenceData, models, tmp_path: Path
) -> None:
    template = load_run_checkpoint(trained_run).model
    probe = validation_probe(small_data.split(), users=40)
    anchors = {"a": models[0], "b": models[1], "c": models[2]}
    middle = {
        n: (models[0][n] + models[1][n]) / 2 if models[0][n].is_floating_point() else models[0][n]
        for n in models[0]
    }
    landscape = plane_landscape(anchors, {"merged": middle}, template, probe, grid_points=4)
    assert len(landscape["ndcg@10"]) == 4 and all(len(row) == 4 for row in landscape["loss"])
    for x, y in landscape["points"].values():
        assert (
            landscape["x"][0] < x < landscape["x"][-1]
            and landscape["y"][0] < y < landscape["y"][-1]
        )
    # The average of a and b lies half way between them, on the plane.
    ax, _ = landscape["points"]["b"]
    assert landscape["points"]["merged"] == pytest.approx((ax / 2, 0.0), abs=1e-6)
    plot_weight_plane(anchors, {"merged": middle}, tmp_path / "plane.png", landscape)
    profile = line_profile(models[0], middle, template, probe, points=3)
    plot_line_profile(profile, "a", "merged", tmp_path / "line.png")
    assert (tmp_path / "plane.png").stat().st_size > 1000 and (
        tmp_path / "line.png"
    ).stat().st_size > 1000


def test_the_barrier_is_the_dip_below_the_straight_line_between_the_ends() -> None:
    from merging.landscape import line_barrier

    t = [0.0, 0.25, 0.5, 0.75, 1.0]
    dip, relative = line_barrier({"t": t, "ndcg@10": [0.06, 0.05, 0.04, 0.05, 0.06]})
    assert dip == pytest.approx(0.02) and relative == pytest.approx(1 / 3)
    # Unequal members, a straight-ish monotone line: no barrier, though the lowest
    # interior point is far below the ends' mean.
    dip, _ = line_barrier({"t": t, "ndcg@10": [0.06, 0.0552, 0.0502, 0.0451, 0.04]})
    assert dip < 0
    dip, relative = line_barrier({"t": t, "ndcg@10": [0.06, 0.05, 0.045, 0.035, 0.04]})
    assert dip == pytest.approx(0.01) and relative == pytest.approx(0.01 / 0.045)
