"""Where a run's data comes from: the embedded synthetic set, a prepared folder or a raw file.

`data.path` (and `data.features`) may also be an fsspec URL such as
`s3://bucket/data/ml-1m` (the s3 extra; credentials and endpoint from the usual
environment, e.g. AWS_ACCESS_KEY_ID / AWS_ENDPOINT_URL): the folder or file is
downloaded first, so a job on a cluster without a shared volume reads its data
from the same bucket it publishes to. Readers stay local-file code.
"""

from __future__ import annotations

import tempfile
from pathlib import Path, PurePosixPath

from training.config import DataSpec
from training.data_error import DataError
from training.prepare import load_data
from training.sequence_data import SequenceData
from training.synthetic import SyntheticConfig, generate

SYNTHETIC = "synthetic"


def load_source(spec: DataSpec, cache: Path | None = None) -> SequenceData:
    """The data of `spec`, under its evaluation protocol (a remote path downloaded to `cache`)."""
    if spec.path == SYNTHETIC:
        data = generate(SyntheticConfig(seed=spec.synthetic.seed, **spec.synthetic.overrides))
    else:
        data = load_data(Path(localized(spec, cache).path))
    return data.with_split(spec.split)


def is_remote(path: str | None) -> bool:
    """An fsspec URL other than a local file (s3://, gs://, memory://...)."""
    return bool(path) and "://" in str(path) and not str(path).startswith("file://")


def localized(spec: DataSpec, cache: Path | None = None) -> DataSpec:
    """`spec` with a remote data.path and data.features downloaded under `cache` (else a temp dir).

    Local paths and the synthetic set come back unchanged.
    """
    remote = [f for f in ("path", "features") if is_remote(getattr(spec, f))]
    if not remote:
        return spec
    folder = Path(cache) if cache else Path(tempfile.mkdtemp(prefix="fishrec-data-"))
    updates = {f: str(download(getattr(spec, f), folder / f)) for f in remote}
    return spec.model_copy(update=updates)


def download(url: str, target: Path) -> Path:
    """Copy a remote folder (into `target`) or file (into `target/<name>`); the local path."""
    try:
        from fsspec.core import url_to_fs
    except ImportError as err:
        raise DataError(
            f"reading {url} needs fsspec and its store's driver (the s3 extra)"
        ) from err
    try:
        fs, root = url_to_fs(url)
    except (ImportError, ValueError) as err:  # e.g. s3:// without s3fs installed
        raise DataError(f"cannot open {url}: {err}") from err
    root = root.rstrip("/")
    if fs.isdir(root):
        target.mkdir(parents=True, exist_ok=True)
        fs.get(root + "/", str(target), recursive=True)
        return target
    if not fs.isfile(root):
        raise DataError(f"{url}: no such file or folder")
    target.mkdir(parents=True, exist_ok=True)
    local = target / PurePosixPath(root).name
    fs.get(root, str(local))
    return local
