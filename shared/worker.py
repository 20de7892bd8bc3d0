"""The consumer-group worker loop that detect and classify share.

``while not stopping``: XREADGROUP with a short block; the subclass handles the entries and
writes its output, acks and dead letters in one pipeline; every ``claim_every_s`` the worker
takes over entries idle on dead consumers (XAUTOCLAIM); entries delivered too often are
dead-lettered. Redis outages are retried with capped exponential backoff, and groups are
re-created if Redis lost its data.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import redis
from prometheus_client import Histogram

from shared.health import PHASES, CommonMetrics, Heartbeat
from shared.settings import ServiceSettings
from shared.streams import (
    COUNT_TRIMMED,
    REFUSAL_ERRORS,
    TRANSIENT_ERRORS,
    Backoff,
    Claimed,
    Entry,
    Keys,
    autoclaim,
    by_slot,
    dead_letter,
    default_consumer_name,
    delivery_counts,
    ensure_group,
    group_stats,
    is_cluster,
    is_nogroup,
    is_transient,
    parse_read,
    refusal_reason,
    trimmed_pending,
    trimmed_unread,
)

log = logging.getLogger(__name__)

STATS_EVERY_S = 2.0

# On a cluster, streams on several slots cannot share one blocking read: an idle worker
# polls them with blocking reads this short, one slot at a time.
CLUSTER_POLL_MS = 50


class Stopper:
    """First SIGTERM/SIGINT asks for a drain; the second exits at once.

    The signal handler only flips a flag: taking a lock there (``Event.set``, logging) can
    deadlock when the signal lands while the main thread holds that same lock.
    """

    def __init__(self) -> None:
        self._stop = False
        self._announced = False
        self.signals = 0

    def _flag(self) -> bool:
        return self._stop

    @property
    def stopping(self) -> bool:
        stop = self._flag()
        if stop and not self._announced:
            self._announced = True
            log.info("stop requested: draining (a second SIGTERM exits at once)")
        return stop

    def stop(self) -> None:
        self._stop = True

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``, waking early when a stop is requested; True if stopping."""
        end = time.monotonic() + seconds
        while not self._flag():
            left = end - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(left, 0.05))
        return self._flag()

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1
        if self.signals >= 2:
            os._exit(128 + signum)
        self._stop = True


class ChildStopper(Stopper):
    """Stops with its parent, or on its own (one camera removed while the service runs)."""

    def __init__(self, parent: Stopper) -> None:
        super().__init__()
        self.parent = parent
        self._announced = True  # the parent announces a service-wide stop

    def _flag(self) -> bool:
        return self._stop or self.parent._flag()


class PhaseClock:
    """Splits a loop's wall time into waiting for input, working and writing output.

    The loop marks each pass's start and its waits; writes are timed where they happen
    (``with clock.writing():`` around a pipeline's EXEC), and work is the rest of the pass. Each
    pass observes wait and work, and write when it wrote, so the histogram's ``_sum`` per phase
    adds up to the loop's wall time (threads of one stage add up their own).
    """

    def __init__(self, metric: Histogram, stage: str) -> None:
        self._phase = {p: metric.labels(stage=stage, phase=p) for p in PHASES}
        self._started = time.perf_counter()
        self._waited = 0.0
        self._wrote = 0.0
        self._writes = 0

    def start(self) -> None:
        """A new pass: what the last one left unobserved (it raised) is dropped."""
        self._started = time.perf_counter()
        self._waited = self._wrote = 0.0
        self._writes = 0

    @contextmanager
    def waiting(self) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self._waited += time.perf_counter() - began

    @contextmanager
    def writing(self) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self._wrote += time.perf_counter() - began
            self._writes += 1

    def finish(self) -> None:
        """Observe the pass: work is what was neither waiting nor writing."""
        total = time.perf_counter() - self._started
        self._phase["wait"].observe(self._waited)
        self._phase["work"].observe(max(0.0, total - self._waited - self._wrote))
        if self._writes:
            self._phase["write"].observe(self._wrote)
        self.start()


