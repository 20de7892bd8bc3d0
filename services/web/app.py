"""The web view's HTTP app (Starlette): pages, the JSON they read, frames; the feed and admin routes."""

from __future__ import annotations

import logging
import time
from importlib import resources
from pathlib import Path
from typing import Any

import redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from services.web.admin import api_camera_add, api_camera_remove, api_camera_update
from services.web.auth import AuthMiddleware
from services.web.context import STREAM_ID, RequestError, WebContext, camera_id, context_of
from services.web.feed import api_events
from services.web.guard import HostGuard
from services.web.views import camera_list, find_frame, frame_jpeg, scrape, stream_lags
from shared.masking import mask_text
from shared.schema import EventMsg
from shared.streams import CONNECTION_ERRORS

log = logging.getLogger(__name__)

STATIC = Path(str(resources.files("services.web") / "static"))
# While faces keep being published, the page shows the frame they were found in (behind the newest
# frame by the pipeline's latency, but with boxes that match); once none came for this long, the
# faces are gone and the newest frame is shown bare.
FACE_HOLD_S = 2.0
SCRAPE_EVERY_S = 2.0


def page_index(request: Request) -> Response:
    return FileResponse(STATIC / "index.html")


def page_camera(request: Request) -> Response:
    camera_id(request)
    return FileResponse(STATIC / "camera.html")


def api_config(request: Request) -> Response:
    opts = context_of(request).opts
    return JSONResponse({"frame_fps": opts.frame_fps, "grafana_url": opts.grafana_url, "window_s": opts.window_s})


def api_cameras(request: Request) -> Response:
    ctx = context_of(request)
    return JSONResponse(camera_list(ctx.r, ctx.keys, ctx.registry, ctx.static_cameras))


def face_dict(ctx: WebContext, ev: EventMsg) -> dict[str, Any]:
    smoothed = ctx.state.track_emotion(ev.camera, ev.track_id)
    return {"box": ev.box.to_list(), "label": ev.label, "score": round(ev.score, 3), "track_id": ev.track_id,
            "emotion": smoothed or ev.label, "zones": list(ev.zones)}


def api_latest(request: Request) -> Response:
    """The frame to show and the faces found in it (none when the newest faces are from an older frame)."""
    ctx = context_of(request)
    cid = camera_id(request)
    faces = ctx.state.latest_faces(cid)
    if faces and time.time() - faces[0].publish_ts <= FACE_HOLD_S:
        frame = find_frame(ctx.r, ctx.keys, cid, faces[0].seq, ctx.opts.frame_scan, faces[0].capture_ts)
    else:
        frame = find_frame(ctx.r, ctx.keys, cid)
    shown = [face_dict(ctx, ev) for ev in faces] if frame is not None and faces and frame.seq == faces[0].seq else []
    return JSONResponse({"camera": cid, "frame": frame.to_dict() if frame else None, "faces": shown})


def api_frame(request: Request) -> Response:
    ctx = context_of(request)
    cid = camera_id(request)
    sid = str(request.path_params["frame"])
    if not STREAM_ID.match(sid):
        raise RequestError(400, [f"bad frame id {sid!r}"])
    jpeg = frame_jpeg(ctx.r, ctx.keys, cid, sid)
    if jpeg is None:
        return PlainTextResponse("frame no longer in the stream\n", status_code=404)
    ctx.metrics.frames_served.inc()
    return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=60"})


def api_summary(request: Request) -> Response:
    ctx = context_of(request)
    cid = camera_id(request)
    seconds = min(ctx.opts.window_s, 300.0)
    return JSONResponse({"camera": cid, "mix_last_minute": ctx.state.mix(cid, 60.0),
                         "history": {"seconds": seconds, "bin_s": 5.0,
                                     "bins": ctx.state.history(cid, seconds, 5.0)},
                         "tracks": ctx.state.tracks(cid)})


def api_health(request: Request) -> Response:
    ctx = context_of(request)
    cams = [c["id"] for c in camera_list(ctx.r, ctx.keys, ctx.registry, ctx.static_cameras)["cameras"]]
    at, services = ctx.scraped
    if time.monotonic() - at > SCRAPE_EVERY_S:
        # several open pages share one scrape of each service
        services = [scrape(ep).to_dict() for ep in ctx.opts.services]
        ctx.scraped = (time.monotonic(), services)
    return JSONResponse({"services": services, "streams": stream_lags(ctx.r, ctx.keys, ctx.opts, cams),
                         "web": {"heartbeat_ok": True}, "grafana_url": ctx.opts.grafana_url})


def healthz(request: Request) -> Response:
    return PlainTextResponse("ok\n")


def readyz(request: Request) -> Response:
    try:
        context_of(request).r.ping()
    except CONNECTION_ERRORS as exc:
        return PlainTextResponse(mask_text(f"not ready: Redis: {exc}\n"), status_code=503)
    return PlainTextResponse("ready\n")



# ----------------------------------------------------------------------------- the app


async def _bad_request(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestError)
    return JSONResponse({"ok": False, "errors": exc.errors}, status_code=exc.status)


async def _redis_down(request: Request, exc: Exception) -> Response:
    context_of(request).metrics.redis_errors.inc()
    return JSONResponse({"ok": False, "errors": [mask_text(f"Redis unavailable: {exc}")]}, status_code=503)


def make_app(ctx: WebContext) -> Starlette:
    routes = [
        Route("/", page_index),
        Route("/cameras/{camera}", page_camera),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/api/config", api_config),
        Route("/api/cameras", api_cameras, methods=["GET"]),
        Route("/api/cameras", api_camera_add, methods=["POST"]),
        Route("/api/cameras/{camera}", api_camera_update, methods=["PUT"]),
        Route("/api/cameras/{camera}", api_camera_remove, methods=["DELETE"]),
        Route("/api/cameras/{camera}/latest", api_latest),
        Route("/api/cameras/{camera}/frames/{frame}.jpg", api_frame),
        Route("/api/cameras/{camera}/summary", api_summary),
        Route("/api/health", api_health),
        Route("/api/events", api_events),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
    ]
    handlers: dict[Any, Any] = {RequestError: _bad_request}
    for exc_type in (redis.ConnectionError, redis.TimeoutError):
        handlers[exc_type] = _redis_down
    app = Starlette(routes=routes, exception_handlers=handlers)
    app.state.ctx = ctx
    app.add_middleware(AuthMiddleware, opts=ctx.opts)
    app.add_middleware(HostGuard, opts=ctx.opts)  # added last, so it runs first: before auth and every route
    return app
