"""Resumable stages: outputs + a completion marker with checksums.

Every stage of the job writes its outputs under the run's work folder and then
a marker `stages/<name>.json` holding the sha256 of every output file. A rerun
with the same run id skips a stage whose marker exists and whose outputs still
verify, and redoes every other stage: a killed job resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any

from merging.pipeline.store import ArtifactStore

log = logging.getLogger(__name__)


class StageError(RuntimeError):
    """A stage that failed for good: names the stage and the cause."""

    def __init__(self, stage: str, cause: BaseException | str) -> None:
        self.stage = stage
        self.cause = cause
        super().__init__(f"stage {stage!r} failed: {cause}")


@dataclass(frozen=True)
class StageOutput:
    """What a stage produced: paths relative to the work folder, and a small JSON result."""

    outputs: list[str]
    result: dict[str, Any]


def sha256_stream(store: ArtifactStore, path: str) -> str:
    digest = hashlib.sha256()
    with store.fs.open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksums(store: ArtifactStore, relative: str) -> dict[str, str]:
    """{path relative to the store root: sha256} of a file or of every file below a folder."""
    full = store.path(relative)
    if not store.fs.exists(full):
        raise FileNotFoundError(f"{store.root}: stage output {relative} is missing")
    files = [full] if store.fs.isfile(full) else sorted(store.fs.find(full))
    base = PurePosixPath(store.base)
    return {str(PurePosixPath(f).relative_to(base)): sha256_stream(store, f) for f in files}


class StageRunner:
    """Runs named stages in one work folder, skipping those already done and verified."""

    def __init__(
        self,
        store: ArtifactStore,
        work: str,
        on_event: Callable[[str, str, dict], None] | None = None,
    ) -> None:
        self.store = store
        self.work = work
        self.on_event = on_event or (lambda stage, event, info: None)

    def marker(self, stage: str) -> str:
        return f"{self.work}/stages/{stage}.json"

    def completed(self, stage: str) -> dict[str, Any] | None:
        """The marker of `stage` if it exists and every output still verifies."""
        relative = self.marker(stage)
        if not self.store.exists(relative):
            return None
        try:
            marker = json.loads(self.store.read_text(relative))
            for path, expected in marker["files"].items():
                if sha256_stream(self.store, self.store.path(path)) != expected:
                    raise ValueError(f"{path} changed since the stage completed")
        except (ValueError, KeyError, FileNotFoundError) as err:
            log.warning("stage %s will run again: %s", stage, err)
            return None
        return marker

    def run(self, stage: str, work: Callable[[], StageOutput]) -> dict[str, Any]:
        """The result of `stage`: from its verified marker, or by running `work`."""
        done = self.completed(stage)
        if done is not None:
            self.on_event(stage, "skipped", done)
            return done["result"]
        self.on_event(stage, "started", {})
        start = time.perf_counter()
        try:
            output = work()
        except StageError:
            raise
        except Exception as err:
            raise StageError(stage, err) from err
        return self.record(stage, output, time.perf_counter() - start)

    def record(self, stage: str, output: StageOutput, seconds: float) -> dict[str, Any]:
        """Checksum the outputs of a finished stage and write its marker (the last step)."""
        files: dict[str, str] = {}
        for relative in output.outputs:
            files.update(checksums(self.store, f"{self.work}/{relative}"))
        marker = {
            "stage": stage,
            "completed": datetime.now(UTC).isoformat(),
            "seconds": seconds,
            "files": files,
            "result": output.result,
        }
        self.store.write_text(
            self.marker(stage), json.dumps(marker, indent=2, sort_keys=True) + "\n"
        )
        self.on_event(stage, "finished", marker)
        return output.result
