"""The JSON errors of vv-serve: `{"error": {"message", "type", "param", "code"}}`, one table from an
exception of the runtime to its HTTP status and error type."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from ..errors import BackendFault, CapacityError, RuntimeInputError, one_line
from ..request_engine import Cancelled, EngineStopped, QueueFull

INVALID = "invalid_request_error"

# (exception class, HTTP status, error type, message with `{}` for the exception's one-line text); an
# exception answers with the first row it is an instance of (CapacityError before its base
# RuntimeInputError); any other exception is a 500 internal_error.
ERRORS_BY_EXCEPTION: tuple[tuple[type[BaseException], int, str, str], ...] = (
    (CapacityError, 503, "capacity", "{}"),
    (RuntimeInputError, 400, INVALID, "{}"),
    (BackendFault, 500, "backend_error", "backend error: {}"),
    (QueueFull, 429, "queue_full", "busy: {}; retry later"),
    (EngineStopped, 503, "unavailable", "unavailable: {}"),
    (TimeoutError, 504, "timeout", "{}"),
    (Cancelled, 503, "cancelled", "{}"),
)

# error types of the HTTP errors the framework raises (unknown route, wrong method, body too large)
HTTP_ERROR_TYPES = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}

# error types of the refusals of the security and connection layers (security.py, connections.py)
AUTHENTICATION = "authentication_error"      # 401: no key, or not one of the service's keys
PERMISSION = "permission_error"              # 403: a browser page of another origin; a preset is read-only
MISDIRECTED = "misdirected_request"          # 421: a Host name this service does not answer to
UNSUPPORTED_MEDIA = "unsupported_media_type"  # 415: a JSON endpoint sent something else
REQUEST_TIMEOUT = "request_timeout"          # 408: headers or body not sent within their deadline

# statuses that ask the client to come back: their answers carry Retry-After
RETRY_STATUSES = (429, 503)


def http_error(exc: BaseException) -> tuple[int, str, str]:
    """(HTTP status, one-line message, error type) of an exception, from ERRORS_BY_EXCEPTION."""
    for error_class, status, kind, message in ERRORS_BY_EXCEPTION:
        if isinstance(exc, error_class):
            return status, message.format(one_line(exc)), kind
    return 500, f"internal error ({type(exc).__name__})", "internal_error"


class ApiError(Exception):
    """A refusal the service decides itself (not an exception of the runtime), answered as JSON
    (`headers`: extra response headers, e.g. `connection: close` where the request body is left unread)."""

    def __init__(self, status: int, message: str, kind: str = INVALID, param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.headers = headers


def error_body(status: int, message: str, kind: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_body(status: int, message: str, kind: str, param: str | None = None) -> dict:
    """The JSON of an error (HTTP answers and WebSocket error messages alike)."""
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(status: int, message: str, kind: str, param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, kind, param), status_code=status, headers=headers)


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """(message, param) of the first of pydantic's validation errors."""
    first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return "request body is not valid JSON", None
    if kind == "missing":
        return f"{param}: required field missing", param
    if kind == "extra_forbidden":
        return f"{param}: unknown field", param
    if kind in ("model_type", "dict_type", "model_attributes_type") and not loc:
        return "request body must be a JSON object", None
    message = first.get("msg", "invalid value")
    return (f"{param}: {message}" if param else message), param
