"""Settings: YAML + environment, validation errors naming key path and value, masking."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO, service_env

from services.classify.settings import ClassifySettings
from services.detect.settings import DetectSettings
from services.ingest.settings import IngestSettings
from shared.settings import ConfigError, load, mask_url


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def check_config(service: str, path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", f"services.{service}", "--config", str(path), "--check-config"],
                          cwd=REPO, env=service_env("redis://127.0.0.1:1/0", **env), capture_output=True, text=True,
                          timeout=60)


def test_yaml_values_load_and_environment_overrides_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "detect:\n  max_frame_age_s: 2.5\ndetector:\n  min_neighbors: 3\n")
    monkeypatch.setenv("ES_DETECTOR__MIN_NEIGHBORS", "7")
    s = load(DetectSettings, path)
    assert s.detect.max_frame_age_s == 2.5
    assert s.detector.min_neighbors == 7


def test_one_file_configures_every_service(tmp_path: Path) -> None:
    path = write(tmp_path, "cameras:\n  - {id: a, url: x.mp4}\ndetect: {read_count: 2}\nclassify: {max_batch: 8}\n")
    assert load(IngestSettings, path).cameras[0].id == "a"
    assert load(DetectSettings, path).detect.read_count == 2
    assert load(ClassifySettings, path).classify.max_batch == 8


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("detect:\n  max_frame_age_s: -1\n", "detect.max_frame_age_s = -1"),
        ("detect:\n  read_cont: 3\n", "detect.read_cont = 3: Extra inputs are not permitted"),
        ("redis:\n  url: ftp://h/0\n", "redis.url = 'ftp://h/0': Value error, unsupported scheme 'ftp'"),
        ("detector:\n  kind: dnn\n", "needs dnn_model"),
        ("streams:\n  block_ms: lots\n", "streams.block_ms = 'lots'"),
    ],
)
def test_bad_values_name_the_key_path_and_value(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(DetectSettings, write(tmp_path, text))
    assert expected in str(info.value)


def test_camera_errors_name_the_camera_index(tmp_path: Path) -> None:
    text = "cameras:\n  - {id: a, url: 'gopher://x'}\n  - {id: a, url: b.mp4}\n"
    with pytest.raises(ConfigError) as info:
        load(IngestSettings, write(tmp_path, text))
    assert "cameras.0.url = 'gopher://x'" in str(info.value)
    assert "unsupported URL scheme 'gopher'" in str(info.value)


def test_duplicate_camera_ids_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="used twice"):
        load(IngestSettings, write(tmp_path, "cameras:\n  - {id: a, url: a.mp4}\n  - {id: a, url: b.mp4}\n"))


def test_invalid_yaml_and_missing_file_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid YAML"):
        load(DetectSettings, write(tmp_path, "detect: [unclosed\n"))
    with pytest.raises(ConfigError, match="file not found"):
        load(DetectSettings, tmp_path / "nope.yaml")


def test_service_exits_1_with_the_key_on_bad_config(tmp_path: Path) -> None:
    result = check_config("detect", write(tmp_path, "detect:\n  read_count: 0\n"))
    assert result.returncode == 1
    assert "config error: detect.read_count = 0: Input should be greater than or equal to 1" in result.stderr


def test_bad_environment_value_is_reported_with_its_key(tmp_path: Path) -> None:
    result = check_config("classify", write(tmp_path, ""), ES_CLASSIFY__MAX_BATCH="many")
    assert result.returncode == 1
    assert "classify.max_batch = 'many'" in result.stderr


def test_check_config_masks_passwords(tmp_path: Path) -> None:
    path = write(tmp_path, "redis:\n  password: hunter2\n")
    result = check_config("ingest", path, ES_REDIS__URL="redis://app:s3cret@127.0.0.1:6379/0")
    assert result.returncode == 0, result.stderr
    assert "config ok" in result.stdout
    assert "s3cret" not in result.stdout and "hunter2" not in result.stdout
    assert "redis://app:***@127.0.0.1:6379/0" in result.stdout


def test_mask_url_hides_only_the_password() -> None:
    assert mask_url("rtsp://admin:pw@10.0.0.5:554/live") == "rtsp://admin:***@10.0.0.5:554/live"
    assert mask_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert mask_url("/videos/a.mp4") == "/videos/a.mp4"


def test_zoom_tta_factor_out_of_range_names_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, "classify: {zoom_tta: [0.9, 3.0]}\n")
    result = subprocess.run([sys.executable, "-m", "services.classify", "--config", str(path), "--check-config"],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 1
    assert "classify.zoom_tta" in result.stderr and "3.0" in result.stderr, result.stderr


def test_zoom_tta_defaults_to_the_bundles_views_and_an_empty_list_turns_zoom_off(tmp_path: Path) -> None:
    # None lets the classify service take the views the model bundle was chosen with (model.json zoom_tta).
    assert load(ClassifySettings, write(tmp_path, "classify: {}\n")).classify.zoom_tta is None
    assert load(ClassifySettings, write(tmp_path, "classify: {zoom_tta: []}\n")).classify.zoom_tta == []
    assert load(ClassifySettings, write(tmp_path, "classify: {zoom_tta: [1.1]}\n")).classify.zoom_tta == [1.1]
