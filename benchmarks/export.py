"""Latency of the exported graph: onnxruntime (float, int8) versus torch eager.

    python benchmarks/export.py --data ../shared/data/ml-1m/ml-1m_5core_iclrec_format.txt \
        --threads 1 --budget 600

For batch sizes 1, 8, 64 and history lengths 50 and 200 it times one call of
the inference path (scores of every item, history excluded, top-10) on real
histories of the data: torch eager (`TopKRecommender` under inference_mode),
the float ONNX graph and the int8 graph, in the same process with the same
thread count set explicitly for torch and onnxruntime. The three engines run
in turn on the same batches, so load on the machine hits them alike. Prints
the median milliseconds per batch, the ratios torch / onnxruntime (> 1: the
graph is faster), the file sizes, and how far each graph's scores are from
torch's on the timed batches.

Without --checkpoint the model is freshly initialised (latency does not depend
on the weights; the int8 graph's quality does, so its NDCG change is reported
only for a trained --checkpoint).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from merging.export_parity import ndcg_at_10, score_diff
from merging.onnx_graph import OnnxRecommender, TopKRecommender, export_onnx, torch_scores
from merging.quantize import quantize_int8
from training.config import DataSpec
from training.evaluate import Evaluator
from training.model import ModelConfig, SequenceRecommender, build_model
from training.run_folder import load_run_checkpoint
from training.sources import load_source
from training.splits import Split

BATCH_SIZES = (1, 8, 64)
LENGTHS = (50, 200)
K = 10


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", required=True, help="prepared data folder, raw file or 'synthetic'"
    )
    parser.add_argument("--checkpoint", default=None, help="trained checkpoint or run folder")
    parser.add_argument("--backbone", choices=["bert4rec", "sasrec"], default="sasrec")
    parser.add_argument("--max-len", type=int, default=200, help="model max_len (no checkpoint)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size (no checkpoint)")
    parser.add_argument("--layers", type=int, default=2, help="blocks (no checkpoint)")
    parser.add_argument("--heads", type=int, default=2, help="attention heads (no checkpoint)")
    parser.add_argument("--threads", type=int, default=1, help="threads of torch and onnxruntime")
    parser.add_argument("--budget", type=float, default=300, help="seconds of timing in all")
    parser.add_argument("--max-reps", type=int, default=200, help="timed calls per cell at most")
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    return parser.parse_args()


def load_model(args: argparse.Namespace, num_items: int) -> SequenceRecommender:
    if args.checkpoint:
        return load_run_checkpoint(Path(args.checkpoint)).model.eval()
    config = ModelConfig(
        num_items=num_items,
        backbone=args.backbone,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        max_len=args.max_len,
    )
    return build_model(config, seed=0).eval()


def batch_of(
    histories: list[np.ndarray], batch: int, length: int, rng: np.random.Generator
) -> np.ndarray:
    """(batch, length) newest items of random users with at least `length` items (else the longest)."""
    pool = [h for h in histories if len(h) >= length] or sorted(histories, key=len)[-batch:]
    rows = [pool[i][-length:] for i in rng.integers(len(pool), size=batch)]
    out = np.zeros((batch, length), dtype=np.int64)
    for r, row in enumerate(rows):
        out[r, length - len(row) :] = row
    return out


def time_engines(
    engines: dict[str, Callable[[], object]], seconds: float, max_reps: int
) -> dict[str, float]:
    """Median seconds per call of each engine, called in rotating turns until the budget is spent."""
    for call in engines.values():  # warm-up: allocations, first-run graph optimisation
        call()
    times: dict[str, list[float]] = {name: [] for name in engines}
    names = list(engines)
    start = time.perf_counter()
    rep = 0
    while rep < 3 or (rep < max_reps and time.perf_counter() - start < seconds):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            begin = time.perf_counter()
            engines[name]()
            times[name].append(time.perf_counter() - begin)
        rep += 1
    return {name: statistics.median(values) for name, values in times.items()}


def measure_cell(
    model: SequenceRecommender,
    graphs: dict[str, OnnxRecommender],
    item_ids: np.ndarray,
    seconds: float,
    max_reps: int,
) -> dict:
    """Median ms per batch of torch and each graph on `item_ids`, and the graphs' score error."""
    eager = TopKRecommender(model).eval()
    exclude = np.ones(len(item_ids), dtype=np.bool_)
    ids_t, exclude_t = torch.from_numpy(item_ids), torch.from_numpy(exclude)
    k = min(K, model.config.num_items)
    k_t = torch.tensor([k])

    def run_torch() -> object:
        with torch.inference_mode():
            return eager(ids_t, k_t, exclude_t)

    engines: dict[str, Callable[[], object]] = {"torch": run_torch}
    for name, graph in graphs.items():
        engines[name] = lambda graph=graph: graph.run(item_ids, k, exclude)
    medians = time_engines(engines, seconds, max_reps)
    expected = torch_scores(model, ids_t, exclude_t).numpy()
    return {
        "batch": item_ids.shape[0],
        "length": item_ids.shape[1],
        "ms": {name: 1e3 * value for name, value in medians.items()},
        "max_abs_diff": {
            name: score_diff(graph.all_scores(item_ids, exclude), expected)
            for name, graph in graphs.items()
        },
    }


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    data = load_source(DataSpec(path=args.data))
    split = data.split()
    model = load_model(args, data.num_items)
    print(
        f"data {args.data}: {data.num_users} users, {data.num_items} items; model "
        f"{model.config.backbone} hidden {model.config.hidden_size} layers "
        f"{model.config.num_layers} max_len {model.config.max_len}; threads {args.threads}"
    )
    with tempfile.TemporaryDirectory(prefix="fishrec-bench-export-") as folder:
        result = run(args, model, split, Path(folder))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


