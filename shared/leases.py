"""Ownership leases in Redis, shared by ingest (who reads a camera) and detect (who follows it).

A pool has a lease key per item (``<prefix>:<name>:{item}``, owner with a TTL, in the item's
cluster slot) and a sorted set of member heartbeats (``<prefix>:<name>-members``). A member
holds at most its fair share of the items (:func:`fair_share`), renews its leases more often
than they lapse, and a dead member's items are taken over once its leases lapse.
"""

from __future__ import annotations

import time

import redis

RENEW = """
local owner = redis.call('GET', KEYS[1])
if owner == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
elseif not owner then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
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

    def lease_key(self, item: str) -> str:
        return f"{self.lease_prefix}:{{{item}}}"

    def hold(self, item: str, owner: str, lease_s: float) -> bool:
        """Take or renew the item's lease; False when another member holds it."""
        return bool(self._renew(keys=[self.lease_key(item)], args=[owner, int(lease_s * 1000)]))

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
