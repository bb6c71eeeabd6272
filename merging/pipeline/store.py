"""The artifact store: where runs and published bundles live, seen alike by every Ray node.

The root is a local path (one machine, or a shared mount such as NFS) or any
fsspec URI (`s3://bucket/fishrec`, `gs://...`, `file:///...`). Stages work in
node-local scratch folders and move whole folders in and out of the store, so
training and export code only ever see local paths.

Publication relies on two properties: a folder becomes visible under its final
name only once complete (local: rename of a staged sibling; object stores: the
manifest is the last object written), and `LATEST` is one small object that is
replaced in a single write (local: write-then-rename; object stores: a single
PUT is atomic).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path, PurePosixPath

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from serving.bundle import MANIFEST


class ArtifactStore:
    """Files under one root, addressed by POSIX paths relative to it."""

    def __init__(self, root: str) -> None:
        self.root = str(root)
        self.fs, self.base = url_to_fs(self.root)
        self.local = isinstance(self.fs, LocalFileSystem)
        if self.local:
            Path(self.base).mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"ArtifactStore({self.root!r})"

    def path(self, relative: str) -> str:
        return str(PurePosixPath(self.base, relative))

    def local_path(self, relative: str) -> Path:
        """The local path of `relative`; only for local stores."""
        if not self.local:
            raise ValueError(f"{self.root} is not a local store")
        return Path(self.path(relative))

    def exists(self, relative: str) -> bool:
        return bool(self.fs.exists(self.path(relative)))

    def read_text(self, relative: str) -> str:
        with self.fs.open(self.path(relative), "r") as handle:
            return handle.read()

    def write_text(self, relative: str, text: str) -> None:
        """Replace one file in a single step (a reader sees the old or the new text)."""
        target = self.path(relative)
        self.fs.makedirs(str(PurePosixPath(target).parent), exist_ok=True)
        if self.local:
            staging = f"{target}.{uuid.uuid4().hex}.tmp"
            Path(staging).write_text(text)
            os.replace(staging, target)
        else:
            with self.fs.open(target, "w") as handle:
                handle.write(text)

    def remove(self, relative: str) -> None:
        if self.exists(relative):
            self.fs.rm(self.path(relative), recursive=True)

    def listdir(self, relative: str) -> list[str]:
        if not self.exists(relative):
            return []
        return sorted(PurePosixPath(p).name for p in self.fs.ls(self.path(relative), detail=False))

    def upload_folder(self, local: Path, relative: str) -> None:
        """Copy a local folder to `relative`, replacing what was there.

        Local stores stage a sibling and rename it into place, so the folder
        appears complete or not at all.
        """
        target = self.path(relative)
        if self.local:
            parent = Path(target).parent
            parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{Path(target).name}.", dir=parent))
            try:
                shutil.copytree(local, staging, dirs_exist_ok=True)
                if Path(target).exists():
                    shutil.rmtree(target)
                os.replace(staging, target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            return
        self.remove(relative)
        # Object stores have no rename: the manifest goes last, so a reader (which
        # trusts a folder only with its manifest) never takes a half-copied one.
        files = sorted(p for p in Path(local).rglob("*") if p.is_file())
        files.sort(key=lambda p: p.name == MANIFEST)
        for path in files:
            self.fs.put_file(str(path), str(PurePosixPath(target, *path.relative_to(local).parts)))

    def upload_file(self, local: Path, relative: str) -> None:
        """Copy one local file to `relative`, replacing it in one step."""
        target = self.path(relative)
        self.fs.makedirs(str(PurePosixPath(target).parent), exist_ok=True)
        if self.local:
            if Path(local).resolve() == Path(target).resolve():
                return
            staging = f"{target}.{uuid.uuid4().hex}.tmp"
            shutil.copy2(local, staging)
            os.replace(staging, target)
        else:
            self.fs.put_file(str(local), target)

    def download_folder(self, relative: str, local: Path) -> Path:
        """A local copy of the folder `relative` (local stores: the folder itself)."""
        if self.local:
            return Path(self.path(relative))
        local.mkdir(parents=True, exist_ok=True)
        self.fs.get(self.path(relative) + "/", str(local), recursive=True)
        return local
