"""Settings that must agree across keys and services are checked when loading, naming both keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from services.classify.settings import ClassifySettings
from services.ingest.settings import IngestSettings
from shared.settings import ConfigError, ServiceSettings, load


def write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def error(cls: type[ServiceSettings], path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load(cls, path)
    return str(info.value)


def test_block_time_must_stay_below_the_socket_timeout(tmp_path: Path) -> None:
    path = write(tmp_path, {"streams": {"block_ms": 5000}, "redis": {"socket_timeout_s": 5}})
    assert error(ClassifySettings, path) == (
        "config error: streams.block_ms (5000) must stay at least 0.5 s below redis.socket_timeout_s (5.0): "
        "a blocking read would time out on the client and count as a Redis outage")


def test_classify_claim_idle_must_exceed_the_batch_wait(tmp_path: Path) -> None:
    path = write(tmp_path, {"streams": {"claim_idle_ms": 1000}, "classify": {"max_wait_ms": 500}})
    assert "streams.claim_idle_ms (1000) must exceed twice classify.max_wait_ms (500)" in error(ClassifySettings,
                                                                                               path)


def test_ingest_takes_the_detect_group_from_the_detect_section_and_refuses_a_different_one(tmp_path: Path) -> None:
    assert load(IngestSettings, write(tmp_path, {"detect": {"group": "faces-a"}})).ingest.detect_group == "faces-a"
    path = write(tmp_path, {"detect": {"group": "faces-a"}, "ingest": {"detect_group": "faces-b"}})
    assert error(IngestSettings, path) == ("config error: ingest.detect_group = 'faces-b': must equal "
                                           "detect.group ('faces-a'), the same consumer group")
