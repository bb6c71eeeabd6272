"""Nightly runs that can be compared over time: the merge job on an MLflow tracking server.

Off by default; one block of the pipeline config turns it on:

    tracking:
      enabled: true
      uri: http://mlflow.internal:5000     # or MLFLOW_TRACKING_URI
      experiment: fishrec-nightly
      registered_model: fishrec            # None: no registry
      alias: champion

Every run of the job is one MLflow run, named by the job's run id (a resumed
job continues its MLflow run): the config as parameters and as pipeline.yaml,
each stage's seconds, every model's validation and test metrics, the pool's
figures, the report with its plots, and a tag `fishrec.outcome` (published,
refused by the quality gate, failed, with the failing stage). A publish
registers the bundle as a version of `registered_model` and points `alias` at
it, so the registry always names the bundle LATEST serves.

The job talks to the server from its driver only (Ray tasks never do). A
tracking server that fails mid-run costs the run nothing: the error is logged
and tracking stops for that run.
"""

from __future__ import annotations

import functools
import logging
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import Field

from training.config import StrictModel

log = logging.getLogger(__name__)
RUN_ID_TAG = "fishrec.run_id"
OUTCOME_TAG = "fishrec.outcome"


class TrackingSpec(StrictModel):
    """Where the job reports its runs (merging/pipeline/tracking.py); off by default."""

    enabled: bool = Field(False, description="log every run to an MLflow tracking server")
    uri: str | None = Field(
        None, description="tracking server URI (None: MLFLOW_TRACKING_URI, else ./mlruns)"
    )
    experiment: str = Field("fishrec", min_length=1, description="MLflow experiment name")
    registered_model: str | None = Field(
        "fishrec", description="registered model a publish adds a version to (None: no registry)"
    )
    alias: str = Field("champion", min_length=1, description="alias set on the published version")


