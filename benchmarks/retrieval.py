"""ANN retrieval against exact scoring on large catalogues: recall, req/s, latency, memory.

    python benchmarks/retrieval.py --items 770000 --duration 10

For each catalogue size it generates a synthetic log (benchmarks/scale.py's
generator), builds a SASRec model (D64, 2 layers, max_len 50) and, with
--train-steps, trains it that many sampled-softmax steps (a freshly
initialised model has unstructured item vectors: the hard case for an ANN
index), exports one bundle with retrieval/ (merging/retrieval_export.py), and
measures, in the same run:

- the export's seconds with and without the index, and the bundle's size;
- recall@10 of the service's retrieval path (serving/retrieval.py) against
  exact top-10 (model.onnx) on test histories (history excluded), for several
  shortlist sizes;
- `fishrec serve` with FISHREC_RETRIEVAL=exact and =auto (the index): req/s
  at 32 concurrent clients, then p50/p99 at half of that saturating load
  (open loop), and the service's resident memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import scale  # the catalogue generator, the model and the process memory of the scale benchmark
import serve_load  # the load client and server helpers of the serving benchmark

from merging.export import export_bundle
from serving.bundle import load_bundle
from serving.retrieval import RetrievalModel
from serving.runtime import OnnxModel, Row
from training.batching import iterate_batches
from training.checkpoint import write_checkpoint
from training.config import TrainConfig
from training.data_parallel import Objective
from training.optimizer import build_optimizer
from training.recipes import build_recipe

log = logging.getLogger("benchmarks.retrieval")
SHORTLISTS = (50, 100, 200, 400)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, nargs="+", default=[770_000])
    parser.add_argument("--users-per-item", type=float, default=0.05)
    parser.add_argument("--mean-length", type=float, default=20.0)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--queries", type=int, default=500, help="histories of the recall check")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load run")
    parser.add_argument("--work", default="/tmp/fishrec-retrieval")
    parser.add_argument("--json", default=None)
    return parser.parse_args()


def trained_model(data: Any, steps: int) -> torch.nn.Module:
    """The scale benchmark's model after `steps` sampled-softmax steps (structure in W)."""
    model = scale.new_model(data.num_items).train()
    train = [seq for seq in data.split().train if len(seq) >= 2]
    params = {"negatives": 1024, "sampler": "popularity"}
    recipe = build_recipe("sasrec", params, model.config, train, None)
    optimizer = build_optimizer([model, recipe], TrainConfig())
    objective = Objective(model, recipe)
    rng = np.random.default_rng(0)

    def batches() -> Any:
        while True:  # epoch after epoch
            yield from iterate_batches(train, scale.BATCH, scale.MAX_LEN + 1, "last", rng)

    stream = batches()
    for step in range(steps):
        loss = objective(next(stream))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            log.info("step %d/%d: loss %.3f", step, steps, float(loss))
    return model.eval()


def export(data: Any, model: Any, folder: Path) -> dict[str, Any]:
    checkpoint = folder / "checkpoint"
    write_checkpoint(
        checkpoint, model, model.config, {"recipe": "sasrec", "data_fingerprint": data.fingerprint}
    )
    figures = {}
    for name, threshold in (("exact", None), ("ann", 1)):
        bundle = folder / f"artifacts-{name}" / "runs" / name
        start = time.perf_counter()
        export_bundle(checkpoint, bundle, data, parity_sequences=64, retrieval_min_items=threshold)
        figures[f"export_{name}_s"] = time.perf_counter() - start
        figures[f"bundle_{name}_mb"] = (
            sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file()) / 1e6
        )
        (bundle.parent.parent / "LATEST").write_text(f"{name}\n")
    return figures


