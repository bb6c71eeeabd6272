"""The merge job on a real local Ray: publication, retries, resume, --address."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from merging.bundle import verify_bundle
from merging.pipeline.job import Pipeline, run_pipeline
from merging.pipeline.publish import publish_bundle
from merging.pipeline.stages import StageError
from merging.pipeline.store import ArtifactStore
from merging.pipeline.task_context import FAULT_DIR, FAULT_LABEL
from merging.pipeline.warm_start_stage import stage_warm_start
from serving.bundle import LATEST
from tests.support import tiny_pipeline

# Real Ray runs of the job: minutes, so outside the inner loop (pytest -m "not slow").
pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.slow]


def reference_config():  # type: ignore[no-untyped-def]
    """The tiny job of `finished_run`, with merges that need the Grams and the base too."""
    return tiny_pipeline(
        merge__methods=["uniform", "greedy", "fisher", "regmean", "ties"], control=True
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One uninterrupted tiny pipeline: the reference of the tests below."""
    root = tmp_path_factory.mktemp("artifacts")
    result = run_pipeline(reference_config(), str(root), run_id="reference")
    return root, result


def test_pipeline_publishes_a_verified_bundle_and_a_report(finished_run) -> None:
    root, result = finished_run
    assert (root / LATEST).read_text().strip() == "reference"
    bundle = root / "runs" / "reference"
    manifest = verify_bundle(bundle)
    assert {"model.onnx", "vocab.json", "popular.json", "report.md", "metrics.json"} <= set(
        manifest["files"]
    )
    assert manifest["merge"]["published"] == "merged-fisher"
    assert [r["name"] for r in manifest["recipes"]] == ["plain", "cl4srec", "duorec"]
    report = (bundle / "report.md").read_text()
    plots = (
        "validation_curves",
        "fisher_per_layer",
        "weight_plane",
        "line_profile",
        "sorted_probabilities",
    )
    for plot in plots:
        assert (bundle / "plots" / f"{plot}.png").stat().st_size > 1000
        assert f"plots/{plot}.png" in report
    models = result.metrics["models"]
    assert set(models) == {
        "base",
        "plain",
        "cl4srec",
        "duorec",
        "merged-uniform",
        "merged-greedy",
        "merged-fisher",
        "merged-regmean",
        "merged-ties",
        "control",
        "ensemble",
        "mostpop",
    }
    # Every model against the best recipe, in metrics.json and in the report.
    best = result.metrics["best_recipe"]
    assert best in ("plain", "cl4srec", "duorec")
    tests = result.metrics["vs_best_recipe"]
    assert set(tests) == set(models) - {best, "base", "mostpop"}
    assert all(
        0 <= row["p_ttest"] <= 1 or row["p_ttest"] != row["p_ttest"] for row in tests.values()
    )
    assert "## Against the best recipe" in report and "| ensemble |" in report
    # The control spends every pool epoch (3 recipes x 1) on the plain objective.
    control = yaml.safe_load(
        (root / "work" / "reference" / "models" / "control" / "config.yaml").read_text()
    )
    assert control["train"]["epochs"] == 3 and control["recipe"]["name"] == "sasrec"
    for name in ("plain", "cl4srec", "duorec"):
        fisher = load_file(str(root / "work" / "reference" / "fisher" / f"{name}.safetensors"))
        grams = {k for k in fisher if k.startswith("gram:")}
        assert grams  # summed over the Fisher shards, for RegMean
        assert all(bool((t >= 0).all()) for k, t in fisher.items() if k not in grams)
    # The merge (before its fine-tune) records the base its task vectors start from.
    ties = root / "work" / "reference" / "merged" / "ties" / "merged" / "checkpoint.json"
    assert "/models/base" in json.loads(ties.read_text())["info"]["merge"]["base"]["path"]


def test_a_rerun_skips_every_verified_stage(finished_run) -> None:
    root, _ = finished_run
    markers = sorted((root / "work" / "reference" / "stages").rglob("*.json"))
    before = {m: m.stat().st_mtime_ns for m in markers}
    result = run_pipeline(reference_config(), str(root), run_id="reference")
    assert result.stage_seconds == {}  # nothing ran again
    assert {m: m.stat().st_mtime_ns for m in markers} == before


