"""Shared fixtures: one small synthetic data set and one trained tiny model per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import SMALL_DATA, tiny_experiment
from training.sequence_data import SequenceData
from training.synthetic import generate


@pytest.fixture(scope="session")
def small_data() -> SequenceData:
    return generate(SMALL_DATA)


@pytest.fixture(scope="session")
def small_data_dir(tmp_path_factory: pytest.TempPathFactory, small_data: SequenceData) -> Path:
    folder = tmp_path_factory.mktemp("data") / "small"
    small_data.save(folder)
    return folder


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, small_data: SequenceData) -> Path:
    """A tiny SASRec trained for a few epochs: the checkpoint most tests start from."""
    from training.run import train

    run = tmp_path_factory.mktemp("runs") / "sasrec"
    train(tiny_experiment(train__epochs=4), small_data, run)
    return run


@pytest.fixture(scope="session")
def serving_bundle(
    tmp_path_factory: pytest.TempPathFactory, trained_run: Path, small_data: SequenceData
) -> Path:
    """The trained tiny model exported as a bundle folder (tests publish copies of it)."""
    from merging.export import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "b1"
    export_bundle(trained_run, out, small_data, parity_sequences=32)
    return out


@pytest.fixture(scope="session")
def ray_local():  # type: ignore[no-untyped-def]
    """One local Ray instance for the whole test session (stopped at the end)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def client(server):  # type: ignore[no-untyped-def]
    """An authorised HTTP client of the module's `server` fixture (a LiveServer)."""
    import httpx

    from tests.serving_support import AUTH

    with httpx.Client(base_url=server.url, headers=AUTH, timeout=10) as http:
        yield http


@pytest.fixture(scope="module")
def vocab(serving_bundle: Path) -> list[str]:
    """External ids of the serving bundle, index i = internal id i + 1."""
    import json

    return json.loads((serving_bundle / "vocab.json").read_text())["items"]


@pytest.fixture(scope="session")
def s3_endpoint():  # type: ignore[no-untyped-def]
    """A real S3 API server process (moto) for the session, found through AWS_* variables."""
    pytest.importorskip("s3fs", reason="the s3 extra (pip install -e '.[s3]') is not installed")
    from tests.s3_support import s3_environment, s3_server

    with s3_server() as endpoint, s3_environment(endpoint):
        yield endpoint


@pytest.fixture
def s3_bucket(s3_endpoint: str, request: pytest.FixtureRequest) -> str:
    """A fresh bucket per test, as an s3:// URL."""
    from tests.s3_support import forget_cached_clients, make_bucket

    forget_cached_clients()
    name = "t-" + "".join(c for c in request.node.name.lower() if c.isalnum())[:40]
    return make_bucket(name)
