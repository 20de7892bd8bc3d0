"""Ownership leases in Redis, shared by ingest (who reads a camera) and detect (who follows it).

A pool has a lease key per item (``<prefix>:<name>:{item}``, owner with a TTL, in the item's
cluster slot) and a sorted set of member heartbeats (``<prefix>:<name>-members``). A member
holds at most its fair share of the items (:func:`fair_share`), renews its leases more often
than they lapse, and a dead member's items are taken over once its leases lapse.

Each item also has an epoch key (``<prefix>:epoch:{item}``: same slot, under the lease keys' name)
that changes only when the lease changes hands, never on a renewal: a writer can WATCH it (or
read it in a script) to fence off a stale owner while its own lease keeps being renewed.
:class:`LeaseKeeper` renews from a thread, so a long piece of work never outlives its lease by
accident.
"""

from __future__ import annotations

import logging
import threading
import time

import redis

from shared.streams import TRANSIENT_ERRORS

log = logging.getLogger(__name__)

# Returns the lease's epoch when ARGV[1] holds it now (taken or renewed), 0 when another does.
RENEW = """
local owner = redis.call('GET', KEYS[1])
if owner == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return tonumber(redis.call('GET', KEYS[2])) or redis.call('INCR', KEYS[2])
elseif not owner then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return redis.call('INCR', KEYS[2])
end
return 0
"""

# 1 when ARGV[1] holds the lease in epoch ARGV[2]; then, if a stream is named, acks ARGV[4..] in group ARGV[3].
FENCED = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] or redis.call('GET', KEYS[2]) ~= ARGV[2] then
  return 0
end
if KEYS[3] then
  redis.call('XACK', KEYS[3], ARGV[3], unpack(ARGV, 4))
end
return 1
"""

RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class LeasePool:
    """Leases over named items and the heartbeats of the members sharing them."""

    def __init__(self, r: redis.Redis, lease_prefix: str, members_key: str) -> None:
        self.r = r
        self.lease_prefix = lease_prefix
        self.members_key = members_key
        self._renew = r.register_script(RENEW)
        self._release = r.register_script(RELEASE)
        self._fenced = r.register_script(FENCED)

    def lease_key(self, item: str) -> str:
        return f"{self.lease_prefix}:{{{item}}}"

    def epoch_key(self, item: str) -> str:
        """Changes whenever the item's lease is taken (not when it is renewed); same slot as the lease."""
        return f"{self.lease_prefix}:epoch:{{{item}}}"

    def hold(self, item: str, owner: str, lease_s: float) -> bool:
        """Take or renew the item's lease; False when another member holds it."""
        return self.take(item, owner, lease_s) > 0

    def take(self, item: str, owner: str, lease_s: float) -> int:
        """Take or renew the item's lease; its epoch (the fencing token), 0 when another member holds it."""
        keys = [self.lease_key(item), self.epoch_key(item)]
        return int(self._renew(keys=keys, args=[owner, int(lease_s * 1000)]))

    def fenced(self, item: str, owner: str, epoch: int) -> bool:
        """True while ``owner`` holds the item's lease without it having changed hands since ``epoch``."""
        return bool(self._fenced(keys=[self.lease_key(item), self.epoch_key(item)], args=[owner, epoch]))

    def ack_if_held(self, item: str, owner: str, epoch: int, stream: str, group: str, ids: list[str]) -> bool:
        """XACK ``ids`` only while the lease is held as in :meth:`fenced` (the stream in the item's slot)."""
        keys = [self.lease_key(item), self.epoch_key(item), stream]
        return bool(self._fenced(keys=keys, args=[owner, epoch, group, *ids]))

    def release(self, item: str, owner: str) -> None:
        self._release(keys=[self.lease_key(item)], args=[owner])

    def owner(self, item: str) -> str | None:
        value = self.r.get(self.lease_key(item))
        return value.decode() if isinstance(value, bytes) else value

    def beat(self, member: str, lease_s: float) -> int:
        """Record this member as alive; returns how many members are alive (at least 1)."""
        now = time.time()
        pipe = self.r.pipeline(transaction=False)
        pipe.zadd(self.members_key, {member: now})
        pipe.zremrangebyscore(self.members_key, "-inf", now - lease_s)
        pipe.zcard(self.members_key)
        return max(1, int(pipe.execute()[2]))

    def leave(self, member: str) -> None:
        self.r.zrem(self.members_key, member)


def fair_share(items: int, members: int) -> int:
    """How many items one member may hold: ceil(items / members)."""
    return -(-items // max(1, members))


class LeaseKeeper:
    """Renews a member's leases from a thread every ``lease_s / 3``, however long its work runs.

    The owner tells it which items it holds (:meth:`track`); a lease found in another member's
    hands is reported once by :meth:`take_lost` and no longer renewed. A Redis error skips a
    round: the lease may then lapse, and the writes fenced by its epoch are refused.
    """

    def __init__(self, pool: LeasePool, owner: str, lease_s: float) -> None:
        self.pool = pool
        self.owner = owner
        self.lease_s = lease_s
        self._items: set[str] = set()
        self._lost: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def track(self, items: set[str]) -> None:
        with self._lock:
            self._items = set(items)
            self._lost &= self._items

    def take_lost(self) -> set[str]:
        with self._lock:
            lost, self._lost = self._lost, set()
            self._items -= lost
            return lost

    def renew_once(self) -> None:
        with self._lock:
            items = sorted(self._items)
        for item in items:
            if not self.pool.hold(item, self.owner, self.lease_s):
                with self._lock:
                    if item in self._items:
                        self._lost.add(item)
                log.warning("lease of %s is held by another member: stopping it", item)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.lease_s)

    def _run(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                self.renew_once()
            except TRANSIENT_ERRORS as exc:
                log.warning("lease renewal failed (%s: %s); retrying in %.1fs", type(exc).__name__, exc,
                            self.lease_s / 3)
