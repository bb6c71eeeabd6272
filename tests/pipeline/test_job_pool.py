"""The merge job with the spawn and population pool strategies, on a real local Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError

from merging.bundle import verify_bundle
from merging.pipeline.job import run_pipeline
from serving.bundle import LATEST
from tests.support import tiny_pipeline
from training.run_folder import load_run_checkpoint

# Real Ray runs of the job: minutes, so outside the inner loop (pytest -m "not slow").
pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.slow]


def test_a_spawned_pool_starts_every_member_from_the_shared_epoch(tmp_path: Path) -> None:
    config = tiny_pipeline(
        setting="spawn", pool={"spawn_epoch": 1}, recipes=[{"name": "plain"}, {"name": "cl4srec"}]
    )
    result = run_pipeline(config, str(tmp_path), run_id="spawn")
    work = tmp_path / "work" / "spawn"
    base = work / "models" / "base"
    # The shared phase ran exactly spawn_epoch epochs, and its last epoch was published.
    history = json.loads((base / "history.json").read_text())
    assert [e["epoch"] for e in history if "loss" in e] == [1]
    assert (base / "last" / "checkpoint.json").is_file()
    for name in ("plain", "cl4srec"):
        member = yaml.safe_load((work / "models" / name / "config.yaml").read_text())
        assert member["train"]["lr"] == config.experiment.train.lr  # not the fine-tune rate
    assert (tmp_path / LATEST).read_text().strip() == "spawn"
    manifest = verify_bundle(tmp_path / "runs" / "spawn")
    assert manifest["merge"]["published"] == "merged-fisher"
    assert {"plain", "cl4srec", "merged-fisher", "base"} <= set(result.metrics["models"])
    # The budget counts the shared epoch once and each member's own epochs.
    assert result.metrics["pool"]["member_epochs_budget"] == 1 + 2 * config.recipe_epochs


def test_a_population_pool_trains_members_together_and_publishes(tmp_path: Path) -> None:
    config = tiny_pipeline(
        setting="population",
        pool={"pull": 0.5, "exchange_every": 2},
        recipes=[{"name": "plain"}, {"name": "cl4srec"}],
        control=True,
    )
    result = run_pipeline(config, str(tmp_path), run_id="population")
    work = tmp_path / "work" / "population"
    assert not (work / "models" / "base").exists()  # no shared base: own initialisations
    # The equal-compute control trained from scratch beside the population, for its budget.
    control = json.loads((work / "models" / "control" / "history.json").read_text())
    assert [e["epoch"] for e in control if "loss" in e] == [1, 2]
    assert "control" in result.metrics["vs_best_recipe"]
    plain, cl4srec = (
        load_run_checkpoint(work / "models" / name).model.state_dict()
        for name in ("plain", "cl4srec")
    )
    # Pulled halfway to their mean every 2 steps: close, yet not one model.
    gap = (plain["item_embedding.weight"] - cl4srec["item_embedding.weight"]).norm()
    assert 0 < gap < 0.5 * plain["item_embedding.weight"].norm()
    assert (tmp_path / LATEST).read_text().strip() == "population"
    verify_bundle(tmp_path / "runs" / "population")
    assert result.metrics["models"]["merged-fisher"]["test"]["full"]["ndcg@10"] > 0
    pool = result.metrics["pool"]
    assert pool["strategy"] == "population" and pool["pull"] == 0.5
    assert pool["member_epochs_budget"] == 2 * config.recipe_epochs
    assert set(pool["error_inconsistency"]) == {"plain | cl4srec"}
    assert len(pool["line"]["ndcg@10"]) == 9 and "barrier" in pool["line"]
    report = (tmp_path / "runs" / "population" / "report.md").read_text()
    assert "population (pull 0.5 every 2 steps): 2 members" in report
    assert torch.isfinite(plain["item_embedding.weight"]).all()


def test_strategy_settings_are_validated() -> None:
    with pytest.raises(ValidationError, match="task vectors"):
        tiny_pipeline(setting="population", merge__methods=["ties"], merge__publish="ties")
    tiny_pipeline(setting="spawn", merge__methods=["ties"], merge__publish="ties")  # a base exists
    with pytest.raises(ValidationError):
        tiny_pipeline(setting="nearby")
    with pytest.raises(ValidationError):
        tiny_pipeline(setting="population", pool={"pull": -0.1})
