"""Live availability: items marked unavailable without a new model.

`<artifacts>/unavailable.txt` (or FISHREC_AVAILABILITY_FILE) lists external item
ids, one per line (blank lines and `#` comments are ignored). The service
re-reads it whenever it changes, checked with every look at LATEST
(FISHREC_RELOAD_INTERVAL_S) and at POST /v1/admin/reload, and never returns a
listed item: the ids go into the graph's `blocked_ids` input of every batch,
and the popular fallback skips them too. So an out-of-stock item stops
appearing within one reload interval.

Write the file atomically (a temporary file renamed over it), as the job writes
LATEST. A file that cannot be read as text is refused: the previous list stays
in force, the failure is logged and counted, and the next change is read
again. A missing file means every item is available.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from serving.bundle import Bundle
from serving.metrics import Metrics
from serving.runtime import NO_IDS

log = logging.getLogger(__name__)

FILE = "unavailable.txt"
MAX_LINE = 256  # an external id is at most 256 characters (the API's limit)


class AvailabilityError(ValueError):
    """An availability file that cannot be read; the previous list stays in force."""


def parse(text: str, path: Path) -> frozenset[str]:
    items = set()
    for number, line in enumerate(text.splitlines(), start=1):
        item = line.split("#", 1)[0].strip()
        if not item:
            continue
        if len(item) > MAX_LINE:
            raise AvailabilityError(f"{path}: line {number}: an item id of {len(item)} characters")
        items.add(item)
    return frozenset(items)


class Availability:
    """The current list of unavailable external ids, and its internal ids per bundle."""

    def __init__(self, path: Path, metrics: Metrics) -> None:
        self.path = Path(path)
        self.metrics = metrics
        self.items: frozenset[str] = frozenset()
        self._digest: str | None = None
        self._ids: dict[str, np.ndarray] = {}  # run id -> internal ids, for the current list

    def poll(self) -> bool:
        """Re-read the file if its content changed; True when the list changed. Never raises."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            raw = b""
        except OSError as err:
            self._refused(err)
            return False
        digest = hashlib.sha256(raw).hexdigest()
        if digest == self._digest:
            return False
        try:
            items = parse(raw.decode("utf-8"), self.path) if raw else frozenset()
        except (UnicodeDecodeError, AvailabilityError) as err:
            self._refused(err)
            return False
        self._digest = digest
        changed = items != self.items
        self.items, self._ids = items, {}
        self.metrics.availability_reloads.labels("success").inc()
        self.metrics.unavailable_items.set(len(items))
        if changed:
            log.info("%d items unavailable (from %s)", len(items), self.path)
        return changed

    def _refused(self, err: Exception) -> None:
        self.metrics.availability_reloads.labels("failure").inc()
        log.error(
            "availability file refused (%s); keeping %d unavailable items", err, len(self.items)
        )

    def blocked_ids(self, bundle: Bundle) -> np.ndarray:
        """Internal ids of `bundle` that must not be returned (ids it does not know are skipped)."""
        ids = self._ids.get(bundle.run_id)
        if ids is None:
            known, _ = bundle.vocab.encode(sorted(self.items))
            ids = np.asarray(known, dtype=np.int64) if known else NO_IDS
            self._ids = {bundle.run_id: ids}  # one bundle serves at a time; drop the others
        return ids
