"""The work of the merge job's Ray tasks, as plain functions.

Each function runs in a Ray worker (any node of the cluster): it reads its
inputs from the artifact store, works in node-local scratch, writes its outputs
back to the store and returns a small JSON-able result. They are plain
functions so that tests and a debugger can call them without Ray; the job
wraps them with `ray.remote` and the resources of the config.

Fault injection for resilience tests: when FISHREC_INJECT_FAULT names a task
label (e.g. "train/cl4srec") and the file of that label does not yet exist in
FISHREC_FAULT_DIR, the worker creates it and dies (os._exit): the first attempt
crashes, Ray's retry succeeds.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from merging.pipeline.store import ArtifactStore

log = logging.getLogger(__name__)

FAULT_LABEL = "FISHREC_INJECT_FAULT"
FAULT_DIR = "FISHREC_FAULT_DIR"


@dataclass(frozen=True)
class TaskContext:
    """Where a task finds the run: store root, work folder, and its thread budget."""

    store_root: str
    work: str
    threads: int = 1
    device: str = "cpu"

    @property
    def store(self) -> ArtifactStore:
        return ArtifactStore(self.store_root)

    def scratch(self, name: str) -> Path:
        """A node-local folder for `name` that survives a retry on the same node."""
        store = self.store
        if store.local:
            folder = store.local_path(f"{self.work}/scratch/{name}")
        else:
            folder = (
                Path(tempfile.gettempdir()) / "fishrec-scratch" / self.work.replace("/", "_") / name
            )
        folder.mkdir(parents=True, exist_ok=True)
        return folder


def start_task(context: TaskContext, label: str) -> None:
    """Common set-up of every task: threads, logging, optional injected fault."""
    import torch

    torch.set_num_threads(max(1, context.threads))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if os.environ.get(FAULT_LABEL) == label:
        flag = Path(os.environ.get(FAULT_DIR, tempfile.gettempdir())) / label.replace("/", "_")
        if not flag.exists():
            flag.parent.mkdir(parents=True, exist_ok=True)
            flag.write_text("crashed once\n")
            log.warning("injected fault: task %s exits now", label)
            os._exit(17)


@functools.cache
def run_data_folder(store_root: str, work: str) -> Path:
    """A local copy of the run's data folder (one download per worker process)."""
    context = TaskContext(store_root, work)
    return context.store.download_folder(f"{work}/data", context.scratch("data"))


@functools.lru_cache(maxsize=4)
def load_run_data(store_root: str, work: str):  # type: ignore[no-untyped-def]
    """The run's data (cached per worker process: several tasks reuse it)."""
    from training.data import SequenceData

    return SequenceData.load(run_data_folder(store_root, work))


def with_staged_features(context: TaskContext, experiment: dict[str, Any]) -> dict[str, Any]:
    """The experiment reading the item features the data stage put beside the data."""
    from training.features import FEATURES_FILE

    staged = run_data_folder(context.store_root, context.work) / FEATURES_FILE
    if not staged.exists():
        return experiment
    return {**experiment, "data": {**experiment["data"], "features": str(staged)}}


def local_checkpoint(context: TaskContext, relative: str) -> Path:
    """A local copy of a checkpoint (or run) folder that lives in the store."""
    return context.store.download_folder(
        f"{context.work}/{relative}", context.scratch(f"in/{relative}")
    )


# ---- training ------------------------------------------------------------------------


def warm_start(context: TaskContext, source_run: str, name: str, seed: int) -> dict[str, Any]:
    """The published model of runs/<source_run> carried over to this run's catalogue.

    Its bundle is verified by the service's own reader first; kept items' rows
    are matched by external id (training/warm_start.py). Writes models/<name>.
    """
    from merging.bundle import verify_bundle
    from training.warm_start import load_bundle_source, write_warm_start

    start_task(context, f"warm-start/{name}")
    bundle = context.store.download_folder(f"runs/{source_run}", context.scratch("warm/bundle"))
    verify_bundle(bundle)
    source, vocab = load_bundle_source(bundle)
    data = load_run_data(context.store_root, context.work)
    out = context.scratch("warm/out") / name
    change = write_warm_start(source, vocab, data, out, seed, {"source_run": source_run})
    context.store.upload_folder(out, f"{context.work}/models/{name}")
    return {"source_run": source_run, **change.to_json()}


