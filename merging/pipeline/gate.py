"""The quality gate: publish a new bundle only if it is not worse than the one in service.

Champion: the bundle `LATEST` names. Challenger: the bundle this run exported.
Both are scored the way the service would answer (their ONNX graphs through
onnxruntime, top-k in the graph, the whole history excluded) on the *new* run's
test users: each user's history and target are mapped to each bundle's own
vocabulary by external id. A history item the champion never saw is dropped
from its input; a target it never saw is a miss for it (it cannot recommend
what it does not know), so a growing catalogue counts against the old model, as
it does for users.

The challenger is published when its metric >= champion's - tolerance; the
decision, with both numbers, is recorded in the run's manifest and report. A
refusal leaves LATEST (and so the service) untouched and the job exits non-zero.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from serving.bundle import BundleError, load_bundle
from serving.runtime import graph_feed
from training.flags import CommandError
from training.sequence_data import SequenceData
from training.splits import EvalSplit

log = logging.getLogger(__name__)

K = 10  # NDCG@10 and HR@10 read the top 10


class GateRefused(CommandError):
    """The challenger scored below the champion minus the tolerance."""


@dataclass(frozen=True)
class GateDecision:
    metric: str
    tolerance: float
    challenger: float
    champion: float | None  # None: no champion (the first run publishes)
    champion_run: str | None
    users: int
    passed: bool
    forced: bool = False
    note: str | None = None  # why there was no champion to compare with, if so

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        if self.champion is None:
            why = self.note or "the first run publishes"
            return f"gate: no champion ({why}); {self.metric} {self.challenger:.4f}"
        verdict = "passed" if self.passed else "refused"
        forced = " (forced: --force-publish)" if self.forced else ""
        return (
            f"gate {verdict}{forced}: challenger {self.metric} {self.challenger:.4f} vs champion "
            f"{self.champion_run} {self.champion:.4f} (tolerance {self.tolerance}) on "
            f"{self.users} test users"
        )


def bundle_per_user(
    folder: Path, split: EvalSplit, data: SequenceData, batch: int = 256
) -> dict[str, np.ndarray]:
    """Per-user NDCG@10 and HR@10 of a bundle's graph on `split` (external ids mapped).

    The bundle is loaded by the service's own reader, so its checksums are verified.
    """
    import onnxruntime as ort

    bundle = load_bundle(folder)
    own = {item: index + 1 for index, item in enumerate(bundle.vocab.items)}
    external = [data.vocab.external(i) for i in range(1, data.num_items + 1)]
    mapped = np.array([0, *(own.get(item, 0) for item in external)], dtype=np.int64)
    session = ort.InferenceSession(
        str(bundle.model_file(quantized=False)), providers=["CPUExecutionProvider"]
    )
    ndcg = np.zeros(len(split), dtype=np.float64)
    hit = np.zeros(len(split), dtype=np.float64)
    k = min(K, len(own))
    for start in range(0, len(split), batch):
        rows = range(start, min(start + batch, len(split)))
        histories = [mapped[split.histories[i]] for i in rows]
        histories = [h[h != 0] for h in histories]  # items this bundle never saw
        width = max(1, max(len(h) for h in histories))
        items = np.zeros((len(histories), width), dtype=np.int64)
        for row, history in enumerate(histories):
            if len(history):
                items[row, width - len(history) :] = history
        exclude = np.ones(len(histories), dtype=bool)
        _, indices = session.run(["scores", "indices"], graph_feed(session, items, k, exclude))
        for row, user in enumerate(rows):
            target = mapped[split.targets[user]]  # 0: unknown to this bundle, a miss
            found = np.flatnonzero(indices[row] == target) if target else []
            if len(found):
                ndcg[user] = 1.0 / math.log2(int(found[0]) + 2)
                hit[user] = 1.0
    return {"ndcg@10": ndcg, "hr@10": hit}


def decide(
    challenger: Path,
    champion: Path | None,
    champion_run: str | None,
    data: SequenceData,
    metric: str,
    tolerance: float,
    force: bool = False,
) -> GateDecision:
    """Score both bundles on the run's test users and decide (see the module docstring)."""
    split = data.split().test
    score = float(bundle_per_user(challenger, split, data)[metric].mean())
    if champion is None:
        return GateDecision(metric, tolerance, score, None, None, len(split), True, False)
    try:
        reference = float(bundle_per_user(champion, split, data)[metric].mean())
    except BundleError as err:
        # The service refuses such a bundle too, so nothing worse can be in service:
        # publishing replaces a model that cannot be served.
        log.warning("gate: champion %s is not a loadable bundle (%s)", champion_run, err)
        note = f"champion {champion_run} is not a loadable bundle: {err}"
        return GateDecision(
            metric, tolerance, score, None, champion_run, len(split), True, note=note
        )
    passed = score >= reference - tolerance
    return GateDecision(
        metric, tolerance, score, reference, champion_run, len(split), passed, force and not passed
    )
