"""Download a public data set, verify it, and prepare it into the canonical folder.

`fishrec data download ml-1m --output DIR` fetches the official GroupLens
archive, checks it against the checksum the server publishes next to it
(`URL.md5`), extracts `ratings.dat`, and prepares it like `fishrec data
prepare` would. The archive's other files that describe items and users
(movies.dat, users.dat, the licence README) are kept under `DIR/raw/`.

Everything happens in a staging folder beside DIR, which is renamed into place
only at the end: a failed download or a bad checksum leaves no output.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import logging
import re
import urllib.error
import urllib.request
import urllib.response
import zipfile
from dataclasses import dataclass
from pathlib import Path

from training.data_error import DataError
from training.files import replace_directory, staging_dir
from training.prepare import build_sequences
from training.readers import read_interactions
from training.sequence_data import SequenceData

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
_TIMEOUT_S = 60.0


class DownloadError(DataError):
    """A data set that could not be fetched or verified; a DataError so that callers catch one."""


@dataclass(frozen=True)
class DatasetSource:
    """Where a public data set lives and which archive members matter."""

    url: str
    ratings: str  # archive member with the interactions
    fmt: str  # its format, as read_interactions names it
    keep: tuple[str, ...] = ()  # members copied to raw/ for later use (item/user features)


DATASETS: dict[str, DatasetSource] = {
    "ml-1m": DatasetSource(
        url="https://files.grouplens.org/datasets/movielens/ml-1m.zip",
        ratings="ml-1m/ratings.dat",
        fmt="ratings",
        keep=("ml-1m/movies.dat", "ml-1m/users.dat", "ml-1m/README"),
    ),
}


def download_dataset(name: str, output: Path, url: str | None = None) -> SequenceData:
    """Fetch, verify, extract and prepare data set `name` into `output`; returns the data.

    `url` replaces the official address (a mirror, a local server, a file path).
    """
    if name not in DATASETS:
        raise DownloadError(f"unknown data set {name!r}; known: {sorted(DATASETS)}")
    source = DATASETS[name]
    url = _as_url(url or source.url)
    output = Path(output)
    with staging_dir(output) as staging:
        archive = staging / "archive.zip"
        digests = _fetch(url, archive, output)
        _verify_md5(url, digests["md5"])
        ratings = _extract(archive, source.ratings, staging / "extracted")
        data = build_sequences(read_interactions(ratings, source.fmt), source=name, fmt=source.fmt)
        data = dataclasses.replace(data, meta={**data.meta, "download": {"url": url, **digests}})
        prepared = staging / "prepared"
        data.save(prepared)
        _keep_raw(archive, source.keep, prepared / "raw")
        replace_directory(prepared, output)
    logger.info("prepared %s into %s", name, output)
    return data


def _as_url(location: str) -> str:
    """A URL; an existing local path becomes a file:// URL."""
    if "://" not in location and Path(location).exists():
        return Path(location).resolve().as_uri()
    return location


def _offline_hint(url: str, output: Path) -> str:
    return (
        f"could not reach {url}. If this machine is offline, fetch the archive elsewhere, "
        f"unzip it, copy ratings.dat here and run `fishrec data prepare --input ratings.dat "
        f"--output {output}` (or pass a mirror or a local copy of the archive as the url)"
    )


def _open(url: str, output: Path) -> http.client.HTTPResponse | urllib.response.addinfourl:
    """The open response, or a DownloadError saying what went wrong and what to do instead."""
    opener = urllib.request.build_opener()  # built per call: proxy settings read now
    try:
        return opener.open(url, timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as error:
        raise DownloadError(
            f"{url}: the server answered HTTP {error.code} {error.reason}"
        ) from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise DownloadError(f"{_offline_hint(url, output)} ({reason})") from None


def _fetch(url: str, target: Path, output: Path) -> dict[str, str]:
    """Stream `url` to `target`, logging progress; returns the md5 and sha256 of the bytes."""
    md5, sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with _open(url, output) as response, open(target, "wb") as sink:
        total = int(response.headers.get("Content-Length") or 0)
        logger.info(
            "downloading %s (%s)", url, f"{total / 1e6:.1f} MB" if total else "size unknown"
        )
        done, next_report = 0, 0.1
        try:
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                sink.write(chunk)
                md5.update(chunk)
                sha256.update(chunk)
                done += len(chunk)
                if total and done / total >= next_report:
                    logger.info("downloaded %.0f%% (%.1f MB)", 100 * done / total, done / 1e6)
                    next_report += 0.1
        except OSError as error:
            raise DownloadError(
                f"{url}: the download broke off after {done} bytes ({error})"
            ) from None
    if total and done != total:
        raise DownloadError(f"{url}: got {done} bytes, the server announced {total}")
    return {"md5": md5.hexdigest(), "sha256": sha256.hexdigest()}


def _published_md5(url: str) -> str | None:
    """The checksum the server publishes at URL.md5, or None when it has none."""
    try:
        with urllib.request.build_opener().open(url + ".md5", timeout=_TIMEOUT_S) as response:
            text = response.read(4096).decode("ascii", errors="replace")
    except (urllib.error.URLError, OSError):
        return None
    match = re.search(r"\b[0-9a-fA-F]{32}\b", text)
    return match.group(0).lower() if match else None


def _verify_md5(url: str, md5: str) -> None:
    expected = _published_md5(url)
    if expected is None:
        logger.warning("no checksum published at %s.md5: the archive is not verified", url)
        return
    if expected != md5:
        raise DownloadError(
            f"{url}: checksum mismatch (md5 {md5}, published {expected}): the archive is "
            "corrupt or was changed; nothing was written"
        )
    logger.info("archive md5 %s matches %s.md5", md5, url)


def _member(archive: zipfile.ZipFile, wanted: str) -> str:
    """The archive member `wanted`, or the only member with its base name."""
    names = archive.namelist()
    if wanted in names:
        return wanted
    base = wanted.rsplit("/", 1)[-1]
    matches = [name for name in names if name.rsplit("/", 1)[-1] == base]
    if len(matches) == 1:
        return matches[0]
    raise DownloadError(f"the archive has no {wanted}; its members: {names[:10]}")


def _extract(archive_path: Path, member: str, folder: Path) -> Path:
    """Copy one member out of the archive (by name: no paths taken from the archive)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(archive_path) as archive:
            name = _member(archive, member)
            target = folder / Path(name).name
            with archive.open(name) as source, open(target, "wb") as sink:
                for chunk in iter(lambda: source.read(_CHUNK), b""):
                    sink.write(chunk)
    except zipfile.BadZipFile as error:
        raise DownloadError(f"{archive_path.name}: not a zip archive ({error})") from None
    return target


def _keep_raw(archive_path: Path, members: tuple[str, ...], folder: Path) -> None:
    """Copy the descriptive members (those present) to `folder`, for later feature use."""
    with zipfile.ZipFile(archive_path) as archive:
        present = set(archive.namelist())
    for member in members:
        if member in present:
            _extract(archive_path, member, folder)
        else:
            logger.warning("the archive has no %s; raw/ goes without it", member)
