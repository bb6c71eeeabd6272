"""Merging recipes (thesis Table 4.4): every recipe, uniform, greedy and Fisher merges.

    python benchmarks/merge.py --data ../shared/data/ml-1m/ml-1m_5core_iclrec_format.txt \
        --config configs/ml-1m.yaml --setting finetune --base-epochs 100 --epochs 20

Trains the models exactly as benchmarks/recipes.py does (finetune: a plain base,
then `plain` and every recipe continue from it; scratch: each from its own
initialisation), or takes already trained run folders with --runs. Then:

- `uniform` and `greedy` (validation NDCG@10) soups;
- `fisher[E]` for every estimator E (exact, sample:n, topk:n, random:n for n in
  --ns, target, empirical; `full` with --with-full), λ uniform; with --search
  also λ chosen on validation; with --finetune-epochs also the post-merge
  fine-tune of the first estimator's merge.

Prints NDCG@10/@20 on the test split under full, random100 and popular100
(history items excluded in full), the seconds each Fisher took, and writes
everything as JSON under --out. Fisher files are cached under --out/fishers and
reused when they belong to the same checkpoint and configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from recipes import (  # benchmarks/recipes.py: the same training protocol
    add_recipe_flags,
    base_experiment,
    first_users,
    run_all,
    start_logging,
)

from merging.fisher import FisherConfig, checkpoint_fisher
from merging.fisher_file import load_fisher, model_sha256, save_fisher
from merging.merge import MergeConfig, merge_checkpoints
from training.evaluate import Evaluator, format_table
from training.flags import add_override_flags
from training.prepare import load_data
from training.run_folder import load_run_checkpoint
from training.sequence_data import SequenceData

log = logging.getLogger("benchmarks.merge")
METRICS = ("ndcg@10", "ndcg@20")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="prepared data folder or raw log file")
    parser.add_argument("--setting", choices=["finetune", "scratch"], default="finetune")
    parser.add_argument("--config", default=None, help="experiment YAML (configs/)")
    add_recipe_flags(parser, "merged with")
    parser.add_argument("--runs", nargs="+", default=None, help="merge these runs (no training)")
    parser.add_argument("--users", type=int, default=0, help="first N users only (0: all)")
    parser.add_argument("--ns", type=int, nargs="+", default=[10, 30, 50])
    parser.add_argument("--with-full", action="store_true", help="also the brute-force Fisher")
    parser.add_argument(
        "--fisher-sequences", type=int, default=1000, help="training sequences per Fisher"
    )
    parser.add_argument("--search", action="store_true", help="also λ searched on validation")
    parser.add_argument("--finetune-epochs", type=int, default=0, help="post-merge fine-tune")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    add_override_flags(parser)
    parser.add_argument("--out", default="/tmp/fishrec-bench-merge", help="folder of everything")
    return parser.parse_args()


def estimator_specs(args: argparse.Namespace) -> list[str]:
    specs = ["exact", *(["full"] if args.with_full else [])]
    specs += [f"{name}:{n}" for name in ("sample", "topk", "random") for n in args.ns]
    return [*specs, "target", "empirical"]


def trained_runs(args: argparse.Namespace, data: SequenceData) -> dict[str, Path]:
    """Label -> run folder of every model to merge (the finetune base is not one)."""
    if args.runs:
        return {Path(run).name: Path(run) for run in args.runs}
    base = base_experiment(args, **{"model.backbone": args.backbone})
    args.out = str(Path(args.out) / "runs")  # run_all writes under args.out/<setting>/
    rows = run_all(args, base, data, Evaluator(data.split()))
    args.out = str(Path(args.out).parent)
    return {label: row.result.run_dir for label, row in rows.items() if label != "base"}


def fisher_file(
    run: Path, label: str, spec: str, args: argparse.Namespace, data: SequenceData
) -> tuple[Path, float]:
    """The Fisher of one run (computed, or reused from the cache) and the seconds it took."""
    config = FisherConfig(estimator=spec, num_sequences=args.fisher_sequences)
    path = Path(args.out) / "fishers" / label / f"{spec.replace(':', '_')}.safetensors"
    if path.is_file():
        meta = load_fisher(path).metadata
        same = meta.get("config") == config.model_dump(mode="json")
        if same and meta.get("checkpoint_sha256") == model_sha256(load_run_checkpoint(run)):
            return path, float(meta.get("seconds", float("nan")))
    start = time.perf_counter()
    result, meta = checkpoint_fisher(run, data, config)
    seconds = time.perf_counter() - start
    save_fisher(path, result.file_tensors(), {**meta, "seconds": seconds})
    return path, seconds


def merge_rows(
    args: argparse.Namespace, runs: dict[str, Path], data: SequenceData
) -> tuple[dict[str, Any], dict[str, float]]:
    """Test metrics of every merge, and the Fisher seconds per estimator (all models)."""
    out = Path(args.out) / "merged"
    inputs = list(runs.values())
    rows: dict[str, Any] = {}
    for method in ("uniform", "greedy"):
        result = merge_checkpoints(inputs, out / method, MergeConfig(method=method), data=data)
        rows[method] = result.metrics
    seconds: dict[str, float] = {}
    for index, spec in enumerate(estimator_specs(args)):
        files = [fisher_file(run, label, spec, args, data) for label, run in runs.items()]
        seconds[spec] = sum(s for _, s in files)
        fishers = [path for path, _ in files]
        variants = {f"fisher[{spec}]": MergeConfig(method="fisher")}
        if args.search:
            variants[f"fisher[{spec}] + search"] = MergeConfig(method="fisher", search=True)
        if args.finetune_epochs and index == 0:
            variants[f"fisher[{spec}] + fine-tune"] = MergeConfig(
                method="fisher", finetune_epochs=args.finetune_epochs
            )
        for label, config in variants.items():
            folder = out / label.replace("[", "_").replace("]", "").replace(":", "_").replace(
                " ", ""
            )
            log.info("merging %s", label)
            if config.finetune_epochs:
                shutil.rmtree(folder, ignore_errors=True)  # a fine-tune needs a fresh run folder
            rows[label] = merge_checkpoints(inputs, folder, config, fishers, data).metrics
    return rows, seconds


def main() -> None:
    args = parse_args()
    start_logging(log, args.threads)
    start = time.perf_counter()
    data = first_users(load_data(Path(args.data)), args.users)
    runs = trained_runs(args, data)
    evaluator = Evaluator(data.split())
    table: dict[str, Any] = {
        label: evaluator.evaluate_model(load_run_checkpoint(run).model, "test").metrics
        for label, run in runs.items()
    }
    merged, seconds = merge_rows(args, runs, data)
    table.update({label: document["model"]["test"] for label, document in merged.items()})
    table["mostpop"] = evaluator.evaluate_mostpop("test").metrics
    print(
        f"\n## {Path(args.data).name}, {args.setting}: {data.num_users} users, "
        f"{data.num_items} items; models {list(runs)}; Fishers over {args.fisher_sequences} "
        f"training sequences; {time.perf_counter() - start:.0f} s in all\n"
    )
    print("test split, history items excluded in full\n")
    print(format_table(table, METRICS))
    print("\n| estimator | Fisher seconds (all models) |\n|---|---|")
    for spec, value in seconds.items():
        print(f"| {spec} | {value:.1f} |")
    document = {
        "test": table,
        "fisher_seconds": seconds,
        "runs": {k: str(v) for k, v in runs.items()},
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "merge_benchmark.json").write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
