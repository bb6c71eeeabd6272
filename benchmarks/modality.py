"""Item modality: text features, KDSR, Fisher merges with KDSR, ANT-style transfer.

    python benchmarks/modality.py --shared ../shared/data --out /tmp/fishrec-bench-modality \
        --epochs 100 --finetune-epochs 20 --transfer-epochs 50 --fisher-sequences 1000

Parts (--parts, default all):

- `ml-1m` (titles + genres of movies.dat) and `beauty` (category/brand text of
  item_attributes_text.tsv): test NDCG@10 (full ranking, history excluded) of
  the plain model, ID+text, and `kdsr` (on the plain ID backbone), each from
  scratch for --epochs; then, from the plain model as the shared base, `plain`,
  `cl4srec` and `kdsr` fine-tuned for --finetune-epochs and the Fisher merge
  (--estimator, λ uniform) of the pool without and with `kdsr`.
- `transfer`: a text-only model trained on ML-1M, transferred to ML-100K: target
  test NDCG@10 of scratch (the same text-only architecture, and a plain ID model
  for reference), zero-shot (the transferred model before any target training),
  `finetune` and `relearn`, each for --transfer-epochs. ML-100K and ML-1M
  number their movies differently; both catalogues get the same text for the
  same film ("Title (Year). Genres: ..."), and the report says how many ML-100K
  films match an ML-1M film by that text.

ML-1M is prepared from ml-1m_sequences_rawids.txt with a 5-core (6040 users,
3416 items, as the ICLRec file) so that its item ids are MovieIDs; Beauty from
Beauty.txt; ML-100K from ml-100k.inter (5-core). Features are cached under
--out/cache (encodings by text hash), so a second run encodes nothing.
Model and training settings come from configs/ml-1m.yaml and configs/beauty.yaml
(ML-100K uses the ML-1M architecture, which the transfer needs anyway).
Prints markdown tables and writes them as JSON to --out/results.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merge import fisher_file  # benchmarks/merge.py: Fisher files cached per checkpoint
from recipes import first_users, start_logging  # benchmarks/recipes.py

from merging.merge import MergeConfig, merge_checkpoints
from training.config import ExperimentConfig, load_config
from training.evaluate import Evaluator
from training.item_features import FEATURES_FILE, write_item_features
from training.item_text import read_item_texts
from training.prepare import load_data, prepare
from training.run import train
from training.run_folder import load_run_checkpoint
from training.sequence_data import SequenceData
from training.transfer import Transfer

log = logging.getLogger("benchmarks.modality")
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class DataSet:
    name: str
    log_file: str  # relative to --shared
    text_file: str
    k_core: int | None
    config: str  # experiment YAML under configs/


DATA_SETS = {
    "ml-1m": DataSet(
        "ml-1m", "ml-1m/ml-1m_sequences_rawids.txt", "ml-1m/movies.dat", 5, "ml-1m.yaml"
    ),
    "beauty": DataSet(
        "beauty",
        "amazon-beauty/Beauty.txt",
        "amazon-beauty/item_attributes_text.tsv",
        None,
        "beauty.yaml",
    ),
    "ml-100k": DataSet("ml-100k", "ml-100k/ml-100k.inter", "ml-100k/ml-100k.item", 5, "ml-1m.yaml"),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shared", required=True, help="the shared data folder (../shared/data)")
    parser.add_argument("--out", default="/tmp/fishrec-bench-modality", help="working folder")
    parser.add_argument(
        "--parts", nargs="+", default=["ml-1m", "beauty", "transfer"], help="what to run"
    )
    parser.add_argument("--encoder", default="all-MiniLM-L6-v2", help="text encoder")
    parser.add_argument("--epochs", type=int, default=100, help="epochs of the scratch models")
    parser.add_argument(
        "--finetune-epochs", type=int, default=20, help="epochs of the pool's fine-tunes"
    )
    parser.add_argument("--transfer-epochs", type=int, default=50, help="epochs on ML-100K")
    parser.add_argument("--estimator", default="exact", help="Fisher estimator of the merges")
    parser.add_argument("--fisher-sequences", type=int, default=1000, help="sequences per Fisher")
    parser.add_argument("--users", type=int, default=0, help="only the first N users (0: all)")
    parser.add_argument("--max-len", type=int, default=None, help="override model.max_len")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    return parser.parse_args()


# ---- data and features ------------------------------------------------------------------------


def prepared(args: argparse.Namespace, spec: DataSet) -> tuple[Path, SequenceData]:
    """The prepared data folder of a data set, with its features.safetensors."""
    folder = Path(args.out) / "data" / spec.name
    if not (folder / "meta.json").is_file():
        prepare(Path(args.shared) / spec.log_file, folder, k_core=spec.k_core)
    data = load_data(folder)
    if not (folder / FEATURES_FILE).is_file():
        write_item_features(
            data,
            Path(args.shared) / spec.text_file,
            folder / FEATURES_FILE,
            encoder=args.encoder,
            cache_dir=Path(args.out) / "cache",
            progress=False,
        )
    return folder, first_users(data, args.users)


def experiment(
    args: argparse.Namespace, spec: DataSet, folder: Path, epochs: int, **fields: Any
) -> ExperimentConfig:
    """The data set's YAML with the benchmark's budget; `fields` are dotted overrides."""
    overrides: dict[str, Any] = {
        "data.path": str(folder),
        "train.epochs": epochs,
        "train.progress": False,
        "model.max_len": args.max_len,
        **fields,
    }
    return load_config(ExperimentConfig, ROOT / "configs" / spec.config, overrides)


def test_ndcg(run: Path, evaluator: Evaluator) -> float:
    model = load_run_checkpoint(run).model
    return evaluator.evaluate_model(model, "test").metrics["full"]["ndcg@10"]


# ---- one catalogue: plain, ID+text, kdsr, Fisher merges -------------------------------------------


def catalogue_part(args: argparse.Namespace, spec: DataSet) -> dict[str, Any]:
    folder, data = prepared(args, spec)
    evaluator = Evaluator(data.split())
    out = Path(args.out) / "runs" / spec.name
    runs: dict[str, Path] = {}
    seconds: dict[str, float] = {}
    scratch = {
        "plain": {},
        "id+text": {"model.item_representation": "id+text"},
        "kdsr": {"recipe.name": "kdsr"},
    }
    for label, fields in scratch.items():
        start = time.perf_counter()
        train(experiment(args, spec, folder, args.epochs, **fields), data, out / label)
        runs[label], seconds[label] = out / label, time.perf_counter() - start
    base = runs["plain"]
    pool: dict[str, Path] = {}
    for recipe in ("sasrec", "cl4srec", "kdsr"):
        config = experiment(args, spec, folder, args.finetune_epochs, **{"recipe.name": recipe})
        pool[recipe] = out / f"ft-{recipe}"
        train(config, data, pool[recipe], init=base)
    fishers = {
        name: fisher_file(run, f"{spec.name}-{name}", args.estimator, args, data)[0]
        for name, run in pool.items()
    }
    merges = {}
    for label, members in (
        ("fisher without kdsr", ["sasrec", "cl4srec"]),
        ("fisher with kdsr", list(pool)),
    ):
        result = merge_checkpoints(
            [pool[m] for m in members],
            out / label.replace(" ", "-"),
            MergeConfig(method="fisher"),
            [fishers[m] for m in members],
            data,
        )
        assert result.metrics is not None
        merges[label] = result.metrics["model"]["test"]["full"]["ndcg@10"]
    return {
        "users": data.num_users,
        "items": data.num_items,
        "scratch": {label: test_ndcg(run, evaluator) for label, run in runs.items()},
        "seconds": seconds,
        "pool": {f"ft-{name}": test_ndcg(run, evaluator) for name, run in pool.items()},
        "merges": merges,
    }


# ---- transfer ML-1M -> ML-100K --------------------------------------------------------------------


def text_overlap(args: argparse.Namespace) -> dict[str, int]:
    """How many ML-100K films have exactly the text of an ML-1M film (ids differ)."""
    source = read_item_texts(Path(args.shared) / DATA_SETS["ml-1m"].text_file)
    target = read_item_texts(Path(args.shared) / DATA_SETS["ml-100k"].text_file)
    known = set(source.texts.values())
    return {
        "ml-100k films": len(target.texts),
        "same text in ml-1m": sum(text in known for text in target.texts.values()),
        "same id and text": sum(source.texts.get(i) == t for i, t in target.texts.items()),
    }


def transfer_part(args: argparse.Namespace) -> dict[str, Any]:
    source_spec, target_spec = DATA_SETS["ml-1m"], DATA_SETS["ml-100k"]
    source_folder, source_data = prepared(args, source_spec)
    target_folder, target_data = prepared(args, target_spec)
    out = Path(args.out) / "runs" / "transfer"
    text = {"model.item_representation": "text"}
    source = out / "source-ml-1m"
    train(experiment(args, source_spec, source_folder, args.epochs, **text), source_data, source)
    evaluator = Evaluator(target_data.split())
    rows: dict[str, float] = {}
    for label, fields in (("scratch (text)", text), ("scratch (id)", {})):
        config = experiment(args, target_spec, target_folder, args.transfer_epochs, **fields)
        train(config, target_data, out / label)
        rows[label] = test_ndcg(out / label, evaluator)
    for label, adaptation, epochs in (
        ("zero-shot", "finetune", 0),
        ("finetune", "finetune", args.transfer_epochs),
        ("relearn", "relearn", args.transfer_epochs),
    ):
        config = experiment(args, target_spec, target_folder, epochs)
        train(config, target_data, out / label, transfer=Transfer(source, adaptation))  # type: ignore[arg-type]
        rows[label] = test_ndcg(out / label, evaluator)
    return {
        "source test ndcg@10": test_ndcg(source, Evaluator(source_data.split())),
        "target": rows,
        "overlap": text_overlap(args),
        "target users": target_data.num_users,
        "target items": target_data.num_items,
    }


# ---- report ----------------------------------------------------------------------------------------


def table(rows: dict[str, float], baseline: str) -> str:
    lines = [f"| model | test NDCG@10 (full) | vs {baseline} |", "|---|---|---|"]
    for label, value in rows.items():
        ratio = value / rows[baseline] if rows[baseline] > 0 else float("nan")
        lines.append(f"| {label} | {value:.4f} | {ratio:.3f} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    start_logging(log, args.threads)
    unknown = set(args.parts) - {"ml-1m", "beauty", "transfer"}
    if unknown:
        raise SystemExit(f"unknown parts {sorted(unknown)}")
    results: dict[str, Any] = {}
    start = time.perf_counter()
    for name in ("ml-1m", "beauty"):
        if name in args.parts:
            log.info("%s: plain, id+text, kdsr, merges", name)
            part = results[name] = catalogue_part(args, DATA_SETS[name])
            print(
                f"\n## {name}: {part['users']} users, {part['items']} items, encoder {args.encoder}"
            )
            print(f"scratch, {args.epochs} epochs\n\n{table(part['scratch'], 'plain')}\n")
            rows = {**part["pool"], **part["merges"]}
            print(
                f"pool: from the plain model, {args.finetune_epochs} epochs; Fisher {args.estimator} "
                f"on {args.fisher_sequences} sequences, λ uniform\n\n{table(rows, 'ft-sasrec')}"
            )
    if "transfer" in args.parts:
        log.info("transfer ml-1m -> ml-100k")
        part = results["transfer"] = transfer_part(args)
        print(
            f"\n## transfer ML-1M -> ML-100K ({part['target users']} users, {part['target items']} "
            f"items), {args.transfer_epochs} epochs on the target; source test NDCG@10 "
            f"{part['source test ndcg@10']:.4f}\n"
        )
        print(table(part["target"], "scratch (text)"))
        print(f"\ntitle alignment: {part['overlap']}")
    print(f"\n{time.perf_counter() - start:.0f} s in all")
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
