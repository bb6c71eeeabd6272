"""The exact Fisher's cost per sequence against the catalogue, against another version.

    python benchmarks/fisher_scale.py --items 77000 770000 --baseline-src /tmp/fishrec-before

The scale benchmark's model (benchmarks/scale.py: SASRec D 64, 2 layers,
max_len 50, freshly initialised, seed 0) over N items; 40 random histories of
50 items; the exact estimator (merging/fisher_exact.py). Each version runs in
its own process (PYTHONPATH = its checkout), one after the other on the same
machine, and writes its Fisher sums; printed per N: seconds per sequence of
each (after one warm-up sequence), their ratio, and the largest relative
difference of the two sums (per parameter: max |a - b| / max |a|), so a
speed-up that changed the numbers shows.

--estimators adds other estimators of the version under test (e.g.
truncated:1000), each timed the same way, with its relative error against that
version's exact Fisher (||F_e - F|| / ||F||). The model is freshly initialised,
so p is nearly uniform over the catalogue: the worst case for an estimator
that keeps the most probable items (benchmarks/fisher_truncation.py measures
one on trained models).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from results_file import write_results  # benchmarks/results_file.py

ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, nargs="+", default=[77_000, 770_000])
    parser.add_argument("--sequences", type=int, default=40)
    parser.add_argument(
        "--estimators", nargs="*", default=[], help="more than exact, e.g. truncated:1000"
    )
    parser.add_argument("--estimator", default="exact", help=argparse.SUPPRESS)  # the child's
    parser.add_argument("--baseline-src", type=Path, default=None, help="another checkout")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/fisher-scale.json"))
    parser.add_argument("--child", nargs=2, metavar=("N", "OUT"), help=argparse.SUPPRESS)
    return parser.parse_args()


def child(items: int, sequences: int, out: Path, estimator: str) -> None:
    """In the version under test: time one estimator's Fisher, save its sums."""
    # Its modules come from PYTHONPATH (its checkout), not from beside this script.
    if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
        sys.path.pop(0)
    import scale  # benchmarks/ of the version under test: its model
    import torch
    from safetensors.torch import save_file

    from merging.fisher import FisherConfig, compute_fisher

    torch.manual_seed(0)
    model = scale.new_model(items).eval()
    draw = torch.Generator().manual_seed(1)
    histories = [torch.randint(1, items, (50,), generator=draw).numpy() for _ in range(sequences)]
    compute_fisher(model, histories[:1], FisherConfig(estimator=estimator))  # warm-up
    start = time.perf_counter()
    result = compute_fisher(model, histories, FisherConfig(estimator=estimator))
    seconds = (time.perf_counter() - start) / sequences
    save_file({k: v.contiguous() for k, v in result.sums.items()}, str(out))
    out.with_suffix(".json").write_text(json.dumps({"seconds_per_sequence": seconds}))


def run(src: Path, items: int, sequences: int, out: Path, estimator: str = "exact") -> float:
    command = [sys.executable, str(Path(__file__).resolve()), "--estimator", estimator]
    command += ["--sequences", str(sequences), "--child", str(items), str(out)]
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{src / 'benchmarks'}"}
    subprocess.run(command, check=True, cwd=src, env=env)
    return json.loads(out.with_suffix(".json").read_text())["seconds_per_sequence"]


def largest_difference(a_path: Path, b_path: Path) -> float:
    from safetensors.torch import load_file

    a, b = load_file(str(a_path)), load_file(str(b_path))
    return max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-300)) for k in a)


def relative_error(estimate_path: Path, exact_path: Path) -> float:
    from safetensors.torch import load_file

    from merging.fisher_result import relative_error as error

    return error(load_file(str(estimate_path)), load_file(str(exact_path)))


def main() -> None:
    args = parse_args()
    if args.child:
        child(int(args.child[0]), args.sequences, Path(args.child[1]), args.estimator)
        return
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder:
        for items in args.items:
            row: dict[str, Any] = {"items": items}
            row["seconds"] = run(ROOT, items, args.sequences, Path(folder) / f"new-{items}.st")
            if args.baseline_src:
                base = Path(folder) / f"base-{items}.st"
                row["baseline_seconds"] = run(args.baseline_src, items, args.sequences, base)
                row["speedup"] = row["baseline_seconds"] / row["seconds"]
                row["largest_relative_difference"] = largest_difference(
                    base, Path(folder) / f"new-{items}.st"
                )
            for spec in args.estimators:
                out = Path(folder) / f"{spec.replace(':', '-')}-{items}.st"
                row[spec] = {"seconds": run(ROOT, items, args.sequences, out, spec)}
                row[spec]["relative_error"] = relative_error(out, Path(folder) / f"new-{items}.st")
            rows.append(row)
            print(json.dumps(row))
    write_results(args.json, args, rows=rows)


if __name__ == "__main__":
    main()
