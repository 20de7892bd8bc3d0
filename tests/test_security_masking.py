"""The one URL masking function and its inverse for edits (no servers)."""

from __future__ import annotations

import logging

import pytest

from shared.masking import MaskingFilter, mask_text, mask_url, restore_secrets


@pytest.mark.parametrize(("url", "shown"), [
    ("rtsp://admin:pw1@cam.local:554/s1", "rtsp://admin:***@cam.local:554/s1"),
    ("rtsp://tokenonly@cam.local/s1", "rtsp://***@cam.local/s1"),
    ("http://cam/v.mjpg?user=admin&password=pw1&fps=5", "http://cam/v.mjpg?user=admin&password=***&fps=5"),
    ("https://cdn/x.m3u8?X-Amz-Signature=abc&X-Amz-Credential=k&expires=9",
     "https://cdn/x.m3u8?X-Amz-Signature=***&X-Amz-Credential=***&expires=9"),
    ("http://h/?pwd=1&pass=2&token=3&apikey=4&access_token=5&auth=6&secret=7&sig=8&key=9",
     "http://h/?pwd=***&pass=***&token=***&apikey=***&access_token=***&auth=***&secret=***&sig=***&key=***"),
    ("redis://:pw@redis:6379/0", "redis://:***@redis:6379/0"),
    ("/media/clip.mp4", "/media/clip.mp4"),
    ("0", "0"),
    ("rtsp://cam.local/s1?channel=2", "rtsp://cam.local/s1?channel=2"),
])
def test_security_mask_url_hides_user_info_and_secret_query_values(url: str, shown: str) -> None:
    assert mask_url(url) == shown
    assert restore_secrets(shown, url) == url  # the masked form sent back keeps the stored secrets


def test_security_restore_secrets_keeps_the_stored_secret_when_other_parts_change() -> None:
    stored = "rtsp://admin:pw1@cam.local/s1?password=pw2&channel=2"
    assert restore_secrets("rtsp://admin:***@cam2.local/s1?password=***&channel=3", stored) == \
        "rtsp://admin:pw1@cam2.local/s1?password=pw2&channel=3"
    # a new user, or a new password typed in, is taken as given
    assert restore_secrets("rtsp://bob:***@cam.local/s1", stored) == "rtsp://bob:***@cam.local/s1"
    assert restore_secrets("rtsp://admin:new@cam.local/s1", stored) == "rtsp://admin:new@cam.local/s1"


def test_security_mask_text_and_the_log_filter_mask_urls_inside_messages(caplog: pytest.LogCaptureFixture) -> None:
    assert mask_text("cannot open rtsp://a:pw1@h/x?token=t1: timed out") == \
        "cannot open rtsp://a:***@h/x?token=***: timed out"
    logger = logging.getLogger("test.masking")
    caplog.handler.addFilter(MaskingFilter())
    with caplog.at_level(logging.INFO, logger="test.masking"):
        logger.info("opened %s", "http://u:pw1@cam/v?sig=s1")
        try:
            raise OSError("connect to rtsp://u:pw2@cam failed")
        except OSError:
            logger.exception("camera down")
    assert "pw1" not in caplog.text and "s1" not in caplog.text and "pw2" not in caplog.text
    assert "http://u:***@cam/v?sig=***" in caplog.text and "rtsp://u:***@cam failed" in caplog.text
