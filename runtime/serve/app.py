"""The HTTP application of vv-serve, built on the `SpeechEngine` interface only: the routes of
`routes`, the middlewares (outermost first: `connections.RequestDeadline`, the body limit,
`security.AccessGuard`), the service state, the error handlers and the OpenAPI document
(`/openapi.json`, generated from the routes and their request models).

Every error is JSON `{"error": {"message", "type", ...}}` with a 4xx status (429/503 carry Retry-After),
or a 5xx for what is not the request's fault (503 capacity/draining, 504 timeout, 500 backend or internal
error): bad input never reaches the engine, and a failure of one request never touches another. An
exception of the runtime is answered by the table `errors.ERRORS_BY_EXCEPTION`.
"""

from __future__ import annotations

import dataclasses
import logging

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from . import realtime_routes, routes
from .connections import RequestDeadline
from .errors import ERRORS_BY_EXCEPTION, HTTP_ERROR_TYPES, INVALID, ApiError, validation_message
from .security import Access, AccessGuard, needs_key
from .service import Limits, Service

__all__ = ["Access", "Limits", "Service", "create_app"]

log = logging.getLogger("vv_runtime.serve")
CLIENT_CLOSED = 499          # the status counted for a request its client left before sending it whole

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


def create_app(engine, limits: Limits | None = None, access: Access | None = None) -> FastAPI:
    """The ASGI app over a started engine (`SpeechEngine`, or `RealtimeEngine` for a VibeVoice-Realtime
    ENGINE_DIR; the caller starts and stops the engine); `access`: its API keys, allowed origins and host
    names (default: no keys, loopback and IP host names only)."""
    realtime = engine.family == realtime_routes.FAMILY
    limits = limits or Limits()
    if realtime:  # its voices are the presets of its ENGINE_DIR
        limits = dataclasses.replace(limits, voice_uploads=False)
    service = Service(engine, limits, access)
    app = FastAPI(title="vv-serve", version="1", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.service = service
    app.add_middleware(AccessGuard, access=service.access, service=service)
    app.add_middleware(BodyLimit, service=service)
    app.add_middleware(RequestDeadline, service=service)
    if realtime:  # first: its routes answer before the common ones of the same path and method
        app.include_router(realtime_routes.router)
    app.include_router(routes.router)
    app.openapi = lambda: openapi_document(app, service.access, sorted(service.voices.presets))

    @app.exception_handler(ApiError)
    async def refused(request: Request, exc: ApiError):
        return service.error(exc.status, exc.message, exc.kind, exc.param, headers=exc.headers)

    @app.exception_handler(ClientDisconnect)
    async def client_left(request: Request, exc: ClientDisconnect):
        # not the service's fault, nor an error of the request: the client went away while sending it
        log.info("%s %s: the client disconnected before sending its whole request", request.method,
                 request.url.path)
        return Response(status_code=CLIENT_CLOSED)

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
        headers = getattr(exc, "headers", None)
        if exc.status_code == 404:
            message = f"no such route: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} not allowed on {request.url.path}"
            headers = {**{k: v for k, v in (headers or {}).items() if k.lower() != "allow"},
                       "allow": ", ".join(allowed_methods(request.scope))}
        return service.error(exc.status_code, message, HTTP_ERROR_TYPES.get(exc.status_code, INVALID),
                             headers=headers)

    return app


def allowed_methods(scope) -> list[str]:
    """Every method a route of `routes` serves on the path of `scope` (starlette names only the first
    route's)."""
    methods = set()
    for route in routes.router.routes:
        if route.matches(scope)[0] != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def openapi_document(app: FastAPI, access: Access, presets: list[str]) -> dict:
    """The OpenAPI document of the app: its routes, the JSON request models (with examples naming the
    preset voices), every error as `ErrorBody`, and, where the service has API keys, the bearer scheme on
    the endpoints that need one."""
    if app.openapi_schema is None:
        document = get_openapi(title=app.title, version=app.version, routes=app.routes,
                               description="vv-serve: speech over HTTP (docs/SERVE.md)")
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        for model in routes.BODY_MODELS + routes.DOC_MODELS:
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[model.__name__] = schema
        if presets:
            speaker = {"seed": 1, "max_new_frames": 8, "response_format": "wav"}
            schemas["SpeechBody"]["examples"] = [{"model": "vibevoice", "input": "Hello there.", "voice": presets[0],
                                                  **speaker}]
            schemas["ScriptBody"]["examples"] = [{"script": "Speaker 1: Hello there.\nSpeaker 2: Hi.",
                                                  "voices": [presets[0], presets[-1]], **speaker}]
        if access.keys_required:
            document["components"]["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
            for path, operations in document["paths"].items():
                if needs_key(path):
                    for operation in operations.values():
                        operation["security"] = [{"apiKey": []}]
        app.openapi_schema = document
    return app.openapi_schema
