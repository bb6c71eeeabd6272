"""training.download: fetch over HTTP from a local server, verify, prepare; clean failures."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import logging
import socket
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from training.download import DownloadError, download_dataset
from training.sequence_data import SequenceData

RATINGS = "1::10::5::978300760\n1::20::3::978300100\n2::10::4::978200000\n2::30::4::978200001\n"


def make_zip(members: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in members.items():
            archive.writestr(name, text)
    return buffer.getvalue()


ML1M = {
    "ml-1m/ratings.dat": RATINGS,
    "ml-1m/movies.dat": "10::Toy::Animation\n20::Heat::Action\n30::Up::Drama\n",
    "ml-1m/users.dat": "1::F::1::10::48067\n2::M::56::16::70072\n",
    "ml-1m/README": "research use only\n",
}


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Keep request lines out of the test output."""


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """(base URL, folder it serves) of an HTTP server on 127.0.0.1, bypassing any proxy."""
    for key in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    folder = tmp_path / "www"
    folder.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", folder
    server.shutdown()
    server.server_close()
    thread.join()


def publish(folder: Path, archive: bytes, md5: str | None) -> None:
    (folder / "ml-1m.zip").write_bytes(archive)
    if md5 is not None:
        (folder / "ml-1m.zip.md5").write_text(f"MD5 (ml-1m.zip) = {md5}\n")


def test_download_verifies_extracts_and_prepares(
    served: tuple[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base, folder = served
    archive = make_zip(ML1M)
    publish(folder, archive, hashlib.md5(archive).hexdigest())
    output = tmp_path / "data" / "ml-1m"
    with caplog.at_level(logging.INFO, logger="training.download"):
        data = download_dataset("ml-1m", output, url=f"{base}/ml-1m.zip")
    assert "matches" in caplog.text
    assert (data.num_users, data.num_items, data.num_interactions) == (2, 3, 4)
    loaded = SequenceData.load(output)
    assert loaded.fingerprint == data.fingerprint
    # Chronological: user 1 saw 20 before 10.
    assert [loaded.vocab.external(int(i)) for i in loaded.sequences[0]] == ["20", "10"]
    assert sorted(p.name for p in (output / "raw").iterdir()) == [
        "README",
        "movies.dat",
        "users.dat",
    ]
    meta = json.loads((output / "meta.json").read_text())
    assert meta["download"]["md5"] == hashlib.md5(archive).hexdigest()
    assert meta["format"] == "ratings" and meta["source"] == "ml-1m"
    assert sorted(p.name for p in output.parent.iterdir()) == ["ml-1m"]


def test_missing_checksum_is_a_warning(
    served: tuple[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base, folder = served
    publish(folder, make_zip(ML1M), md5=None)
    with caplog.at_level(logging.WARNING, logger="training.download"):
        download_dataset("ml-1m", tmp_path / "out", url=f"{base}/ml-1m.zip")
    assert "not verified" in caplog.text
    assert (tmp_path / "out" / "meta.json").is_file()


def test_wrong_checksum_fails_and_leaves_nothing(served: tuple[str, Path], tmp_path: Path) -> None:
    base, folder = served
    publish(folder, make_zip(ML1M), md5="0" * 32)
    parent = tmp_path / "data"
    with pytest.raises(DownloadError, match="checksum mismatch"):
        download_dataset("ml-1m", parent / "ml-1m", url=f"{base}/ml-1m.zip")
    assert not (parent / "ml-1m").exists()
    assert list(parent.iterdir()) == []


def test_unreachable_server_says_how_to_prepare_a_local_file(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DownloadError, match=r"could not reach .*fishrec data prepare"):
        download_dataset("ml-1m", tmp_path / "out", url=f"http://127.0.0.1:{port}/ml-1m.zip")
    assert not (tmp_path / "out").exists()


def test_http_error_and_archive_problems(served: tuple[str, Path], tmp_path: Path) -> None:
    base, folder = served
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_dataset("ml-1m", tmp_path / "out", url=f"{base}/absent.zip")
    publish(folder, make_zip({"ml-1m/movies.dat": "x"}), md5=None)
    with pytest.raises(DownloadError, match=r"has no ml-1m/ratings\.dat"):
        download_dataset("ml-1m", tmp_path / "out", url=f"{base}/ml-1m.zip")
    publish(folder, b"not a zip at all", md5=None)
    with pytest.raises(DownloadError, match="not a zip archive"):
        download_dataset("ml-1m", tmp_path / "out", url=f"{base}/ml-1m.zip")
    assert not (tmp_path / "out").exists()
    with pytest.raises(DownloadError, match="unknown data set 'ml-20m'"):
        download_dataset("ml-20m", tmp_path / "out")


def test_a_local_archive_path_works_as_the_url(tmp_path: Path) -> None:
    archive = tmp_path / "ml-1m.zip"
    archive.write_bytes(make_zip(ML1M))
    data = download_dataset("ml-1m", tmp_path / "out", url=str(archive))
    assert data.num_interactions == 4
