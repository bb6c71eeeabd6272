"""`fishrec demo`: the merge job on the embedded synthetic data, then the service.

What a new user runs first: a complete run of the merge job (docs/pipeline.md) on a laptop (local Ray,
a few minutes on 2 cores), a look at the results, and a live HTTP endpoint on
the published bundle with a request to try.
"""

from __future__ import annotations

import json
import logging
import shlex
from importlib import resources
from pathlib import Path

from merging.pipeline.config import PipelineConfig
from merging.pipeline.job import PipelineResult
from merging.pipeline.store import ArtifactStore

log = logging.getLogger(__name__)

# Package data (pyproject.toml), so that a non-editable install has it too;
# configs/pipeline-demo.yaml in a checkout is a link to this file.
DEMO_CONFIG = "demo.yaml"


def default_demo_config() -> Path:
    """The demo's pipeline YAML, shipped inside the package; an error when it is missing.

    A silent fallback to the library defaults once made the demo train for twice
    as long with settings docs/recipes.md warns against: never again.
    """
    path = Path(str(resources.files("merging.pipeline").joinpath(DEMO_CONFIG)))
    if not path.is_file():
        raise FileNotFoundError(
            f"the demo configuration {path} is missing from the installed package: "
            "reinstall fishrec, or pass --config"
        )
    return path


def example_history(store: ArtifactStore, result: PipelineResult, length: int = 5) -> list[str]:
    """The newest items of one test user, as external ids: a realistic request body."""
    from training.sequence_data import SequenceData

    data = SequenceData.load(store.local_path(f"work/{result.run_id}/data"))
    history = data.split().test.histories[0][-length:]
    return [data.vocab.external(int(item)) for item in history]


def example_curl(host: str, port: int, items: list[str], api_key: bool) -> str:
    body = json.dumps({"items": items, "k": 5, "exclude_seen": True})
    key = ' -H "X-API-Key: $FISHREC_API_KEY"' if api_key else ""
    return (
        f"curl -s -X POST http://{host}:{port}/v1/recommendations "
        f"-H 'Content-Type: application/json'{key} -d {shlex.quote(body)}"
    )


def summary_table(result: PipelineResult) -> str:
    from training.evaluate import format_table

    rows = {name: doc["test"] for name, doc in result.metrics["models"].items()}
    return format_table(rows)


def run_demo(
    config: PipelineConfig,
    artifacts: str,
    run_id: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    serve: bool = True,
) -> PipelineResult:
    from merging.pipeline.job import run_pipeline

    # The demo shows what it just trained: it publishes even when the quality gate
    # refuses (e.g. a second demo a hair below the first); the decision is recorded.
    result = run_pipeline(config, artifacts, run_id=run_id, force_publish=True)
    store = ArtifactStore(artifacts)
    bundle = store.path(result.bundle)
    print(f"\nPublished run {result.run_id}: {bundle}")
    print(f"Report: {bundle}/report.md (plots in {bundle}/plots/)\n")
    print("Test metrics (history items excluded in `full`):")
    print(summary_table(result))
    if not store.local:
        print("\nThe artifact root is not a local folder: serve it from a machine that mounts it.")
        return result
    from serving.settings import Settings

    settings = Settings(artifacts=Path(store.base), host=host, port=port)
    items = example_history(store, result)
    starts = (
        "the service starts now; Ctrl-C stops it"
        if serve
        else f"after: fishrec serve --artifacts {store.base}"
    )
    print(f"\nTry it ({starts}):\n")
    print("  " + example_curl(host, port, items, settings.api_key is not None) + "\n")
    if serve:
        from serving.server import run

        run(settings)
    return result
