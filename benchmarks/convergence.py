"""Per-epoch convergence of the training defaults: an ablation against SASRec+.

    python benchmarks/convergence.py --data /work/data/ml-1m --max-len 200 --epochs 6 \
        --variants before,after --out benchmarks/results/convergence-ml-1m.json

Each variant is a set of config overrides (VARIANTS below). `before` is the
configuration fishrec shipped until 2026-12-03 (and its loss, which held all
logits at once); every single-change variant is `before` with one thing changed;
`after` is today's defaults. Each variant trains in its own process (so peak RSS
is its own), validates after every epoch (full ranking, NDCG@10, the user's whole
history excluded) and reports test NDCG@10 of its best epoch.

Results go to the JSON file as each variant finishes, and a rerun skips the
variants already there (resumable; `--redo` trains them again). The table is
printed and a PNG of the curves is written beside the JSON, with the SASRec+
reference points (Klenitskiy & Vasilev, RecSys 2023) where the data set has them.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# Each round's dict is the complete difference from today's defaults, so an old
# variant reruns as what it was: a round is the next round plus what that one changed.
# Round 3 (2026-12-04): positions from the start; before it, from the end.
ROUND_3: dict[str, Any] = {"model.positions": "end"}
# Round 2 (2026-12-03 afternoon): SASRec's block and attention init; before, pre-norm.
ROUND_2: dict[str, Any] = {**ROUND_3, "model.block": "prenorm", "model.attention_init": "normal"}
# Round 1 (2026-12-03 morning); the ablation below it showed SASRec's 1x feed-forward
# and Adam's betas no worse and 20% faster.
ROUND_1: dict[str, Any] = {**ROUND_2, "model.ffn_mult": 4, "train.betas": [0.9, 0.98]}
# Overrides of ExperimentConfig per variant, applied over the library defaults.
BEFORE: dict[str, Any] = {
    **ROUND_1,
    "model.num_heads": 2,
    "model.dropout": 0.2,
    "model.attn_dropout": 0.2,
    "model.embedding_input": "layernorm",
    "model.prediction_head": True,
    "model.activation": "gelu",
    "train.schedule": "cosine",
    "train.warmup_steps": "WARMUP",  # the data set's old config value (see --old-warmup)
    "train.length_grouping": 50,
}
SINGLE_CHANGES: dict[str, dict[str, Any]] = {
    "constant-lr": {"train.schedule": "constant", "train.warmup_steps": 0},
    "dropout-0.1": {"model.dropout": 0.1, "model.attn_dropout": 0.1},
    "uniform-batches": {"train.length_grouping": 0},
    "scaled-embedding": {"model.embedding_input": "scaled"},
    "no-head": {"model.prediction_head": False},
    "1-head-relu": {"model.num_heads": 1, "model.activation": "relu"},
}
# Variants built on `before` (which `--before-set` adjusts to the data set's old config).
LEGACY: dict[str, dict[str, Any]] = {
    "before": {"materialised_logits": True},
    **SINGLE_CHANGES,
}
VARIANTS: dict[str, dict[str, Any]] = {
    **LEGACY,
    "round-1": ROUND_1,
    "round-1-bf16": {**ROUND_1, "train.precision": "bf16"},
    "round-1-grouped": {**ROUND_1, "train.length_grouping": 50},
    "round-1-betas-0.999": {**ROUND_1, "train.betas": [0.9, 0.999]},
    "round-1-ffn-1x": {**ROUND_1, "model.ffn_mult": 1},
    "round-1-no-clip": {**ROUND_1, "train.clip_grad_norm": None},
    # Round 2 (2026-12-03 afternoon) made SASRec's block and attention init the defaults.
    "round-2": ROUND_2,
    "round-2-bf16": {**ROUND_2, "train.precision": "bf16"},
    "round-2-grouped": {**ROUND_2, "train.length_grouping": 50},
    # SASRec's own code (the block SASRec+ trains, its attention init), one at a time.
    "round-2-sasrec-block": {**ROUND_2, "model.block": "sasrec"},
    "round-2-xavier": {**ROUND_2, "model.attention_init": "xavier"},
    # Round 3 (2026-12-04) counts positions from the oldest item of the window (SASRec+'s
    # right padding); "round-3" is the defaults before that, with positions from the end.
    "round-3": ROUND_3,
    "after": {},
    "after-bf16": {"train.precision": "bf16"},
    "after-dropout-0.3": {"model.dropout": 0.3, "model.attn_dropout": 0.3},
    "after-dropout-0.5": {"model.dropout": 0.5, "model.attn_dropout": 0.5},
    "after-compile": {"train.compile": True},
}
# SASRec+ validation NDCG@10 by epoch (ML-1M, read off the paper's convergence plot).
SASREC_PLUS = {"ml-1m": {6: 0.13, 13: 0.155, 25: 0.17}}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="prepared data folder")
    parser.add_argument("--name", default=None, help="data set name (default: folder name)")
    parser.add_argument("--max-len", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--patience", type=int, default=1000, help="early stopping")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--old-warmup", type=int, default=200, help="warm-up of `before`")
    parser.add_argument(
        "--before-set",
        action="append",
        default=[],
        help="override of `before` and its single changes: the data set's old config",
    )
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument(
        "--set", action="append", default=[], help="extra override for every variant"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="results JSON (PNG beside it)")
    parser.add_argument("--redo", action="store_true", help="train finished variants again")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def variant_overrides(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from training.config import parse_override

    overrides: dict[str, Any] = {}
    if name in LEGACY:
        overrides.update({k: args.old_warmup if v == "WARMUP" else v for k, v in BEFORE.items()})
    overrides.update(
        {
            "model.max_len": args.max_len,
            "train.epochs": args.epochs,
            "train.patience": args.patience,
            "train.batch_size": args.batch_size,
            "train.seed": args.seed,
            "train.eval_every": 1,
            "train.progress": False,
        }
    )
    extra = [*args.set, *(args.before_set if name in LEGACY else [])]
    overrides.update(parse_override(text) for text in extra)
    overrides.update(VARIANTS[name])
    return overrides


def run_worker(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train one variant in this process; return its curve, timings and test metric."""
    import torch.nn.functional as F

    import training.losses
    from training.config import ExperimentConfig, load_config
    from training.prepare import load_data
    from training.trainer import Trainer

    overrides = variant_overrides(name, args)
    if overrides.pop("materialised_logits", False):
        # The loss as it was: all (M, N) logits at once, then F.cross_entropy.
        def materialised(states, weight, bias, labels):  # type: ignore[no-untyped-def]
            return F.cross_entropy(states @ weight.T + bias, labels)

        training.losses.linear_cross_entropy = materialised  # type: ignore[assignment]
    config = load_config(ExperimentConfig, None, {"data.path": args.data, **overrides})
    data = load_data(Path(args.data))
    run_dir = Path(args.out).with_suffix("") / name
    started = time.perf_counter()
    curve: list[dict[str, float]] = []

    def on_epoch(entry: dict[str, Any]) -> None:
        ndcg = entry["valid"]["full"]["ndcg@10"]
        curve.append(
            {
                "epoch": entry["epoch"],
                "valid_ndcg@10": ndcg,
                "train_seconds": entry["seconds"],
                "elapsed_seconds": time.perf_counter() - started,
            }
        )
        print(
            f"  {name} epoch {entry['epoch']}: valid NDCG@10 {ndcg:.4f}, {entry['seconds']:.1f} s",
            file=sys.stderr,
            flush=True,
        )

    trainer = Trainer(config, data, run_dir, on_epoch=on_epoch)
    result = trainer.fit()
    return {
        "variant": name,
        "overrides": overrides,
        "curve": curve,
        "median_epoch_seconds": statistics.median(c["train_seconds"] for c in curve),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "best_epoch": result.best_epoch,
        "test_ndcg@10": result.metrics["model"]["test"]["full"]["ndcg@10"],
        "mostpop_test_ndcg@10": result.metrics["mostpop"]["test"]["full"]["ndcg@10"],
    }