class StreamWorker(ABC):
    """Reads one consumer group over a set of streams; subclasses process the entries."""

    service = "worker"

    def __init__(self, settings: ServiceSettings, r: redis.Redis, group: str, common: CommonMetrics,
                 stopper: Stopper | None = None) -> None:
        self.settings = settings
        self.r = r
        self.group = group
        self.keys = Keys(settings.redis.prefix)
        self.common = common
        self.stopper = stopper or Stopper()
        self.consumer = settings.consumer or default_consumer_name()
        self.heartbeat = Heartbeat(common.heartbeat)
        self.backoff = Backoff(settings.redis.backoff_initial_s, settings.redis.backoff_max_s)
        self._groups: set[str] = set()
        self._last_claim = 0.0
        self._last_stats = 0.0
        self._clustered = is_cluster(r)
        self._turn = 0
        self._count_trimmed = r.register_script(COUNT_TRIMMED)
        self.clock = PhaseClock(common.phase, self.service)

    # -- subclass API -------------------------------------------------------

    @abstractmethod
    def streams(self) -> list[str]:
        """Stream keys to read now (may change while running)."""

    @abstractmethod
    def handle(self, entries: list[Entry]) -> None:
        """Process entries; must ack each one (output + XACK in one pipeline)."""

    def read_count(self) -> int:
        return 16

    def block_ms(self) -> int:
        return self.settings.streams.block_ms

    def handle_claimed(self, entries: list[Entry]) -> None:
        """Process entries taken over from another consumer; by default like fresh ones."""
        self.handle(entries)

    def idle(self) -> None:  # noqa: B027 (optional hook)
        """Called when a read returned nothing (e.g. to flush a partial batch)."""

    def drain(self) -> None:  # noqa: B027 (optional hook)
        """Called once after the loop stops, to finish in-flight work."""

    # -- loop -------------------------------------------------------------

    def run(self) -> None:
        log.info("%s consumer %s in group %s", self.service, self.consumer, self.group)
        while not self.stopper.stopping:
            self.heartbeat.beat()
            try:
                self.step()
                self.backoff.reset()
            except redis.ResponseError as exc:
                if is_transient(exc):
                    self._on_redis_down(exc)  # OOM, READONLY: the entries stay pending, retried later
                elif is_nogroup(exc):
                    log.warning("consumer group missing (Redis restarted empty?): re-creating")
                    self._groups.clear()
                else:
                    raise
            except TRANSIENT_ERRORS as exc:
                self._on_redis_down(exc)
        self._drain_safely()

    def step(self) -> None:
        self.clock.start()
        self._step()
        self.clock.finish()

    def _step(self) -> None:
        streams = self.streams()
        self._ensure_groups(streams)
        self._maybe_claim(streams)
        self._maybe_sample(streams)
        if not streams:
            with self.clock.waiting():
                self.stopper.wait(self.settings.streams.block_ms / 1000)
            self.idle()
            return
        with self.clock.waiting():
            entries = self._read(streams)
        if entries:
            self.handle(entries)
        else:
            self.idle()

    def _read(self, streams: list[str]) -> list[Entry]:
        groups = by_slot(streams) if self._clustered else [streams]
        if len(groups) == 1:
            return self._read_group(groups[0], self.block_ms())
        # Rotating the starting slot keeps one busy camera from starving the others.
        self._turn = (self._turn + 1) % len(groups)
        ordered = groups[self._turn:] + groups[:self._turn]
        entries: list[Entry] = []
        for group in ordered:
            entries += self._read_group(group, None, self.read_count() - len(entries))
            if len(entries) >= self.read_count():
                break
        return entries or self._read_group(ordered[0], min(self.block_ms(), CLUSTER_POLL_MS))

    def _read_group(self, streams: list[str], block: int | None, count: int | None = None) -> list[Entry]:
        reply = self.r.xreadgroup(self.group, self.consumer, {s: ">" for s in streams},
                                  count=count or self.read_count(), block=block)
        return parse_read(reply)

    def _on_redis_down(self, exc: Exception) -> None:
        self.common.redis_errors.inc()
        delay = self.backoff.next_delay()
        log.warning("Redis refused or unavailable (%s, %s: %s); retrying in %.2fs", refusal_reason(exc),
                    type(exc).__name__, exc, delay)
        self._groups.clear()
        self.stopper.wait(delay)

    def _drain_safely(self) -> None:
        deadline = self.settings.streams.drain_timeout_s
        done = threading.Event()

        def target() -> None:
            try:
                self.drain()
            except Exception:
                log.exception("drain failed")
            finally:
                done.set()

        threading.Thread(target=target, name="drain", daemon=True).start()
        if not done.wait(deadline):
            log.error("drain did not finish within %.1fs; unacked entries stay pending for reclaim", deadline)

    def _ensure_groups(self, streams: list[str]) -> None:
        for stream in streams:
            if stream not in self._groups:
                ensure_group(self.r, stream, self.group)
                self._groups.add(stream)

    def _maybe_claim(self, streams: list[str]) -> None:
        cfg = self.settings.streams
        now = time.monotonic()
        if now - self._last_claim < cfg.claim_every_s:
            return
        self._last_claim = now
        for stream in streams:
            self._claim_stream(stream)

    def _claim_stream(self, stream: str, idle_ms: int | None = None) -> None:
        """Take over idle entries a few at a time, so a poison entry takes few others with it.

        Entries already delivered before (suspects: the consumer holding them died) are handled
        one by one; at most one full pass over the stream's pending entries per call.
        """
        cfg = self.settings.streams
        cursor = "0-0"
        while not self.stopper.stopping:
            claimed = autoclaim(self.r, stream, self.group, self.consumer,
                                cfg.claim_idle_ms if idle_ms is None else idle_ms,
                                count=cfg.claim_count, start_id=cursor)
            self._count_lost_pending(stream, claimed)
            if claimed.entries:
                log.info("reclaimed %d idle entries from %s", len(claimed.entries), stream)
                self.common.reclaimed.labels(stream=stream).inc(len(claimed.entries))
                survivors = self._drop_poison(stream, claimed.entries)
                counts = delivery_counts(self.r, stream, self.group, [e.id for e in survivors])
                first_time = [e for e in survivors if counts.get(e.id, 1) <= 2]
                if first_time:
                    self.handle_claimed(first_time)
                for suspect in (e for e in survivors if counts.get(e.id, 1) > 2):
                    self.handle_claimed([suspect])
            cursor = claimed.next_id
            if cursor == "0-0":
                return

    def _count_lost_pending(self, stream: str, claimed: Claimed) -> None:
        """Pending entries trimmed before anyone acked them: ack (Redis 6.2 keeps them) and count."""
        gone = list(claimed.deleted)
        if claimed.unnamed:
            gone += trimmed_pending(self.r, stream, self.group, self.consumer,
                                    claimed.unnamed + self.settings.streams.claim_count + self.read_count())
        if not gone:
            return
        self.r.xack(stream, self.group, *gone)
        log.warning("%d pending entries of %s were trimmed before they were processed", len(gone), stream)
        self.common.lost.labels(stream=stream, group=self.group, reason="trimmed_pending").inc(len(gone))

    def _maybe_sample(self, streams: list[str]) -> None:
        now = time.monotonic()
        if now - self._last_stats < STATS_EVERY_S:
            return
        self._last_stats = now
        for stream in streams:
            stats = group_stats(self.r, stream, self.group)
            if stats is None:
                continue
            self.common.stream_length.labels(stream=stream).set(stats.length)
            self.common.group_pending.labels(stream=stream, group=self.group).set(stats.pending)
            self.common.group_lag.labels(stream=stream, group=self.group).set(stats.lag)
            self._count_trimmed_unread(stream)

    def _count_trimmed_unread(self, stream: str) -> None:
        lost = trimmed_unread(self.r, stream, self.group)
        if not lost:
            return
        marker = f"{stream}:trimmed:{self.group}"
        stats = self.r.xinfo_groups(stream)
        last = next((g["last-delivered-id"] for g in stats if _name(g["name"]) == self.group), b"")
        new = int(self._count_trimmed(keys=[marker], args=[_name(last), lost]))
        if new:
            log.warning("%d entries of %s were trimmed (MAXLEN) before group %s read them", new, stream, self.group)
            self.common.lost.labels(stream=stream, group=self.group, reason="trimmed_unread").inc(new)

    def _drop_poison(self, stream: str, entries: list[Entry]) -> list[Entry]:
        """Entries delivered more than ``max_deliveries`` times go to the dead-letter stream.

        When even the dead letter is refused (Redis out of memory), the entry is acked and
        counted as lost: retrying forever would pin it, and its stream's memory, for good.
        """
        counts = delivery_counts(self.r, stream, self.group, [e.id for e in entries])
        limit = self.settings.streams.max_deliveries
        poison = [e for e in entries if counts.get(e.id, 0) > limit]
        if poison:
            pipe = self.slot_pipeline()
            for e in poison:
                self.dead_letter(pipe, e, "max_deliveries", f"delivered {counts[e.id]} times")
            try:
                with self.clock.writing():
                    pipe.execute()
            except REFUSAL_ERRORS as exc:
                self._ack_lost(stream, poison, refusal_reason(exc))
        return [e for e in entries if e not in poison]

    def _ack_lost(self, stream: str, entries: list[Entry], reason: str) -> None:
        self.r.xack(stream, self.group, *[e.id for e in entries])
        log.error("%d entries of %s could not be dead-lettered (%s): acked and counted as lost",
                  len(entries), stream, reason)
        self.common.lost.labels(stream=stream, group=self.group, reason=reason).inc(len(entries))

    # -- helpers for subclasses -------------------------------------------

    def pipeline(self) -> Any:
        """MULTI/EXEC on a single Redis, so outputs and acks land together or not at all.

        A cluster refuses a transaction across slots; there the caller queues outputs and acks
        in separate pipelines, outputs first (see the README's guarantees).
        """
        return self.r.pipeline(transaction=not self._clustered)

    def slot_pipeline(self) -> Any:
        """MULTI/EXEC even on a cluster, for writes to one slot (a stream and its dead letters):
        a refused dead letter must not let its ack through."""
        return self.r.pipeline(transaction=True)

    def dead_letter(self, pipe: Any, entry: Entry, reason: str, detail: str, ack: bool = True) -> None:
        """Queue a dead letter (+ its ack, unless the caller acks after its outputs) on ``pipe`` and count it."""
        log.warning("dead letter from %s %s: %s (%s)", entry.stream, entry.id, reason, detail)
        dead_letter(pipe, self.keys, self.settings.streams, entry, reason, detail, self.service)
        if ack:
            pipe.xack(entry.stream, self.group, entry.id)
        self.common.dead_letters.labels(stream=entry.stream, reason=reason).inc()


def _name(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