def test_a_crashed_worker_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULT_LABEL, "train/cl4srec")
    monkeypatch.setenv(FAULT_DIR, str(tmp_path / "faults"))
    config = tiny_pipeline(
        recipes=[{"name": "plain"}, {"name": "cl4srec"}],
        merge__methods=["uniform"],
        merge__publish="uniform",
        max_retries=2,
    )
    result = run_pipeline(config, str(tmp_path / "artifacts"), run_id="retried")
    assert (tmp_path / "faults" / "train_cl4srec").is_file()  # the first attempt did die
    verify_bundle(tmp_path / "artifacts" / result.bundle)


def test_a_stage_that_keeps_failing_stops_the_job_with_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAULT_LABEL, "train/base")
    monkeypatch.setenv(FAULT_DIR, str(tmp_path / "faults"))
    config = tiny_pipeline(max_retries=0)
    with pytest.raises(StageError, match="train/base") as failure:
        run_pipeline(config, str(tmp_path / "artifacts"), run_id="failing")
    assert "died" in str(failure.value)
    assert not (tmp_path / "artifacts" / LATEST).exists()


def test_a_killed_job_resumes_and_matches_an_uninterrupted_run(
    finished_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference_root, _ = finished_run
    root = tmp_path / "artifacts"
    monkeypatch.setenv(FAULT_LABEL, "merge/fisher")
    monkeypatch.setenv(FAULT_DIR, str(tmp_path / "faults"))
    config = tiny_pipeline(max_retries=0)
    with pytest.raises(StageError, match="merge/fisher"):
        run_pipeline(config, str(root), run_id="resumed")
    stages = root / "work" / "resumed" / "stages"
    finished = {m: m.stat().st_mtime_ns for m in stages.rglob("*.json")}
    assert (
        stages / "train" / "cl4srec.json" in finished
        and not (stages / "merge" / "fisher.json").exists()
    )

    result = run_pipeline(config, str(root), run_id="resumed")  # the fault fired once already
    assert {m: m.stat().st_mtime_ns for m in finished} == finished  # finished stages not recomputed
    assert "merge/fisher" in result.stage_seconds and "train/base" not in result.stage_seconds
    ours = json.loads((root / "runs" / "resumed" / "manifest.json").read_text())
    reference = json.loads((reference_root / "runs" / "reference" / "manifest.json").read_text())
    for name in ("model.onnx", "vocab.json", "popular.json"):
        assert ours["files"][name] == reference["files"][name], name
    assert ours["metrics"] == reference["metrics"]


def test_latest_moves_only_after_the_bundle_verifies(
    finished_run, tmp_path: Path, monkeypatch
) -> None:
    reference_root, _ = finished_run
    store = ArtifactStore(str(tmp_path / "store"))
    store.write_text(LATEST, "older\n")
    work = tmp_path / "store" / "work" / "new"
    work.mkdir(parents=True)
    shutil.copytree(reference_root / "work" / "reference" / "bundle", work / "bundle")
    shutil.copytree(reference_root / "work" / "reference" / "report", work / "report")
    shutil.copy(reference_root / "work" / "reference" / "metrics.json", work / "metrics.json")

    def corrupt_upload(local: Path, relative: str, original=store.upload_folder) -> None:
        original(local, relative)
        (tmp_path / "store" / relative / "model.onnx").write_bytes(b"truncated")

    monkeypatch.setattr(store, "upload_folder", corrupt_upload)
    with pytest.raises(ValueError, match="sha256"):
        publish_bundle(store, "work/new", "new", tmp_path / "scratch")
    assert store.read_text(LATEST) == "older\n"

    monkeypatch.undo()
    readers_saw: set[str] = set()
    stop = threading.Event()

    def read_latest() -> None:
        while not stop.is_set():
            readers_saw.add(store.read_text(LATEST))

    reader = threading.Thread(target=read_latest)
    reader.start()
    for _ in range(5):
        publish_bundle(store, "work/new", "new", tmp_path / "scratch")
    stop.set()
    reader.join()
    assert readers_saw <= {"older\n", "new\n"}  # never empty, never half-written
    assert store.read_text(LATEST) == "new\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {seconds} s")


