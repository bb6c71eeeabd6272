"""Sampled-softmax train step against the catalogue: dense AdamW vs `train.sparse_items`.

    python benchmarks/sparse_step.py --items 10000 100000 1000000 --steps 9 --rounds 3

The scale benchmark's catalogues and model (benchmarks/scale.py: synthetic
logs of 0.2 users per item, SASRec D 64, 2 layers, max_len 50, batch 128, 1024
popularity negatives, logQ-corrected). Per catalogue, rounds alternate the two
variants of one optimiser step (loss, backward, clip, update), each the median
of --steps steps after a warm-up; a round's ratio is dense / sparse. Printed:
the median step of each variant and the ratio, and each variant's step at the
largest catalogue over its step at the second largest (the issue's target:
within 1.5x for sparse). Data folders are kept in --work and reused.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import scale  # the catalogues, the model and the timed step of the scale benchmark
from results_file import write_results  # benchmarks/results_file.py

from training.sequence_data import SequenceData

log = logging.getLogger("benchmarks.sparse_step")
SAMPLED = {"negatives": 1024, "sampler": "popularity"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    scale.add_catalogue_flags(parser)
    parser.add_argument("--steps", type=int, default=9, help="timed steps per median")
    parser.add_argument("--rounds", type=int, default=3, help="dense/sparse pairs per catalogue")
    parser.add_argument("--work", type=Path, default=Path("/tmp/fishrec-bench-sparse"))
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/sparse-step.json"))
    return parser.parse_args()


def catalogue(args: argparse.Namespace, items: int) -> SequenceData:
    folder = args.work / f"n{items}"
    if not (folder / "data" / "meta.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        scale.make_data(args, items, folder)
    return SequenceData.load(folder / "data")


def measure(args: argparse.Namespace, items: int) -> dict[str, Any]:
    data = catalogue(args, items)
    dense, sparse = [], []
    for round_ in range(args.rounds):
        dense.append(scale.step_seconds(data, SAMPLED, args.steps, sparse=False))
        sparse.append(scale.step_seconds(data, SAMPLED, args.steps, sparse=True))
        log.info("n=%d round %d: dense %.4f s, sparse %.4f s", items, round_, dense[-1], sparse[-1])
    return {
        "catalogue": data.num_items,
        "users": data.num_users,
        "dense_s": statistics.median(dense),
        "sparse_s": statistics.median(sparse),
        "ratio_dense_over_sparse": statistics.median(
            d / s for d, s in zip(dense, sparse, strict=True)
        ),
        "rounds": {"dense": dense, "sparse": sparse},
    }


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args()
    torch.set_num_threads(2)
    rows = [measure(args, items) for items in args.items]
    print(f"{'items':>10} {'dense AdamW s':>14} {'sparse rows s':>14} {'dense/sparse':>13}")
    for row in rows:
        print(
            f"{row['catalogue']:>10,} {row['dense_s']:>14.4f} {row['sparse_s']:>14.4f} "
            f"{row['ratio_dense_over_sparse']:>13.2f}"
        )
    growth = {}
    if len(rows) > 1:
        last, before = rows[-1], rows[-2]
        growth = {key: last[key] / before[key] for key in ("dense_s", "sparse_s")}
        print(
            f"step at {last['catalogue']:,} items over the step at {before['catalogue']:,}: "
            f"dense {growth['dense_s']:.2f}x, sparse {growth['sparse_s']:.2f}x"
        )
    write_results(args.json, args, rows=rows, growth_last_two=growth)


if __name__ == "__main__":
    main()
