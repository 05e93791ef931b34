"""Fixtures for the weights tests: a client of the session S3 server, a fresh bucket per test."""

from __future__ import annotations

import uuid

import pytest

from hydraserve.weights.s3 import RetryPolicy, S3Client


@pytest.fixture
def s3_client(s3_server) -> S3Client:
    """A client of the shared moto server with a short retry budget (tests fail fast)."""
    return s3_server.client(retry=RetryPolicy(max_attempts=4, base_delay_s=0.05, budget_s=5))


@pytest.fixture
def bucket(s3_server) -> str:
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(name)
    return name