def load_results(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {"variants": {}}


def save_results(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".tmp")
    staging.write_text(json.dumps(results, indent=2) + "\n")
    staging.replace(path)


def first_epoch_reaching(curve: list[dict[str, float]], level: float) -> dict[str, float] | None:
    return next((c for c in curve if c["valid_ndcg@10"] >= level), None)


def table(results: dict[str, Any]) -> str:
    variants = results["variants"]
    base = variants.get("before", {}).get("median_epoch_seconds")
    epochs = sorted({c["epoch"] for v in variants.values() for c in v["curve"]})
    shown = [e for e in epochs if e <= 6 or e in (13, 25) or e == epochs[-1]]
    header = ["variant", *[f"ep {e}" for e in shown], "best ep", "test", "s/epoch", "speed-up"]
    header += ["peak RSS MiB", "min to 0.15"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, v in variants.items():
        by_epoch = {c["epoch"]: c["valid_ndcg@10"] for c in v["curve"]}
        reach = first_epoch_reaching(v["curve"], 0.15)
        cells = [f"{by_epoch[e]:.4f}" if e in by_epoch else "" for e in shown]
        speed = f"{base / v['median_epoch_seconds']:.2f}x" if base else ""
        cells += [
            str(v["best_epoch"]),
            f"{v['test_ndcg@10']:.4f}",
            f"{v['median_epoch_seconds']:.1f}",
            speed,
            f"{v['peak_rss_mib']:.0f}",
            f"{reach['elapsed_seconds'] / 60:.1f} (ep {reach['epoch']})" if reach else "-",
        ]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    mostpop = next(iter(variants.values()), {}).get("mostpop_test_ndcg@10")
    if mostpop is not None:
        lines.append(f"\nMostPop test NDCG@10: {mostpop:.4f} (same protocol)")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, v in results["variants"].items():
        epochs = [c["epoch"] for c in v["curve"]]
        style = "-" if name.startswith("after") or name == "before" else "--"
        ax.plot(epochs, [c["valid_ndcg@10"] for c in v["curve"]], style, marker=".", label=name)
    reference = SASREC_PLUS.get(results["name"])
    if reference:
        ax.scatter(
            list(reference), list(reference.values()), marker="*", s=150, c="k", label="SASRec+"
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation NDCG@10 (full ranking, history excluded)")
    ax.set_title(f"{results['name']}: convergence per epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.worker:
        print(json.dumps(run_worker(args.worker, args)))
        return
    out = Path(args.out)
    results = load_results(out)
    results["name"] = args.name or Path(args.data).name
    for name in args.variants.split(","):
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
        if name in results["variants"] and not args.redo:
            print(f"{name}: done before, skipped", flush=True)
            continue
        print(f"{name}: training", flush=True)
        command = [sys.executable, __file__, *sys.argv[1:], "--worker", name]
        done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
        results["variants"][name] = json.loads(done.stdout.strip().splitlines()[-1])
        save_results(out, results)
        plot(results, out.with_suffix(".png"))
    print(table(results))


if __name__ == "__main__":
    main()
