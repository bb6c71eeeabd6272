"""Training and evaluation throughput, memory, and quality after N epochs.

    python benchmarks/train.py --data ../shared/data/ml-1m/ml-1m_5core_iclrec_format.txt \
        --backbone sasrec --max-len 200 --epochs 20

Prints sequences/s for training and evaluation, epoch time (medians), peak
memory, the validation/test metric table against MostPop, and two ratios
measured in the same run on the same batches:

- whole sequences padded per batch (fishrec) vs every batch padded to max_len;
- whole sequences vs RecBole-style prefix expansion (one sample per prefix),
  as the estimated time of one epoch.
"""

from __future__ import annotations

import argparse
import logging
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from training.batching import Batch, iterate_batches, pad_left
from training.config import ExperimentConfig
from training.evaluate import format_table
from training.prepare import load_data
from training.trainer import Trainer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="prepared data folder or raw log file")
    parser.add_argument("--backbone", choices=["bert4rec", "sasrec"], default="sasrec")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--max-len", type=int, default=200)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument(
        "--probe-batches", type=int, default=20, help="batches timed for the ratios"
    )
    parser.add_argument("--out", default="/tmp/fishrec-bench-train", help="run folder")
    return parser.parse_args()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step_seconds(trainer: Trainer, batches: list[Batch]) -> float:
    """Median seconds of one forward+backward+step over `batches`."""
    times = []
    for batch in batches:
        start = time.perf_counter()
        trainer.train_step(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def padding_ratio(trainer: Trainer, count: int) -> tuple[float, float]:
    """Step time with per-batch padding vs padding to max_len, on the same batches."""
    rng = np.random.default_rng(0)
    length = trainer.recipe.window_length()
    own = list(
        iterate_batches(trainer.train_sequences, trainer.cfg.batch_size, length, "last", rng)
    )[:count]
    full = []
    for batch in own:
        padded = torch.zeros(batch.items.shape[0], length, dtype=torch.long)
        padded[:, length - batch.items.shape[1] :] = batch.items
        full.append(Batch(padded, batch.index))
    return step_seconds(trainer, own), step_seconds(trainer, full)


def prefix_epoch_estimate(trainer: Trainer, count: int) -> tuple[float, int]:
    """Estimated seconds of one epoch when every prefix is its own sample (RecBole)."""
    rng = np.random.default_rng(0)
    length = trainer.recipe.window_length()
    sequences = trainer.train_sequences
    num_prefixes = int(sum(len(s) - 1 for s in sequences))
    batches = []
    for _ in range(count):
        rows = rng.integers(0, len(sequences), trainer.cfg.batch_size)
        prefixes = []
        for row in rows:
            seq = sequences[row]
            end = int(rng.integers(2, len(seq) + 1))
            prefixes.append(seq[:end][-length:])
        batches.append(Batch(pad_left(prefixes), torch.as_tensor(rows)))
    per_batch = step_seconds(trainer, batches)
    return per_batch * num_prefixes / trainer.cfg.batch_size, num_prefixes


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data = load_data(Path(args.data))
    load_seconds = time.perf_counter() - start
    config = ExperimentConfig.model_validate(
        {
            "model": {
                "backbone": args.backbone,
                "hidden_size": args.hidden,
                "num_layers": args.layers,
                "num_heads": args.heads,
                "max_len": args.max_len,
                "dropout": args.dropout,
                "attn_dropout": args.dropout,
            },
            "train": {
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "lr": args.lr,
                "patience": 1000,
                "progress": False,
            },
        }
    )
    trainer = Trainer(config, data, Path(args.out))
    result = trainer.fit()
    history = result.history
    epoch_seconds = statistics.median(e["seconds"] for e in history)
    train_rate = statistics.median(e["sequences_per_second"] for e in history)
    eval_seconds = statistics.median(e["eval_seconds"] for e in history if "eval_seconds" in e)
    eval_rate = len(trainer.split.valid) / eval_seconds
    own, padded = padding_ratio(trainer, args.probe_batches)
    prefix_epoch, num_prefixes = prefix_epoch_estimate(trainer, args.probe_batches)

    print(
        f"\n## {Path(args.data).name}: {data.num_users} users, {data.num_items} items, "
        f"{data.num_interactions} interactions (loaded in {load_seconds:.1f} s)"
    )
    print(
        f"backbone {args.backbone}, D={args.hidden}, {args.layers} layers, {args.heads} heads, "
        f"max_len {args.max_len}, batch {args.batch_size}, {args.epochs} epochs, "
        f"{torch.get_num_threads()} threads\n"
    )
    print("| figure | value |\n|---|---|")
    print(f"| epoch time (median) | {epoch_seconds:.1f} s |")
    print(f"| training sequences/s (median) | {train_rate:.0f} |")
    print(f"| evaluation users/s (valid, 3 settings) | {eval_rate:.0f} |")
    print(f"| peak RSS | {peak_rss_mib():.0f} MiB |")
    print(
        f"| step time, padded per batch / padded to max_len | {own * 1e3:.1f} / {padded * 1e3:.1f} ms "
        f"(x{padded / own:.2f} faster) |"
    )
    print(
        f"| epoch, whole sequences / prefix expansion ({num_prefixes} samples, estimated) | "
        f"{epoch_seconds:.1f} s / {prefix_epoch:.0f} s (x{prefix_epoch / epoch_seconds:.0f} faster) |"
    )
    print(f"| best epoch | {result.best_epoch} |")
    for part in ("valid", "test"):
        rows = {"model": result.metrics["model"][part], "mostpop": result.metrics["mostpop"][part]}
        print(f"\n{part} (history items excluded in full)\n{format_table(rows)}")


if __name__ == "__main__":
    main()