def train_model(
    context: TaskContext,
    name: str,
    experiment: dict[str, Any],
    init: str | None,
    keep_last: bool = False,
) -> dict[str, Any]:
    """Train one model into `models/<name>` of the work folder (resuming a crashed attempt).

    keep_last: also publish last/ (a spawn base: members start from its last epoch).
    """
    from training.config import ExperimentConfig
    from training.run import train

    start_task(context, f"train/{name}")
    config = ExperimentConfig.model_validate(with_staged_features(context, experiment))
    data = load_run_data(context.store_root, context.work)
    scratch = context.scratch(f"train/{name}")
    init_path = local_checkpoint(context, init) if init else None
    result = train(config, data, scratch, init=init_path, resume=True)
    publish_run(context, name, scratch, keep_last)
    return {
        "name": name,
        "best_epoch": result.best_epoch,
        "best_score": result.best_score,
        "metrics": result.metrics,
    }


def publish_run(context: TaskContext, name: str, run_dir: Path, keep_last: bool = False) -> None:
    """Upload a trained run folder to `models/<name>` (best/, config, history, metrics)."""
    publishable = context.scratch(f"out/{name}")
    shutil.rmtree(publishable, ignore_errors=True)
    publishable.mkdir(parents=True)
    items = ["best", "config.yaml", "history.json", "metrics.json"] + (
        ["last"] if keep_last else []
    )
    for item in items:
        source = run_dir / item
        copy = shutil.copytree if source.is_dir() else shutil.copy2
        copy(source, publishable / item)
    context.store.upload_folder(publishable, f"{context.work}/models/{name}")


def train_population_members(
    context: TaskContext,
    experiments: dict[str, dict[str, Any]],
    pull: float,
    exchange_every: int,
    num_gpus: float = 0.0,
) -> dict[str, dict[str, Any]]:
    """The pool as a population (training/population.py): one actor per member.

    This task only drives: each actor loads the run's data, trains, and uploads
    its own run to `models/<name>` (actors may sit on any node). A retried task
    resumes every member from its last epoch.
    """
    from training.population import MemberSpec, train_population

    start_task(context, "train/population")
    members = [
        MemberSpec(
            name,
            with_staged_features(context, experiment),
            str(context.scratch(f"train/{name}")),
        )
        for name, experiment in experiments.items()
    ]
    results = train_population(
        members,
        functools.partial(load_run_data, context.store_root, context.work),
        pull,
        exchange_every,
        threads=context.threads,
        num_gpus=num_gpus,
        resume=True,
        on_finish=functools.partial(publish_run, context),
    )
    return {
        name: {
            "name": name,
            "best_epoch": result["best_epoch"],
            "best_score": result["best_score"],
            "metrics": result["metrics"],
        }
        for name, result in results.items()
    }


# ---- evaluation ----------------------------------------------------------------------


def evaluate_model(
    context: TaskContext, name: str, relative: str, eval_seed: int
) -> dict[str, Any]:
    """The metrics document of a checkpoint in the store."""
    from training.evaluate import Evaluator
    from training.trainer import load_run_checkpoint

    start_task(context, f"evaluate/{name}")
    data = load_run_data(context.store_root, context.work)
    checkpoint = load_run_checkpoint(local_checkpoint(context, relative))
    return Evaluator(data.split(), seed=eval_seed).metrics_document(checkpoint.model)


ENSEMBLE = "ensemble"


def evaluate_baselines(
    context: TaskContext, pool: dict[str, str], others: dict[str, str], line_users: int = 500
) -> dict[str, Any]:
    """What a merge must beat, on the run's test users (docs/pipeline.md).

    The output ensemble of the pool (mean log-probability, M times the serving
    cost) is evaluated; every other model and the ensemble are compared with the
    best pool member on validation by a paired test on per-user test NDCG@10,
    with the share of the ensemble's gain each reaches. Also how the members
    differ: error inconsistency of every pair, and (line_users > 0) validation
    NDCG@10 on the line between the first two members and its barrier.
    """
    from merging.ensemble import ensemble_max_len, ensemble_scorer
    from merging.significance import paired_comparison
    from training.diagnostics import error_inconsistency
    from training.evaluate import Evaluator
    from training.trainer import load_run_checkpoint

    start_task(context, "baselines")
    data = load_run_data(context.store_root, context.work)
    evaluator = Evaluator(data.split())
    models = {
        name: load_run_checkpoint(local_checkpoint(context, relative)).model
        for name, relative in {**pool, **others}.items()
    }
    results = {
        name: {p: evaluator.evaluate_model(m, p) for p in ("valid", "test")}
        for name, m in models.items()
    }
    members = [models[name] for name in pool]
    scorer, length = ensemble_scorer(members), ensemble_max_len(members)
    results[ENSEMBLE] = {p: evaluator.evaluate(scorer, p, length) for p in ("valid", "test")}

    def ndcg(name: str, part: str) -> float:
        return float(results[name][part].metrics["full"]["ndcg@10"])

    best = max(pool, key=lambda name: ndcg(name, "valid"))
    users = {name: parts["test"].per_user["full"]["ndcg@10"] for name, parts in results.items()}
    gain = ndcg(ENSEMBLE, "test") - ndcg(best, "test")
    names = list(pool)
    return {
        "members": {
            "error_inconsistency": {
                f"{a} | {b}": error_inconsistency(users[a], users[b])
                for i, a in enumerate(names)
                for b in names[i + 1 :]
            },
            "line": member_line(models[names[0]], models[names[1]], data, line_users)
            if len(names) > 1 and line_users > 0
            else None,
        },
        "best_recipe": best,
        "ensemble": {p: results[ENSEMBLE][p].metrics for p in ("valid", "test")},
        "ensemble_members": len(pool),
        "vs_best_recipe": {
            name: {
                **paired_comparison(users[name], users[best]).to_dict(),
                "ensemble_gain_share": (ndcg(name, "test") - ndcg(best, "test")) / gain
                if gain > 0
                else None,
            }
            for name in results
            if name != best
        },
    }


