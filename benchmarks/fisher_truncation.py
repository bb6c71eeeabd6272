"""The truncated exact Fisher against the exact one: its error, its time, and the merge it gives.

    python benchmarks/fisher_truncation.py --data data/beauty \\
        --runs benchmarks/results/pool-sweep-beauty/seed-0/population-0.05-10/1-plain \\
               benchmarks/results/pool-sweep-beauty/seed-0/population-0.05-10/2-plain \\
        --items 10 100 1000 --json benchmarks/results/fisher-truncation-beauty.json

`truncated:K` (merging/fisher_exact.py) builds the output covariance of the
exact identity from the K most probable items exactly and K draws from the
rest: O(K D²) per sequence instead of O(N D²), unbiased, so its error is the
draws' noise, which shrinks as the top K hold more of p and as sequences add
up. For each trained run (--runs, the pool's members) and each K, on the same
--sequences training sequences: seconds per sequence, the relative error of
the Fisher against exact (||F_K - F|| / ||F|| over all parameters, and over the
item table alone), and the mass of p in the top K. Then the members are merged with each Fisher (Fisher
merge, the job's default) and every merge is evaluated on the test split (full
ranking, whole history excluded) against the exact-Fisher merge, paired per
user: the error that matters is the one the merged model shows.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from results_file import write_results  # benchmarks/results_file.py

from merging.fisher import FisherConfig, checkpoint_fisher
from merging.fisher_file import save_fisher
from merging.fisher_result import relative_error
from merging.merge import merge_checkpoints
from merging.methods import MergeConfig
from merging.significance import paired_comparison
from training.evaluate import Evaluator
from training.prepare import load_data
from training.run_folder import load_run_checkpoint
from training.sequence_data import SequenceData

log = logging.getLogger("benchmarks.fisher_truncation")
METRIC = ("full", "ndcg@10")
TABLE = "item_embedding.weight"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="prepared data folder of the runs")
    parser.add_argument("--runs", nargs="+", required=True, help="trained run folders to merge")
    parser.add_argument("--items", type=int, nargs="+", default=[10, 100, 1000], help="values of K")
    parser.add_argument("--sequences", type=int, default=1000, help="training sequences per Fisher")
    parser.add_argument("--json", type=Path, required=True)
    return parser.parse_args()


def top_mass(run: Path, data: SequenceData, sequences: int, ks: list[int]) -> dict[int, float]:
    """Mean share of p in the K most probable items, over the Fisher's sequences."""
    from merging.fisher import select_sequences
    from training.batching import pad_left

    model = load_run_checkpoint(run).model.eval()
    _, chosen = select_sequences(data.split().train, sequences, FisherConfig().seed)
    histories = pad_left([seq[:-1] for seq in chosen], model.config.max_len)
    with torch.no_grad():
        p = torch.softmax(model.logits(histories), dim=-1)
    ordered = p.sort(dim=-1, descending=True).values.cumsum(dim=-1)
    return {k: float(ordered[:, min(k, p.shape[1]) - 1].mean()) for k in ks}


def fishers(
    run: Path, data: SequenceData, args: argparse.Namespace, folder: Path
) -> tuple[dict[str, Path], list[dict[str, Any]]]:
    """Each estimator's Fisher file of `run`, and a row per estimator (time, error)."""
    paths, rows, exact = {}, [], None
    checkpoint_fisher(run, data, FisherConfig(num_sequences=2))  # warm-up: not timed
    for spec in ["exact", *(f"truncated:{k}" for k in args.items)]:
        config = FisherConfig(estimator=spec, num_sequences=args.sequences)
        start = time.perf_counter()
        result, meta = checkpoint_fisher(run, data, config)
        seconds = (time.perf_counter() - start) / result.count
        mean = result.mean(torch.float64)
        exact = exact or mean
        row = {"run": str(run), "estimator": spec, "seconds_per_sequence": seconds}
        row["relative_error"] = relative_error(mean, exact)
        row["relative_error_item_table"] = relative_error(
            {TABLE: mean[TABLE]}, {TABLE: exact[TABLE]}
        )
        rows.append(row)
        log.info("%s %s: %s", run.name, spec, json.dumps(row))
        paths[spec] = folder / f"{run.name}-{spec.replace(':', '-')}.safetensors"
        save_fisher(paths[spec], result.file_tensors(), meta)
    return paths, rows


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args()
    data = load_data(Path(args.data))
    runs = [Path(run) for run in args.runs]
    evaluator = Evaluator(data.split())
    rows, files = [], []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        for index, run in enumerate(runs):
            paths, estimator_rows = fishers(run, data, args, folder / str(index))
            mass = top_mass(run, data, args.sequences, args.items)
            for row in estimator_rows:
                k = row["estimator"].partition(":")[2]
                row["top_k_mass"] = mass[int(k)] if k else 1.0
            rows += estimator_rows
            files.append(paths)
        merges = {}
        for spec in files[0]:
            merged = folder / f"merged-{spec.replace(':', '-')}"
            config = MergeConfig(method="fisher")
            merge_checkpoints(runs, merged, config, [paths[spec] for paths in files], data)
            result = evaluator.evaluate_model(load_run_checkpoint(merged).model, "test")
            merges[spec] = result.per_user[METRIC[0]][METRIC[1]]
    comparisons = {}
    for spec, scores in merges.items():
        comparison = paired_comparison(scores, merges["exact"])
        comparisons[spec] = {"test_ndcg@10": float(np.mean(scores)), **comparison.to_dict()}
        print(
            f"Fisher merge with {spec}: test NDCG@10 {np.mean(scores):.5f}, "
            f"{comparison.relative:+.2%} against exact (p {comparison.p_ttest:.2g})"
        )
    for row in rows:
        print(json.dumps(row))
    write_results(args.json, args, rows=rows, merges=comparisons)


if __name__ == "__main__":
    main()
