"""The job's first stage: the run's data (and item features) staged into the store.

It runs on the driver, which can read the configured source; workers on other
nodes read the staged copy under work/<run_id>/data (merging/pipeline/task_context.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from merging.pipeline.config import PipelineConfig
from merging.pipeline.stage_context import StageContext
from merging.pipeline.stages import StageOutput
from training.config import DataSpec


def stage_data(run: StageContext) -> dict[str, Any]:
    """Load the configured source, stage it as work/<run_id>/data; its summary."""

    def work() -> StageOutput:
        from training.sources import load_source, localized

        local = run.tasks.scratch("data-staging")
        # A data.path on the bucket (s3://...) is downloaded here, once, by the driver.
        spec = localized(run.config.experiment.data, local / "source")
        data = load_source(spec)
        data.save(local / "data")
        result = {
            "fingerprint": data.fingerprint,
            "num_users": data.num_users,
            "num_items": data.num_items,
            "num_interactions": data.num_interactions,
            "protocol": data.split().protocol,
            "test_users": len(data.split().test),
        }
        if needs_features(run.config):
            result["features"] = stage_features(spec, data, local / "data")
        run.store.upload_folder(local / "data", f"{run.work}/data")
        return StageOutput(["data"], result)

    return run.runner.run("data", work)


def needs_features(config: PipelineConfig) -> bool:
    """Whether a model of the pool reads item features (text models, KDSR)."""
    from training.recipes import needs_features as recipe_needs_features

    text_model = config.experiment.model.item_representation != "id"
    return text_model or any(recipe_needs_features(entry.recipe_name) for entry in config.recipes)


def stage_features(spec: DataSpec, data: Any, folder: Path) -> dict[str, Any]:
    """Copy the item features (of a local `spec`) into the run's data folder, checked.

    Workers on other nodes cannot read the submitter's files: they read the
    features from the store, beside the data (see pool_stage.train_model).
    """
    import shutil

    from training.item_features import FEATURES_FILE, features_path, load_item_features

    features = load_item_features(spec.path, spec.features, data)
    shutil.copy2(features_path(spec.path, spec.features), folder / FEATURES_FILE)
    return {"encoder": features.encoder, "dim": features.dim, "coverage": features.coverage}
