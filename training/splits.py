"""Evaluation protocols: how a data set is cut into train, validation and test.

Two protocols, in the registry `SPLITS` (docs/evaluation.md):

- `leave_one_out` (SASRec/BERT4Rec): each user's last item is the test target,
  the second-to-last the validation target, the rest trains. Every user is
  judged on the item that followed their own history, whenever that was.
- `temporal`: one global cut-off time. Training and validation see only what
  happened before it; each user with a history before the cut-off and an
  interaction after it is tested on their *first* interaction after it, given
  the history before it. This is how a production model is judged: it is
  trained up to a day and asked about the next one. Validation is each user's
  last interaction before the cut-off (given the ones before), so early
  stopping never looks past the cut-off. Users who only appear after the
  cut-off have no history and are not evaluated (the service gives them the
  popular items); a test target that never occurs before the cut-off is an
  item the model cannot know, and counts as a miss.

Both keep the exclusion rule of the evaluator: the items of the history (and
the target's own id, for the sampled candidates) are what `seen` holds; no
item from after the target is ever used.

This module must not import torch.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from training.config import SplitSpec
from training.data_error import DataError
from training.interactions import parse_time


@dataclass(frozen=True, eq=False)
class EvalSplit:
    """Evaluation cases: one history and one target per evaluated user."""

    users: np.ndarray  # int64 row indices into SequenceData.users
    histories: list[np.ndarray]  # int64 internal ids, oldest first
    targets: np.ndarray  # int64 internal ids
    seen: list[np.ndarray]  # distinct items never sampled as negatives for this user

    def __len__(self) -> int:
        return len(self.targets)


@dataclass(frozen=True, eq=False)
class Split:
    """Train sequences and the validation and test cases of one protocol."""

    train: list[np.ndarray]  # one sequence per user (possibly empty)
    valid: EvalSplit
    test: EvalSplit
    popularity: np.ndarray  # int64 [num_items + 1]: occurrences in `train` (index 0 is 0)
    num_items: int
    protocol: str = "leave-one-out"  # how tables and metrics.json name the protocol


def _popularity(train: list[np.ndarray], num_items: int) -> np.ndarray:
    flat = np.concatenate(train) if train else np.zeros(0, np.int64)
    popularity = np.bincount(flat, minlength=num_items + 1).astype(np.int64)
    popularity[0] = 0  # id 0 is padding
    return popularity


def _cases(
    rows: list[int], histories: list[np.ndarray], targets: list[int], seen: list[np.ndarray]
) -> EvalSplit:
    return EvalSplit(
        np.asarray(rows, dtype=np.int64),
        histories,
        np.asarray(targets, dtype=np.int64),
        seen,
    )


def leave_one_out(
    sequences: list[np.ndarray],
    timestamps: list[np.ndarray] | None,
    num_items: int,
    spec: SplitSpec,
) -> Split:
    """Last item test, second-to-last validation, the rest train (users with >= 3 items)."""
    train: list[np.ndarray] = []
    evaluated: list[int] = []
    for row, seq in enumerate(sequences):
        # Fewer than 3 items leave no training item once validation and test are held out.
        if len(seq) >= 3:
            train.append(seq[:-2])
            evaluated.append(row)
        else:
            train.append(seq)
    seqs = [sequences[row] for row in evaluated]
    seen = [np.unique(seq) for seq in seqs]
    valid = _cases(evaluated, [s[:-2] for s in seqs], [int(s[-2]) for s in seqs], seen)
    test = _cases(evaluated, [s[:-1] for s in seqs], [int(s[-1]) for s in seqs], seen)
    return Split(train, valid, test, _popularity(train, num_items), num_items)


def temporal(
    sequences: list[np.ndarray],
    timestamps: list[np.ndarray] | None,
    num_items: int,
    spec: SplitSpec,
) -> Split:
    """One global cut-off: train and validate before it, test on the first item after it."""
    if timestamps is None:
        raise DataError(
            "the temporal split needs timestamps, and this data has none (it was prepared "
            "from a log without them, such as a sequence file); use protocol leave_one_out "
            "or prepare the data from a timed log"
        )
    cutoff = cutoff_seconds(spec, timestamps)
    train: list[np.ndarray] = []
    valid_rows: list[int] = []
    valid_cases: tuple[list, list, list] = ([], [], [])
    test_rows: list[int] = []
    test_cases: tuple[list, list, list] = ([], [], [])
    for row, (seq, stamps) in enumerate(zip(sequences, timestamps, strict=True)):
        before = int(np.searchsorted(stamps, cutoff, side="left"))  # stamps are sorted
        history = seq[:before]
        train.append(history[:-1] if before >= 2 else history)
        if before >= 2:
            valid_rows.append(row)
            _add_case(valid_cases, history[:-1], int(history[-1]))
        if before >= 1 and before < len(seq):
            test_rows.append(row)
            _add_case(test_cases, history, int(seq[before]))
    if not test_rows:
        raise DataError(
            f"the temporal cut-off {format_time(cutoff)} leaves no test case: no user has "
            "interactions both before and after it (move the cut-off or add data)"
        )
    return Split(
        train,
        _cases(valid_rows, *valid_cases),
        _cases(test_rows, *test_cases),
        _popularity(train, num_items),
        num_items,
        protocol=f"temporal (cut-off {format_time(cutoff)})",
    )


def _add_case(cases: tuple[list, list, list], history: np.ndarray, target: int) -> None:
    histories, targets, seen = cases
    histories.append(history)
    targets.append(target)
    seen.append(np.unique(np.append(history, target)))


def cutoff_seconds(spec: SplitSpec, timestamps: list[np.ndarray]) -> float:
    """The cut-off as epoch seconds: given, or `last_days` before the newest interaction."""
    if spec.cutoff is not None:
        return parse_time(spec.cutoff)
    newest = max((float(s[-1]) for s in timestamps if len(s)), default=0.0)
    assert spec.last_days is not None  # SplitSpec's validator guarantees one of the two
    return newest - spec.last_days * 86400.0


def format_time(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="seconds")


# A protocol: (sequences, per-user timestamps or None, catalogue size, spec) -> Split.
Protocol = Callable[[list[np.ndarray], "list[np.ndarray] | None", int, SplitSpec], Split]

SPLITS: dict[str, Protocol] = {
    "leave_one_out": leave_one_out,
    "temporal": temporal,
}
