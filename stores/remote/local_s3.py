"""A local S3-compatible server for the tests and benchmarks of the store on object storage: moto's server
(``pip install 'e2r-kd[dev]'``, ``moto[server]``) in a subprocess on 127.0.0.1 and a free port, with dummy
credentials in the AWS environment variables. Nothing leaves the machine.

    with moto_s3("bkt") as endpoint:          # http://127.0.0.1:<port>; s3://bkt/... now reaches it
        bank = open_memorybank("s3://bkt/mb.zarr")
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import fsspec

ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
       "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def moto_s3(bucket: str = "bkt", timeout_s: float = 30.0) -> Iterator[str]:
    """Run moto's S3 server, point the AWS environment variables at it (endpoint, dummy credentials), create
    ``bucket``; yield the endpoint URL; stop the server and restore the environment."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in [*ENV, "AWS_ENDPOINT_URL"]}
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start on port {port} (exit code {proc.poll()}); is "
                                       "'moto[server]' installed? pip install 'e2r-kd[dev]'") from None
                time.sleep(0.05)
        os.environ.update(ENV, AWS_ENDPOINT_URL=endpoint)
        fsspec.filesystem("s3", skip_instance_cache=True).mkdir(bucket)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
