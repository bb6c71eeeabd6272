"""The plain route of two revisions of the service, interleaved: is a change slower?

    git worktree add /tmp/old 399ca88
    python benchmarks/serve_ab.py --data DIR --old /tmp/old --reps 4

Exports a fresh SASRec (D 64, 2 layers, 2 heads, max_len 50) on --data with
each revision's own code (its bundle format), then alternates the two servers
(old, new, old, new, ...), each loaded at 32 concurrent clients for --duration
seconds by benchmarks/serve_load.py's client, and prints each run, the medians
and the median of the paired ratios new/old. Alternating makes the noise of a
shared machine fall on both sides alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import serve_load

EXPORT = """
import sys
from pathlib import Path
from merging.export import export_bundle
from training.checkpoint import write_checkpoint
try:
    from training.prepare import load_data
except ImportError:  # a revision from before training/data.py was split
    from training.data import load_data
from training.model import ModelConfig, build_model
data = load_data(sys.argv[1])
config = ModelConfig(num_items=data.num_items, backbone="sasrec", hidden_size=64,
                     num_layers=2, num_heads=2, max_len=50)
model = build_model(config, seed=0).eval()
root = Path(sys.argv[2])
info = {"recipe": "sasrec", "data_fingerprint": data.fingerprint}
write_checkpoint(root / "checkpoint", model, config, info)
export_bundle(root / "checkpoint", root / "artifacts" / "runs" / "bench", data, parity_sequences=64)
(root / "artifacts" / "LATEST").write_text("bench\\n")
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="prepared data folder")
    parser.add_argument("--old", required=True, help="a checkout of the other revision")
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--work", default="/tmp/fishrec-bench-serve-ab")
    parser.add_argument("--json", default=None, help="write the figures here")
    return parser.parse_args()


def code_env(name: str, old: str) -> dict[str, str]:
    return {"PYTHONPATH": old} if name == "old" else {}


def main() -> None:
    args = parse_args()
    work = Path(args.work)
    for name in ("old", "new"):
        if not (work / name / "artifacts" / "LATEST").exists():
            env = {**os.environ, **code_env(name, args.old)}
            command = [sys.executable, "-c", EXPORT, args.data, str(work / name)]
            subprocess.run(command, check=True, env=env, cwd=work.parent)
    from training.prepare import load_data

    payloads = work / "payloads.jsonl"
    histories = serve_load.write_payloads(load_data(args.data), 50, payloads)
    body = json.dumps({"items": histories[0], "k": 10}).encode()
    headers = {"X-API-Key": "bench"}
    rps: dict[str, list[float]] = {"old": [], "new": []}
    for rep in range(args.reps):
        for name in ("old", "new"):
            port = serve_load.free_port()
            env = {
                "FISHREC_API_KEY": "bench",
                "FISHREC_RELOAD_INTERVAL_S": "0",
                "FISHREC_MAX_QUEUE": "4096",
                "FISHREC_MAX_BATCH_SIZE": "64",
                "FISHREC_MAX_WAIT_MS": "0",
                "FISHREC_MODEL_PROCESS": "true",
                **code_env(name, args.old),
            }
            # INFO logs every request, as serve_load.py's figures do.
            command = serve_load.serve_command(work / name / "artifacts", port)
            server = serve_load.Server(name, command, port, env)
            try:
                server.wait_ready(body, headers)
                result = serve_load.load(port, payloads, args.duration, headers, concurrency=32)
            finally:
                server.stop()
            rps[name].append(result["rps"])
            print(f"rep {rep} {name}: {result['rps']:.0f} req/s", flush=True)
    ratios = [new / old for old, new in zip(rps["old"], rps["new"], strict=True)]
    summary = {
        "old_rps": rps["old"],
        "new_rps": rps["new"],
        "old_median": statistics.median(rps["old"]),
        "new_median": statistics.median(rps["new"]),
        "paired_ratio_median": statistics.median(ratios),
    }
    print(
        f"old median {summary['old_median']:.0f} req/s, new median {summary['new_median']:.0f} "
        f"req/s, new/old paired ratio median {summary['paired_ratio_median']:.3f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
