"""Publishing a run: the bundle under runs/<run_id>/, verified, then LATEST; the report's lines."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from merging.pipeline.gate import GateDecision
from merging.pipeline.store import ArtifactStore
from serving.bundle import LATEST, MANIFEST, run_path

log = logging.getLogger(__name__)


def describe_pool(pool: dict[str, Any] | None) -> str | None:
    """The report's line on the pool: strategy, budget, how far apart the members are."""
    if not pool:
        return None
    strategy = pool["strategy"]
    detail = {
        "spawn": f" (shared {pool['spawn_epoch']} epochs)",
        "population": (
            f" (pull {pool['pull_per_epoch']:g} per epoch"
            if pool.get("pull_per_epoch") is not None
            else f" (pull {pool['pull']:g} every {pool['exchange_every']} steps"
        )
        + (
            f", {pool['pull_schedule']} decay"
            if pool.get("pull_schedule", "constant") != "constant"
            else ""
        )
        + (", one initialisation)" if pool.get("shared_init") else ")"),
    }.get(strategy, "")
    parts = [
        f"{strategy}{detail}: {pool['members']} members, {pool['member_epochs_budget']} "
        "member-epochs at most"
    ]
    pairs = pool.get("error_inconsistency") or {}
    if pairs:
        parts.append(f"error inconsistency {min(pairs.values()):.3f}-{max(pairs.values()):.3f}")
    if pool.get("line"):
        parts.append(
            f"barrier between the first two {pool['line']['barrier']:+.4f} (valid NDCG@10)"
        )
    return "; ".join(parts)


def describe_warm_start(init_from: str | None, warm: dict[str, Any] | None) -> str:
    """The report's line on where the base started."""
    if init_from is None:
        return "trained from scratch"
    if warm is None:
        return f"from scratch (base.init_from {init_from}: nothing was published yet)"
    return (
        f"warm-started from run {warm['source_run']}: {warm['kept']} items kept, "
        f"{warm['new']} new (fresh rows), {warm['dropped']} dropped"
    )


def publish_bundle(
    store: ArtifactStore,
    work: str,
    run_id: str,
    scratch: Path,
    gate: dict[str, Any] | None = None,
) -> str:
    """Assemble, verify and publish runs/<run_id>/, then point LATEST at it.

    LATEST moves only after the published folder verifies, so a reader of
    LATEST always finds a complete bundle.
    """

    from merging.bundle import verify_bundle, write_manifest

    staging = scratch / run_id
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(store.download_folder(f"{work}/bundle", scratch / "in-bundle"), staging)
    report = store.download_folder(f"{work}/report", scratch / "in-report")
    shutil.copytree(report, staging, dirs_exist_ok=True)
    (staging / "metrics.json").write_text(store.read_text(f"{work}/metrics.json"))
    manifest = json.loads((staging / MANIFEST).read_text())
    fields = {k: v for k, v in manifest.items() if k not in ("schema", "files", "created")}
    if gate is not None:
        fields["gate"] = gate
        with (staging / "report.md").open("a") as report:
            report.write(f"\n## Quality gate\n\n{GateDecision(**gate).describe()}.\n")
    write_manifest(staging, fields)
    verify_bundle(staging)
    relative = run_path(run_id)
    store.upload_folder(staging, relative)
    verify_bundle(store.download_folder(relative, scratch / "check"))
    store.write_text(LATEST, run_id + "\n")
    log.info("published %s and pointed %s at it", relative, LATEST)
    return relative