def run(args: argparse.Namespace, model: SequenceRecommender, split: Split, folder: Path) -> dict:
    """Export into `folder`, time every cell, print the table; return the figures."""
    num_items = model.config.num_items
    began = time.perf_counter()
    export_onnx(model, folder / "model.onnx")
    exported = time.perf_counter() - began
    quantize_int8(folder / "model.onnx", folder / "model.int8.onnx")
    sizes = {
        name: (folder / name).stat().st_size / 2**20 for name in ("model.onnx", "model.int8.onnx")
    }
    print(
        f"export {exported:.1f} s; model.onnx {sizes['model.onnx']:.2f} MiB, "
        f"model.int8.onnx {sizes['model.int8.onnx']:.2f} MiB"
    )
    graphs = {
        "onnx float": OnnxRecommender(folder / "model.onnx", num_items, threads=args.threads),
        "onnx int8": OnnxRecommender(folder / "model.int8.onnx", num_items, threads=args.threads),
    }
    rng = np.random.default_rng(0)
    cell_seconds = args.budget / (len(BATCH_SIZES) * len(LENGTHS))
    rows = [
        measure_cell(
            model,
            graphs,
            batch_of(split.test.histories, batch, length, rng),
            cell_seconds,
            args.max_reps,
        )
        for length in LENGTHS
        for batch in BATCH_SIZES
    ]
    print_table(rows)
    result = {"threads": args.threads, "sizes_mib": sizes, "export_seconds": exported, "rows": rows}
    if args.checkpoint:
        evaluator = Evaluator(split)
        change = ndcg_at_10(graphs["onnx int8"], evaluator) - ndcg_at_10(
            graphs["onnx float"], evaluator
        )
        print(f"int8 NDCG@10 change (full, test): {change:+.4f}")
        result["int8_ndcg@10_change"] = change
    return result


def print_table(rows: list[dict]) -> None:
    print(
        "\n| batch | length | torch ms | onnx float ms | onnx int8 ms | torch/float | torch/int8 "
        "| float max diff | int8 max diff |"
    )
    print("|" + "---|" * 9)
    for row in rows:
        ms, diff = row["ms"], row["max_abs_diff"]
        print(
            f"| {row['batch']} | {row['length']} | {ms['torch']:.2f} | {ms['onnx float']:.2f} | "
            f"{ms['onnx int8']:.2f} | {ms['torch'] / ms['onnx float']:.2f}x | "
            f"{ms['torch'] / ms['onnx int8']:.2f}x | {diff['onnx float']:.1e} | {diff['onnx int8']:.1e} |"
        )


if __name__ == "__main__":
    main()
