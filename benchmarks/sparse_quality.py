"""Does `train.sparse_items` (lazy Adam on the touched item rows) cost quality?

    python benchmarks/sparse_quality.py --data data/beauty --config configs/beauty.yaml \\
        --epochs 30 --negatives 256 --seeds 0 1

The same sampled-softmax model (--negatives popularity negatives, logQ) trained
twice per seed, with dense AdamW on the item table and with sparse rows and lazy
Adam, on the same batches and negatives' distribution; the best validation
epoch of each on the test split (full ranking, history excluded), compared by a
paired per-user test on NDCG@10. Runs are kept in --work and resumed; the JSON
gets each seed as soon as it exists.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path
from typing import Any

from recipes import base_experiment, experiment_parser, start_logging  # benchmarks/recipes.py

from merging.significance import paired_comparison
from training.evaluate import Evaluator
from training.prepare import load_data
from training.run import train
from training.run_folder import load_run_checkpoint

log = logging.getLogger("benchmarks.sparse_quality")


def parse_args() -> Any:
    parser = experiment_parser(__doc__)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--negatives", type=int, default=256)
    parser.add_argument("--sampler", default="popularity")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    parser.add_argument("--work", type=Path, default=Path("/tmp/fishrec-bench-sparse-quality"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sparse-quality.json"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    start_logging(log, threads=None)
    data = load_data(args.data)
    evaluator = Evaluator(data.split())
    results: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(args).items()}, "seeds": {}}
    for seed in args.seeds:
        scores, metrics = {}, {}
        for variant, sparse in (("dense", False), ("sparse", True)):
            config = base_experiment(
                args,
                **{
                    "train.epochs": args.epochs,
                    "train.seed": seed,
                    "train.sparse_items": sparse,
                    "train.progress": False,
                    "recipe.params.negatives": args.negatives,
                    "recipe.params.sampler": args.sampler,
                },
            )
            run = args.work / f"seed{seed}-{variant}"
            log.info("seed %d, %s item rows: training %s", seed, variant, run)
            result = train(config, data, run, resume=True)
            model = load_run_checkpoint(run).model
            evaluation = evaluator.evaluate_model(model, "test")
            scores[variant] = evaluation.per_user["full"]["ndcg@10"]
            seconds = statistics.median(e["seconds"] for e in result.history)
            metrics[variant] = {
                "test_ndcg@10": evaluation.metrics["full"]["ndcg@10"],
                "best_epoch": result.best_epoch,
                "seconds_per_epoch": seconds,
            }
        versus = paired_comparison(scores["sparse"], scores["dense"], seed=seed).to_dict()
        results["seeds"][str(seed)] = {**metrics, "sparse_vs_dense": versus}
        print(json.dumps({"seed": seed, **metrics, "sparse_vs_dense": versus}))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
