"""How each stage's cost grows with the catalogue: data, training, Fisher, export, serving.

    python benchmarks/scale.py --items 10000 100000 1000000

For each catalogue size n it generates a synthetic log (training/synthetic.py,
`--users-per-item` users per item, Parquet in chunks), and measures:

- data: writing the log and `prepare` (reading it into a data folder);
- training: one optimiser step (batch 128, SASRec D64 L2, max_len 50) with the
  full softmax (chunked cross-entropy) and with sampled softmax (logQ, 1024
  popularity negatives), medians of a few steps; the model is freshly
  initialised: cost does not depend on what it learned;
- Fisher: the exact estimator per 256 sequences;
- export: `export_bundle` time and the size of model.onnx;
- onnxruntime: top-10 latency at batch 1 and 64 (medians);
- the service: `fishrec serve` on the bundle, its resident memory (all its
  processes) and req/s at 32 concurrent clients (benchmarks/serve_load.py's
  client).

It prints the table and, per stage, the growth exponent a of cost ~ n^a fitted
by least squares on log-log, and writes them to --json. Each size's figures are
kept in --work and reused when the benchmark is run again (delete to remeasure).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from merging.export import export_bundle
from merging.fisher import FisherConfig, compute_fisher
from merging.onnx_graph import OnnxRecommender
from training.batching import iterate_batches
from training.checkpoint import write_checkpoint
from training.config import TrainConfig
from training.data_parallel import Objective
from training.interactions import ColumnNames
from training.model import ModelConfig, build_model
from training.optimizer import build_optimizer, clip_gradients
from training.prepare import prepare
from training.recipes import build_recipe
from training.sequence_data import SequenceData
from training.synthetic import SyntheticConfig
from training.synthetic_log import write_parquet

sys.path.insert(0, str(Path(__file__).parent))
import serve_load  # the load client and server helpers of the serving benchmark

log = logging.getLogger("scale")
BATCH, MAX_LEN, HIDDEN = 128, 50, 64
STAGES = {  # key -> (label, unit)
    "generate_s": ("write synthetic log", "s"),
    "prepare_s": ("prepare data folder", "s"),
    "step_full_s": ("train step, full softmax", "s"),
    "step_sampled_s": ("train step, sampled 1024", "s"),
    "fisher_256_s": ("exact Fisher / 256 seq", "s"),
    "export_s": ("export bundle", "s"),
    "onnx_mb": ("model.onnx size", "MB"),
    "ort_b1_ms": ("onnxruntime top-10, batch 1", "ms"),
    "ort_b64_ms": ("onnxruntime top-10, batch 64", "ms"),
    "serve_rss_mb": ("service RSS", "MB"),
    "serve_rps": ("service req/s at c=32", "req/s"),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_catalogue_flags(parser)
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per loss")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of HTTP load")
    parser.add_argument("--work", default="/tmp/fishrec-bench-scale")
    parser.add_argument("--json", default="benchmarks/results/scale.json")
    return parser.parse_args()


def add_catalogue_flags(parser: argparse.ArgumentParser) -> None:
    """The synthetic catalogues' sizes and shape (`make_data`), for the benchmarks that reuse them."""
    parser.add_argument("--items", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--users-per-item", type=float, default=0.2)
    parser.add_argument("--mean-length", type=float, default=20.0)


def timed(function: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = function()
    return time.perf_counter() - start, value


def median_seconds(function: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        function()
    return statistics.median(timed(function)[0] for _ in range(repeats))


# ---- the stages ---------------------------------------------------------------------------------


def synthetic_config(args: argparse.Namespace, items: int, users: int) -> SyntheticConfig:
    return SyntheticConfig(
        num_users=users,
        num_items=items,
        num_topics=max(24, items // 1000),
        mean_length=args.mean_length,
        max_length=int(4 * args.mean_length),
        zipf_exponent=0.8,  # a long tail that still touches most of the catalogue
    )


def make_data(args: argparse.Namespace, items: int, folder: Path) -> tuple[dict, SequenceData]:
    users = max(1000, int(items * args.users_per_item))
    config = synthetic_config(args, items, users)
    log_folder = folder / "log"
    generate_s, _ = timed(lambda: write_parquet(config, log_folder))
    prepare_s, _ = timed(lambda: prepare(log_folder, folder / "data", "auto", None, ColumnNames()))
    data = SequenceData.load(folder / "data")
    shutil.rmtree(log_folder)
    figures = {
        "users": data.num_users,
        "catalogue": data.num_items,
        "interactions": data.num_interactions,
        "generate_s": generate_s,
        "prepare_s": prepare_s,
    }
    return figures, data


def new_model(num_items: int):  # type: ignore[no-untyped-def]
    config = ModelConfig(
        num_items=num_items,
        hidden_size=HIDDEN,
        num_layers=2,
        num_heads=2,
        max_len=MAX_LEN,
        backbone="sasrec",
        feature_dim=0,
    )
    return build_model(config, seed=0)


def step_seconds(
    data: SequenceData, params: dict[str, Any], steps: int, sparse: bool = False
) -> float:
    """Median seconds of one optimiser step (loss, backward, clip, AdamW).

    sparse: `train.sparse_items` (sparse item-table gradients, lazy Adam for the table).
    """
    model = new_model(data.num_items).train()
    train = [seq for seq in data.split().train if len(seq) >= 2]
    recipe = build_recipe("sasrec", params, model.config, train, None)
    model.item_embedding.sparse = sparse
    table = model.item_embedding.weight if sparse else None
    optimizer = build_optimizer([model, recipe], TrainConfig(), None, table)
    objective = Objective(model, recipe)
    rng = np.random.default_rng(0)
    batches = iterate_batches(train, BATCH, MAX_LEN + 1, "last", rng)

    def step() -> None:
        loss = objective(next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(list(model.parameters()), 5.0)
        optimizer.step()

    return median_seconds(step, steps)


def fisher_seconds(data: SequenceData, model: Any, count: int = 32) -> float:
    sequences = [seq[-(MAX_LEN + 1) :] for seq in data.split().train if len(seq) >= 2][:count]
    seconds, _ = timed(lambda: compute_fisher(model, sequences, FisherConfig(estimator="exact")))
    return seconds * 256 / len(sequences)


def export_figures(data: SequenceData, model: Any, folder: Path) -> tuple[dict, Path]:
    checkpoint = folder / "checkpoint"
    info = {"recipe": "sasrec", "data_fingerprint": data.fingerprint}
    write_checkpoint(checkpoint, model, model.config, info)
    bundle = folder / "artifacts" / "runs" / "scale"
    shutil.rmtree(bundle, ignore_errors=True)
    seconds, _ = timed(lambda: export_bundle(checkpoint, bundle, data, parity_sequences=64))
    (folder / "artifacts" / "LATEST").write_text("scale\n")
    return {"export_s": seconds, "onnx_mb": (bundle / "model.onnx").stat().st_size / 1e6}, bundle


def onnx_latency(data: SequenceData, bundle: Path) -> dict[str, float]:
    graph = OnnxRecommender(bundle / "model.onnx", data.num_items)
    histories = [seq[-MAX_LEN:] for seq in data.sequences[:64]]
    figures = {}
    for batch in (1, 64):
        ids = np.zeros((batch, MAX_LEN), dtype=np.int64)
        for row, seq in enumerate(histories[:batch]):
            ids[row, MAX_LEN - len(seq) :] = seq
        exclude = np.ones(batch, dtype=np.bool_)
        figures[f"ort_b{batch}_ms"] = 1000 * median_seconds(
            lambda ids=ids, exclude=exclude: graph.run(ids, 10, exclude), repeats=20, warmup=3
        )
    return figures


def process_tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo += children.get(current, [])
        try:
            status = Path(f"/proc/{current}/status").read_text()
        except OSError:
            continue
        total += next(
            (int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS")), 0
        )
    return total / 1024


def serve_figures(
    args: argparse.Namespace, data: SequenceData, artifacts: Path
) -> dict[str, float]:
    port = serve_load.free_port()
    command = serve_load.serve_command(artifacts, port)
    env = {
        "FISHREC_API_KEY": "bench",
        "FISHREC_RELOAD_INTERVAL_S": "0",
        "FISHREC_MAX_QUEUE": "4096",
    }
    server = serve_load.Server("fishrec", command, port, env)
    headers = {"X-API-Key": "bench"}
    payloads = artifacts.parent / "payloads.jsonl"
    histories = serve_load.write_payloads(data, MAX_LEN, payloads)
    try:
        server.wait_ready(json.dumps({"items": histories[0], "k": 10}).encode(), headers)
        result = serve_load.load(port, payloads, args.duration, headers, concurrency=32)
        return {"serve_rss_mb": process_tree_rss_mb(server.process.pid), "serve_rps": result["rps"]}
    finally:
        server.stop()


def cached(folder: Path, compute: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """The figures of `folder` (figures.json) if measured before, else computed there now."""
    done = folder / "figures.json"
    if done.exists():
        return json.loads(done.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    figures = compute(folder)
    done.write_text(json.dumps(figures, indent=2))
    return figures


def measure(args: argparse.Namespace, items: int) -> dict[str, Any]:
    return cached(Path(args.work) / f"n{items}", lambda folder: measure_in(args, items, folder))


def measure_in(args: argparse.Namespace, items: int, folder: Path) -> dict[str, Any]:
    log.info("n = %d: data", items)
    figures, data = make_data(args, items, folder)
    log.info("n = %d: training steps", items)
    figures["step_full_s"] = step_seconds(data, {}, args.steps)
    figures["step_sampled_s"] = step_seconds(
        data, {"negatives": 1024, "sampler": "popularity"}, args.steps
    )
    model = new_model(data.num_items).eval()
    log.info("n = %d: Fisher", items)
    figures["fisher_256_s"] = fisher_seconds(data, model)
    log.info("n = %d: export", items)
    exported, bundle = export_figures(data, model, folder)
    figures |= exported
    figures |= onnx_latency(data, bundle)
    log.info("n = %d: service", items)
    figures |= serve_figures(args, data, bundle.parent.parent)
    log.info("n = %d: %s", items, figures)
    return figures


def growth_exponent(sizes: list[float], costs: list[float]) -> float:
    """a of cost ~ n^a: the least-squares slope on log-log."""
    if len(sizes) < 2:
        return float("nan")
    return float(np.polyfit(np.log(sizes), np.log(costs), 1)[0])


DERIVED = {  # what a user waits for, from the measured figures (minutes)
    "epoch_full_min": (
        "epoch, full softmax (min)",
        lambda r: r["users"] / BATCH * r["step_full_s"] / 60,
    ),
    "epoch_sampled_min": (
        "epoch, sampled 1024 (min)",
        lambda r: r["users"] / BATCH * r["step_sampled_s"] / 60,
    ),
    "fisher_job_min": (
        "exact Fisher, job's 2000 seq (min)",
        lambda r: r["fisher_256_s"] * 2000 / 256 / 60,
    ),
}


def report(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Print the table; returns each stage's exponent over all sizes and over the last two."""
    sizes = [row["catalogue"] for row in rows]
    print(
        f"{'stage':<36}" + "".join(f"{f'n={n:,}':>13}" for n in sizes) + f"{'a':>7}{'a last2':>9}"
    )
    print(f"{'users':<36}" + "".join(f"{r['users']:>13,}" for r in rows))
    print(f"{'interactions':<36}" + "".join(f"{r['interactions']:>13,}" for r in rows))
    lines = [
        (key, label, unit, [row[key] for row in rows]) for key, (label, unit) in STAGES.items()
    ]
    lines += [(key, label, "", [f(row) for row in rows]) for key, (label, f) in DERIVED.items()]
    exponents = {}
    for key, label, unit, values in lines:
        exponents[key] = {
            "all": growth_exponent(sizes, values),
            "last_two": growth_exponent(sizes[-2:], values[-2:]),
        }
        title = f"{label} ({unit})" if unit else label
        cells = "".join(f"{v:>13.4g}" for v in values)
        print(f"{title:<36}{cells}{exponents[key]['all']:>7.2f}{exponents[key]['last_two']:>9.2f}")
    return exponents


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Log-log cost per stage against the catalogue, relative to the smallest size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = np.array([row["catalogue"] for row in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    keys = ["prepare_s", "step_full_s", "step_sampled_s", "fisher_256_s", "export_s"]
    keys += ["ort_b1_ms", "ort_b64_ms", "serve_rss_mb"]
    for key in keys:
        values = np.array([row[key] for row in rows], dtype=float)
        ax.loglog(sizes, values / values[0], marker="o", label=STAGES[key][0])
    rps = np.array([row["serve_rps"] for row in rows], dtype=float)
    ax.loglog(sizes, rps[0] / rps, marker="s", linestyle="--", label="service 1 / (req/s)")
    ax.loglog(sizes, sizes / sizes[0], color="grey", linewidth=3, alpha=0.3, label="∝ n")
    ax.set_xlabel("items in the catalogue (n)")
    ax.set_ylabel("cost relative to the smallest catalogue")
    ax.set_title("fishrec: cost of each stage against the catalogue (2 CPU cores)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    rows = [measure(args, items) for items in args.items]
    exponents = report(rows)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    if len(rows) > 1:
        plot(rows, Path(args.json).with_suffix(".png"))
    Path(args.json).write_text(
        json.dumps(
            {"settings": vars(args), "rows": rows, "exponents": exponents},
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
