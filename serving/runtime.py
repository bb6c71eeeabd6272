"""The onnxruntime side: the model session and the graph's inputs and outputs.

Its thread count comes from serving/cpus.py (the container's CPU quota).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from serving.bundle import BundleError

log = logging.getLogger(__name__)

# The interface of model.onnx (bundle contract fishrec.bundle/1).
INPUTS = {"item_ids": "tensor(int64)", "k": "tensor(int64)", "exclude_seen": "tensor(bool)"}
# Business rules inside the graph; bundles exported before them lack these inputs and
# serve without filters (docs/serving.md).
FILTER_INPUTS = {
    "exclude_ids": "tensor(int64)",
    "candidate_ids": "tensor(int64)",
    "blocked_ids": "tensor(int64)",
}
OUTPUTS = {"scores": "tensor(float)", "indices": "tensor(int64)"}
NO_IDS = np.zeros(0, dtype=np.int64)
NO_IDS.setflags(write=False)  # shared by every row without exclusions


class FiltersUnsupported(ValueError):
    """A request asks for filters that the serving bundle's graph cannot apply."""


@dataclass(frozen=True)
class Filters:
    """The graph's filter inputs for one batch: 0-padded internal ids (0 is never an item)."""

    exclude_ids: np.ndarray  # (B, E): never returned for that row
    candidate_ids: np.ndarray  # (B, C): a row with any non-zero id returns only among them
    blocked_ids: np.ndarray  # (U,): never returned for any row

    @classmethod
    def none(cls, batch: int) -> Filters:
        zeros = np.zeros((batch, 1), dtype=np.int64)
        return cls(zeros, zeros, np.zeros(1, dtype=np.int64))

    @classmethod
    def of_rows(
        cls, excluded: list[np.ndarray], candidates: list[np.ndarray], blocked: np.ndarray
    ) -> Filters:
        return cls(padded(excluded), padded(candidates), blocked if len(blocked) else NO_BLOCKED)

    @property
    def active(self) -> bool:
        return bool(self.exclude_ids.any() or self.candidate_ids.any() or self.blocked_ids.any())

    def feed(self) -> dict[str, np.ndarray]:
        return {
            "exclude_ids": np.ascontiguousarray(self.exclude_ids, dtype=np.int64),
            "candidate_ids": np.ascontiguousarray(self.candidate_ids, dtype=np.int64),
            "blocked_ids": np.ascontiguousarray(self.blocked_ids, dtype=np.int64),
        }


NO_BLOCKED = np.zeros(1, dtype=np.int64)


