"""Masks and zones in the web view: the admin API, the feed's zone filter, and the editor in a real browser."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import RedisServer, Service, endpoint_ok, free_port, service_env, wait_for
from test_web import event, make_client, read_feed, run_web
from test_web_browser import browser, css

from shared.cameras import CameraRegistry, CameraSettings
from shared.sample import render_frames, write_video
from shared.schema import FIELD, EventMsg, encode_event
from shared.streams import Keys

KEYS = Keys()
WAIT_S = 60


@pytest.fixture
def dynamic_registry(redis_server: RedisServer) -> CameraRegistry:
    registry = CameraRegistry(redis_server.client())
    registry.beat("ingest-test", 60.0)
    return registry


def test_zone_and_mask_edits_are_validated_by_field_and_kept_by_the_camera_form(
        redis_server: RedisServer, dynamic_registry: CameraRegistry) -> None:
    client = make_client(redis_server)
    added = client.post("/api/cameras", json={"id": "hall", "url": "rtsp://cam.example/hall", "fps": 5})
    assert added.status_code == 201
    bad = client.put("/api/cameras/hall", json={
        "mask": [[[0, 0], [0.2, 0], [0.2, 0.3]]],
        "zones": [{"name": "desk", "points": [[0, 0], [1, 0], [1, 1]]}, {"name": "door", "points": [[0, 0], [1, 1]]}]})
    assert bad.status_code == 422
    assert bad.json()["errors"] == ["zones[1].points: List should have at least 3 items after validation, not 2 "
                                    "(got [[0, 0], [1, 1]])"]
    assert dynamic_registry.cameras()[0]["hall"].zones == []

    zones = [{"name": "desk", "points": [[0.1, 0.5], [0.6, 0.5], [0.6, 1], [0.1, 1]]}]
    saved = client.put("/api/cameras/hall", json={"mask": [[[0, 0], [0.2, 0], [0.2, 0.3]]], "zones": zones})
    assert saved.status_code == 200, saved.json()
    # the camera form sends url, fps and loop only: the mask and zones stay
    assert client.put("/api/cameras/hall", json={"url": "rtsp://cam.example/hall", "fps": 8}).status_code == 200
    stored = dynamic_registry.cameras()[0]["hall"]
    assert stored.fps == 8.0 and [z.name for z in stored.zones] == ["desk"] and len(stored.mask) == 1
    (listed,) = client.get("/api/cameras").json()["cameras"]
    assert listed["zones"] == zones and listed["mask"] == [[[0, 0], [0.2, 0], [0.2, 0.3]]]


@pytest.mark.integration
def test_event_feed_filters_by_zone(tmp_path: Path, redis_server: RedisServer) -> None:
    r = redis_server.client()
    zoned = {1: ("door",), 2: ("door", "desk"), 3: ("desk",)}
    for seq in range(6):
        ev = event("a", seq)
        ev = EventMsg(**{**ev.__dict__, "zones": zoned.get(seq, ())})
        r.xadd(KEYS.events, {FIELD: encode_event(ev)})
    with run_web(tmp_path, redis_server.url, feed_backfill=0) as port:
        door = read_feed(port, "?zone=door", 2, last_id="0-0")
        assert [(d["seq"], d["zones"]) for _, d in door] == [(1, ["door"]), (2, ["door", "desk"])]
        nowhere = read_feed(port, "?zone=none", 3, last_id="0-0")
        assert [d["seq"] for _, d in nowhere] == [0, 4, 5]


# ----------------------------------------------------------------------------- the editor in a browser


@pytest.fixture
def ingest_and_web(tmp_path: Path, redis_server: RedisServer) -> Iterator[tuple[int, dict[str, Service]]]:
    """A looping file camera through a dynamic ingest, and the web view: frames to draw on, edits allowed."""
    video = write_video(tmp_path / "astronaut.mp4", render_frames(20), fps=4)
    web_port = free_port()
    config = {"cameras": [{"id": "cam0", "url": str(video), "fps": 4, "loop": True,
                           "mask": [[[0, 0], [0.25, 0], [0.25, 0.25], [0, 0.25]]]}],
              "ingest": {"dynamic": True, "allow_local_sources": True, "media_root": str(tmp_path)},
              "streams": {"block_ms": 200},
              "web": {"port": web_port, "frame_fps": 2, "feed_backfill": 0}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    procs: dict[str, Service] = {}
    try:
        for name in ("ingest", "web"):
            env = service_env(redis_server.url, ES_CONSUMER=f"{name}-test", ES_METRICS__PORT=str(free_port()))
            procs[name] = Service(name, path, env, tmp_path)
        wait_for(lambda: procs["web"].proc.poll() is not None or endpoint_ok(web_port, "/readyz"), 30, what="web")
        assert procs["web"].proc.poll() is None, procs["web"].log()
        yield web_port, procs
    finally:
        for svc in procs.values():
            svc.stop()


def wait_css(driver: Any, selector: str, procs: dict[str, Service], what: str) -> list[Any]:
    def found() -> list[Any] | None:
        for name, svc in procs.items():
            if svc.proc.poll() is not None:
                raise AssertionError(f"{name} exited {svc.proc.returncode}\n{svc.log()[-2000:]}")
        return css(driver, selector) or None

    return list(wait_for(found, WAIT_S, interval=0.2, what=what))


def click_at(driver: Any, element: Any, fx: float, fy: float) -> None:
    """A click at a fraction of the element's box (selenium offsets count from its centre)."""
    from selenium.webdriver.common.action_chains import ActionChains

    w, h = element.size["width"], element.size["height"]
    offset = (int((fx - 0.5) * w), int((fy - 0.5) * h))
    ActionChains(driver).move_to_element_with_offset(element, *offset).click().perform()


