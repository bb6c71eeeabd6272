"""Cost and accuracy of every Fisher estimator (thesis Fig. 4.4), in one table.

    python benchmarks/fisher_cost.py --data ../shared/data/ml-1m/ml-1m_5core_iclrec_format.txt

For every estimator (exact, full, random:n, topk:n, sample:n for n in --ns,
target, empirical; optionally the batch shortcut and truncated exact:r) it
prints the seconds per 256 sequences (median over chunks of --chunk sequences)
and the relative L2 error against `full` (brute force over all items) on a
subset of --error-sequences sequences, for all parameters together, the item
embedding alone and the rest. `full` is timed on the error subset only and
scaled to 256 (it is |V| backward passes per sequence).

Without --checkpoint a model is trained first (--epochs, paper-sized by
default: D=64, 2 layers, max length 200), since a random model's p is nearly
uniform and would flatter the sampling estimators.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from recipes import first_users  # benchmarks/recipes.py

from merging.fisher import FisherConfig, compute_fisher, select_sequences
from merging.fisher_result import relative_error
from training.config import ExperimentConfig
from training.model import SequenceRecommender
from training.prepare import load_data
from training.run import train
from training.run_folder import load_run_checkpoint
from training.sequence_data import SequenceData

EMBEDDING = "item_embedding.weight"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="prepared data folder or raw log file")
    parser.add_argument("--users", type=int, default=0, help="first N users only (0: all)")
    parser.add_argument("--checkpoint", default=None, help="a trained checkpoint or run folder")
    parser.add_argument("--backbone", choices=["bert4rec", "sasrec"], default="sasrec")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (no --checkpoint)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=200)
    parser.add_argument("--work", default="/tmp/fishrec-bench-fisher", help="run folder")
    parser.add_argument(
        "--ns", type=int, nargs="+", default=[10, 30, 50], help="n of the :n estimators"
    )
    parser.add_argument(
        "--ranks", type=int, nargs="*", default=[16], help="also time exact:r for these r"
    )
    parser.add_argument(
        "--shortcut", action="store_true", help="also the batch shortcut of sample:n"
    )
    parser.add_argument("--timing-sequences", type=int, default=256)
    parser.add_argument("--error-sequences", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=32, help="sequences per timed chunk")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    return parser.parse_args()


def trained_model(args: argparse.Namespace, data: SequenceData) -> SequenceRecommender:
    if args.checkpoint:
        return load_run_checkpoint(Path(args.checkpoint), args.device).model
    config = ExperimentConfig.model_validate(
        {
            "model": {
                "backbone": args.backbone,
                "hidden_size": args.hidden,
                "max_len": args.max_len,
            },
            "train": {"epochs": args.epochs, "progress": False, "device": args.device},
        }
    )
    train(config, data, Path(args.work))
    return load_run_checkpoint(Path(args.work), args.device).model


def estimators(args: argparse.Namespace) -> list[tuple[str, FisherConfig]]:
    specs = ["exact", *(f"exact:{r}" for r in args.ranks)]
    specs += [f"{name}:{n}" for name in ("sample", "topk", "random") for n in args.ns]
    specs += ["target", "empirical"]
    rows = [(spec, FisherConfig(estimator=spec)) for spec in specs]
    if args.shortcut:
        rows += [
            (
                f"sample:{n} (batch shortcut)",
                FisherConfig(estimator=f"sample:{n}", batch_shortcut=True),
            )
            for n in args.ns
        ]
    return rows


def seconds_per_256(
    model: SequenceRecommender,
    sequences: list[np.ndarray],
    ids: list[int],
    config: FisherConfig,
    chunk: int,
) -> float:
    """Median seconds of one chunk, scaled to 256 sequences."""
    times = []
    for start in range(0, len(sequences), chunk):
        part = slice(start, start + chunk)
        begin = time.perf_counter()
        compute_fisher(model, sequences[part], config, ids[part])
        times.append((time.perf_counter() - begin) / len(sequences[part]))
    return 256 * statistics.median(times)


def errors(estimate: dict[str, torch.Tensor], full: dict[str, torch.Tensor]) -> dict[str, float]:
    rest = [k for k in full if k != EMBEDDING]
    return {
        "all": relative_error(estimate, full),
        "embedding": relative_error({EMBEDDING: estimate[EMBEDDING]}, {EMBEDDING: full[EMBEDDING]}),
        "rest": relative_error({k: estimate[k] for k in rest}, {k: full[k] for k in rest}),
    }


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = first_users(load_data(Path(args.data)), args.users)
    model = trained_model(args, data)
    print(
        f"{data.num_users} users, |V| = {data.num_items}, D = {model.config.hidden_size}, "
        f"{model.config.backbone}, max_len {model.config.max_len}, {torch.get_num_threads()} threads"
    )
    ids, sequences = select_sequences(data.split().train, args.timing_sequences, seed=0)
    error_ids, error_seqs = ids[: args.error_sequences], sequences[: args.error_sequences]

    begin = time.perf_counter()
    full = compute_fisher(model, error_seqs, FisherConfig(estimator="full"), error_ids).mean()
    full_seconds = 256 * (time.perf_counter() - begin) / len(error_seqs)
    rows: dict[str, dict[str, Any]] = {
        "full": {"seconds_per_256": full_seconds, "error": errors(full, full), "extrapolated": True}
    }
    for label, config in estimators(args):
        result = compute_fisher(model, error_seqs, config, error_ids)
        rows[label] = {
            "seconds_per_256": seconds_per_256(model, sequences, ids, config, args.chunk),
            "error": errors(result.mean(), full),
            "dropped_mass": result.mean_dropped_mass,
        }
        print(
            f"  {label}: {rows[label]['seconds_per_256']:.2f} s / 256, error {rows[label]['error']['all']:.3g}"
        )
    report(rows, args, len(error_seqs))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


def report(rows: dict[str, dict[str, Any]], args: argparse.Namespace, error_count: int) -> None:
    reference = max(args.ns)
    sample = rows[f"sample:{reference}"]["seconds_per_256"]
    full = rows["full"]["seconds_per_256"]
    print(
        f"\n| estimator | s / 256 seq | x sample:{reference} | full / this | rel. L2 error vs full "
        f"(all) | embedding | rest | dropped eig. mass |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, row in rows.items():
        seconds = row["seconds_per_256"]
        mark = " (extrapolated)" if row.get("extrapolated") else ""
        error = row["error"]
        print(
            f"| {label} | {seconds:.2f}{mark} | {seconds / sample:.2f} | {full / seconds:.1f} | "
            f"{error['all']:.2e} | {error['embedding']:.2e} | {error['rest']:.2e} | "
            f"{row.get('dropped_mass', 0.0):.2e} |"
        )
    exact = rows["exact"]
    print(f"\nerrors on {error_count} sequences; timings: median over chunks of {args.chunk}")
    print(f"exact error vs full: {exact['error']['all']:.2e} (target: ~0, float32 round-off)")
    print(f"exact / sample:{reference} cost: {exact['seconds_per_256'] / sample:.2f} (target <= 2)")
    print(f"full / exact cost: {full / exact['seconds_per_256']:.1f} (target >= 30)")


if __name__ == "__main__":
    main()
