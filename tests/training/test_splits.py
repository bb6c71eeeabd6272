"""training.splits: leave-one-out and the temporal cut-off on hand-made logs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from training.config import DataSpec, SplitSpec
from training.data_error import DataError
from training.evaluate import Evaluator, popularity_scorer
from training.prepare import load_data, prepare
from training.sequence_data import SequenceData
from training.sources import load_source

# user, item, time: a spans the cut-off (4), b has one item before it, c only after,
# d only before. File order is not time order.
LOG = """user,item,timestamp
a,z,5
a,x,1
b,x,1
a,y,2
c,z,5
a,w,6
b,y,7
d,x,1
d,y,2
d,z,3
"""


@pytest.fixture
def timed(tmp_path: Path) -> SequenceData:
    path = tmp_path / "log.csv"
    path.write_text(LOG)
    prepare(path, tmp_path / "prepared")
    return SequenceData.load(tmp_path / "prepared")


def named(data: SequenceData, ids: np.ndarray) -> list[str]:
    return [data.vocab.external(int(i)) for i in ids]


def cases(data: SequenceData, part: str) -> dict[str, tuple[list[str], str]]:
    split = getattr(data.split(), part)
    return {
        data.users[int(row)]: (named(data, history), data.vocab.external(int(target)))
        for row, history, target in zip(split.users, split.histories, split.targets, strict=True)
    }


def test_temporal_split_on_a_hand_made_log(timed: SequenceData) -> None:
    data = timed.with_split(SplitSpec(protocol="temporal", cutoff=4))
    split = data.split()
    # Test: the first interaction after the cut-off, given everything before it.
    assert cases(data, "test") == {"a": (["x", "y"], "z"), "b": (["x"], "y")}
    # Validation: the last interaction before the cut-off; never a later one.
    assert cases(data, "valid") == {"a": (["x"], "y"), "d": (["x", "y"], "z")}
    train = {user: named(data, seq) for user, seq in zip(data.users, split.train, strict=True)}
    assert train == {"a": ["x"], "b": ["x"], "c": [], "d": ["x", "y"]}
    # Nothing after the target is known: seen is the history and the target only.
    a = list(split.test.users).index(data.users.index("a"))
    assert named(data, split.test.seen[a]) == sorted(["x", "y", "z"], key=data.vocab.index)
    assert split.popularity[data.vocab.index("x")] == 3
    assert split.protocol == "temporal (cut-off 1970-01-01T00:00:04+00:00)"


def test_leave_one_out_is_unchanged_by_timestamps(timed: SequenceData) -> None:
    assert cases(timed, "test") == {"a": (["x", "y", "z"], "w"), "d": (["x", "y"], "z")}
    assert cases(timed, "valid") == {"a": (["x", "y"], "z"), "d": (["x"], "y")}
    assert timed.split().protocol == "leave-one-out"


def test_last_days_counts_back_from_the_newest_interaction(timed: SequenceData) -> None:
    # The newest interaction is at 7 s; 3 s before it is the same cut-off as above.
    days = 3 / 86400
    by_days = timed.with_split(SplitSpec(protocol="temporal", last_days=days))
    assert cases(by_days, "test") == {"a": (["x", "y"], "z"), "b": (["x"], "y")}
    iso = timed.with_split(SplitSpec(protocol="temporal", cutoff="1970-01-01T00:00:04"))
    assert cases(iso, "test") == cases(by_days, "test")


def test_timestamps_and_protocol_survive_save_and_load(timed: SequenceData, tmp_path: Path) -> None:
    loaded = load_data(tmp_path / "prepared")
    assert [list(t) for t in loaded.timestamps] == [[1, 2, 5, 6], [1, 7], [5], [1, 2, 3]]
    assert loaded.fingerprint == timed.fingerprint
    temporal = loaded.with_split(SplitSpec(protocol="temporal", cutoff=4))
    temporal.save(tmp_path / "temporal")
    again = load_data(tmp_path / "temporal")
    assert again.split_spec == temporal.split_spec
    assert cases(again, "test") == cases(temporal, "test")
    # Back to the default protocol: the saved folder forgets the temporal one.
    again.with_split(SplitSpec()).save(tmp_path / "default")
    assert load_data(tmp_path / "default").split_spec == SplitSpec()


def test_times_are_part_of_the_fingerprint(timed: SequenceData) -> None:
    shifted = SequenceData(
        timed.sequences, timed.users, timed.vocab, {}, [t + 1 for t in timed.timestamps]
    )
    untimed = SequenceData(timed.sequences, timed.users, timed.vocab)
    assert len({timed.fingerprint, shifted.fingerprint, untimed.fingerprint}) == 3


def test_a_cutoff_without_test_users_is_an_error(timed: SequenceData) -> None:
    with pytest.raises(DataError, match="leaves no test case"):
        timed.with_split(SplitSpec(protocol="temporal", cutoff=100)).split()


def test_temporal_split_needs_timestamps(tmp_path: Path) -> None:
    path = tmp_path / "seq.txt"
    path.write_text("u1 a b c\nu2 b c d\n")
    data = load_data(path).with_split(SplitSpec(protocol="temporal", cutoff=0))
    with pytest.raises(DataError, match="needs timestamps"):
        data.split()


def test_split_spec_is_validated() -> None:
    with pytest.raises(ValidationError, match="exactly one of cutoff and last_days"):
        SplitSpec(protocol="temporal")
    with pytest.raises(ValidationError, match="exactly one"):
        SplitSpec(protocol="temporal", cutoff=3, last_days=1)
    with pytest.raises(ValidationError, match="belongs to the temporal split"):
        SplitSpec(last_days=1)
    with pytest.raises(ValidationError, match="neither epoch seconds nor ISO 8601"):
        SplitSpec(protocol="temporal", cutoff="yesterday")


def test_the_config_protocol_reaches_the_metrics(timed: SequenceData, tmp_path: Path) -> None:
    spec = DataSpec(path=str(tmp_path / "prepared"), split=SplitSpec(protocol="temporal", cutoff=4))
    data = load_source(spec)
    evaluator = Evaluator(data.split())
    scores = evaluator.evaluate_mostpop("test")
    assert len(scores.per_user["full"]["ndcg@10"]) == 2  # the two users spanning the cut-off
    document = evaluator.metrics_document(popularity_scorer(data.split().popularity))
    assert document["protocol"]["split"].startswith("temporal (cut-off")
