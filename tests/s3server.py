"""A real S3 endpoint for tests: moto's server on a free loopback port, and a fresh bucket per test.

Everything talks to it over HTTP, as ximrun does to AWS; nothing is patched in-process.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import boto3
import pytest
import requests
import s3fs
from moto.server import ThreadedMotoServer

REGION = "us-east-1"
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": REGION,
    # No profile, config file or instance metadata: the fake keys above are all there is.
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}


@dataclass
class Bucket:
    """One empty bucket on the test endpoint, with what fsspec and boto3 need to reach it."""

    name: str
    endpoint_url: str
    storage_options: dict[str, Any]
    fs: s3fs.S3FileSystem
    client: Any = field(repr=False)

    def url(self, key: str = "") -> str:
        return f"s3://{self.name}/{key}"

    def put(self, key: str, data: bytes) -> str:
        """Upload one object; returns its s3:// URL."""
        self.client.put_object(Bucket=self.name, Key=key, Body=data)
        return self.url(key)

    def put_many(self, objects: dict[str, bytes]) -> None:
        """Upload many objects concurrently (s3fs sends them on its event loop)."""
        self.fs.pipe({f"{self.name}/{k}": v for k, v in objects.items()})


def set_auth(endpoint_url: str, enabled: bool) -> None:
    """Turn moto's IAM enforcement on or off for the whole server (off by default)."""
    body = b"0" if enabled else b"inf"
    requests.post(f"{endpoint_url}/moto-api/reset-auth", data=body, timeout=10).raise_for_status()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """Start moto's S3 server on 127.0.0.1 (port chosen by the kernel); yield its URL."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    with pytest.MonkeyPatch.context() as mp:
        for name, value in FAKE_CREDENTIALS.items():
            mp.setenv(name, value)
        mp.delenv("AWS_PROFILE", raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> Iterator[Bucket]:
    """A fresh, uniquely named, empty bucket."""
    name = f"test-{uuid.uuid4().hex[:20]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name=REGION,
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=name)
    options = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **options)
    yield Bucket(name=name, endpoint_url=s3_endpoint, storage_options=options, fs=fs,
                 client=client)
