"""Peak memory and time of `fishrec data prepare` against the size of the log.

    python benchmarks/prepare_scale.py --users 250000 1000000 2500000 10000000 \\
        --baseline-src /tmp/fishrec-before --baseline-max-users 1000000

For each number of users it writes a synthetic log (training/synthetic_log.py:
Parquet files of 10,000 users, ~20 interactions each, a catalogue of --items
items, timestamps), then runs `fishrec data prepare` on it in a child process
and reports the wall time and the child's own peak resident memory (wait4's
ru_maxrss), with the growth exponent a of cost ~ interactions^a over the sizes.
With --baseline-src (a checkout of another version, e.g. a `git worktree` of
the commit before), the same logs up to --baseline-max-users are also prepared
by that version, in the same run, so the table carries the ratio; the two
folders' fingerprints must agree.

Drawing the log is slower than preparing it (about 6 minutes per million users
on one core here). --tile K writes the logs of more than --tile-above users as
K copies of the log of users/K users, each copy's users renumbered (copy c's
user uN becomes u(N + c * users/K)): a log of that many distinct users and
interactions, with each behaviour K times over, for the price of one copy (the
row says tile K; the prepare step does not depend on what users do, only on how
many rows, users and items there are).

Logs and figures are kept in --work and reused when run again (delete a size's
folder to remeasure); each size's row goes to --json as soon as it exists.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from results_file import write_results  # benchmarks/results_file.py

from training.synthetic import SyntheticConfig
from training.synthetic_log import write_parquet

log = logging.getLogger("benchmarks.prepare_scale")
ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--items", type=int, default=1_000_000, help="catalogue of the generator")
    parser.add_argument("--mean-length", type=float, default=20.0)
    parser.add_argument("--k-core", type=int, default=None, help="prepare with this k-core")
    parser.add_argument("--tile", type=int, default=1, help="copies of a smaller log (see above)")
    parser.add_argument("--tile-above", type=int, default=2_500_000, help="users: tile above this")
    parser.add_argument("--baseline-src", type=Path, default=None, help="another checkout")
    parser.add_argument("--baseline-max-users", type=int, default=1_000_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/fishrec-bench-prepare"))
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/prepare-scale.json"))
    return parser.parse_args()


def synthetic_log(args: argparse.Namespace, users: int) -> tuple[Path, dict[str, Any]]:
    """The log of `users` users (written once, kept in --work)."""
    folder = args.work / f"log-u{users}-n{args.items}"
    done = folder.with_suffix(".json")
    if not done.exists():
        config = SyntheticConfig(  # benchmarks/scale.py's large catalogues
            num_users=users,
            num_items=args.items,
            num_topics=max(24, args.items // 1000),
            mean_length=args.mean_length,
            max_length=int(4 * args.mean_length),
            zipf_exponent=0.8,
        )
        start = time.perf_counter()
        written = write_parquet(config, folder, progress=_progress(users))
        facts = {"interactions": written.rows, "log_mb": written.bytes / 1e6}
        facts["generate_s"] = time.perf_counter() - start
        done.write_text(json.dumps(facts))
    return folder, json.loads(done.read_text())


def tiled_log(args: argparse.Namespace, users: int) -> tuple[Path, dict[str, Any]]:
    """`users` users as --tile renumbered copies of the log of users / --tile users."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from training.files import atomic_directory

    if users % args.tile:
        raise SystemExit(f"--tile {args.tile} does not divide {users} users")
    drawn = users // args.tile
    source, facts = synthetic_log(args, drawn)
    folder = args.work / f"log-u{users}-n{args.items}-tile{args.tile}"
    done = folder.with_suffix(".json")
    if not done.exists():
        start, size = time.perf_counter(), 0
        with atomic_directory(folder) as staging:
            for copy in range(args.tile):
                for part in sorted(source.glob("*.parquet")):
                    table = pq.read_table(part)
                    numbers = pc.utf8_slice_codeunits(table["user"], 1).cast("int64")
                    renamed = pc.binary_join_element_wise(
                        "u", pc.add(numbers, copy * drawn).cast("string"), ""
                    )
                    table = table.set_column(0, "user", renamed)
                    path = staging / f"copy-{copy}-{part.name}"
                    pq.write_table(table, path, compression="zstd")
                    size += path.stat().st_size
                log.info("log: copy %d of %d written", copy + 1, args.tile)
        tiled = {"interactions": facts["interactions"] * args.tile, "log_mb": size / 1e6}
        tiled |= {"generate_s": time.perf_counter() - start, "tile": args.tile, "drawn": facts}
        done.write_text(json.dumps(tiled))
    return folder, json.loads(done.read_text())


