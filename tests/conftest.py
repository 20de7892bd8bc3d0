"""Fixtures: a real redis-server per test, the model bundle, the sample video."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support import FER_DIR, RedisServer

from shared.model_bundle import DEFAULT_BUNDLE, META_FILE


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def model_bundle() -> Path:
    """The shipped bundle (or ES_TEST_MODEL's); skips when neither exists."""
    override = os.environ.get("ES_TEST_MODEL")
    if override:
        return Path(override)
    if (DEFAULT_BUNDLE / META_FILE).exists():
        return DEFAULT_BUNDLE
    pytest.skip(f"no model bundle at {DEFAULT_BUNDLE} (train one with python -m services.classify.train)")


@pytest.fixture
def fer_dir() -> Path:
    """FER2013 beside the repository; skips without it, except where ES_TEST_REQUIRE_FER=1 (CI has it)."""
    if not (FER_DIR / "publictest.npz").exists():
        if os.environ.get("ES_TEST_REQUIRE_FER") == "1":
            pytest.fail(f"FER2013 data not found at {FER_DIR}, and ES_TEST_REQUIRE_FER=1 says it must be there")
        pytest.skip(f"FER2013 data not found at {FER_DIR}")
    return FER_DIR
