"""Retention of published runs and work folders (docs/pipeline.md).

A nightly job publishes a run every day; without clean-up the artifact store
grows by a bundle and a work folder each night. After a successful publish,
`apply_retention` keeps:

- the newest `keep_runs` published runs (by their manifest's `created`);
- always the run `LATEST` names and the one published before it (roll-back);
- the work folder of the current run (a rerun with its id skips what is done)
  and of every kept run; other work folders are stale (their runs were removed,
  or they never published) and are deleted.

`keep_runs: 0` keeps everything (the default). Nothing is deleted before the
new run is published, so a failed run never costs a roll-back target.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from merging.pipeline.store import ArtifactStore
from serving.bundle import LATEST, MANIFEST, RUNS, run_path  # the contract's one home

log = logging.getLogger(__name__)

WORK = "work"


@dataclass(frozen=True)
class RetentionResult:
    kept_runs: list[str]
    deleted_runs: list[str]
    deleted_work: list[str]


def published_runs(store: ArtifactStore) -> list[str]:
    """Run ids under runs/, oldest first by their manifest's `created` (then by id)."""
    runs = []
    for run_id in store.listdir(RUNS):
        manifest = f"{run_path(run_id)}/{MANIFEST}"
        created = ""
        if store.exists(manifest):
            try:
                created = str(json.loads(store.read_text(manifest)).get("created", ""))
            except (ValueError, AttributeError):
                created = ""  # unreadable: treated as the oldest
        runs.append((created, run_id))
    return [run_id for _, run_id in sorted(runs)]


def apply_retention(store: ArtifactStore, keep_runs: int, current: str) -> RetentionResult:
    """Delete published runs beyond the newest `keep_runs` and stale work folders."""
    if keep_runs <= 0:
        return RetentionResult(published_runs(store), [], [])
    runs = published_runs(store)
    latest = store.read_text(LATEST).strip() if store.exists(LATEST) else None
    keep = set(runs[-keep_runs:])
    if latest in runs:
        keep.add(latest)
        position = runs.index(latest)
        if position > 0:
            keep.add(runs[position - 1])  # the roll-back target
    deleted_runs = [r for r in runs if r not in keep]
    for run_id in deleted_runs:
        store.remove(f"{RUNS}/{run_id}")
    kept_work = keep | {current}
    deleted_work = [w for w in store.listdir(WORK) if w not in kept_work]
    for run_id in deleted_work:
        store.remove(f"{WORK}/{run_id}")
    kept = [r for r in runs if r in keep]
    log.info(
        "retention: kept runs %s, deleted runs %s and work folders %s",
        kept,
        deleted_runs,
        deleted_work,
    )
    return RetentionResult(kept, deleted_runs, deleted_work)
