"""Camera admin from the page: add, change, remove through the same registry as ``emotion-stream cameras``."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from services.web.context import RequestError, WebContext, camera_id, context_of
from services.web.views import dynamic_ingest_alive
from shared.cameras import CameraSettings
from shared.masking import restore_secrets
from shared.settings import format_errors, mask_url
from shared.sources import SourceRefusedError
from shared.zones import geometry_errors

GEOMETRY = ("mask", "zones")

log = logging.getLogger(__name__)


async def _json_body(request: Request) -> dict[str, Any]:
    """The JSON body of a same-origin request (a cross-site form cannot send JSON without CORS)."""
    if not request.headers.get("content-type", "").startswith("application/json"):
        raise RequestError(415, ["send the camera as JSON (Content-Type: application/json)"])
    origin = request.headers.get("origin")
    if origin and urlsplit(origin).netloc != request.headers.get("host"):
        raise RequestError(403, [f"cross-origin request from {origin} refused"])
    try:
        body = await request.json()
    except ValueError:
        raise RequestError(400, ["body is not valid JSON"]) from None
    if not isinstance(body, dict):
        raise RequestError(400, ["body must be a JSON object"])
    return body


def _require_dynamic(ctx: WebContext) -> None:
    if not dynamic_ingest_alive(ctx.r, ctx.registry):
        raise RequestError(409, ["camera changes need an ingest replica running with ingest.dynamic: true, "
                               "and none is alive"])


def _camera_from(body: dict[str, Any], cid: str, current: CameraSettings | None) -> CameraSettings:
    url = str(body.get("url") or "")
    if current is not None:
        # the page only ever saw the masked URL: keep the stored credentials
        url = restore_secrets(url, current.url) if url else current.url
    fields = {"id": cid, "url": url, "fps": body.get("fps", current.fps if current else 10.0),
              "loop": bool(body.get("loop", current.loop if current else False))}
    # Fields the body leaves out keep their values: the camera form does not send the mask and
    # zones, the mask and zones editor sends nothing else.
    for key in GEOMETRY:
        fields[key] = body[key] if key in body else (current.model_dump()[key] if current else [])
    try:
        return CameraSettings.model_validate(fields)
    except ValidationError as exc:
        raise RequestError(422, camera_errors(exc)) from None


def camera_errors(exc: ValidationError) -> list[str]:
    """Mask and zone problems as ``zones[1].points[2]: reason`` (the page marks them by field), the rest as usual."""
    geometry = [line for line in geometry_errors(exc) if line.startswith(GEOMETRY)]
    rest = [line.removeprefix("config error: ") for line in format_errors(exc)]
    return geometry + [line for line in rest if not line.startswith(GEOMETRY)]


async def api_camera_add(request: Request) -> Response:
    ctx = context_of(request)
    body = await _json_body(request)
    cam = _camera_from(body, str(body.get("id") or ""), None)
    await run_in_threadpool(_put, ctx, cam, False)
    return JSONResponse({"ok": True, "camera": cam.id, "message": f"camera {cam.id} added"}, status_code=201)


async def api_camera_update(request: Request) -> Response:
    ctx = context_of(request)
    cid = camera_id(request)
    body = await _json_body(request)
    current = (await run_in_threadpool(ctx.registry.cameras))[0].get(cid)
    if current is None:
        raise RequestError(404, [f"camera {cid!r} does not exist"])
    cam = _camera_from(body, cid, current)
    await run_in_threadpool(_put, ctx, cam, True)
    return JSONResponse({"ok": True, "camera": cid, "message": f"camera {cid} updated"})


def _put(ctx: WebContext, cam: CameraSettings, must_exist: bool) -> None:
    _require_dynamic(ctx)
    try:
        ctx.registry.put(cam, must_exist=must_exist)
    except KeyError as exc:
        ctx.metrics.camera_changes.labels(action="update" if must_exist else "add", result="refused").inc()
        raise RequestError(409, [str(exc.args[0])]) from None
    except SourceRefusedError as exc:
        ctx.metrics.camera_changes.labels(action="update" if must_exist else "add", result="refused").inc()
        raise RequestError(422, [f"url = {mask_url(cam.url)!r}: {exc}"]) from None
    ctx.metrics.camera_changes.labels(action="update" if must_exist else "add", result="ok").inc()
    log.info("camera %s %s from the web view (%s)", cam.id, "updated" if must_exist else "added", mask_url(cam.url))


def api_camera_remove(request: Request) -> Response:
    ctx = context_of(request)
    cid = camera_id(request)
    origin = request.headers.get("origin")
    if origin and urlsplit(origin).netloc != request.headers.get("host"):
        raise RequestError(403, [f"cross-origin request from {origin} refused"])
    _require_dynamic(ctx)
    if not ctx.registry.remove(cid):
        raise RequestError(404, [f"camera {cid!r} does not exist"])
    ctx.metrics.camera_changes.labels(action="remove", result="ok").inc()
    log.info("camera %s removed from the web view", cid)
    return JSONResponse({"ok": True, "camera": cid, "message": f"camera {cid} removed"})
