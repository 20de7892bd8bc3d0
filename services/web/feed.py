"""The live event feed: Server-Sent Events from the events stream, filtered, resumable by Last-Event-ID."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import anyio
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from services.web.context import STREAM_ID, RequestError, WebContext, context_of
from shared.events import EventFilter, EventReader
from shared.schema import EventMsg
from shared.streams import CONNECTION_ERRORS

log = logging.getLogger(__name__)


def parse_filter(request: Request) -> EventFilter:
    q = request.query_params
    try:
        min_score = float(q.get("min_score") or 0.0)
    except ValueError:
        raise RequestError(400, [f"min_score must be a number, got {q.get('min_score')!r}"]) from None
    if not 0.0 <= min_score <= 1.0:
        raise RequestError(400, [f"min_score must be between 0 and 1, got {min_score}"])
    cams = frozenset(c for c in q.getlist("camera") if c)
    emotions = frozenset(e for e in q.getlist("emotion") if e)
    zones = frozenset(z for z in q.getlist("zone") if z)
    return EventFilter(cameras=cams, emotions=emotions, min_score=min_score, zones=zones)


def feed_start(ctx: WebContext, request: Request) -> str:
    """Where the feed reads from: after the browser's Last-Event-ID, else a few events back."""
    last = request.headers.get("last-event-id") or request.query_params.get("last_id") or ""
    if last:
        if not STREAM_ID.match(last):
            raise RequestError(400, [f"bad Last-Event-ID {last!r}"])
        return last
    if ctx.opts.feed_backfill == 0:
        return "$"
    rows = ctx.r.xrevrange(ctx.keys.events, count=ctx.opts.feed_backfill + 1)
    if len(rows) <= ctx.opts.feed_backfill:
        return "0-0"
    oldest = rows[-1][0]
    return oldest.decode() if isinstance(oldest, bytes) else str(oldest)


def sse_event(ctx: WebContext, stream_id: str, ev: EventMsg) -> str:
    body = ev.to_dict()
    body["stream_id"] = stream_id
    body["emotion"] = ctx.state.track_emotion(ev.camera, ev.track_id) or ev.label
    return f"id: {stream_id}\ndata: {json.dumps(body, separators=(',', ':'))}\n\n"


async def api_events(request: Request) -> Response:
    ctx = context_of(request)
    filt = parse_filter(request)
    if ctx.feeds >= ctx.opts.max_feeds:
        raise RequestError(503, [f"too many open event feeds ({ctx.feeds}, web.max_feeds)"])
    start = await run_in_threadpool(feed_start, ctx, request)
    reader = EventReader(ctx.r, keys=ctx.keys, start=start, filt=filt, block_ms=1000)
    return StreamingResponse(_feed(ctx, reader), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


async def _feed(ctx: WebContext, reader: EventReader) -> AsyncIterator[str]:
    ctx.metrics.sse_clients.inc()
    ctx.feeds += 1
    try:
        yield "retry: 1000\n\n"
        while not ctx.stopping:
            reconnects = reader.reconnects
            try:
                items = await anyio.to_thread.run_sync(reader.poll_positioned, limiter=ctx.feed_threads())
            except CONNECTION_ERRORS as exc:
                items, reconnects = [], -1
                await anyio.sleep(1.0)
                log.warning("event feed: %s", exc)
            if reader.reconnects != reconnects:
                # the reader waits out Redis outages itself; tell the page why the feed is quiet
                ctx.metrics.redis_errors.inc()
                yield f"event: problem\ndata: {json.dumps('Redis unavailable; retrying')}\n\n"
                continue
            for item in items:
                yield sse_event(ctx, item.id, item.msg)
            ctx.metrics.events_sent.inc(len(items))
            if not items:
                yield ": keepalive\n\n"
    finally:
        ctx.feeds -= 1
        ctx.metrics.sse_clients.dec()
