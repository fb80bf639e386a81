"""The HTTP application of vv-serve, built on the `SpeechEngine` interface only: the routes of
`routes`, the body limit middleware, the service state and the error handlers.

Every error is JSON `{"error": {"message", "type", ...}}` with a 4xx status (429/503 carry Retry-After),
or a 5xx for what is not the request's fault (503 capacity/draining, 504 timeout, 500 backend or internal
error): bad input never reaches the engine, and a failure of one request never touches another. An
exception of the runtime is answered by the table `errors.ERRORS_BY_EXCEPTION`.
"""

from __future__ import annotations

import dataclasses

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import realtime_routes, routes
from .errors import ERRORS_BY_EXCEPTION, HTTP_ERROR_TYPES, INVALID, ApiError, validation_message
from .service import Limits, Service

__all__ = ["Limits", "Service", "create_app"]

ROUTES = frozenset(route.path for router in (routes.router, realtime_routes.router) for route in router.routes)


class BodyLimit:
    """ASGI middleware: bounds request bodies (413 as JSON) and counts responses by route and status."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = path if path in ROUTES else "other"
        limit = self.service.limits.body_limit(path)
        metrics = self.service.metrics

        async def counted_send(message):
            if message["type"] == "http.response.start":
                metrics.response(route, message["status"])
            await send(message)

        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > limit
            except ValueError:
                too_big = False
            if too_big:
                response = self.service.error(413, f"request body of {int(declared)} bytes is larger than the "
                                                   f"limit of {limit} bytes on {path}", "too_large")
                return await response(scope, receive, counted_send)
        seen = 0

        async def bounded_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, f"request body larger than the limit of {limit} bytes on {path}")
            return message

        await self.app(scope, bounded_receive, counted_send)


def create_app(engine, limits: Limits | None = None) -> FastAPI:
    """The ASGI app over a started engine (`SpeechEngine`, or `RealtimeEngine` for a VibeVoice-Realtime
    ENGINE_DIR; the caller starts and stops the engine)."""
    realtime = engine.family == realtime_routes.FAMILY
    limits = limits or Limits()
    if realtime:  # its voices are the presets of its ENGINE_DIR
        limits = dataclasses.replace(limits, voice_uploads=False)
    service = Service(engine, limits)
    app = FastAPI(title="vv-serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.add_middleware(BodyLimit, service=service)
    if realtime:  # first: its routes answer before the common ones of the same path and method
        app.include_router(realtime_routes.router)
    app.include_router(routes.router)

    @app.exception_handler(ApiError)
    async def refused(request: Request, exc: ApiError):
        return service.error(exc.status, exc.message, exc.kind, exc.param)

    async def failed(request: Request, exc: Exception):
        return service.error(*service.failure(exc, f"{request.method} {request.url.path}"))

    for error_class, *_ in ERRORS_BY_EXCEPTION:
        app.add_exception_handler(error_class, failed)
    app.add_exception_handler(Exception, failed)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc.errors())
        return service.error(400, message, INVALID, param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no such route: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} not allowed on {request.url.path}"
        return service.error(exc.status_code, message, HTTP_ERROR_TYPES.get(exc.status_code, INVALID),
                             headers=getattr(exc, "headers", None))

    return app