def _progress(total: int) -> Any:
    done = [0]

    def report(chunk_users: int) -> None:
        done[0] += chunk_users
        if done[0] % (total // 10 or 1) < chunk_users:
            log.info("log: %d of %d users written", done[0], total)

    return report


def run_prepare(src: Path, log_folder: Path, output: Path, k_core: int | None) -> dict[str, Any]:
    """`fishrec data prepare` of checkout `src` in a child process: seconds, its peak RSS."""
    shutil.rmtree(output, ignore_errors=True)
    command = [sys.executable, "-m", "merging.main", "data", "prepare"]
    command += ["--input", str(log_folder), "--output", str(output)]
    command += ["--k-core", str(k_core)] if k_core else []
    env = {**os.environ, "PYTHONPATH": str(src)}
    errors = output.with_name(output.name + ".stderr")
    start = time.perf_counter()
    with open(errors, "wb") as stderr:  # a file, not a pipe: a chatty child cannot block
        child = subprocess.Popen(
            command, cwd=src, env=env, stdout=subprocess.DEVNULL, stderr=stderr
        )
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if child.returncode != 0:
        raise RuntimeError(f"prepare failed ({src}):\n{errors.read_text()[-2000:]}")
    meta = json.loads((output / "meta.json").read_text())
    shutil.rmtree(output)
    return {
        "seconds": seconds,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "fingerprint": meta["fingerprint"],
        "users": meta["num_users"],
        "items": meta["num_items"],
    }


def measure(args: argparse.Namespace, users: int) -> dict[str, Any]:
    tiled = args.tile > 1 and users > args.tile_above
    tag = f"-tile{args.tile}" if tiled else ""
    done = args.work / f"figures-u{users}-n{args.items}-k{args.k_core}{tag}.json"
    if done.exists():
        return json.loads(done.read_text())
    log_folder, facts = tiled_log(args, users) if tiled else synthetic_log(args, users)
    log.info("%d users: %d interactions; preparing", users, facts["interactions"])
    row = {
        "log_users": users,
        **facts,
        "new": run_prepare(ROOT, log_folder, args.work / "out", args.k_core),
    }
    if args.baseline_src and users <= args.baseline_max_users:
        log.info("%d users: preparing with %s", users, args.baseline_src)
        row["baseline"] = run_prepare(args.baseline_src, log_folder, args.work / "out", args.k_core)
        if row["baseline"]["fingerprint"] != row["new"]["fingerprint"]:
            raise RuntimeError(f"{users} users: the two versions prepared different data")
    done.write_text(json.dumps(row, indent=2))
    return row


def exponent(sizes: list[float], costs: list[float]) -> float:
    """a of cost ~ size^a: the least-squares slope on log-log."""
    if len(sizes) < 2:
        return float("nan")
    return float(np.polyfit(np.log(sizes), np.log(costs), 1)[0])


def report(rows: list[dict[str, Any]]) -> dict[str, float]:
    print(
        f"{'users':>11} {'interactions':>13} {'log MB':>7} {'prepare s':>10} {'peak RSS MB':>12}"
        f" {'MB per 1e6':>10} {'baseline s':>11} {'baseline MB':>12} {'RSS ratio':>10}"
    )
    for row in rows:
        new, base = row["new"], row.get("baseline")
        cells = f"{row['log_users']:>11,} {row['interactions']:>13,} {row['log_mb']:>7.0f}"
        cells += f" {new['seconds']:>10.1f} {new['peak_rss_mb']:>12.0f}"
        cells += f" {new['peak_rss_mb'] / row['interactions'] * 1e6:>10.1f}"
        if base:
            ratio = new["peak_rss_mb"] / base["peak_rss_mb"]
            cells += f" {base['seconds']:>11.1f} {base['peak_rss_mb']:>12.0f} {ratio:>10.2f}"
        print(cells)
    sizes = [row["interactions"] for row in rows]
    exponents = {
        "seconds": exponent(sizes, [row["new"]["seconds"] for row in rows]),
        "peak_rss_mb": exponent(sizes, [row["new"]["peak_rss_mb"] for row in rows]),
    }
    print(
        f"growth exponent over interactions: time {exponents['seconds']:.2f}, "
        f"peak RSS {exponents['peak_rss_mb']:.2f}"
    )
    return exponents


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for users in sorted(args.users):
        rows.append(measure(args, users))
        exponents = report(rows)
        write_results(args.json, args, rows=rows, exponents=exponents)


if __name__ == "__main__":
    main()
