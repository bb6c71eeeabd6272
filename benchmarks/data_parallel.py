"""Data-parallel training on Ray Train vs one worker with the same CPUs.

    python benchmarks/data_parallel.py --data /work/data/ml-1m --epochs 4 --seeds 0 1 2

Trains the same SASRec on the same data for the same epochs twice per seed:
1 worker x T threads (`train.workers: 1`) and W workers x T/W threads
(`train.workers: W`, DDP over gloo), and prints the median seconds per epoch
(training only, and the whole run including Ray Train's start-up), their
ratio, and validation/test NDCG@10 as mean ± std over seeds. Each run is a
folder under --out and is resumed when the benchmark is run again; the
figures go to --json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from training.config import ExperimentConfig
from training.prepare import load_data
from training.run import train


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="prepared data folder or raw log file")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cpus", type=int, default=2, help="CPUs both set-ups share out")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--out", default="/tmp/fishrec-bench-ddp", help="run folders")
    parser.add_argument("--json", default="benchmarks/results/data-parallel-ml-1m.json")
    return parser.parse_args()


def experiment(args: argparse.Namespace, seed: int, workers: int) -> ExperimentConfig:
    return ExperimentConfig.model_validate(
        {
            "model": {"max_len": args.max_len, "num_heads": 2, "dropout": 0.2},
            "train": {
                "epochs": args.epochs,
                "patience": args.epochs,
                "seed": seed,
                "workers": workers,
                "num_threads": args.cpus // workers,
                "progress": False,
            },
        }
    )


def run(args: argparse.Namespace, data: Any, seed: int, workers: int) -> dict[str, Any]:
    folder = Path(args.out) / f"w{workers}-s{seed}"
    done = folder / "timing.json"
    if done.exists():
        return json.loads(done.read_text())
    start = time.perf_counter()
    result = train(experiment(args, seed, workers), data, folder)
    figures = {
        "workers": workers,
        "threads": args.cpus // workers,
        "seed": seed,
        "run_seconds": time.perf_counter() - start,
        "epoch_seconds": statistics.median(e["seconds"] for e in result.history),
        "valid_ndcg10": result.metrics["model"]["valid"]["full"]["ndcg@10"],
        "test_ndcg10": result.metrics["model"]["test"]["full"]["ndcg@10"],
        "final_loss": result.history[-1]["loss"],
    }
    done.write_text(json.dumps(figures, indent=2))
    return figures


def mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1) if len(values) > 1 else 0:.4f}"


def main() -> None:
    import ray

    args = parse_args()
    data = load_data(args.data)
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    try:
        runs = [run(args, data, seed, w) for seed in args.seeds for w in (1, args.workers)]
    finally:
        ray.shutdown()
    single = [r for r in runs if r["workers"] == 1]
    multi = [r for r in runs if r["workers"] == args.workers]
    summary: dict[str, Any] = {
        "data": str(args.data),
        "epochs": args.epochs,
        "max_len": args.max_len,
        "cpus": args.cpus,
        "runs": runs,
    }
    print(
        f"{'set-up':<22}{'epoch s (median)':>18}{'run s':>10}{'valid NDCG@10':>20}{'test NDCG@10':>20}"
    )
    for label, group in (
        (f"1 worker x {args.cpus} threads", single),
        (f"{args.workers} workers x {args.cpus // args.workers} threads", multi),
    ):
        epoch = statistics.median(r["epoch_seconds"] for r in group)
        whole = statistics.median(r["run_seconds"] for r in group)
        valid = mean_std([r["valid_ndcg10"] for r in group])
        test = mean_std([r["test_ndcg10"] for r in group])
        print(f"{label:<22}{epoch:>18.1f}{whole:>10.1f}{valid:>20}{test:>20}")
        summary[label] = {
            "epoch_seconds": epoch,
            "run_seconds": whole,
            "valid": valid,
            "test": test,
        }
    ratio = statistics.median(r["epoch_seconds"] for r in multi) / statistics.median(
        r["epoch_seconds"] for r in single
    )
    summary["epoch_time_ratio_multi_vs_single"] = ratio
    print(f"epoch time, {args.workers} workers / 1 worker: {ratio:.2f}x")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
