"""`fishrec data`: prepare, download, synthetic and features, the commands that make data folders.

Registration imports nothing heavy (training/cli.py says why); each command
imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from training.flags import CommandError, add_override_flags


def cmd_data_prepare(args: argparse.Namespace) -> None:
    from training.interactions import ColumnNames
    from training.prepare import prepare

    columns = ColumnNames(
        user=args.user_column, item=args.item_column, timestamp=args.time_column or None
    )
    meta = prepare(Path(args.input), Path(args.output), args.format, args.k_core, columns, args.sep)
    print(
        f"{args.output}: {meta['num_users']} users, {meta['num_items']} items, "
        f"{meta['num_interactions']} interactions, {meta['fingerprint']}"
    )


def cmd_data_download(args: argparse.Namespace) -> None:
    from training.download import download_dataset

    data = download_dataset(args.name, Path(args.output), url=args.url)
    print(
        f"{args.output}: {data.num_users} users, {data.num_items} items, {data.num_interactions} interactions"
    )


def cmd_data_synthetic(args: argparse.Namespace) -> None:
    from training.config import parse_override
    from training.synthetic import SyntheticConfig, generate
    from training.synthetic_log import DEFAULT_CHUNK_USERS, write_parquet

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
        written = write_parquet(config, Path(args.output), chunk_users, progress=bar.update)
    print(
        f"{written.path}: {written.rows} interactions, {written.users} users, "
        f"{written.items} items in {written.files} Parquet files "
        f"({written.bytes / 1e6:.1f} MB), {written.seconds:.1f} s"
    )


def cmd_data_features(args: argparse.Namespace) -> None:
    from training.item_features import FEATURES_FILE, write_item_features
    from training.prepare import load_data
    from training.text_encoders import DEFAULT_CACHE

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
    from training.item_text import TEXT_FORMATS
    from training.text_encoders import DEFAULT_ENCODER, ENCODERS

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