@pytest.mark.integration
def test_web_admin_draws_and_saves_a_zone_in_the_browser(ingest_and_web: tuple[int, dict[str, Service]],
                                                          redis_server: RedisServer) -> None:
    port, procs = ingest_and_web
    registry = CameraRegistry(redis_server.client())
    driver = browser()
    try:
        driver.get(f"http://127.0.0.1:{port}/cameras/cam0")
        wait_css(driver, '#geo-panel[data-ready="1"]', procs, "the editor's preview frame")
        assert "/api/cameras/cam0/frames/" in css(driver, "#geo-img")[0].get_attribute("src")
        # the configured mask is outlined on the live tile and in the editor
        wait_css(driver, '.tile[data-camera="cam0"] polygon.mask-area', procs, "the mask on the live image")
        assert css(driver, "#geo-svg polygon.mask-area")

        css(driver, '#geo-kind option[value="zone"]')[0].click()
        css(driver, "#geo-zone-name")[0].send_keys("table")
        css(driver, "#geo-start")[0].click()
        svg = css(driver, "#geo-svg")[0]
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", svg)
        corners = [(0.5, 0.5), (0.9, 0.5), (0.9, 0.9), (0.5, 0.9)]
        for fx, fy in corners:
            click_at(driver, svg, fx, fy)
        assert len(css(driver, "#geo-svg circle.draft-point")) == 4
        css(driver, "#geo-finish")[0].click()
        wait_css(driver, '#geo-svg g.zone[data-zone="table"] polygon', procs, "the drawn zone's outline")
        css(driver, "#geo-save")[0].click()
        wait_css(driver, "#geo-message.ok", procs, "the zone saved")

        (zone,) = registry.cameras()[0]["cam0"].zones
        assert zone.name == "table"
        assert [(round(x, 1), round(y, 1)) for x, y in zone.points] == corners, zone.points
        assert len(registry.cameras()[0]["cam0"].mask) == 1, "saving zones must keep the mask"
        driver.execute_script("window.scrollTo(0, 0)")
        wait_css(driver, '.tile[data-camera="cam0"] g.zone[data-zone="table"]', procs, "the zone on the live image")

        # coordinates typed by hand: the outline follows, and a bad one is named by its field
        area = css(driver, "#geo-json")[0]
        driver.execute_script(
            "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'));", area,
            '{"mask": [], "zones": [{"name": "table", "points": [[0.5, 0.5], [0.9, 0.5], [0.9, 0.9]]},'
            ' {"name": "door", "points": [[10, 10], [200, 10]]}]}')
        assert not css(driver, "#geo-svg polygon.mask-area")
        css(driver, "#geo-save")[0].click()
        error = wait_css(driver, '#geo-errors li.geo-error[data-field="zones[1].points"]', procs, "the field error")[0]
        assert "at least 3 items" in error.text
        time.sleep(0.5)
        assert [z.name for z in registry.cameras()[0]["cam0"].zones] == ["table"]  # nothing saved
    finally:
        driver.quit()


def test_zone_names_of_saved_cameras_round_trip_through_the_registry(redis_server: RedisServer) -> None:
    registry = CameraRegistry(redis_server.client())
    cam = CameraSettings.model_validate({"id": "a", "url": "rtsp://cam.example/a", "zones": [
        {"name": "z1", "points": [[0, 0], [1, 0], [1, 1]]}], "mask": [[[10, 10], [50, 10], [50, 50]]]})
    registry.put(cam)
    assert registry.cameras()[0]["a"] == cam
