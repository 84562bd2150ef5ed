"""A local S3 API (moto_server on 127.0.0.1) for tests and benchmarks: real HTTP, real s3fs.

Needs the dev extra (`moto[server]`, `s3fs`). Never reaches beyond loopback.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from inflora_dist.dist import free_port


@contextlib.contextmanager
def moto_s3(bucket: str = "inflora", timeout: float = 30.0) -> Iterator[dict[str, Any]]:
    """Start moto_server on a free loopback port with `bucket` created; yields fsspec storage options.

    The server is stopped (and waited for) on exit, errors included.
    """
    exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()  # loopback only
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on {endpoint}") from None
                time.sleep(0.1)
        options = {
            "endpoint_url": endpoint,
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"region_name": "us-east-1"},
        }
        import boto3

        boto3.client(
            "s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
            region_name="us-east-1",
        ).create_bucket(Bucket=bucket)  # fmt: skip
        yield options
    finally:
        proc.terminate()
        proc.wait(timeout=10)