def recall(data: Any, folder: Path, queries: int) -> dict[str, Any]:
    """recall@10 against model.onnx's exact top-10, and per-row ms, per shortlist size."""
    bundle_folder = folder / "artifacts-ann" / "runs" / "ann"
    bundle = load_bundle(bundle_folder)
    rows = [Row(h[-scale.MAX_LEN :], 10, True) for h in data.split().test.histories if len(h)][
        :queries
    ]
    exact = OnnxModel(bundle_folder / "model.onnx", bundle.num_items, 2, 1, bundle.max_history)
    start = time.perf_counter()
    truth = [set(a.ids.tolist()) for a in exact.run(rows)]
    out: dict[str, Any] = {"exact_ms_per_row": 1000 * (time.perf_counter() - start) / len(rows)}
    for shortlist in SHORTLISTS:
        ann = RetrievalModel(
            bundle_folder, bundle.num_items, 2, 1, bundle.max_history, shortlist, 128
        )
        start = time.perf_counter()
        got = ann.run(rows)
        seconds = time.perf_counter() - start
        hits = [len(truth[i] & set(a.ids.tolist())) / 10 for i, a in enumerate(got)]
        out[f"recall@10_s{shortlist}"] = float(np.mean(hits))
        out[f"ann_ms_per_row_s{shortlist}"] = 1000 * seconds / len(rows)
    return out


def serve(data: Any, folder: Path, name: str, mode: str, duration: float) -> dict[str, Any]:
    artifacts = folder / f"artifacts-{name}"
    port = serve_load.free_port()
    env = {
        "FISHREC_API_KEY": "bench",
        "FISHREC_RELOAD_INTERVAL_S": "0",
        "FISHREC_MAX_QUEUE": "4096",
        "FISHREC_RETRIEVAL": mode,
    }
    server = serve_load.Server(
        f"fishrec-{mode}", serve_load.serve_command(artifacts, port), port, env
    )
    headers = {"X-API-Key": "bench"}
    payloads = folder / "payloads.jsonl"
    histories = serve_load.write_payloads(data, scale.MAX_LEN, payloads)
    try:
        server.wait_ready(
            json.dumps({"items": histories[0], "k": 10}).encode(), headers, timeout=600
        )
        saturated = serve_load.load(port, payloads, duration, headers, concurrency=32)
        half = serve_load.load(port, payloads, duration, headers, rate=saturated["rps"] / 2)
        return {
            "rps_c32": saturated["rps"],
            "half_load_rps": saturated["rps"] / 2,
            "half_load_p50_ms": half["p50_ms"],
            "half_load_p99_ms": half["p99_ms"],
            "errors": saturated["errors"] + half["errors"],
            "rss_mb": scale.process_tree_rss_mb(server.process.pid),
        }
    finally:
        server.stop()


def measure(args: argparse.Namespace, items: int) -> dict[str, Any]:
    folder = Path(args.work) / f"n{items}"
    done = folder / "figures.json"
    if done.exists():
        return json.loads(done.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    scale_args = argparse.Namespace(
        users_per_item=args.users_per_item, mean_length=args.mean_length
    )
    log.info("n = %d: data", items)
    figures, data = scale.make_data(scale_args, items, folder)
    log.info("n = %d: model (%d training steps)", items, args.train_steps)
    model = trained_model(data, args.train_steps)
    figures |= export(data, model, folder)
    log.info("n = %d: recall", items)
    figures |= recall(data, folder, args.queries)
    for name, mode in (("exact", "exact"), ("ann", "auto")):
        log.info("n = %d: service, %s", items, mode)
        figures[f"serve_{name}"] = serve(data, folder, name, mode, args.duration)
    figures["rps_ratio"] = figures["serve_ann"]["rps_c32"] / figures["serve_exact"]["rps_c32"]
    done.write_text(json.dumps(figures, indent=2))
    return figures


def table(rows: dict[int, dict[str, Any]]) -> str:
    lines = [
        "| items | recall@10 (shortlist 50/100/200/400) | exact req/s | ANN req/s | ratio | ANN p50/p99 ms at half load | exact p99 ms | RSS MB exact/ANN | export s exact/ANN |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for f in rows.values():
        recalls = "/".join(f"{f[f'recall@10_s{s}']:.3f}" for s in SHORTLISTS)
        e, a = f["serve_exact"], f["serve_ann"]
        lines.append(
            f"| {f['catalogue']} | {recalls} | {e['rps_c32']:.0f} | {a['rps_c32']:.0f} | "
            f"{f['rps_ratio']:.1f}x | {a['half_load_p50_ms']:.1f}/{a['half_load_p99_ms']:.1f} | "
            f"{e['half_load_p99_ms']:.1f} | {e['rss_mb']:.0f}/{a['rss_mb']:.0f} | "
            f"{f['export_exact_s']:.0f}/{f['export_ann_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(2)
    rows = {items: measure(args, items) for items in args.items}
    print(table(rows))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"settings": vars(args), "rows": rows}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