def flatten(values: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """Nested config values as (dotted key, text) pairs."""
    if isinstance(values, dict):
        for key, value in values.items():
            yield from flatten(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], str(values)


def metric_name(text: str) -> str:
    """MLflow allows alphanumerics, _ - . / : and spaces in names: ndcg@10 -> ndcg_at_10."""
    return text.replace("@", "_at_")


def model_metrics(document: dict[str, Any]) -> dict[str, float]:
    """Every model's full-ranking metrics per split, and the pool's figures."""
    out = {}
    for model, parts in document.get("models", {}).items():
        for part in ("valid", "test"):
            for name, value in parts.get(part, {}).get("full", {}).items():
                out[metric_name(f"{model}/{part}/{name}")] = float(value)
    for model, row in document.get("vs_best_recipe", {}).items():
        out[metric_name(f"{model}/vs_best_recipe/relative")] = float(row["relative"])
        out[metric_name(f"{model}/vs_best_recipe/p_ttest")] = float(row["p_ttest"])
    line = (document.get("pool") or {}).get("line")
    if line:
        out["pool/barrier"] = float(line["barrier"])
    for pair, value in ((document.get("pool") or {}).get("error_inconsistency") or {}).items():
        out[metric_name(f"pool/error_inconsistency/{pair.replace(' | ', '-')}")] = float(value)
    return out


def _quiet(method: Callable[..., None]) -> Callable[..., None]:
    """A tracking failure is logged and turns tracking off; the job goes on."""

    @functools.wraps(method)
    def wrapper(self: MlflowTracker, *args: Any, **kwargs: Any) -> None:
        if self.run_id is None:
            return
        try:
            method(self, *args, **kwargs)
        except Exception as err:
            log.warning(
                "tracking: %s failed (%s); tracking stops for this run", method.__name__, err
            )
            self.run_id = None

    return wrapper


class Tracker:
    """What the job tells a tracker; this one records nothing (tracking off)."""

    def start(self, run_id: str, config: dict[str, Any]) -> None: ...
    def stage(self, name: str, seconds: float) -> None: ...
    def metrics(self, document: dict[str, Any]) -> None: ...
    def report(self, folder: Path) -> None: ...
    def published(self, run_id: str, bundle: Path) -> None: ...
    def finish(self, outcome: str, **fields: Any) -> None: ...


class MlflowTracker(Tracker):
    """The job's runs on an MLflow tracking server (and its model registry)."""

    def __init__(self, spec: TrackingSpec) -> None:
        from mlflow.tracking import MlflowClient

        self.spec = spec
        self.client = MlflowClient(tracking_uri=spec.uri)
        self.run_id: str | None = None

    def start(self, run_id: str, config: dict[str, Any]) -> None:
        try:
            self.run_id = self._run_for(run_id)
        except Exception as err:
            log.warning(
                "tracking: cannot reach %s (%s); this run is not tracked", self.spec.uri, err
            )
            return
        self._log_config(config)

    def _run_for(self, run_id: str) -> str:
        """The MLflow run of this job run: the one a resumed run started, else a new one."""
        experiment = self.client.get_experiment_by_name(self.spec.experiment)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self.client.create_experiment(self.spec.experiment)
        )
        found = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`{RUN_ID_TAG}` = '{run_id}'", max_results=1
        )
        if found:
            self.client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
        run = self.client.create_run(experiment_id, run_name=run_id, tags={RUN_ID_TAG: run_id})
        return run.info.run_id

    @_quiet
    def _log_config(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(key, value[:6000]) for key, value in flatten(config)]
        known = self.client.get_run(self.run_id).data.params
        fresh = [p for p in params if p.key not in known]  # a resumed run has them already
        for start in range(0, len(fresh), 100):
            self.client.log_batch(self.run_id, params=fresh[start : start + 100])
        import yaml

        self.client.log_text(self.run_id, yaml.safe_dump(config, sort_keys=False), "pipeline.yaml")

    @_quiet
    def stage(self, name: str, seconds: float) -> None:
        self.client.log_metric(self.run_id, metric_name(f"stage_seconds/{name}"), seconds)

    @_quiet
    def metrics(self, document: dict[str, Any]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in model_metrics(document).items()]
        for start in range(0, len(metrics), 500):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 500])
        self.client.set_tag(self.run_id, "fishrec.best_recipe", document.get("best_recipe", ""))

    @_quiet
    def report(self, folder: Path) -> None:
        self.client.log_artifacts(self.run_id, str(folder), "report")

    @_quiet
    def published(self, run_id: str, bundle: Path) -> None:
        """The bundle as an artifact, a registry version of it, and the alias moved onto it."""
        self.client.log_artifacts(self.run_id, str(bundle), "bundle")
        name = self.spec.registered_model
        if name is None:
            return
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
        except MlflowException:
            self.client.create_registered_model(name)
        source = f"{self.client.get_run(self.run_id).info.artifact_uri}/bundle"
        version = self.client.create_model_version(
            name, source, run_id=self.run_id, tags={RUN_ID_TAG: run_id}
        )
        self.client.set_registered_model_alias(name, self.spec.alias, version.version)
        log.info("tracking: %s version %s is now %r", name, version.version, self.spec.alias)

    @_quiet
    def finish(self, outcome: str, **fields: Any) -> None:
        self.client.set_tag(self.run_id, OUTCOME_TAG, outcome)
        for key, value in fields.items():
            if value is not None:
                self.client.set_tag(self.run_id, f"fishrec.{key}", str(value)[:5000])
        status = "FAILED" if outcome == "failed" else "FINISHED"
        self.client.set_terminated(self.run_id, status=status)


def make_tracker(spec: TrackingSpec) -> Tracker:
    return MlflowTracker(spec) if spec.enabled else Tracker()


def report_folder(download: Callable[[Path], Path]) -> Path:
    """A local copy of the run's report to log (the store may be remote)."""
    return download(Path(tempfile.mkdtemp(prefix="fishrec-report-")))
