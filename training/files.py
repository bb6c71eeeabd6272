"""Small file-system building blocks shared by data folders, checkpoints and bundles.

Torch-free, so the data tools (training/sequence_data.py) can use them.
(serving/ keeps its own reader side: it must not import training.)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def staging_dir(target: Path) -> Iterator[Path]:
    """A fresh folder beside `target` (same file system, so a rename is atomic), removed on exit.

    Build the content in it, then `replace_directory(staging, target)`.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (not mkdtemp, which makes the folder private) so the result has the umask's modes.
    path = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:12]}")
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def replace_directory(source: Path, target: Path) -> None:
    """Move the folder `source` to `target`, replacing any old `target`; never half-written.

    rename() cannot replace a non-empty folder, so an old target is first
    renamed aside and deleted after the new one is in place.
    """
    source, target = Path(source), Path(target)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
    try:
        os.replace(source, target)
    except OSError:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a staging folder that replaces `target` when the block succeeds.

    On failure the staging folder is removed and `target` is untouched.
    """
    with staging_dir(target) as staging:
        yield staging
        replace_directory(staging, target)
