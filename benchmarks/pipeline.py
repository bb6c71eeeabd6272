"""Wall time of the merge job with recipes in parallel vs one after another.

    python benchmarks/pipeline.py --config configs/pipeline-demo.yaml

Each variant is a fresh `fishrec pipeline` process on a fresh artifact root, on
the same machine:

- parallel:   a local Ray with all the machine's CPUs, 1 CPU (and 1 thread) per task;
- sequential: a local Ray with 1 CPU, so tasks run one at a time, 1 thread each;
- sequential-threads: one task at a time, but each task gets every CPU as
  torch threads (what a single process with intra-op parallelism gets).

Prints the wall time of each, the time of every stage (from the stage
markers), and the ratios against the sequential run.

With --settings S1 S2 ... the variants are instead the parallel run under each
pool strategy (training/pool.py), e.g. `--settings finetune population`: the
job's wall time for the same members under today's and another default. An
entry may carry its own overrides after the strategy, e.g.
`--settings population "finetune recipe_epochs=5"` (fine-tunes are shorter than
members trained from scratch). Each run's published metrics (members and
merges on the test split) are printed too, and everything goes to --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from merging.pipeline.scheduler import machine_cpus
from training.flags import add_override_flags


def run_variant(
    config: str, cpus: int, threads: int, overrides: list[str], root: Path
) -> tuple[float, dict[str, float], dict]:
    """Wall seconds of one pipeline run, the seconds of each stage, its metrics.json."""
    fishrec = str(Path(sys.executable).parent / "fishrec")
    command = [
        fishrec,
        "--log-level",
        "WARNING",
        "pipeline",
        "--config",
        config,
        "--artifacts",
        str(root),
        "--run-id",
        "bench",
        "--set",
        f"num_cpus={cpus}",
        "--set",
        f"resources.num_cpus={threads}",
    ]
    for override in overrides:
        command += ["--set", override]
    start = time.perf_counter()
    with open(root / "pipeline.log", "w") as log:  # Ray workers log a lot: keep it out of the table
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    stages = {}
    for marker in sorted((root / "work" / "bench" / "stages").rglob("*.json")):
        record = json.loads(marker.read_text())
        stages[record["stage"]] = record["seconds"]
    published = root / "runs" / "bench" / "metrics.json"
    metrics = json.loads(published.read_text()) if published.is_file() else {}
    return wall, stages, metrics


def setting_variant(entry: str) -> tuple[str, list[str]]:
    """'finetune recipe_epochs=5' -> ('parallel, finetune recipe_epochs=5', [overrides])."""
    setting, *overrides = entry.split()
    return f"parallel, {entry}", [f"setting={setting}", *overrides]


def test_ndcg(metrics: dict) -> dict[str, float]:
    """{model: test NDCG@10 (full ranking)} of the members, merges and ensemble a run reports."""
    return {
        name: row["test"]["full"]["ndcg@10"]
        for name, row in (metrics.get("models") or {}).items()
        if "test" in row
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/pipeline-demo.yaml", help="pipeline YAML")
    parser.add_argument("--cpus", type=int, default=machine_cpus(), help="CPUs of the parallel run")
    add_override_flags(parser, "recipe_epochs=2", "a pipeline config field of every variant")
    parser.add_argument(
        "--settings",
        nargs="+",
        default=None,
        help="compare pool strategies (parallel runs): STRATEGY [KEY=VALUE ...] per entry",
    )
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    variants: dict[str, tuple[int, int, list[str]]] = {
        "parallel": (args.cpus, 1, []),
        "sequential": (1, 1, []),
        "sequential-threads": (args.cpus, args.cpus, []),
    }
    if args.settings:
        variants = {
            name: (args.cpus, 1, extra) for name, extra in map(setting_variant, args.settings)
        }
    results: dict[str, tuple[float, dict[str, float], dict]] = {}
    for name, (cpus, threads, extra) in variants.items():
        root = Path(tempfile.mkdtemp(prefix="fishrec-bench-"))
        try:
            print(
                f"running {name} (Ray CPUs {cpus}, {threads} CPU/threads per task) ...", flush=True
            )
            overrides = [*args.overrides, *extra]
            results[name] = run_variant(args.config, cpus, threads, overrides, root)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    reference = "sequential" if "sequential" in results else next(iter(results))
    baseline = results[reference][0]
    print(f"\n## Merge job wall time ({args.config}, {args.cpus} CPUs)\n")
    print(f"| variant | wall s | speed-up vs {reference} |\n|---|---|---|")
    for name, (wall, _, _) in results.items():
        print(f"| {name} | {wall:.1f} | x{baseline / wall:.2f} |")
    stages = sorted({s for _, per_stage, _ in results.values() for s in per_stage})
    print("\n## Seconds per stage\n")
    print("| stage | " + " | ".join(results) + " |\n|---|" + "---|" * len(results))
    for stage in stages:
        cells = [f"{results[n][1].get(stage, float('nan')):.1f}" for n in results]
        print(f"| {stage} | " + " | ".join(cells) + " |")
    quality = {name: test_ndcg(metrics) for name, (_, _, metrics) in results.items()}
    if any(quality.values()):
        print("\n## Test NDCG@10 of the published run's members and merges\n")
        for name, rows in quality.items():
            print(f"- {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in rows.items()))
    if args.out:
        payload = {
            "config": args.config,
            "cpus": args.cpus,
            "overrides": args.overrides,
            "variants": {
                name: {"wall_s": wall, "stages_s": per_stage, "metrics": metrics}
                for name, (wall, per_stage, metrics) in results.items()
            },
        }
        Path(args.out).write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
