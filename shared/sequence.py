"""Frame numbers: unique per camera across ingest restarts and replicas."""

from __future__ import annotations

import redis

SEQ_BLOCK = 1000


class SeqAllocator:
    """Frame numbers unique across restarts: reserved from Redis in blocks (one INCRBY per block)."""

    def __init__(self, r: redis.Redis, key: str) -> None:
        self.r = r
        self.key = key
        self._next = 0
        self._end = 0

    def next(self) -> int:
        if self._next >= self._end:
            self._reserve()
        value = self._next
        self._next += 1
        return value

    def _reserve(self) -> None:
        end = int(self.r.incrby(self.key, SEQ_BLOCK))
        if end - SEQ_BLOCK < self._next:
            # Redis lost the counter (restarted empty): never hand out a number twice.
            end = self._next + SEQ_BLOCK
            self.r.set(self.key, end)
        self._end = end
        self._next = end - SEQ_BLOCK
