"""Fixtures shared by the test modules (helpers: `tests.fixtures`, `tests.store_fixtures`)."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from stores.remote.local_s3 import moto_s3


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """A local S3 server (moto's, on 127.0.0.1) with bucket ``bkt``, the AWS environment pointed at it: the
    endpoint URL. One per test module."""
    with moto_s3("bkt") as endpoint:
        yield endpoint
