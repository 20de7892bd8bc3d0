"""The web view in a real browser (Debian chromium + chromium-driver, headless) over a running pipeline.

The sample clip (scikit-image's astronaut, a smiling face the model calls Happy) loops through
ingest (dynamic mode), detect and classify; the web service runs beside them. Set
``ES_WEB_SCREENSHOT=path.png`` to keep the page's screenshot.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml
from support import RedisServer, Service, endpoint_ok, free_port, service_env, wait_for

from shared.cameras import CameraRegistry
from shared.sample import render_frames, write_video
from shared.streams import Keys

pytestmark = [pytest.mark.integration]
KEYS = Keys()
SERVICES = ("classify", "detect", "ingest")
WAIT_S = 90  # generous for busy CI machines; the test usually finishes well within a minute


def browser() -> Any:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service as DriverService

    chromium = shutil.which("chromium")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("chromium and chromium-driver are not installed (bash deploy/run.sh test installs them)")
    opts = Options()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--disable-extensions", "--mute-audio"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=DriverService(driver), options=opts)


class Stack:
    """Redis-backed pipeline processes plus the web service, restartable (to cut the feed's connection)."""

    def __init__(self, tmp: Path, redis_url: str, bundle: Path) -> None:
        self.tmp = tmp
        self.redis_url = redis_url
        self.web_port = free_port()
        self.metrics = {name: free_port() for name in (*SERVICES, "web")}
        video = write_video(tmp / "astronaut.mp4", render_frames(30), fps=3)
        config = {
            "cameras": [{"id": "cam0", "url": str(video), "fps": 3, "loop": True}],
            "ingest": {"dynamic": True},
            "detect": {"max_frame_age_s": 60},
            "classify": {"model": str(bundle), "runtime": "litert", "max_wait_ms": 10},
            "streams": {"block_ms": 200},
            "web": {"port": self.web_port, "frame_fps": 2, "feed_backfill": 0,
                    "services": [{"name": n, "url": f"http://127.0.0.1:{self.metrics[n]}/metrics"}
                                 for n in SERVICES]},
        }
        self.config = tmp / "config.yaml"
        self.config.write_text(yaml.safe_dump(config))
        self.procs: dict[str, Service] = {}
        self.restarts = 0

    def start(self, name: str) -> Service:
        tag = f"-{self.restarts}" if name == "web" else ""
        env = service_env(self.redis_url, ES_CONSUMER=f"{name}-test", ES_METRICS__PORT=str(self.metrics[name]))
        self.procs[name] = Service(name, self.config, env, self.tmp, tag=tag)
        return self.procs[name]

    def wait_web(self) -> None:
        web = self.procs["web"]
        wait_for(lambda: web.proc.poll() is not None or endpoint_ok(self.web_port, "/readyz"), 30, what="web ready")
        assert web.proc.poll() is None, web.log()

    def kill_web(self) -> None:
        web = self.procs["web"]
        web.proc.send_signal(signal.SIGKILL)
        web.proc.wait(10)
        self.restarts += 1

    def stop(self) -> None:
        for svc in self.procs.values():
            svc.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{s.log()[-1500:]}" for n, s in self.procs.items())


@pytest.fixture
def stack(tmp_path: Path, redis_server: RedisServer, model_bundle: Path) -> Iterator[Stack]:
    s = Stack(tmp_path, redis_server.url, model_bundle)
    try:
        for name in (*SERVICES, "web"):
            s.start(name)
        s.wait_web()
        yield s
    finally:
        s.stop()


def css(driver: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return list(driver.find_elements(By.CSS_SELECTOR, selector))


def wait_css(driver: Any, selector: str, stack: Stack, what: str, at_least: int = 1) -> list[Any]:
    def found() -> list[Any] | None:
        for name, svc in stack.procs.items():
            code = svc.proc.poll()
            if code is not None and not (name == "web" and code == -signal.SIGKILL):
                raise AssertionError(f"{name} exited {code}\n{stack.logs()}")
        items = css(driver, selector)
        return items if len(items) >= at_least else None

    try:
        return list(wait_for(found, WAIT_S, interval=0.2, what=what))
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{stack.logs()}") from None


def feed_ids(driver: Any) -> list[str]:
    ids = driver.execute_script("return [...document.querySelectorAll('#feed li.feed-item')].map(li => li.dataset.id)")
    return sorted(ids, key=lambda i: tuple(int(p) for p in i.split("-")))


def not_blank(png: bytes) -> None:
    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None and img.shape[0] > 500 and img.shape[1] > 1000
    colours = len(np.unique(img.reshape(-1, 3)[::7], axis=0))
    assert float(img.std()) > 20 and colours > 200, (float(img.std()), colours)


def test_operator_page_shows_the_happy_face_events_tracks_and_survives_a_lost_feed(stack: Stack,
                                                                                   redis_server: RedisServer) -> None:
    driver = browser()
    base = f"http://127.0.0.1:{stack.web_port}"
    try:
        driver.get(base + "/")
        # the camera tile draws the face the pipeline found, labelled with its (smoothed) emotion
        box = wait_css(driver, '.tile[data-camera="cam0"] g.face[data-label="Happy"] rect.face-box', stack,
                       "a face box labelled Happy on cam0's tile")[0]
        assert float(box.get_attribute("width")) > 40
        tile_img = css(driver, '.tile[data-camera="cam0"] img')[0]
        assert "/api/cameras/cam0/frames/" in tile_img.get_attribute("src")
        wait_css(driver, "#feed li.feed-item", stack, "events in the live feed", at_least=3)
        wait_css(driver, '#health tr[data-service="ingest"] td.ok', stack, "ingest healthy")
        not_blank(driver.get_screenshot_as_png())

        check_feed_resumes_after_the_connection_is_cut(driver, stack, redis_server)
        wait_css(driver, "#banner:not(.show)", stack, "no error banner")
        png = driver.get_screenshot_as_png()
        not_blank(png)
        if os.environ.get("ES_WEB_SCREENSHOT"):
            Path(os.environ["ES_WEB_SCREENSHOT"]).write_bytes(png)
        check_camera_admin_form(driver, stack, redis_server)

        driver.get(base + "/cameras/cam0")
        wait_css(driver, 'ul.tracks li.track[data-kinds~="started"]', stack, "a started track")
        wait_css(driver, '#plot polyline.series[data-emotion="Happy"]', stack, "Happy in the plot")
        happy_bar = wait_css(driver, '#mix rect.mix-bar[data-emotion="Happy"]', stack, "the mix")[0]
        assert float(happy_bar.get_attribute("width")) > 100  # most faces of the last minute are Happy
        wait_css(driver, '.tile[data-camera="cam0"] g.face[data-label="Happy"]', stack, "the face on the camera page")
    finally:
        driver.quit()


def check_feed_resumes_after_the_connection_is_cut(driver: Any, stack: Stack, redis_server: RedisServer) -> None:
    """Kill the web service under the open feed: events published meanwhile must still reach the page."""
    r = redis_server.client()
    before = feed_ids(driver)
    stack.kill_web()
    down_from = r.xrevrange(KEYS.events, count=1)[0][0].decode()
    # events the page cannot receive while the service is down (web.feed_backfill is 0, so only a
    # resume from Last-Event-ID can bring them)
    wait_for(lambda: len(r.xrange(KEYS.events, min=f"({down_from}", max="+")) >= 4, WAIT_S, what="events while down")
    missed = [i.decode() for i, _ in r.xrange(KEYS.events, min=f"({down_from}", max="+")]
    wait_css(driver, "#feed-state.down", stack, "the page noticing the lost feed")
    stack.start("web")
    stack.wait_web()
    wait_for(lambda: set(missed) <= set(feed_ids(driver)), WAIT_S, interval=0.2, what="missed events in the feed")
    wait_css(driver, "#feed-state.live", stack, "the feed live again")
    shown = feed_ids(driver)
    first, last = before[0], shown[-1]
    stream = [i.decode() for i, _ in r.xrange(KEYS.events, min=first, max=last)]
    gaps = sorted(set(stream) - set(shown))
    assert not gaps, f"{len(gaps)} events never reached the page: {gaps[:5]}"
    assert len(shown) == len(set(shown)), "an event was shown twice"


def check_camera_admin_form(driver: Any, stack: Stack, redis_server: RedisServer) -> None:
    registry = CameraRegistry(redis_server.client())
    fill = {"cam-id": "door", "cam-url": "gopher://10.0.0.9/x", "cam-fps": "2"}
    for field, value in fill.items():
        element = css(driver, f"#{field}")[0]
        element.clear()
        element.send_keys(value)
    css(driver, "#cam-add")[0].click()
    error = wait_css(driver, "#admin-message.error", stack, "the validation error")[0]
    assert "unsupported URL scheme" in error.text and "door" not in registry.cameras()[0]

    url = css(driver, "#cam-url")[0]
    url.clear()
    url.send_keys("rtsp://viewer:pa55word@127.0.0.1:9/stream")
    css(driver, "#cam-add")[0].click()
    wait_css(driver, "#admin-message.ok", stack, "the camera added")
    assert registry.cameras()[0]["door"].url == "rtsp://viewer:pa55word@127.0.0.1:9/stream"
    wait_css(driver, '.tile[data-camera="door"]', stack, "door's tile")
    row = wait_css(driver, '#admin-table tr[data-camera="door"]', stack, "door in the admin table")[0]
    assert "viewer:***@127.0.0.1:9" in row.text
    assert "pa55word" not in driver.page_source

    css(driver, '#admin-table button.remove[data-camera="door"]')[0].click()
    wait_for(lambda: not css(driver, '.tile[data-camera="door"]'), WAIT_S, interval=0.2, what="door's tile gone")
    assert "door" not in registry.cameras()[0]
    assert css(driver, '.tile[data-camera="cam0"]')
