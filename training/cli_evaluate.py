"""`fishrec evaluate` and `fishrec compare`: the commands that score trained models.

Also what they share with other commands: the candidate and protocol flags,
the check that a checkpoint scores the data's items, and the metric tables
(`print_metrics`, which `fishrec train` and `fishrec merge` print too).
Registration imports nothing heavy (training/cli.py says why).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from training.flags import CommandError


def print_metrics(tables: dict[str, dict[str, Any]]) -> None:
    from training.evaluate import format_table

    for part in ("valid", "test"):
        rows = {name: parts[part] for name, parts in tables.items() if part in parts}
        print(f"\n{part}\n{format_table(rows)}")


def checkpoint_for_data(path: Path, data: Any) -> Any:
    """The checkpoint at `path`, refused unless it scores the items of `data`."""
    from training.run_folder import load_run_checkpoint

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

    from training.evaluate import Evaluator
    from training.prepare import load_data

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

    from training.diagnostics import compare_models, representation_quality
    from training.evaluate import Evaluator, format_table
    from training.prepare import load_data

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