def test_a_run_id_is_bound_to_its_config(finished_run) -> None:
    root, _ = finished_run
    with pytest.raises(StageError, match="another configuration"):
        Pipeline(
            tiny_pipeline(recipe_epochs=3), ArtifactStore(str(root)), "reference"
        ).save_config()


def test_demo_prints_a_request_that_the_service_answers(finished_run, tmp_path: Path) -> None:
    """`fishrec demo` end to end on an already finished run: every stage is skipped, then it serves."""
    import httpx

    root, _ = finished_run
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(reference_config().model_dump(mode="json")))
    port = free_port()
    fishrec = str(Path(sys.executable).parent / "fishrec")
    demo = subprocess.Popen(
        [
            fishrec,
            "demo",
            "--config",
            str(config),
            "--artifacts",
            str(root),
            "--run-id",
            "reference",
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(demo.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    try:
        wait_for_port(port, 120)
        deadline = time.monotonic() + 30
        while httpx.get(f"http://127.0.0.1:{port}/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the demo's service never became ready"
            time.sleep(0.2)
        curl = next(line for line in lines if line.strip().startswith("curl"))
        body = json.loads(shlex.split(curl)[-1])
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/recommendations", json=body)
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["items"]) == 5
        os.killpg(demo.pid, signal.SIGINT)
        demo.wait(timeout=60)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
    reader.join(timeout=10)
    output = "".join(lines)
    assert "already done and verified: skipped" in output
    assert "merged-fisher" in output  # the metric table


def test_item_features_travel_with_the_run_data(tmp_path: Path) -> None:
    """KDSR's features reach workers through the store, not the submitter's disk."""
    from merging.pipeline.data_stage import stage_data
    from merging.pipeline.pool_stage import experiment_for, train_model
    from tests.modality_support import FEATURE_DIM, write_features
    from training.item_features import FEATURES_FILE
    from training.sources import load_source

    recipes = [{"name": "plain"}, {"name": "kdsr"}]
    data = load_source(tiny_pipeline().experiment.data)
    features = write_features(data, tmp_path / "submitter" / "features.safetensors")
    config = tiny_pipeline(recipes=recipes, experiment__data__features=str(features))
    pipeline = Pipeline(config, ArtifactStore(str(tmp_path / "artifacts")), "features")
    info = stage_data(pipeline.stage_context)
    assert info["features"]["dim"] == FEATURE_DIM
    work = tmp_path / "artifacts" / "work" / "features"
    assert (work / "data" / FEATURES_FILE).read_bytes() == features.read_bytes()
    shutil.rmtree(tmp_path / "submitter")  # a worker on another node has none of it
    experiment = experiment_for(config, "kdsr", {}, 1, 0)
    result = train_model(pipeline.stage_context.tasks, "kdsr", experiment, None)
    assert result["name"] == "kdsr" and result["best_epoch"] >= 1
    assert (work / "models" / "kdsr" / "best" / "model.safetensors").exists()


def test_recipe_fine_tunes_use_their_own_learning_rate() -> None:
    config = tiny_pipeline(recipes=[{"name": "plain"}, {"name": "cl4srec", "lr": 1e-4}])
    plain, cl4srec = config.recipes
    assert config.experiment.train.lr == 3e-3  # the base's rate
    assert config.recipe_lr_of(plain) == 3e-4  # the default fine-tune rate
    assert config.recipe_lr_of(cl4srec) == 1e-4  # the entry's own
    assert tiny_pipeline(recipe_lr=None).recipe_lr_of(plain) == 3e-3
    # From scratch there is no base to stay near: the experiment's rate.
    assert tiny_pipeline(setting="scratch").recipe_lr_of(cl4srec) == 3e-3


def test_the_gate_refuses_a_worse_model_until_forced(finished_run, tmp_path: Path) -> None:
    """Champion/challenger: an untrained challenger is refused, LATEST stays; --force-publish wins."""
    source, _ = finished_run
    root = tmp_path / "artifacts"
    shutil.copytree(source, root)  # the reference run is published and LATEST
    worse = tiny_pipeline(
        experiment__train__epochs=0,  # an untrained base and pool: clearly worse
        recipe_epochs=0,
        recipes=[{"name": "plain"}, {"name": "duorec"}],
        merge__methods=["uniform"],
        merge__publish="uniform",
        merge__finetune_epochs=0,
        fisher__num_sequences=16,  # the gate is under test here, not the Fisher or the plots
        report__landscape_users=0,
    )
    config = tmp_path / "worse.yaml"
    config.write_text(yaml.safe_dump(worse.model_dump(mode="json")))
    fishrec = str(Path(sys.executable).parent / "fishrec")
    cli = [
        fishrec,
        "pipeline",
        "--config",
        str(config),
        "--artifacts",
        str(root),
        "--run-id",
        "worse",
    ]
    # The CLI says so and exits non-zero (the scheduler marks the job failed).
    done = subprocess.run(cli, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "gate refused" in done.stderr
    assert "LATEST is unchanged" in done.stderr
    assert (root / LATEST).read_text().strip() == "reference"
    assert not (root / "runs" / "worse").exists()
    outcome = json.loads((root / "work" / "worse" / "outcome.json").read_text())
    assert outcome["outcome"] == "refused" and not outcome["gate"]["passed"]
    gate = outcome["gate"]
    assert gate["champion_run"] == "reference" and gate["challenger"] < gate["champion"]
    assert gate["users"] > 0 and gate["metric"] == "ndcg@10"
    forced = subprocess.run([*cli, "--force-publish"], capture_output=True, text=True, timeout=600)
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert (root / LATEST).read_text().strip() == "worse"
    manifest = verify_bundle(root / "runs" / "worse")
    assert manifest["gate"]["forced"] and not manifest["gate"]["passed"]
    assert "## Quality gate" in (root / "runs" / "worse" / "report.md").read_text()
    published = json.loads((root / "work" / "worse" / "outcome.json").read_text())
    assert published["outcome"] == "published" and published["bundle"] == "runs/worse"


def test_a_nightly_run_warm_starts_from_the_published_model(finished_run, tmp_path: Path) -> None:
    """base.init_from latest: rows carried over by external id; the catalogue grew."""
    from tests.support import SMALL_DATA
    from training.checkpoint import load_checkpoint
    from training.vocabulary import Vocabulary
    from training.warm_start import load_bundle_source

    source, _ = finished_run
    root = tmp_path / "artifacts"
    shutil.copytree(source, root)
    more_items = SMALL_DATA.model_dump(exclude={"seed"}) | {"num_items": SMALL_DATA.num_items + 20}
    nightly = tiny_pipeline(
        experiment__data__synthetic__overrides=more_items,
        base__init_from="latest",
        base__warm_epochs=1,
        gate__enabled=False,
    )
    run_pipeline(nightly, str(root), run_id="nightly")
    stage = json.loads((root / "work" / "nightly" / "stages" / "warm-start.json").read_text())
    warm = stage["result"]
    assert warm["source_run"] == "reference" and warm["kept"] > 0 and warm["new"] > 0
    published, old_vocab = load_bundle_source(root / "runs" / "reference")
    new_vocab = Vocabulary.load(root / "runs" / "nightly" / "vocab.json")
    assert len(set(new_vocab.items) - set(old_vocab.items)) == warm["new"]
    assert len(set(old_vocab.items) - set(new_vocab.items)) == warm["dropped"]
    start = load_checkpoint(root / "work" / "nightly" / "models" / "warm-start")
    kept = next(item for item in new_vocab.items if item in old_vocab)
    assert torch_equal(
        start.model.item_embedding.weight[new_vocab.index(kept)],
        published.model.item_embedding.weight[old_vocab.index(kept)],
    )
    history = json.loads(
        (root / "work" / "nightly" / "models" / "base" / "history.json").read_text()
    )
    assert [entry["epoch"] for entry in history] == [1]  # base.warm_epochs
    report = (root / "runs" / "nightly" / "report.md").read_text()
    assert f"warm-started from run reference: {warm['kept']} items kept" in report
    # The next night starts from this run's bundle: it carries its checkpoint too.
    assert (root / "runs" / "nightly" / "checkpoint" / "model.safetensors").is_file()


def test_warm_start_before_anything_is_published_trains_from_scratch(tmp_path: Path) -> None:
    config = tiny_pipeline(base__init_from="latest")
    pipeline = Pipeline(config, ArtifactStore(str(tmp_path)), "first")
    assert stage_warm_start(pipeline.stage_context) is None
    marker = json.loads((tmp_path / "work" / "first" / "stages" / "warm-start.json").read_text())
    assert marker["result"] == {"source_run": None}
    missing = Pipeline(tiny_pipeline(base__init_from="nope"), ArtifactStore(str(tmp_path)), "x")
    with pytest.raises(StageError, match="runs/nope is not a published run"):
        stage_warm_start(missing.stage_context)


def torch_equal(a, b) -> bool:  # type: ignore[no-untyped-def]
    import torch

    return bool(torch.equal(a, b))


def test_every_stage_takes_the_shared_loss_and_workers() -> None:
    from merging.pipeline.pool_stage import experiment_for

    config = tiny_pipeline(
        experiment__recipe__params={"negatives": 64, "sampler": "popularity"},
        experiment__train__workers=2,
        recipes=[{"name": "plain"}, {"name": "cl4srec", "params": {"negatives": 32}}],
    )
    plain = experiment_for(config, "sasrec", {}, epochs=1, seed=0)
    cl4srec = experiment_for(config, "cl4srec", {"negatives": 32}, epochs=1, seed=0)
    assert plain["recipe"]["params"] == {"negatives": 64, "sampler": "popularity"}
    assert cl4srec["recipe"]["params"] == {"negatives": 32, "sampler": "popularity"}
    # Data-parallel stages: each worker gets the task's CPUs as threads.
    assert plain["train"]["workers"] == 2 and plain["train"]["num_threads"] == 1


def test_demo_without_config_runs_the_packaged_demo_config(tmp_path: Path) -> None:
    """`fishrec demo` with no --config runs the demo YAML shipped in the package.

    Overrides shrink the run; every value not overridden must come from the demo file,
    not from the library defaults (a silent fallback once doubled the demo's time).
    """
    from merging.pipeline.config import PipelineConfig
    from merging.pipeline.demo import default_demo_config
    from training.config import read_yaml

    packaged = read_yaml(default_demo_config())
    small = json.dumps(
        {"num_users": 300, "num_items": 120, "num_topics": 6, "mean_length": 12, "max_length": 30}
    )
    shrink = [
        f"experiment.data.synthetic.overrides={small}",
        "experiment.model.hidden_size=16",
        "experiment.model.num_layers=1",
        "experiment.train.epochs=1",
        "recipe_epochs=1",
        "fisher.num_sequences=40",
        "export.parity_sequences=16",
        "report.landscape_users=0",
    ]
    fishrec = str(Path(sys.executable).parent / "fishrec")
    command = [fishrec, "demo", "--no-serve", "--artifacts", str(tmp_path), "--run-id", "demo"]
    for text in shrink:
        command += ["--set", text]
    done = subprocess.run(command, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    used = yaml.safe_load((tmp_path / "work" / "demo" / "pipeline.yaml").read_text())
    defaults = PipelineConfig().model_dump(mode="json")
    # Values where the demo file differs from the library defaults.
    assert used["experiment"]["train"]["patience"] == packaged["experiment"]["train"]["patience"]
    assert (
        packaged["experiment"]["train"]["patience"] != defaults["experiment"]["train"]["patience"]
    )
    assert [r.get("params", {}) for r in used["recipes"]] == [
        r.get("params", {}) for r in packaged["recipes"]
    ]
    assert used["recipes"] != defaults["recipes"]
    assert used["merge"]["methods"] == packaged["merge"]["methods"]
    assert (tmp_path / LATEST).read_text().strip() == "demo"
    assert "Published run demo" in done.stdout


def test_demo_config_is_package_data_and_a_missing_one_is_an_error(monkeypatch) -> None:
    from merging.pipeline import demo

    path = demo.default_demo_config()
    assert path.parent == Path(demo.__file__).parent
    assert (Path(__file__).parents[2] / "configs" / "pipeline-demo.yaml").resolve() == path
    monkeypatch.setattr(demo, "DEMO_CONFIG", "no-such-demo.yaml")
    with pytest.raises(FileNotFoundError, match="missing from the installed package"):
        demo.default_demo_config()
