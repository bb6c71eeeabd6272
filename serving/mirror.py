"""Serving from an object store: a local cache that follows a remote artifact root.

onnxruntime opens local files, so the service always serves from a folder on
its own disk. With `FISHREC_SOURCE` set (an fsspec URL such as
`s3://bucket/fishrec`; credentials and endpoint from the usual environment,
e.g. AWS_ACCESS_KEY_ID / AWS_ENDPOINT_URL), `FISHREC_ARTIFACTS` becomes that
folder's cache of the remote root, and no volume needs to be shared between
the job's nodes and the service's pods.

A run is downloaded into a hidden staging folder beside the cache's runs,
checked there exactly as a local bundle is (every file against the manifest's
checksums, `serving.bundle.load_bundle`), and renamed into place only then: a
partial or corrupt upload never becomes loadable, and the model that serves
keeps serving. Only the serving run and the one before it stay cached.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from pathlib import Path, PurePosixPath
from typing import Any

from serving.bundle import (
    LATEST,
    MANIFEST,
    RUNS,
    BundleError,
    bundle_folder,
    load_bundle,
    parse_latest,
)

log = logging.getLogger(__name__)


class BundleMirror:
    """A local cache of `source`'s runs/<run_id>/ folders, filled on demand."""

    def __init__(self, source: str, cache: Path) -> None:
        try:
            from fsspec.core import url_to_fs
        except ImportError as err:  # the lean serve extra has no fsspec
            raise BundleError(
                f"serving from {source} needs fsspec and its store's driver "
                "(pip install 'fishrec[serve,s3]')"
            ) from err
        self.source = source
        self.cache = Path(cache)
        self.fs: Any
        self.fs, self.base = url_to_fs(source)

    def remote(self, *parts: str) -> str:
        return str(PurePosixPath(self.base, *parts))

    def latest(self) -> str | None:
        """The run id the remote LATEST names (None when nothing is published yet)."""
        try:
            with self.fs.open(self.remote(LATEST), "r") as handle:
                text = handle.read()
        except FileNotFoundError:
            return None
        except Exception as err:  # network, credentials: a refusal, never a crash
            raise BundleError(f"cannot read {self.source}/{LATEST}: {err}") from err
        return parse_latest(text, f"{self.source}/{LATEST}")

    def fetch(self, run_id: str) -> Path:
        """The cached, verified folder of `run_id`, downloaded first when it is not cached."""
        try:
            local = bundle_folder(self.cache, run_id)
        except ValueError as err:
            raise BundleError(str(err)) from err
        if (local / MANIFEST).is_file():
            return local  # complete: only verified folders are renamed into place
        local.parent.mkdir(parents=True, exist_ok=True)
        staging = local.parent / f".{run_id}.{uuid.uuid4().hex}.partial"
        try:
            self.download(run_id, staging)
            load_bundle(staging)  # every checksum, before the folder can be loaded
            staging.rename(local)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("downloaded bundle %s from %s", run_id, self.source)
        return local

    def download(self, run_id: str, staging: Path) -> None:
        remote = self.remote(RUNS, run_id)
        try:
            if not self.fs.exists(self.remote(RUNS, run_id, MANIFEST)):
                raise BundleError(f"{self.source}/{RUNS}/{run_id}: no {MANIFEST} (incomplete)")
            self.fs.get(remote + "/", str(staging), recursive=True)
        except BundleError:
            raise
        except Exception as err:
            raise BundleError(f"cannot download {self.source}/{RUNS}/{run_id}: {err}") from err

    def prune(self, keep: set[str]) -> list[str]:
        """Delete cached runs other than `keep` (and stale staging folders); return them."""
        runs = self.cache / RUNS
        if not runs.is_dir():
            return []
        removed = [p.name for p in runs.iterdir() if p.name not in keep]
        for name in removed:
            shutil.rmtree(runs / name, ignore_errors=True)
        return removed
