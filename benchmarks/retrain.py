"""Nightly retraining: warm-started increments against full retrains, on a log by time.

    python benchmarks/retrain.py \
        --log ../shared/data/ml-1m/partial_ratings/ratings_users_0001-2999.dat.gz \
        --config configs/pipeline-retrain.yaml --out benchmarks/results/retrain-ml-1m.json

The log's interactions are cut at the quantiles --start, --start + --step, ...
of their timestamps (by count: ML-1M's timeline is dense in 2000 and sparse
after). Each "day" k holds the interactions before cut k + 1 and is judged by
the temporal split at cut k (train and validate before it, test on each user's
first interaction after it: docs/evaluation.md), so every step is scored on
the interactions it has not seen, as a production model is judged.

- day 0: a full run (cold start), published;
- day k = 1..--increments: the merge job warm-started from the model published
  the day before (`base.init_from: latest`, `base.warm_epochs`), and, on the
  same data and split, a full retrain from scratch in its own artifact root.

Printed per day: wall time of the increment and of the full retrain (and the
ratio), test NDCG@10 (temporal, full ranking) of both and the relative
difference, the catalogue change the warm start carried over, and the gate's
decision (every increment is published so that the next one can build on it:
forced when the gate refused, which is recorded). Results go to --out as each
run finishes; a rerun skips finished runs (and resumes a broken one from its
stages).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from merging.pipeline.config import PipelineConfig
from merging.pipeline.job import load_pipeline_config, run_pipeline
from training.interactions import Interactions
from training.prepare import build_sequences
from training.readers import read_log
from training.splits import format_time

log = logging.getLogger("benchmarks.retrain")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log", required=True, help="a timed interaction log (file/folder/glob)")
    parser.add_argument("--config", required=True, help="pipeline YAML (configs/)")
    parser.add_argument("--start", type=float, default=0.8, help="first cut: share of the log")
    parser.add_argument("--step", type=float, default=0.05, help="share of the log per day")
    parser.add_argument("--increments", type=int, default=3)
    parser.add_argument("--k-core", type=int, default=5, help="k-core of every day's data")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    parser.add_argument("--work", default=None, help="artifact roots (default: beside --out)")
    parser.add_argument("--out", required=True, help="results JSON")
    parser.add_argument("--num-cpus", type=int, default=None, help="local Ray size")
    return parser.parse_args()


def cut_times(stamps: np.ndarray, start: float, step: float, days: int) -> list[float]:
    """Cut k (k = 0..days) at the quantile start + k * step of the interaction times."""
    shares = [min(1.0, start + k * step) for k in range(days + 1)]
    ordered = np.sort(stamps)
    cuts = [float(ordered[min(len(ordered) - 1, int(share * len(ordered)))]) for share in shares]
    if len(set(cuts)) != len(cuts):
        raise SystemExit(f"the cuts {cuts} coincide: use a larger --step")
    return cuts


def day_data(log: Interactions, end: float, k_core: int, folder: Path) -> dict[str, Any]:
    """Prepare the interactions before `end` into `folder` (once); their statistics."""
    if not (folder / "meta.json").is_file():
        keep = log.timestamps < end
        part = Interactions(log.users[keep], log.items[keep], log.timestamps[keep])
        build_sequences(part, k_core=k_core, source=f"before {format_time(end)}").save(folder)
    meta = json.loads((folder / "meta.json").read_text())
    return {key: meta[key] for key in ("num_users", "num_items", "num_interactions")}


def day_config(base: PipelineConfig, data: Path, cutoff: float, warm: bool) -> PipelineConfig:
    values = base.model_dump(mode="json")
    values["experiment"]["data"]["path"] = str(data)
    values["experiment"]["data"]["split"] = {"protocol": "temporal", "cutoff": cutoff}
    values["base"]["init_from"] = "latest" if warm else None
    return PipelineConfig.model_validate(values)


def timed_run(config: PipelineConfig, root: Path, run_id: str) -> dict[str, Any]:
    """Run (or resume) one pipeline; its wall time, test NDCG@10, gate and warm start."""
    started = time.perf_counter()
    result = run_pipeline(config, str(root), run_id=run_id, force_publish=True)
    seconds = time.perf_counter() - started
    manifest = json.loads((root / result.bundle / "manifest.json").read_text())
    stages = root / "work" / run_id / "stages"
    warm = stages / "warm-start.json"
    base = json.loads((stages / "train" / "base.json").read_text())["result"]
    data = json.loads((stages / "data.json").read_text())["result"]
    return {
        "run_id": run_id,
        "seconds": seconds,
        "stage_seconds": result.stage_seconds,
        "published": manifest["merge"]["published"],
        "test_ndcg@10": manifest["metrics"]["test"]["full"]["ndcg@10"],
        "valid_ndcg@10": manifest["metrics"]["valid"]["full"]["ndcg@10"],
        "base_best_epoch": base["best_epoch"],
        "test_users": data["test_users"],
        "gate": manifest.get("gate"),
        "warm_start": json.loads(warm.read_text())["result"] if warm.exists() else None,
    }


def relative(value: float, reference: float) -> str:
    return f"{value / reference - 1:+.1%}" if reference else "n/a"


def report(results: dict[str, Any]) -> None:
    print(f"\n{results['protocol']}\n")
    print(
        "| day | data (users/items/interactions), test users | increment s | full retrain s | speed-up "
        "| NDCG@10 increment | NDCG@10 full | difference | warm start | gate |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for day in results["days"]:
        inc, full = day.get("increment"), day.get("full")
        data = day["data"]
        size = f"{data['num_users']}/{data['num_items']}/{data['num_interactions']}"
        size += f", {(inc or full)['test_users']}"
        if inc is None or full is None:
            only = inc or full
            print(
                f"| {day['day']} | {size} | - | {only['seconds']:.0f} | | | "
                f"{only['test_ndcg@10']:.4f} | | | |"
            )
            continue
        warm = inc["warm_start"] or {}
        gate = inc.get("gate") or {}
        print(
            f"| {day['day']} | {size} | {inc['seconds']:.0f} | {full['seconds']:.0f} | "
            f"{full['seconds'] / inc['seconds']:.2f}x | {inc['test_ndcg@10']:.4f} | "
            f"{full['test_ndcg@10']:.4f} | "
            f"{relative(inc['test_ndcg@10'], full['test_ndcg@10'])} | "
            f"{warm.get('kept', '-')} kept, {warm.get('new', '-')} new, "
            f"{warm.get('dropped', '-')} dropped | "
            f"{'passed' if gate.get('passed') else 'forced' if gate.get('forced') else '-'} |"
        )


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("ray").setLevel(logging.WARNING)
    args = parse_args()
    out = Path(args.out)
    work = Path(args.work) if args.work else out.with_suffix("")
    config = load_pipeline_config(Path(args.config), args.overrides)
    interactions, _ = read_log(args.log)
    if interactions.timestamps is None:
        raise SystemExit(f"{args.log}: the log has no timestamps; a temporal benchmark needs them")
    cuts = cut_times(interactions.timestamps, args.start, args.step, args.increments + 1)
    results = json.loads(out.read_text()) if out.exists() else {}
    results.update(
        {
            "log": str(args.log),
            "protocol": "temporal split: day k trains before cut k and is tested on each "
            "user's first interaction between cut k and cut k + 1 (full ranking, history "
            "excluded)",
            "cuts": [format_time(c) for c in cuts],
            "config": config.model_dump(mode="json"),
        }
    )
    days = {day["day"]: day for day in results.get("days", [])}

    import ray

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        for k in range(args.increments + 1):
            data_folder = work / "data" / f"day-{k}"
            day = days.setdefault(k, {"day": k, "cutoff": format_time(cuts[k])})
            day["data"] = day_data(interactions, cuts[k + 1], args.k_core, data_folder)
            runs = [("increment", True)] if k else [("full", False)]
            if k:
                runs.append(("full", False))
            for kind, warm in runs:
                if kind in day:
                    continue
                root = work / ("chain" if warm or k == 0 else f"full-{k}")
                log.info("day %d: %s run on %s", k, kind, day["data"])
                day[kind] = timed_run(
                    day_config(config, data_folder, cuts[k], warm), root, f"day-{k}"
                )
                results["days"] = [days[d] for d in sorted(days)]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(results, indent=2) + "\n")
    finally:
        ray.shutdown()
    report(results)
    increments = [d for d in results["days"] if "increment" in d and "full" in d]
    if increments:
        speed = [d["full"]["seconds"] / d["increment"]["seconds"] for d in increments]
        diff = [
            d["increment"]["test_ndcg@10"] / d["full"]["test_ndcg@10"] - 1
            for d in increments
            if d["full"]["test_ndcg@10"]
        ]
        print(
            f"\nmedian speed-up {np.median(speed):.2f}x (target >= 3x); NDCG@10 of the "
            f"increments vs full retrains: median {np.median(diff):+.1%} (target within 2%)"
        )


if __name__ == "__main__":
    main()
