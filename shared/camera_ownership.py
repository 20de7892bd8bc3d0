"""Which cameras one ingest replica reads, in dynamic mode: leases, fair share, (re)seeding.

Each pass (:meth:`CameraOwnership.plan`) records the replica's heartbeat, reads the cameras
from the registry, renews the leases of the cameras it reads (only while their reader is
alive: a dead reader must not keep a camera from the other replicas), gives up cameras beyond
its fair share, and takes free ones up to it. The caller starts and stops the readers.

If Redis lost its data (restarted empty), the registry is seeded again from the settings file:
otherwise every camera would look removed. A marker key tells "lost" from "emptied on purpose".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from shared.cameras import CameraRegistry, CameraSettings
from shared.sources import SourceRefusedError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stop:
    camera: str
    why: str


@dataclass(frozen=True)
class Plan:
    stop: list[Stop] = field(default_factory=list)
    start: list[CameraSettings] = field(default_factory=list)


class CameraOwnership:
    def __init__(self, registry: CameraRegistry, replica: str, seed: list[CameraSettings], lease_s: float) -> None:
        self.registry = registry
        self.replica = replica
        self.seed_cameras = seed
        self.lease_s = lease_s
        self.marker = f"{registry.prefix}:camera-config-seeded"
        self.lease_until: dict[str, float] = {}
        self._bad_configs: list[str] = []

    def seed(self) -> None:
        """Add the file's cameras Redis does not know yet, and mark the registry as seeded."""
        self.registry.seed(self.seed_cameras)
        self.registry.r.set(self.marker, "1")

    def plan(self, running: Mapping[str, CameraSettings], alive: Callable[[str], bool],
             leaving: set[str]) -> Plan:
        """What to stop and start now; ``running`` maps the cameras read here to their settings."""
        replicas = self.registry.beat(self.replica, self.lease_s)
        if not self.registry.r.exists(self.marker):
            log.warning("camera registry missing (Redis lost its data?): seeding it again from the settings file")
            self.seed()
        desired = self._desired()
        plan = Plan()
        kept = self._keep_or_drop(running, desired, alive, plan)
        quota = -(-len(desired) // max(1, replicas))  # ceil: each replica's fair share
        for cid in sorted(kept, reverse=True)[: max(0, len(kept) - quota)]:
            plan.stop.append(Stop(cid, f"rebalancing: {replicas} replicas share {len(desired)} cameras"))
            kept.remove(cid)
        for cid in sorted(desired):
            if len(kept) + len(plan.start) >= quota:
                break
            if cid in running or cid in leaving:
                continue
            if self.registry.hold(cid, self.replica, self.lease_s):
                self.lease_until[cid] = time.monotonic() + self.lease_s
                plan.start.append(desired[cid])
        return plan

    def _desired(self) -> dict[str, CameraSettings]:
        desired, bad = self.registry.cameras()
        for cid, cam in list(desired.items()):
            refusal = self._refusal(cam)
            if refusal is not None:
                bad.append(f"camera {cid}: {refusal}")
                del desired[cid]
        if bad != self._bad_configs:
            for line in bad:
                log.error("ignoring invalid camera in Redis: %s", line)
            self._bad_configs = bad
        return desired

    def _refusal(self, cam: CameraSettings) -> str | None:
        """Why the source policy refuses a camera from Redis; the settings file's own cameras are the
        operator's and pass as they are. Checked here too: whoever can write the registry in Redis
        directly must not make this replica open a local file."""
        if any(own.id == cam.id and own.url == cam.url for own in self.seed_cameras):
            return None
        try:
            self.registry.policy.check(cam.url)
        except SourceRefusedError as exc:
            return str(exc)
        return None

    def _keep_or_drop(self, running: Mapping[str, CameraSettings], desired: Mapping[str, CameraSettings],
                      alive: Callable[[str], bool], plan: Plan) -> list[str]:
        kept = []
        for cid, cam in running.items():
            if cid not in desired:
                plan.stop.append(Stop(cid, "removed"))
            elif desired[cid].reader_view() != cam.reader_view():
                plan.stop.append(Stop(cid, "settings changed"))
            elif not alive(cid):
                plan.stop.append(Stop(cid, "reader died"))
            elif not self.registry.hold(cid, self.replica, self.lease_s):
                plan.stop.append(Stop(cid, "lease lost"))
            else:
                self.lease_until[cid] = time.monotonic() + self.lease_s
                kept.append(cid)
        return kept

    def lapsed(self, running: Mapping[str, CameraSettings]) -> list[str]:
        """Cameras whose lease could not be renewed in time (Redis down): stop before another replica starts."""
        now = time.monotonic()
        return [cid for cid in running if self.lease_until.get(cid, now) <= now]

    def release(self, camera: str) -> None:
        self.lease_until.pop(camera, None)
        self.registry.release(camera, self.replica)

    def leave(self, cameras: list[str]) -> None:
        for cid in cameras:
            self.release(cid)
        self.registry.leave(self.replica)