def member_line(first: Any, second: Any, data: Any, users: int) -> dict[str, Any]:
    """Validation NDCG@10 on the line between two members, and the dip below their ends."""
    from merging.landscape import line_profile, validation_probe

    probe = validation_probe(data.split(), users=users, seed=0)
    line = line_profile(first.state_dict(), second.state_dict(), first, probe, points=9, extend=0.0)
    values = line["ndcg@10"]
    return {**line, "barrier": (values[0] + values[-1]) / 2 - min(values[1:-1])}


def shard(rows: list[int], shards: int) -> list[list[int]]:
    """Contiguous slices of `rows` (users), as even as possible; never an empty one."""
    parts = np.array_split(np.asarray(rows, dtype=np.int64), max(1, min(shards, len(rows))))
    return [part.tolist() for part in parts if len(part)]


# ---- Fisher --------------------------------------------------------------------------


def fisher_shard(
    context: TaskContext, name: str, model: str, ids: list[int], fisher: dict[str, Any]
) -> dict[str, Any]:
    """Fisher sums of one model over one shard of training sequences (global ids)."""
    from merging.fisher import FisherConfig, compute_fisher
    from training.trainer import load_run_checkpoint

    start_task(context, f"fisher/{name}")
    data = load_run_data(context.store_root, context.work)
    train = data.split().train
    checkpoint = load_run_checkpoint(local_checkpoint(context, model), context.device)
    result = compute_fisher(
        checkpoint.model, [train[i] for i in ids], FisherConfig(**fisher), ids=ids
    )
    # numpy arrays travel through Ray's object store without copies.
    return {
        "sums": {k: v.cpu().numpy() for k, v in result.sums.items()},
        "count": result.count,
        "estimator": result.estimator,
        "batch_shortcut": result.batch_shortcut,
        "dropped_mass": result.dropped_mass,
        "grams": {k: v.cpu().numpy() for k, v in result.grams.items()},
        "gram_rows": result.gram_rows,
    }


def combine_fisher_shards(
    context: TaskContext, name: str, shards: list[dict[str, Any]], provenance: dict[str, Any]
) -> dict[str, Any]:
    """Sum shard results, average, and save `fisher/<name>.safetensors` in the store."""
    import torch

    from merging.fisher import FisherResult, fisher_metadata, save_fisher

    total = sum(
        FisherResult(
            {k: torch.tensor(v) for k, v in s["sums"].items()},
            s["count"],
            s["estimator"],
            s["batch_shortcut"],
            s["dropped_mass"],
            grams={k: torch.tensor(v) for k, v in s["grams"].items()},
            gram_rows=s["gram_rows"],
        )
        for s in shards
    )
    local = context.scratch("fisher") / f"{name}.safetensors"
    save_fisher(
        local,
        total.file_tensors(),
        fisher_metadata(total, model=name, shards=len(shards), **provenance),
    )
    context.store.upload_file(local, f"{context.work}/fisher/{name}.safetensors")
    return {"sequences": total.count, "dropped_eigenvalue_mass": total.mean_dropped_mass}


# ---- merge, export, report -------------------------------------------------------------


