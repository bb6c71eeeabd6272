"""A real S3 API server for tests: moto in server mode, a process on localhost.

The same arrangement s3fs's own test suite uses. The server speaks the S3 REST
API over HTTP; clients find it the way production clients find an S3-compatible
store, through the standard AWS environment variables (AWS_ENDPOINT_URL and the
credentials), so the code under test has no test-only switch.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "fishrec-test",
    "AWS_SECRET_ACCESS_KEY": "fishrec-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def s3_server(timeout_s: float = 30.0) -> Iterator[str]:
    """Start `moto.server` on a free port; yield its endpoint URL; stop it."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                break
            except OSError as err:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the S3 test server did not start on {endpoint}") from err
                time.sleep(0.1)
        yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextmanager
def s3_environment(endpoint: str) -> Iterator[None]:
    """The AWS variables a client reads, pointed at `endpoint`; restored afterwards."""
    wanted = CREDENTIALS | {"AWS_ENDPOINT_URL": endpoint}
    saved = {name: os.environ.get(name) for name in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        forget_cached_clients()


def forget_cached_clients() -> None:
    """fsspec caches filesystem instances with their endpoint: drop them between servers."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


def make_bucket(name: str) -> str:
    """Create `name` on the server the environment points at; return its s3:// URL."""
    import boto3

    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"
