"""MQTT output: every event reaches the broker, at least once across crashes and broker restarts,
with the last will, the retained per-camera state and Home Assistant discovery.

A mosquitto on a free loopback port per test (never a broker the machine may already run).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from support import (
    REPO,
    Mosquitto,
    MqttTap,
    RedisServer,
    Service,
    metric,
    metric_or,
    outside_env,
    service_env,
    wait_for,
)

from services.mqtt.settings import MqttSettings
from services.mqtt.state import Presence
from shared.cameras import CameraRegistry, CameraSettings
from shared.embedded_redis import free_port
from shared.sample import render_frames, write_video
from shared.schema import FIELD, Box, EventMsg, TrackEventMsg, encode_event, encode_track
from shared.settings import ConfigError, load
from shared.streams import Keys

KEYS = Keys()
CLASSES = ("Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral")
PREFIX = "emotion-stream"


def event(seq: int, camera: str = "cam", label: str = "Happy", track: int | None = None) -> EventMsg:
    probs = tuple(0.9 if c == label else 0.1 / 6 for c in CLASSES)
    return EventMsg(event_id=f"{camera}:{seq}:0", camera=camera, seq=seq, face=0, capture_ts=1.0 + seq,
                    publish_ts=1.05 + seq, box=Box(1, 2, 30, 30), label=label, score=0.9, classes=CLASSES,
                    probs=probs, model_version="test", track_id=track)


def feed(r: redis.Redis, seqs: range, **kw: Any) -> list[str]:
    for seq in seqs:
        r.xadd(KEYS.events, {FIELD: encode_event(event(seq, **kw))})  # type: ignore[arg-type]
    return [event(seq, **kw).event_id for seq in seqs]


def event_ids(tap: MqttTap) -> list[str]:
    return [json.loads(p)["event_id"] for p in tap.on(f"{PREFIX}/events")]


@pytest.fixture
def broker() -> Iterator[Mosquitto]:
    server = Mosquitto().start()
    try:
        yield server
    finally:
        server.stop()


class MqttService:
    """``python -m services.mqtt`` with a config file; restartable under the same consumer name."""

    def __init__(self, tmp: Path, redis_url: str, mqtt: dict[str, Any], **streams: Any) -> None:
        self.tmp = tmp
        self.config = tmp / "mqtt.yaml"
        self.config.write_text(yaml.safe_dump({"mqtt": {"new_group_from": "start", **mqtt},
                                               "streams": {"claim_every_s": 0.5, **streams}}))
        self.redis_url = redis_url
        self.port = free_port()
        self.runs = 0
        self.svc: Service | None = None

    def start(self) -> MqttService:
        self.runs += 1
        env = service_env(self.redis_url, ES_CONSUMER="mqtt-test", ES_METRICS__PORT=str(self.port))
        self.svc = Service("mqtt", self.config, env, self.tmp, tag=f"-{self.runs}")
        return self

    def kill(self) -> None:
        assert self.svc is not None
        self.svc.proc.send_signal(signal.SIGKILL)
        self.svc.proc.wait(10)

    def stop(self) -> None:
        if self.svc is not None:
            self.svc.stop()

    def log(self) -> str:
        return "\n".join((self.tmp / f"mqtt-{i}.log").read_text(errors="replace")[-3000:]
                         for i in range(1, self.runs + 1))


def group_done(server: RedisServer, stream: str, group: str = "mqtt") -> bool:
    r = server.client()
    info = {g["name"].decode(): g for g in r.xinfo_groups(stream)}.get(group)
    return bool(info) and info["pending"] == 0 and info["last-delivered-id"] == r.xinfo_stream(stream)[
        "last-generated-id"]


# ------------------------------------------------------------------------------------ no servers


def test_mqtt_settings_require_a_broker_url_and_name_the_bad_key(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("ES_MQTT__URL", "REDIS_URL"):
        monkeypatch.delenv(key, raising=False)
    path = tmp_path / "c.yaml"
    path.write_text("mqtt: {}\n")
    with pytest.raises(ConfigError) as missing:
        load(MqttSettings, path)
    assert "mqtt.url = ''" in str(missing.value)
    path.write_text("mqtt: {url: 'http://broker:1883'}\n")
    with pytest.raises(ConfigError) as scheme:
        load(MqttSettings, path)
    assert "mqtt.url = 'http://broker:1883'" in str(scheme.value) and "mqtt://" in str(scheme.value)
    path.write_text("mqtt: {url: 'mqtt://u:secret@broker:1884', topic_prefix: 'a/#'}\n")
    with pytest.raises(ConfigError) as prefix:
        load(MqttSettings, path)
    assert "mqtt.topic_prefix = 'a/#'" in str(prefix.value) and "secret" not in str(prefix.value)


def test_mqtt_state_counts_tracked_faces_and_picks_the_dominant_smoothed_emotion() -> None:
    now = [0.0]
    presence = Presence(ttl_s=5.0, clock=lambda: now[0])

    def track(kind: str, tid: int, emotion: str, confidence: float = 0.8) -> None:
        presence.track_event(TrackEventMsg(kind=kind, camera="door", track_id=tid, ts=1.0, emotion=emotion,
                                           confidence=confidence))

    track("started", 1, "Happy")
    track("started", 2, "Sad", 0.9)
    track("started", 3, "Sad", 0.6)
    assert presence.summaries()["door"].faces == 3
    assert presence.summaries()["door"].emotion == "Sad"  # two of three faces
    track("changed", 3, "Happy", 0.7)
    assert presence.summaries()["door"].emotion == "Happy"  # two Happy now
    track("ended", 1, "Happy")
    # one Happy (0.7) against one Sad (0.9): the tie goes to the more confident
    assert (presence.summaries()["door"].emotion, presence.summaries()["door"].faces) == ("Sad", 2)
    presence.event(event(5, camera="door", label="Angry", track=1))  # late frame of an ended track
    assert presence.summaries()["door"].faces == 2
    now[0] = 10.0
    presence.event(event(6, camera="door", label="Angry", track=2))  # track 2 seen again, 3 not
    presence.expire()
    assert (presence.summaries()["door"].emotion, presence.summaries()["door"].faces) == ("Sad", 1)
    track("ended", 2, "Sad")
    assert (presence.summaries()["door"].emotion, presence.summaries()["door"].faces) == ("none", 0)
    track("started", 1, "Fear")  # track 1's person back where they were: its id returns
    assert (presence.summaries()["door"].emotion, presence.summaries()["door"].faces) == ("Fear", 1)


# ------------------------------------------------------------------------------------ with servers

integration = pytest.mark.integration


@integration
def test_mqtt_publishes_every_event_track_and_state_and_acks_only_what_the_broker_took(
        tmp_path: Path, redis_server: RedisServer, broker: Mosquitto) -> None:
    r = redis_server.client()
    tap = MqttTap(broker.port, [f"{PREFIX}/#"])
    service = MqttService(tmp_path, redis_server.url, {"url": broker.url}).start()
    try:
        ids = feed(r, range(50), camera="lobby", track=7)
        tracks = [TrackEventMsg(kind="started", camera="lobby", track_id=7, ts=1.0, emotion="Happy", confidence=0.8),
                  TrackEventMsg(kind="started", camera="lobby", track_id=8, ts=1.0, emotion="Happy", confidence=0.7)]
        for te in tracks:
            r.xadd(KEYS.tracks, {FIELD: encode_track(te)})  # type: ignore[arg-type]
        wait_for(lambda: set(event_ids(tap)) >= set(ids), 30, what="every event on MQTT")
        wait_for(lambda: len(tap.on(f"{PREFIX}/lobby/tracks")) >= 2, 10, what="track events")
        wait_for(lambda: b"2" in tap.on(f"{PREFIX}/lobby/faces"), 10, what="face count 2")
        wait_for(lambda: group_done(redis_server, KEYS.events) and group_done(redis_server, KEYS.tracks), 10,
                 what="every entry acked")
        first = json.loads(tap.on(f"{PREFIX}/events")[0])
        assert first["camera"] == "lobby" and first["label"] == "Happy" and first["track_id"] == 7
        assert set(first["probabilities"]) == set(CLASSES) and first["box"] == [1, 2, 30, 30]
        assert [json.loads(p)["track_id"] for p in tap.on(f"{PREFIX}/lobby/tracks")] == [7, 8]
        assert tap.on(f"{PREFIX}/lobby/emotion")[-1] == b"Happy"
        assert tap.on(f"{PREFIX}/available")[-1] == b"online"
        assert metric(service.port, "es_mqtt_acked_total", stream=KEYS.events) == 50
        assert metric(service.port, "es_mqtt_published_total", kind="event") >= 50
        # the state is retained: a subscriber arriving now gets it at once
        late = MqttTap(broker.port, [f"{PREFIX}/lobby/+"])
        try:
            wait_for(lambda: late.on(f"{PREFIX}/lobby/faces") == [b"2"], 5, what="retained face count")
            assert late.on(f"{PREFIX}/lobby/emotion") == [b"Happy"]
        finally:
            late.close()
        # an undecodable entry is dead-lettered and counted, not published
        r.xadd(KEYS.events, {FIELD: b"\xc1 not msgpack"})
        wait_for(lambda: metric_or(service.port, "es_mqtt_dropped_total", 0, reason="undecodable") == 1, 10,
                 what="the bad entry counted")
        assert r.xlen(KEYS.dead_letter(KEYS.events)) == 1
    finally:
        service.stop()
        tap.close()
    assert "Traceback" not in service.log(), service.log()


@integration
def test_mqtt_acks_an_entry_only_once_the_broker_acknowledged_its_message(
        tmp_path: Path, redis_server: RedisServer, broker: Mosquitto) -> None:
    r = redis_server.client()
    tap = MqttTap(broker.port, [f"{PREFIX}/events"])
    service = MqttService(tmp_path, redis_server.url, {"url": broker.url}).start()
    assert broker.proc is not None
    try:
        first = feed(r, range(10))
        wait_for(lambda: set(event_ids(tap)) >= set(first), 30, what="the first events")
        wait_for(lambda: metric_or(service.port, "es_mqtt_acked_total", 0, stream=KEYS.events) == 10, 10,
                 what="their acks")
        broker.proc.send_signal(signal.SIGSTOP)  # connected, but no PUBACK comes back
        try:
            feed(r, range(10, 30))
            wait_for(lambda: int(r.xpending(KEYS.events, "mqtt")["pending"]) > 0, 10,
                     what="the service to read and publish the next ones")
            time.sleep(1.5)
            # what it published waits for the PUBACK, unacked; the rest waits in the stream
            assert int(r.xpending(KEYS.events, "mqtt")["pending"]) > 0
            assert metric(service.port, "es_mqtt_acked_total", stream=KEYS.events) == 10
        finally:
            broker.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: group_done(redis_server, KEYS.events), 15, what="acks once the broker answers")
        assert set(event_ids(tap)) == {f"cam:{i}:0" for i in range(30)}
        assert metric(service.port, "es_mqtt_acked_total", stream=KEYS.events) == 30
    finally:
        service.stop()
        tap.close()


@integration
def test_mqtt_kill_9_mid_stream_then_restart_loses_no_event(tmp_path: Path, redis_server: RedisServer,
                                                            broker: Mosquitto) -> None:
    r = redis_server.client()
    tap = MqttTap(broker.port, [f"{PREFIX}/events", f"{PREFIX}/available"])
    service = MqttService(tmp_path, redis_server.url, {"url": broker.url, "read_count": 16}).start()
    stop = threading.Event()
    fed: list[str] = []

    def feeder() -> None:
        seq = 0
        while not stop.is_set() and seq < 3000:
            fed.extend(feed(redis.Redis(port=redis_server.port), range(seq, seq + 10)))
            seq += 10
            time.sleep(0.01)

    thread = threading.Thread(target=feeder, daemon=True)
    try:
        wait_for(lambda: tap.on(f"{PREFIX}/available") == [b"online"], 30, what="the service online")
        thread.start()
        wait_for(lambda: len(tap.on(f"{PREFIX}/events")) >= 300, 60, what="300 events before the kill")
        service.kill()
        killed_at = len(set(event_ids(tap)))
        time.sleep(1.0)  # events keep arriving in Redis while the service is down
        service.start()
        wait_for(lambda: len(fed) >= 3000, 60, what="the feeder to finish")
        stop.set()
        thread.join(10)
        wait_for(lambda: set(event_ids(tap)) >= set(fed), 60, what="every fed event on MQTT after the restart")
        # Harder: the service dies with a batch the broker never acknowledged, and the broker dies
        # too, so the messages of that batch are gone with it. Only the pending entries bring them back.
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGSTOP)
        fed.extend(feed(r, range(3000, 3040)))
        wait_for(lambda: int(r.xpending(KEYS.events, "mqtt")["pending"]) > 0, 10, what="a batch in flight")
        service.kill()
        broker.proc.kill()
        broker.proc.wait(10)
        broker.start()
        wait_for(tap.connected.is_set, 15, what="the subscriber back")
        time.sleep(0.3)  # its SUBACK
        service.start()
        wait_for(lambda: set(event_ids(tap)) >= set(fed), 60, what="the unacknowledged batch after both restarts")
    finally:
        stop.set()
        service.stop()
        tap.close()
    ids = event_ids(tap)
    stream_ids = {_text(e[1][FIELD]) for e in r.xrange(KEYS.events)}
    assert len(stream_ids) == 3040 and set(ids) == stream_ids and killed_at < 3000, service.log()
    print(f"{len(ids)} messages for {len(stream_ids)} events ({len(ids) - len(stream_ids)} duplicates)")


@integration
def test_mqtt_last_will_says_offline_when_the_service_dies(tmp_path: Path, redis_server: RedisServer,
                                                          broker: Mosquitto) -> None:
    tap = MqttTap(broker.port, [f"{PREFIX}/available"])
    service = MqttService(tmp_path, redis_server.url, {"url": broker.url, "keepalive_s": 5}).start()
    try:
        wait_for(lambda: tap.on(f"{PREFIX}/available") == [b"online"], 30, what="online")
        service.kill()  # no DISCONNECT: only the broker's last will can tell
        wait_for(lambda: tap.on(f"{PREFIX}/available")[-1:] == [b"offline"], 15, what="the last will")
        service.start()
        wait_for(lambda: tap.on(f"{PREFIX}/available")[-1:] == [b"online"], 30, what="online again")
        service.stop()  # a clean stop says offline itself (a DISCONNECT suppresses the will)
        wait_for(lambda: tap.on(f"{PREFIX}/available")[-1:] == [b"offline"], 15, what="offline on a clean stop")
    finally:
        service.stop()
        tap.close()


@integration
def test_mqtt_broker_restart_reconnects_and_delivers_what_waited(tmp_path: Path, redis_server: RedisServer,
                                                                 broker: Mosquitto) -> None:
    r = redis_server.client()
    # A persistent session: the restarted broker keeps this subscription and queues for it.
    tap = MqttTap(broker.port, [f"{PREFIX}/events"], client_id="tap-restart", persistent=True)
    service = MqttService(tmp_path, redis_server.url, {"url": broker.url, "backoff_initial_s": 0.2,
                                                       "backoff_max_s": 1.0}).start()
    try:
        before = feed(r, range(20))
        wait_for(lambda: set(event_ids(tap)) >= set(before), 30, what="events before the restart")
        broker.stop()
        wait_for(lambda: metric_or(service.port, "es_mqtt_connected", 1) == 0, 10, what="the service to notice")
        during = feed(r, range(20, 60))
        time.sleep(1.5)
        assert not group_done(redis_server, KEYS.events)  # nothing acked while the broker is away
        broker.start()
        wait_for(lambda: set(event_ids(tap)) >= set(before + during), 30, what="what waited, after the restart")
        wait_for(lambda: group_done(redis_server, KEYS.events), 10, what="acked after the broker took them")
        assert metric(service.port, "es_mqtt_reconnects_total") >= 1
    finally:
        service.stop()
        tap.close()
    assert "reconnecting in" in service.log()


@integration
def test_mqtt_discovery_configs_are_json_with_unique_ids_and_go_with_their_camera(
        tmp_path: Path, redis_server: RedisServer, broker: Mosquitto) -> None:
    r = redis_server.client()
    registry = CameraRegistry(r, "es")
    for cid in ("door", "yard"):
        registry.put(CameraSettings(id=cid, url="rtsp://camera.example.internal/stream1"))
    tap = MqttTap(broker.port, ["homeassistant/#", f"{PREFIX}/+/faces"])
    service = MqttService(tmp_path, redis_server.url, {"url": broker.url, "discovery": True,
                                                       "cameras_refresh_s": 0.2}).start()
    config_topic = "homeassistant/sensor/emotion-stream/{}_{}/config"
    try:
        wanted = {config_topic.format(c, s) for c in ("door", "yard") for s in ("emotion", "faces")}
        wait_for(lambda: tap.topics() >= wanted, 30, what="discovery configs")
        configs = {t: json.loads(tap.on(t)[0]) for t in wanted}
        assert len({c["unique_id"] for c in configs.values()}) == 4
        for topic, cfg in configs.items():
            camera = topic.split("/")[3].rsplit("_", 1)[0]
            sensor = topic.split("/")[3].rsplit("_", 1)[1]
            assert cfg["state_topic"] == f"{PREFIX}/{camera}/{sensor}"
            assert cfg["availability_topic"] == f"{PREFIX}/available"
            assert cfg["device"]["identifiers"] == [f"emotion-stream_{camera}"]
        assert tap.on(f"{PREFIX}/door/faces") == [b"0"]  # a known camera starts with no faces
        # Home Assistant restarting announces itself: the configs come again
        before = len(tap.on(config_topic.format("door", "faces")))
        tap.client.publish("homeassistant/status", b"online", qos=1)
        wait_for(lambda: len(tap.on(config_topic.format("door", "faces"))) > before, 10,
                 what="configs sent again after homeassistant/status online")
        registry.remove("yard")
        gone = {config_topic.format("yard", s) for s in ("emotion", "faces")}
        wait_for(lambda: all(tap.on(t)[-1:] == [b""] for t in gone), 15, what="empty configs for the removed camera")
        assert tap.on(f"{PREFIX}/yard/faces")[-1] == b""  # its retained state is cleared too
        # a subscriber arriving now (Home Assistant restarting) finds only the remaining camera
        late = MqttTap(broker.port, ["homeassistant/#"])
        try:
            wait_for(lambda: late.topics() >= {config_topic.format("door", s) for s in ("emotion", "faces")}, 5,
                     what="retained configs")
            time.sleep(0.3)
            assert not late.topics() & gone
        finally:
            late.close()
        registry.remove("door")  # the last camera goes too
        wait_for(lambda: tap.on(config_topic.format("door", "faces"))[-1:] == [b""], 15,
                 what="empty configs for the last camera")
    finally:
        service.stop()
        tap.close()


@integration
def test_mqtt_up_with_a_clip_publishes_every_event(tmp_path: Path, redis_server: RedisServer, broker: Mosquitto,
                                                   model_bundle: Path) -> None:
    video = write_video(tmp_path / "clip.mp4", render_frames(20), fps=10)
    tap = MqttTap(broker.port, [f"{PREFIX}/#"])
    try:
        up = subprocess.run([sys.executable, "-m", "shared.cli", "up", "--input", str(video), "--redis-url",
                             redis_server.url, "--mqtt-url", broker.url, "--model", str(model_bundle), "--no-web",
                             "--json"], cwd=REPO, capture_output=True, text=True, timeout=240,
                            env={**outside_env(), "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"})
        assert up.returncode == 0, up.stderr[-3000:]
        stream = [json.loads(line)["event_id"] for line in up.stdout.splitlines()]
        in_redis = {_text(e[1][FIELD]) for e in redis_server.client().xrange(KEYS.events)}
        assert len(stream) >= 15 and len(in_redis) == len(stream)
        time.sleep(0.5)
        assert set(event_ids(tap)) == set(stream)
        # classify ends its open tracks when up stops it: those events are published too
        kinds = [json.loads(p)["kind"] for p in tap.on(f"{PREFIX}/cam0/tracks")]
        assert "started" in kinds and kinds[-1] == "ended", kinds
        assert tap.on(f"{PREFIX}/cam0/faces")[-1] == b"0" and tap.on(f"{PREFIX}/cam0/emotion")[-1] == b"none"
        assert tap.on(f"{PREFIX}/available")[-1] == b"offline"  # up stopped it cleanly
    finally:
        tap.close()


def _text(payload: bytes) -> str:
    from shared.schema import decode_event

    return decode_event(payload).event_id


def tls_files(folder: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 (openssl)."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)

    (folder / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=emotion-stream test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj",
            "/CN=127.0.0.1")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
            "server.pem", "-days", "2", "-extfile", "san.cnf")
    for name in ("ca.pem", "server.pem", "server.key"):
        (folder / name).chmod(0o644)
    return {name: folder / f"{name}.pem" if name != "key" else folder / "server.key"
            for name in ("ca", "server", "key")}


@integration
def test_mqtt_over_tls_with_a_password_and_a_refused_password_counted(tmp_path: Path,
                                                                       redis_server: RedisServer) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    certs.chmod(0o755)
    files = tls_files(certs)
    passwords = certs / "passwords"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "pub", "s3cret pass"], check=True, timeout=30)
    passwords.chmod(0o644)
    broker = Mosquitto(f"cafile {files['ca']}\ncertfile {files['server']}\nkeyfile {files['key']}\n"
                       f"allow_anonymous false\npassword_file {passwords}\n").start()

    def secure(client: Any) -> None:
        client.tls_set(ca_certs=str(files["ca"]))
        client.username_pw_set("pub", "s3cret pass")

    tap = MqttTap(broker.port, [f"{PREFIX}/events"], setup=secure)
    url = f"mqtts://pub:s3cret%20pass@127.0.0.1:{broker.port}"
    good = MqttService(tmp_path, redis_server.url, {"url": url, "tls_ca_certs": str(files["ca"])}).start()
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    bad = MqttService(bad_dir, redis_server.url, {"url": url.replace("s3cret", "wrong"), "group": "other",
                                                  "tls_ca_certs": str(files["ca"]), "backoff_max_s": 0.5})
    try:
        ids = feed(redis_server.client(), range(10))
        wait_for(lambda: set(event_ids(tap)) >= set(ids), 30, what="events over TLS with a password")
        bad.start()
        wait_for(lambda: metric_or(bad.port, "es_mqtt_reconnects_total", 0) >= 2, 30, what="refusals counted")
        assert metric(bad.port, "es_mqtt_connected") == 0
        assert "refused the connection" in bad.log() and "s3cret" not in bad.log() and "wrong" not in bad.log()
    finally:
        good.stop()
        bad.stop()
        tap.close()
        broker.stop()
