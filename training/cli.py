"""Subcommands of the training package: data, train, evaluate, compare.

`merging/main.py` (the `fishrec` console script) registers them with the other
packages' commands. Registration imports nothing heavy, so `fishrec serve` runs
in the serving image, which has no torch; each command imports what it needs
when it runs.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from training.flags import CommandError, add_override_flags, collect_overrides

log = logging.getLogger("fishrec")


# ---- data ---------------------------------------------------------------------------


def cmd_data_prepare(args: argparse.Namespace) -> None:
    from training.data import ColumnNames, prepare

    columns = ColumnNames(
        user=args.user_column, item=args.item_column, timestamp=args.time_column or None
    )
    data = prepare(Path(args.input), Path(args.output), args.format, args.k_core, columns, args.sep)
    print(
        f"{args.output}: {data.num_users} users, {data.num_items} items, "
        f"{data.num_interactions} interactions, {data.fingerprint}"
    )


def cmd_data_download(args: argparse.Namespace) -> None:
    from training.download import download_dataset

    data = download_dataset(args.name, Path(args.output), url=args.url)
    print(
        f"{args.output}: {data.num_users} users, {data.num_items} items, {data.num_interactions} interactions"
    )


def cmd_data_synthetic(args: argparse.Namespace) -> None:
    from training.config import parse_override
    from training.synthetic import DEFAULT_CHUNK_USERS, SyntheticConfig, generate, write_parquet

    fields = {"seed": args.seed, **dict(parse_override(text) for text in args.overrides)}
    config = SyntheticConfig(**fields)
    if not args.parquet:
        if args.chunk_users is not None:
            raise CommandError("--chunk-users needs --parquet (a data folder is built in memory)")
        data = generate(config)
        data.save(Path(args.output))
        print(
            f"{args.output}: {data.num_users} users, {data.num_items} items, {data.num_interactions} interactions"
        )
        return
    from tqdm.auto import tqdm

    chunk_users = DEFAULT_CHUNK_USERS if args.chunk_users is None else args.chunk_users
    if chunk_users < 1:
        raise CommandError(f"--chunk-users must be at least 1, got {chunk_users}")
    with tqdm(
        total=config.num_users,
        unit="user",
        unit_scale=True,
        desc="synthetic",
        disable=args.no_progress,
    ) as bar:
        log = write_parquet(config, Path(args.output), chunk_users, progress=bar.update)
    print(
        f"{log.path}: {log.rows} interactions, {log.users} users, {log.items} items in "
        f"{log.files} Parquet files ({log.bytes / 1e6:.1f} MB), {log.seconds:.1f} s"
    )


def cmd_data_features(args: argparse.Namespace) -> None:
    from training.data import load_data
    from training.features import DEFAULT_CACHE, FEATURES_FILE, write_item_features

    data_path = Path(args.data)
    if args.out is None and not data_path.is_dir():
        raise CommandError(f"{data_path} is not a prepared data folder: pass --out FILE")
    out = Path(args.out) if args.out else data_path / FEATURES_FILE
    features = write_item_features(
        load_data(data_path),
        Path(args.input),
        out,
        fmt=args.format,
        encoding=args.encoding,
        encoder=args.encoder,
        id_map=Path(args.id_map) if args.id_map else None,
        cache_dir=None if args.no_cache else Path(args.cache_dir or DEFAULT_CACHE),
        progress=not args.no_progress,
    )
    print(
        f"{out}: {features.num_items} items, {int(features.mask.sum())} with text "
        f"({features.coverage:.1%}), encoder {features.encoder} ({features.dim} dimensions)"
    )


def register_features(sub: argparse._SubParsersAction) -> None:
    from training.features import DEFAULT_ENCODER, ENCODERS, TEXT_FORMATS

    features = sub.add_parser(
        "features",
        help="encode item text into a feature matrix aligned with a data folder",
        description="Read item text (MovieLens movies.dat, RecBole .item, item_id<TAB>text), "
        "encode it with a local sentence encoder and write features.safetensors (items "
        "without text get zeros and mask 0). Encodings are cached by the sha256 of each text.",
    )
    features.add_argument("--data", required=True, help="the prepared data folder (or raw log)")
    features.add_argument("--input", required=True, help="the item text file")
    features.add_argument(
        "--format", default="auto", choices=["auto", *TEXT_FORMATS], help="item text format"
    )
    features.add_argument(
        "--encoding",
        default=None,
        help="text encoding (default: iso-8859-1 for movielens, else utf-8)",
    )
    features.add_argument(
        "--encoder", default=DEFAULT_ENCODER, choices=list(ENCODERS), help="sentence encoder"
    )
    features.add_argument(
        "--id-map",
        default=None,
        help="TSV data item id -> text file item id, when they differ (e.g. ml-1m_5core_item_map.tsv)",
    )
    features.add_argument(
        "--out", default=None, help="feature file (default: DATA/features.safetensors)"
    )
    features.add_argument(
        "--cache-dir", default=None, help="encoding cache (default: ~/.cache/fishrec/features)"
    )
    features.add_argument(
        "--no-cache", action="store_true", help="neither read nor write the cache"
    )
    features.add_argument("--no-progress", action="store_true", help="no progress bar")
    features.set_defaults(func=cmd_data_features)


def register_data(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser(
        "data",
        help="read, prepare and download interaction data",
        description="Turn interaction logs into fishrec's canonical data folder.",
    )
    sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    prepare = sub.add_parser(
        "prepare",
        help="turn a log file into a canonical data folder",
        description="Read ratings.dat, sequence .txt, CSV/TSV, Parquet or RecBole .inter; "
        "order each user's items by time, optionally k-core filter, map ids, save.",
    )
    prepare.add_argument(
        "--input",
        required=True,
        help="the log: a file, a folder of files (e.g. daily partitions, read in name order) "
        "or a quoted glob such as 'logs/*.csv.gz'",
    )
    prepare.add_argument("--output", required=True, help="folder to write (replaced atomically)")
    prepare.add_argument(
        "--format",
        default="auto",
        choices=["auto", "ratings", "sequences", "csv", "parquet", "recbole"],
        help="input format; auto recognises it by content",
    )
    prepare.add_argument(
        "--k-core",
        type=int,
        default=None,
        help="drop users and items with fewer than N interactions, repeatedly",
    )
    prepare.add_argument("--user-column", default="user", help="CSV/Parquet: user column")
    prepare.add_argument("--item-column", default="item", help="CSV/Parquet: item column")
    prepare.add_argument(
        "--time-column",
        default="timestamp",
        help="CSV/Parquet: timestamp column ('' for none: file order)",
    )
    prepare.add_argument("--sep", default=None, help="CSV separator (default: sniffed)")
    prepare.set_defaults(func=cmd_data_prepare)

    download = sub.add_parser(
        "download",
        help="download and prepare a public data set (needs internet)",
        description="Download a public data set, verify its checksum and prepare it.",
    )
    download.add_argument("name", choices=["ml-1m"], help="data set")
    download.add_argument("--output", required=True, help="folder to write")
    download.add_argument(
        "--url", default=None, help="download from this URL instead of the official one"
    )
    download.set_defaults(func=cmd_data_download)

    synthetic = sub.add_parser(
        "synthetic",
        help="write the embedded synthetic data set as a data folder (or a Parquet log)",
        description="Generate the deterministic synthetic data set (the default data of every "
        "command). --parquet streams a large one (e.g. --set num_users=1000000 --set "
        "num_items=1000000) chunk by chunk into a folder of Parquet files, a log for "
        "'fishrec data prepare'.",
    )
    synthetic.add_argument("--output", required=True, help="folder to write (replaced atomically)")
    synthetic.add_argument("--seed", type=int, default=0, help="generator seed")
    synthetic.add_argument(
        "--parquet",
        action="store_true",
        help="write an interaction log (user, item, timestamp) as part-NNNNN.parquet files, "
        "one per chunk of users, instead of a data folder",
    )
    synthetic.add_argument(
        "--chunk-users",
        type=int,
        default=None,
        metavar="N",
        help="with --parquet: users per chunk and file (default 10000); memory grows with N, "
        "and the same seed and N give the same files",
    )
    synthetic.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_override_flags(synthetic, example="num_items=1000000", what="a SyntheticConfig field")
    synthetic.set_defaults(func=cmd_data_synthetic)
    register_features(sub)


# ---- train / evaluate ---------------------------------------------------------------

TRAIN_FLAGS = {
    "data": "data.path",
    "backbone": "model.backbone",
    "recipe": "recipe.name",
    "epochs": "train.epochs",
    "seed": "train.seed",
    "device": "train.device",
    "workers": "train.workers",
    "features": "data.features",
    "item_representation": "model.item_representation",
}


def cmd_train(args: argparse.Namespace) -> None:
    from training.config import ExperimentConfig, load_config
    from training.run import train
    from training.sources import load_source
    from training.transfer import Transfer

    overrides = collect_overrides(args, TRAIN_FLAGS)
    if args.no_progress:
        overrides["train.progress"] = False
    config = load_config(ExperimentConfig, Path(args.config) if args.config else None, overrides)
    data = load_source(config.data)
    result = train(
        config,
        data,
        Path(args.out),
        init=Path(args.init) if args.init else None,
        resume=args.resume,
        transfer=Transfer(Path(args.transfer_from), args.adaptation)
        if args.transfer_from
        else None,
    )
    print_metrics({"model": result.metrics["model"], "mostpop": result.metrics["mostpop"]})
    print(f"best epoch {result.best_epoch}; run folder {result.run_dir}")


def register_train(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "train",
        help="train one model with one recipe",
        description="Train a BERT4Rec/SASRec model with a recipe; early-stops on validation NDCG@10 "
        "and writes best/, last/, history.json and metrics.json into the run folder.",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="'synthetic' (default), a prepared data folder or a raw log file",
    )
    parser.add_argument("--out", required=True, help="run folder")
    parser.add_argument("--config", default=None, help="experiment YAML (see configs/)")
    parser.add_argument(
        "--backbone", choices=["bert4rec", "sasrec"], default=None, help="model variant"
    )
    parser.add_argument(
        "--recipe", default=None, help="training objective (default: the backbone's plain one)"
    )
    parser.add_argument(
        "--init", default=None, help="start from this checkpoint or run folder (fine-tune setting)"
    )
    parser.add_argument(
        "--transfer-from",
        default=None,
        help="start from a model of another catalogue whose items have text (id+text or text); "
        "the architecture is the source's, the items and features this data's (see --adaptation)",
    )
    parser.add_argument(
        "--adaptation",
        choices=["finetune", "relearn"],
        default="relearn",
        help="with --transfer-from: finetune every weight, or relearn (freeze the transformer "
        "blocks, re-initialise positions and the text adaptor)",
    )
    parser.add_argument(
        "--item-representation",
        choices=["id", "id+text", "text"],
        default=None,
        help="how items are represented (id+text and text need item features)",
    )
    parser.add_argument(
        "--features", default=None, help="item feature file (default: DATA/features.safetensors)"
    )
    parser.add_argument("--epochs", type=int, default=None, help="maximum epochs")
    parser.add_argument("--seed", type=int, default=None, help="random seed")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="data-parallel Ray Train workers (train.workers; threads each: train.num_threads)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last epoch"
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (log lines only)"
    )
    add_override_flags(parser)
    parser.set_defaults(func=cmd_train)


def print_metrics(tables: dict[str, dict[str, Any]]) -> None:
    from training.evaluate import format_table

    for part in ("valid", "test"):
        rows = {name: parts[part] for name, parts in tables.items() if part in parts}
        print(f"\n{part}\n{format_table(rows)}")


def checkpoint_for_data(path: Path, data: Any) -> Any:
    """The checkpoint at `path`, refused unless it scores the items of `data`."""
    from training.trainer import load_run_checkpoint

    checkpoint = load_run_checkpoint(path)
    if checkpoint.config.num_items != data.num_items:
        raise CommandError(
            f"{path}: the checkpoint scores {checkpoint.config.num_items} items, the data has {data.num_items}"
        )
    fingerprint = checkpoint.info.get("data_fingerprint")
    if fingerprint and fingerprint != data.fingerprint:
        raise CommandError(f"{path}: trained on data {fingerprint}, not on {data.fingerprint}")
    return checkpoint


def cmd_evaluate(args: argparse.Namespace) -> None:
    import json

    from training.data import load_data
    from training.evaluate import Evaluator

    data = with_protocol_flags(load_data(Path(args.data)), args)
    checkpoint = checkpoint_for_data(Path(args.checkpoint), data)
    evaluator = Evaluator(data.split(), seed=args.seed, exclude_seen=not args.no_exclude_seen)
    document = evaluator.metrics_document(checkpoint.model)
    print_metrics({"model": document["model"], "mostpop": document["mostpop"]})
    print(
        f"(protocol {evaluator.split.protocol}: {len(evaluator.split.test)} test users; history "
        f"items {'excluded' if evaluator.exclude_seen else 'ranked'} in the full setting)"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(document, indent=2) + "\n")


def add_candidate_flags(parser: argparse.ArgumentParser) -> None:
    """How candidates are built: the flags every command that ranks items shares."""
    parser.add_argument(
        "--no-exclude-seen",
        action="store_true",
        help="rank history items too in the full setting (RecBole style)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random100 candidates")
    parser.add_argument(
        "--split",
        choices=["leave_one_out", "temporal"],
        default=None,
        help="evaluation protocol (default: the data's own, leave_one_out unless it says)",
    )
    parser.add_argument("--cutoff", default=None, help="temporal: epoch seconds or ISO 8601")
    parser.add_argument(
        "--last-days", type=float, default=None, help="temporal: cut-off N days before the end"
    )


def with_protocol_flags(data: Any, args: argparse.Namespace) -> Any:
    """The data under the protocol of --split/--cutoff/--last-days (if given)."""
    from pydantic import ValidationError

    from training.config import SplitSpec

    if args.split is None and args.cutoff is None and args.last_days is None:
        return data
    try:
        spec = SplitSpec(
            protocol=args.split or "temporal", cutoff=args.cutoff, last_days=args.last_days
        )
    except ValidationError as error:
        raise CommandError(f"--split: {error.errors()[0]['msg']}") from None
    return data.with_split(spec)


def register_evaluate(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "evaluate",
        help="rank metrics of a checkpoint under the three candidate settings",
        description="NDCG@10/@20, HR@10/@20 and MRR under full, random100 and popular100 "
        "candidates, for the model and for MostPop, under leave-one-out or a temporal cut-off.",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint or run folder")
    parser.add_argument(
        "--data", required=True, help="the data folder (or raw file) the model was trained on"
    )
    parser.add_argument("--out", default=None, help="write metrics.json here")
    add_candidate_flags(parser)
    parser.set_defaults(func=cmd_evaluate)


def cmd_compare(args: argparse.Namespace) -> None:
    import json

    from training.data import load_data
    from training.diagnostics import compare_models, representation_quality
    from training.evaluate import Evaluator, format_table

    data = with_protocol_flags(load_data(Path(args.data)), args)
    a, b = (checkpoint_for_data(Path(path), data) for path in (args.a, args.b))
    evaluator = Evaluator(data.split(), seed=args.seed, exclude_seen=not args.no_exclude_seen)
    comparison = compare_models(a.model, b.model, evaluator, args.part, args.setting)
    geometry = {
        name: representation_quality(checkpoint.model, getattr(evaluator.split, args.part))
        for name, checkpoint in (("A", a), ("B", b))
    }
    print(f"A = {args.a}\nB = {args.b}\n\n{args.part}")
    print(format_table({"A": comparison.metrics_a, "B": comparison.metrics_b}))
    print(
        f"\nerror inconsistency ({args.part}, {args.setting}, NDCG@10 > 0.5): "
        f"{comparison.inconsistency:.4f}  (only A {comparison.only_a:.4f}, only B "
        f"{comparison.only_b:.4f}, both {comparison.both_right:.4f})"
    )
    for name, values in geometry.items():
        print(f"{name}: alignment {values['alignment']:.4f}, uniformity {values['uniformity']:.4f}")
    if args.out:
        document = {**comparison.__dict__, "representations": geometry}
        Path(args.out).write_text(json.dumps(document, indent=2) + "\n")


def register_compare(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "compare",
        help="how differently two models err, with both models' metrics",
        description="Error inconsistency of two models (share of users for which exactly one has "
        "NDCG@10 > 0.5 on the held-out item), both models' metrics, and the alignment and "
        "uniformity of their sequence representations.",
    )
    parser.add_argument("a", metavar="A_RUN", help="first checkpoint or run folder")
    parser.add_argument("b", metavar="B_RUN", help="second checkpoint or run folder")
    parser.add_argument("--data", required=True, help="the data folder (or raw file) both use")
    parser.add_argument(
        "--part", choices=["valid", "test"], default="test", help="which held-out item"
    )
    parser.add_argument(
        "--setting",
        choices=["full", "random100", "popular100"],
        default="full",
        help="candidate setting of the inconsistency",
    )
    add_candidate_flags(parser)
    parser.add_argument("--out", default=None, help="write the comparison as JSON here")
    parser.set_defaults(func=cmd_compare)


def cmd_warm_start(args: argparse.Namespace) -> None:
    from training.data import load_data
    from training.warm_start import load_bundle_source, write_warm_start

    data = load_data(Path(args.data))
    source, vocab = load_bundle_source(Path(args.source))
    change = write_warm_start(source, vocab, data, Path(args.out), seed=args.seed)
    print(f"{args.out}: {change.describe()}; continue it with fishrec train --init {args.out}")


def register_warm_start(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "warm-start",
        help="carry a published model over to new data (item rows matched by external id)",
        description="Write a checkpoint of --data that starts from the model a bundle carries: "
        "every non-item weight copied, kept items' rows and output bias copied by external id, "
        "new items freshly initialised, vanished items dropped. Train it with --init.",
    )
    parser.add_argument(
        "--from", dest="source", required=True, help="a bundle folder with checkpoint/"
    )
    parser.add_argument("--data", required=True, help="the new data (folder or raw file)")
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new items' rows")
    parser.set_defaults(func=cmd_warm_start)


# ---- entry point --------------------------------------------------------------------


def register(commands: argparse._SubParsersAction) -> None:
    """Add the training package's subcommands (data, train, evaluate, compare, warm-start)."""
    register_data(commands)
    register_train(commands)
    register_evaluate(commands)
    register_compare(commands)
    register_warm_start(commands)
