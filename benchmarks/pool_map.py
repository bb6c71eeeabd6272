"""Every measured pool on one map: how different the members are, what the ensemble and the merge gain.

    python benchmarks/pool_map.py --results benchmarks/results/pool-sweep-beauty*.json \\
        --seed 0 --png benchmarks/results/pool-map-beauty-seed0.png

Reads the JSONs of benchmarks/pool_sweep.py (nothing is trained) and lists, for
every strategy of the seed, the member best on validation, the output
ensemble's and the Fisher merge's test NDCG@10 with their gains over that
member, the barrier on the line between the first two members and their error
inconsistency, sorted by the latter. The PNG draws the trade-off: against error
inconsistency (how differently the members err), the ensemble's gain and the
merge's (left), and the merged model's own test NDCG@10 (right), barrier pools
marked, with the seed's equal-compute control where a file has one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from merging.landscape import line_barrier

BARRIER = 0.005  # a dip of 0.5% below the straight line: the pool sits in two basins


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results", nargs="+", type=Path, required=True, help="pool_sweep JSONs")
    parser.add_argument("--seed", default="0", help="which seed of each file")
    parser.add_argument("--merge", default="fisher", help="the merge to place on the map")
    parser.add_argument("--png", type=Path, default=None)
    return parser.parse_args()


def pool_label(name: str, settings: dict[str, Any], epochs: Any) -> str:
    """The strategy, with what set the file's pool apart (members, epochs, overrides)."""
    members = settings.get("members") or []
    default = members in ([], ["plain", "plain"])
    extra = [] if default else [f"{len(members)} members: {' '.join(sorted(set(members)))}"]
    if settings.get("epochs") != epochs:
        extra.append(f"{settings.get('epochs')} epochs per member")
    extra += [o.replace("train.", "") for o in settings.get("overrides") or []]
    return name + (f" ({', '.join(extra)})" if extra else "")


def control(paths: list[Path], seed: str) -> float | None:
    """Test NDCG@10 of the seed's equal-compute control (one plain model, the pool's budget)."""
    for path in paths:
        row = json.loads(path.read_text())["seeds"].get(seed, {}).get("control")
        if row:
            return float(row["test"])
    return None


def points(paths: list[Path], seed: str, merge: str) -> list[dict[str, Any]]:
    found, epochs = [], None  # the first file's epochs per member; others are labelled
    for path in paths:
        results = json.loads(path.read_text())
        settings = results.get("settings", {})
        epochs = settings.get("epochs") if epochs is None else epochs
        strategies = results["seeds"].get(seed, {}).get("strategies", {})
        for name, row in strategies.items():
            if merge not in row["merge_gain"] or not row.get("line"):
                continue
            best = row["rows"][row["best_member"]]["test"]
            found.append(
                {
                    "pool": pool_label(name, settings, epochs),
                    "best_member": best,
                    "ensemble": row["rows"]["ensemble"]["test"],
                    "merged": row["rows"][merge]["test"],
                    "ensemble_gain": row["ensemble_gain"],
                    "merge_gain": row["merge_gain"][merge],
                    "barrier": line_barrier(row["line"])[1],
                    "error_inconsistency": row["error_inconsistency"],
                }
            )
    return sorted(found, key=lambda p: p["error_inconsistency"])


def table(found: list[dict[str, Any]], merge: str) -> str:
    lines = [
        f"| pool | error incons. | barrier | best member | ensemble | {merge} merge |",
        "|---|---|---|---|---|---|",
    ]
    for p in found:
        lines.append(
            f"| {p['pool']} | {p['error_inconsistency']:.3f} | {100 * p['barrier']:+.1f}% "
            f"| {p['best_member']:.4f} | {p['ensemble']:.4f} ({100 * p['ensemble_gain']:+.1f}%) "
            f"| {p['merged']:.4f} ({100 * p['merge_gain']:+.1f}%) |"
        )
    return "\n".join(lines)


def plot(found: list[dict[str, Any]], merge: str, path: Path, reference: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (gains, level) = plt.subplots(1, 2, figsize=(12, 4.8))
    for p in found:
        x, barrier = p["error_inconsistency"], p["barrier"] > BARRIER
        gains.scatter(x, 100 * p["ensemble_gain"], marker="^", color="tab:gray")
        gains.scatter(x, 100 * p["merge_gain"], marker="x" if barrier else "o", color="tab:blue")
        level.scatter(x, p["merged"], marker="x" if barrier else "o", color="tab:blue")
        level.annotate(p["pool"], (x, p["merged"]), fontsize=6, alpha=0.8)
    if reference is not None:
        level.axhline(reference, color="tab:red", linewidth=0.8, label="equal-compute control")
        level.legend(loc="lower left")
    gains.axhline(0, color="black", linewidth=0.5)
    gains.set(xlabel="error inconsistency of the members", ylabel="gain over the best member, %")
    gains.legend(
        handles=[
            plt.Line2D([], [], marker="^", color="tab:gray", linestyle="", label="ensemble"),
            plt.Line2D([], [], marker="o", color="tab:blue", linestyle="", label=f"{merge} merge"),
            plt.Line2D([], [], marker="x", color="tab:blue", linestyle="", label="... barrier"),
        ]
    )
    level.set(xlabel="error inconsistency of the members", ylabel=f"{merge} merge, test NDCG@10")
    fig.suptitle(
        "Pools: the more the members differ, the more the ensemble gains and the merge loses"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    args = parse_args()
    found = points(args.results, args.seed, args.merge)
    print(table(found, args.merge))
    reference = control(args.results, args.seed)
    if reference is not None:
        print(f"equal-compute control (one plain model, the pool's budget): {reference:.4f}")
    if args.png:
        plot(found, args.merge, args.png, reference)
        print(f"plot: {args.png}")


if __name__ == "__main__":
    main()