def padded(rows: list[np.ndarray]) -> np.ndarray:
    """(B, max(1, longest)) int64, each row's ids then zeros."""
    out = np.zeros((len(rows), max(1, max((len(r) for r in rows), default=0))), dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def has_filter_inputs(session: ort.InferenceSession) -> bool:
    """Whether the graph takes the filter inputs (all of them, with their types)."""
    inputs = {node.name: node.type for node in session.get_inputs()}
    present = [name for name in FILTER_INPUTS if name in inputs]
    if present and (
        len(present) < len(FILTER_INPUTS)
        or any(inputs[name] != FILTER_INPUTS[name] for name in present)
    ):
        raise BundleError(
            f"model inputs {inputs} have only part of the filter inputs {FILTER_INPUTS}"
        )
    return bool(present)


def graph_feed(
    session: ort.InferenceSession,
    item_ids: np.ndarray,
    k: int,
    exclude_seen: np.ndarray,
    filters: Filters | None = None,
    has_filters: bool | None = None,
) -> dict[str, np.ndarray]:
    """The inputs of one run: filters fed when the graph has them (refused if it has not).

    `has_filters`: what `has_filter_inputs(session)` says, when the caller knows it.
    """
    feed = {
        "item_ids": np.ascontiguousarray(item_ids, dtype=np.int64),
        "k": np.array([k], dtype=np.int64),
        "exclude_seen": np.ascontiguousarray(exclude_seen, dtype=np.bool_),
    }
    if has_filter_inputs(session) if has_filters is None else has_filters:
        feed.update((filters or Filters.none(len(item_ids))).feed())
    elif filters is not None and filters.active:
        raise FiltersUnsupported(
            "the serving bundle was exported before per-request filters and availability "
            "(its graph has no exclude_ids/candidate_ids/blocked_ids inputs): re-export it"
        )
    return feed


# ---- the session ----------------------------------------------------------------------

# Padding a run to its longest row may add this share of the rows' real positions, plus a few
# positions per row (runs of very short rows are cheap either way).
PADDING_SLACK = 0.25
PADDING_PER_ROW = 4


def length_groups(lengths: list[int]) -> list[list[int]]:
    """Indices of `lengths` in groups of similar length (shortest first), padding bounded."""
    groups: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        length = lengths[i]  # the longest so far in `current`: lengths come in order
        padded = (len(current) + 1) * length
        allowed = (1 + PADDING_SLACK) * (real + length) + PADDING_PER_ROW * (len(current) + 1)
        if current and padded > allowed:
            groups.append(current)
            current, real = [], 0
        current.append(i)
        real += length
    if current:
        groups.append(current)
    return groups


def left_padded(histories: list[np.ndarray]) -> np.ndarray:
    """(B, longest) int64: each history right-aligned, 0 (padding) before it."""
    width = max(len(h) for h in histories)
    item_ids = np.zeros((len(histories), width), dtype=np.int64)
    for i, history in enumerate(histories):
        item_ids[i, width - len(history) :] = history
    return item_ids


@dataclass(frozen=True)
class Row:
    """One history to score: internal ids oldest first (no padding), how many items, rules."""

    history: np.ndarray  # (L,) int64, L >= 1
    k: int
    exclude_seen: bool
    exclude: np.ndarray = field(default_factory=lambda: NO_IDS)  # never to return for this row
    candidates: np.ndarray | None = None  # return only among these (None: every item)


@dataclass(frozen=True)
class Ranked:
    """The answer for one row: internal ids and scores, best first, non-finite scores dropped."""

    ids: np.ndarray  # (<= k,) int64
    scores: np.ndarray  # (<= k,) float32


def open_session(path: Path, intra_op_threads: int, inter_op_threads: int) -> ort.InferenceSession:
    """An onnxruntime CPU session with explicit threads; BundleError for a bad graph."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.execution_mode = (
        ort.ExecutionMode.ORT_SEQUENTIAL
        if inter_op_threads == 1
        else ort.ExecutionMode.ORT_PARALLEL
    )
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning pool threads burn the CPU that the event loop needs between runs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types for bad graphs
        raise BundleError(f"{path}: onnxruntime cannot load the model ({err})") from err


class RankingModel:
    """What the service runs: rows -> ranked answers, checked by a warm-up before it serves.

    Two implementations: `OnnxModel` (model.onnx scores every item) and
    `serving.retrieval.RetrievalModel` (ANN shortlist, exact re-ranking).
    """

    path: Path
    num_items: int
    filters: bool
    warm_k: int  # the k of the warm-up's unfiltered rows (every one must come back)

    def run(self, rows: list[Row], blocked: np.ndarray = NO_IDS) -> list[Ranked]:
        raise NotImplementedError

    def warm_up(self, batch_size: int, history: int) -> None:
        """Run the shapes serving will see and check the answers are sane.

        A bundle that loads but answers nonsense (wrong shapes, ids out of range,
        NaN) is refused here, before it can replace a working model.
        """
        rng = np.random.default_rng(0)
        for rows, length in ((1, 1), (batch_size, history)):
            batch = [
                Row(rng.integers(1, self.num_items + 1, size=length), self.warm_k, i % 2 == 1)
                for i in range(rows)
            ]
            for row, answer in zip(batch, self.run(batch), strict=True):
                if not ((answer.ids >= 1) & (answer.ids <= self.num_items)).all():
                    raise BundleError(f"{self.path}: warm-up answer has item ids out of range")
                if not row.exclude_seen and len(answer.ids) != self.warm_k:
                    raise BundleError(f"{self.path}: warm-up scores are not all finite")
                if np.any(np.diff(answer.scores) > 0):
                    raise BundleError(f"{self.path}: warm-up scores are not in descending order")
        if self.filters:
            self.warm_up_filters(rng, batch_size, history)

    def warm_up_filters(self, rng: np.random.Generator, batch_size: int, history: int) -> None:
        """The filter inputs must hold: nothing excluded or blocked comes back, only candidates."""
        blocked = rng.integers(1, self.num_items + 1, size=3)
        batch = []
        for i in range(batch_size):
            candidates = rng.integers(1, self.num_items + 1, size=20) if i % 2 else None
            exclude = rng.integers(1, self.num_items + 1, size=5)
            batch.append(
                Row(
                    rng.integers(1, self.num_items + 1, size=history), 10, True, exclude, candidates
                )
            )
        for row, answer in zip(batch, self.run(batch, blocked), strict=True):
            returned = set(answer.ids.tolist())
            if returned & (set(row.exclude.tolist()) | set(blocked.tolist())):
                raise BundleError(f"{self.path}: warm-up returned an excluded or blocked item")
            if row.candidates is not None and not returned <= set(row.candidates.tolist()):
                raise BundleError(f"{self.path}: warm-up returned an item outside the candidates")


class OnnxModel(RankingModel):
    """An onnxruntime session of a bundle's model with explicit threads."""

    def __init__(
        self,
        path: Path,
        num_items: int,
        intra_op_threads: int,
        inter_op_threads: int,
        max_history: int | None = None,
    ) -> None:
        """`max_history`: how many newest items the graph reads (the bundle's max_history)."""
        self.path = Path(path)
        self.num_items = num_items
        self.max_history = max_history or sys.maxsize
        self.session = open_session(self.path, intra_op_threads, inter_op_threads)
        self.check_interface()
        self.warm_k = num_items
        self.filters = has_filter_inputs(self.session)

    def check_interface(self) -> None:
        inputs = {node.name: node.type for node in self.session.get_inputs()}
        outputs = {node.name: node.type for node in self.session.get_outputs()}
        for expected, actual, kind in ((INPUTS, inputs, "inputs"), (OUTPUTS, outputs, "outputs")):
            wrong = {
                name: actual.get(name)
                for name, type_ in expected.items()
                if actual.get(name) != type_
            }
            if wrong:
                raise BundleError(
                    f"{self.path}: model {kind} {wrong} do not match the bundle contract {expected}"
                )

    def run(self, rows: list[Row], blocked: np.ndarray = NO_IDS) -> list[Ranked]:
        """Score a batch of rows; rows of similar length share a session run, each keeps its k.

        `blocked`: internal ids no row may return (items marked unavailable).

        Rows are padded to the longest row of their run, and the transformer's cost
        grows with the padded length while batching saves little on a CPU, so one
        run over rows of 10 and 200 items would cost nearly 200 + 200.
        """
        lengths = [min(len(row.history), self.max_history) for row in rows]
        ranked: list[Ranked | None] = [None] * len(rows)
        for group in length_groups(lengths):
            answers = self.run_padded([rows[i] for i in group], blocked)
            for i, answer in zip(group, answers, strict=True):
                ranked[i] = answer
        return ranked  # type: ignore[return-value]  # every index belongs to one group

    def run_padded(self, rows: list[Row], blocked: np.ndarray = NO_IDS) -> list[Ranked]:
        """One session run over `rows`, left-padded to the longest."""
        item_ids = left_padded([row.history for row in rows])
        k = min(max(row.k for row in rows), self.num_items)
        exclude = np.fromiter((row.exclude_seen for row in rows), dtype=bool, count=len(rows))
        filters = Filters.of_rows(
            [row.exclude for row in rows],
            [NO_IDS if row.candidates is None else row.candidates for row in rows],
            blocked,
        )
        feed = graph_feed(self.session, item_ids, k, exclude, filters, self.filters)
        scores, indices = self.session.run(["scores", "indices"], feed)  # (B, k), (B, k)
        ranked = []
        for i, row in enumerate(rows):
            row_scores, row_ids = scores[i, : row.k], indices[i, : row.k]
            keep = np.isfinite(row_scores)
            ranked.append(Ranked(ids=row_ids[keep], scores=row_scores[keep]))
        return ranked