def merge_models(
    context: TaskContext,
    method: str,
    models: list[str],
    fishers: list[str] | None,
    merge: dict[str, Any],
    base: str | None = None,
) -> dict[str, Any]:
    """Merge checkpoints of the store into `merged/<method>` (evaluated on valid and test)."""
    from merging.merge import MergeConfig, merge_checkpoints

    start_task(context, f"merge/{method}")
    data = load_run_data(context.store_root, context.work)
    inputs = [local_checkpoint(context, m) for m in models]
    fisher_paths = [local_file(context, f) for f in fishers] if fishers else None
    out = context.scratch(f"merged/{method}")
    shutil.rmtree(out, ignore_errors=True)
    result = merge_checkpoints(
        inputs,
        out,
        MergeConfig(method=method, **merge),
        fisher_paths,
        data,
        base=local_checkpoint(context, base) if base else None,
    )
    context.store.upload_folder(out, f"{context.work}/merged/{method}")
    return {
        "method": method,
        "coefficients": result.info["merge"]["coefficients"],
        "metrics": result.metrics,
    }


def local_file(context: TaskContext, relative: str) -> Path:
    """A local copy of one file of the store."""
    store = context.store
    if store.local:
        return store.local_path(f"{context.work}/{relative}")
    local = context.scratch("in") / relative
    local.parent.mkdir(parents=True, exist_ok=True)
    store.fs.get_file(store.path(f"{context.work}/{relative}"), str(local))
    return local


def export_model(
    context: TaskContext, model: str, export: dict[str, Any], fields: dict[str, Any]
) -> dict[str, Any]:
    """Export a checkpoint of the store as the run's bundle into `bundle/` (parity-checked)."""
    from merging.export import export_bundle

    start_task(context, "export")
    data = load_run_data(context.store_root, context.work)
    out = context.scratch("bundle") / fields["run_id"]
    manifest = export_bundle(
        local_checkpoint(context, model), out, data, manifest_fields=fields, **export
    )
    context.store.upload_folder(out, f"{context.work}/bundle")
    return {"onnx": manifest["onnx"], "quantized": manifest.get("quantized")}


def check_gate(
    context: TaskContext,
    champion_run: str | None,
    metric: str,
    tolerance: float,
    force: bool,
) -> dict[str, Any]:
    """The quality gate of merging/pipeline/gate.py: this run's bundle against runs/<champion>."""
    from merging.pipeline.gate import decide

    start_task(context, "gate")
    data = load_run_data(context.store_root, context.work)
    challenger = context.store.download_folder(
        f"{context.work}/bundle", context.scratch("gate/new")
    )
    champion = (
        context.store.download_folder(f"runs/{champion_run}", context.scratch("gate/champion"))
        if champion_run
        else None
    )
    decision = decide(challenger, champion, champion_run, data, metric, tolerance, force)
    return decision.to_dict()


def write_run_report(context: TaskContext, info: dict[str, Any]) -> dict[str, Any]:
    """report.md and plots/ of the run into `report/`."""
    from merging.fisher import load_fisher
    from merging.landscape import validation_probe
    from merging.pipeline.report import write_report
    from training.batching import pad_left
    from training.trainer import load_run_checkpoint

    start_task(context, "report")
    data = load_run_data(context.store_root, context.work)

    def weights(relative: str) -> dict[str, Any]:
        return load_run_checkpoint(local_checkpoint(context, relative)).model.state_dict()

    histories = {}
    for name, relative in info["trained"].items():
        folder = local_checkpoint(context, relative)
        histories[name] = json.loads((folder / "history.json").read_text())
    published = load_run_checkpoint(local_checkpoint(context, info["published_model"])).model
    test = data.split().test
    rows = np.linspace(0, len(test) - 1, num=min(5, len(test))).astype(int)
    out = context.scratch("report-out")
    shutil.rmtree(out, ignore_errors=True)
    spec = info["report"]
    users = spec["landscape_users"]
    write_report(
        out,
        title=f"fishrec run {info['run_id']}",
        summary=info["summary"],
        metrics=info["metrics"],
        histories=histories,
        epoch_offsets=info["epoch_offsets"],
        fishers={
            n: load_fisher(local_file(context, f)).tensors for n, f in info["fishers"].items()
        },
        recipe_weights={n: weights(f"models/{n}") for n in info["recipes"]},
        merged_weights={n: weights(r) for n, r in info["merged"].items()},
        published=published,
        sample_histories=pad_left([test.histories[i] for i in rows], published.config.max_len),
        stage_seconds=info["stage_seconds"],
        comparisons=(info["best_recipe"], info["vs_best_recipe"]),
        probe=validation_probe(data.split(), users) if users else None,
        grid_points=spec["grid_points"],
        line_points=spec["line_points"],
        protocol=data.split().protocol,
    )
    context.store.upload_folder(out, f"{context.work}/report")
    return {"report": "report/report.md"}
