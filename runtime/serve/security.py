"""Who may use vv-serve, and from where: API keys, browser origins and Host names.

    access = Access(keys=[...], allow_origins=["https://app.example"], allow_hosts=["tts.example"])
    app.add_middleware(AccessGuard, access=access, service=service)
    principal_of(request)          # in a route (HTTP or WebSocket): who asks; its `owner` owns its uploads

`AccessGuard` runs the checks of `Access` on every HTTP request and every WebSocket handshake before any
route sees it, from the connection's path and headers only; a route reads the outcome with
`principal_of(connection)` (a starlette `Request` or `WebSocket`):

- **Host**: the Host header must be a name this service answers to: any IP address, `localhost`, `test`
  and their subdomains (names that public DNS never answers, RFC 6761), and the names given with
  `--allow-host` (`*.example.com`: every subdomain; `*`: any name). A page elsewhere that points a name
  of its own at this machine (DNS rebinding) sends that name: 421.
- **Origin**: a browser names the page's origin in `Origin` on every cross-origin request and on every
  POST; one that is neither the service's own (the origin's host and port are the Host header) nor listed
  with `--allow-origin` is refused (403) before anything runs. A listed origin gets CORS answers (the
  preflight, `Access-Control-Allow-Origin`, the exposed `X-*` headers), since its JSON requests and
  Authorization header need a preflight.
- **API keys**: where the service has keys, every `/v1/...` endpoint and `/metrics` need
  `Authorization: Bearer KEY` (401 otherwise; compared in constant time with every key). `/health`, the
  page `/` and `/openapi.json` stay open. Without keys (the command line allows that on a loopback
  address only, unless told otherwise) every request is the one principal `LOCAL`.

Every refusal is the service's JSON error and closes the connection (the request's body is left unread).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from starlette.datastructures import Headers

from .errors import AUTHENTICATION, MISDIRECTED, PERMISSION, ApiError

KEYS_ENV = "VV_SERVE_API_KEYS"             # keys from the environment, separated by white space
KEY_SHAPE = re.compile(r"[\x21-\x7e]{16,512}")  # printable ASCII without spaces: sent in a header as it is
RESERVED_NAMES = ("localhost", "test")     # RFC 6761: never answered by public DNS
DEFAULT_PORTS = {"http": 80, "https": 443}
PREFLIGHT_MAX_AGE_S = 600
# what an allowed page may read of a response besides the CORS-safelisted headers
EXPOSED_HEADERS = ("x-request-id, x-seed, x-sample-rate, x-replica-id, x-frames, x-audio-seconds, "
                   "x-first-audio-seconds, x-sample-format, x-channels, retry-after")
ALLOWED_METHODS = "GET, POST, DELETE, OPTIONS"
ALLOWED_REQUEST_HEADERS = "authorization, content-type"


def needs_key(path: str) -> bool:
    """Whether `path` is served only with a key (where the service has keys)."""
    return path in ("/v1", "/metrics") or path.startswith("/v1/")


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: `owner` owns the voices it uploads."""
    owner: str
    key_id: str | None = None      # a short digest of its key (for logs); None where the service has no keys


LOCAL = Principal("local")        # every request of a service without keys


class Refusal(Exception):
    """A request refused before any route runs (answered by `AccessGuard`)."""

    def __init__(self, status: int, message: str, kind: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def read_keys(keys=(), keys_file: str | Path | None = None) -> list[str]:
    """The API keys given one by one and those of a keys file (one a line; blank lines and lines
    starting with `#` skipped). ValueError (one line, never showing a key) for a bad one."""
    found = [str(k).strip() for k in keys if str(k).strip()]
    source = ["given"] * len(found)
    if keys_file is not None:
        path = Path(keys_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"keys file {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if line and not line.startswith("#"):
                found.append(line)
                source.append(f"{path} line {number}")
    for key, where in zip(found, source):
        if not KEY_SHAPE.fullmatch(key):
            raise ValueError(f"API key ({where}): use 16 to 512 printable ASCII characters without spaces")
    return list(dict.fromkeys(found))


def host_name(host: str) -> str:
    """The name of a Host header value, without port, brackets or trailing dot, lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def is_loopback(host: str) -> bool:
    """Whether a listening address (or name) is loopback only."""
    name = host_name(host) if host.startswith("[") else host.strip().lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def origin_of(value: str) -> str:
    """`scheme://host[:port]` of an origin or URL (lower case, default port left out); ValueError if
    it is none. `null` (a sandboxed page, a file) and `*` stay as they are."""
    value = value.strip()
    if value in ("null", "*"):
        return value
    parts = urlsplit(value)
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/") or parts.query:
        raise ValueError(f"origin {value[:100]!r}: expected scheme://host[:port], e.g. https://app.example.com")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    port = parts.port
    return f"{parts.scheme}://{host}" + ("" if port in (None, DEFAULT_PORTS[parts.scheme]) else f":{port}")


class Access:
    """The keys, origins and host names a service accepts (see the module docstring)."""

    def __init__(self, keys=(), allow_origins=(), allow_hosts=()):
        keys = read_keys(keys)
        self._digests = {hashlib.sha256(k.encode()).digest(): key_id(k) for k in keys}
        self.allow_origins = frozenset(origin_of(o) for o in allow_origins)
        self.allow_hosts = tuple(h.strip().lower().rstrip(".") for h in allow_hosts if h.strip())

    @property
    def key_count(self) -> int:
        return len(self._digests)

    @property
    def keys_required(self) -> bool:
        return bool(self._digests)

    # --- the checks ----------------------------------------------------------------------------------

    def answers_to(self, name: str) -> bool:
        try:
            ipaddress.ip_address(name)
            return True                      # an address cannot be re-pointed by anyone's DNS
        except ValueError:
            pass
        if any(name == reserved or name.endswith("." + reserved) for reserved in RESERVED_NAMES):
            return True
        for allowed in self.allow_hosts:
            if allowed == "*" or allowed == name or (allowed.startswith("*.") and name.endswith(allowed[1:])):
                return True
        return False

    def check_host(self, host: str | None) -> None:
        if host is None:
            return                           # HTTP/1.0 without Host: no name that could have been re-pointed
        name = host_name(host)
        if not self.answers_to(name):
            raise Refusal(421, f"this service does not answer to the host name {name[:100]!r} (start it with "
                               f"--allow-host NAME to serve it under a name)", MISDIRECTED)

    def cross_origin(self, origin: str | None, host: str | None) -> str | None:
        """The page origin to answer with CORS headers (None: no browser page of another origin asks);
        Refusal (403) for an origin that is not allowed."""
        if origin is None:
            return None
        try:
            normal = origin_of(origin)
        except ValueError:
            normal = origin.strip()[:100]
        if normal != "null" and host is not None and urlsplit(origin.strip()).netloc.lower() == host.strip().lower():
            return None                      # the service's own page (scheme aside: a TLS proxy in front)
        if "*" in self.allow_origins or normal in self.allow_origins:
            return origin.strip()
        raise Refusal(403, f"requests from pages of origin {normal!r} are refused (start the service with "
                           f"--allow-origin {normal} to allow them)", PERMISSION)

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal of an `Authorization: Bearer KEY` header; Refusal (401) without a valid key."""
        if not self._digests:
            return LOCAL
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Refusal(401, "this service needs an API key: send the header 'Authorization: Bearer KEY'",
                          AUTHENTICATION, {"www-authenticate": 'Bearer realm="vv-serve"'})
        presented = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found = None
        for digest, kid in self._digests.items():   # every key, whatever matched: no timing to learn from
            if hmac.compare_digest(digest, presented):
                found = kid
        if found is None:
            raise Refusal(401, "the API key is not one of this service's keys", AUTHENTICATION,
                          {"www-authenticate": 'Bearer realm="vv-serve", error="invalid_token"'})
        return Principal(f"key-{found}", found)


WEBSOCKET_PROTOCOL = "vv-stream"   # the subprotocol the WebSocket routes accept
KEY_PROTOCOL = "bearer."            # + the key in unpadded base64url: a browser's way to send a key on a WebSocket


def websocket_authorization(headers) -> str | None:
    """`Bearer KEY` from a WebSocket handshake's `Sec-WebSocket-Protocol` entry `bearer.<base64url(KEY)>`
    (browsers cannot set an Authorization header on a WebSocket); None when there is none."""
    for entry in (headers.get("sec-websocket-protocol") or "").split(","):
        entry = entry.strip()
        if entry.startswith(KEY_PROTOCOL):
            encoded = entry[len(KEY_PROTOCOL):]
            try:
                key = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                return "Bearer "      # refused below as a key that is not one of the service's
            return f"Bearer {key}"
    return None


def principal_of(connection) -> Principal:
    """Who the request or WebSocket of `connection` (starlette HTTPConnection) comes from, as
    `AccessGuard` established it."""
    principal = (connection.scope.get("state") or {}).get("principal")
    if principal is None:
        raise ApiError(401, "this endpoint needs an API key: send the header 'Authorization: Bearer KEY'",
                       AUTHENTICATION)
    return principal


class AccessGuard:
    """ASGI middleware: the checks of `Access` on HTTP requests and WebSocket handshakes, CORS for the
    allowed origins; the principal goes into `scope["state"]["principal"]`."""

    def __init__(self, app, access: Access, service):
        self.app, self.access, self.service = app, access, service

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        origin = None
        try:
            self.access.check_host(headers.get("host"))
            origin = self.access.cross_origin(headers.get("origin"), headers.get("host"))
            if (scope["type"] == "http" and scope["method"] == "OPTIONS" and origin is not None
                    and "access-control-request-method" in headers):
                return await self._preflight(origin, send)
            path = scope.get("path", "")
            if needs_key(path):
                authorization = headers.get("authorization")
                if authorization is None and scope["type"] == "websocket":
                    authorization = websocket_authorization(headers)
                principal = self.access.authenticate(authorization)
            else:
                principal = None if self.access.keys_required else LOCAL
        except Refusal as refusal:
            return await self._refuse(scope, receive, send, refusal, origin)
        scope.setdefault("state", {})["principal"] = principal
        if origin is None:
            return await self.app(scope, receive, send)

        async def send_with_cors(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *_cors_headers(origin)]}
            await send(message)

        await self.app(scope, receive, send_with_cors)

    async def _preflight(self, origin: str, send) -> None:
        headers = [*_cors_headers(origin), (b"access-control-allow-methods", ALLOWED_METHODS.encode()),
                   (b"access-control-allow-headers", ALLOWED_REQUEST_HEADERS.encode()),
                   (b"access-control-max-age", str(PREFLIGHT_MAX_AGE_S).encode()), (b"content-length", b"0")]
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    async def _refuse(self, scope, receive, send, refusal: Refusal, origin: str | None) -> None:
        response = self.service.error(refusal.status, refusal.message, refusal.kind,
                                      headers={**refusal.headers, "connection": "close"})
        headers = list(response.raw_headers) + (_cors_headers(origin) if origin else [])
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
            await send({"type": "http.response.body", "body": response.body})
            return
        await receive()                              # websocket.connect
        if "websocket.http.response" in (scope.get("extensions") or {}):
            await send({"type": "websocket.http.response.start", "status": refusal.status, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": response.body})
        else:
            await send({"type": "websocket.close", "code": 1008, "reason": refusal.message[:120]})


def _cors_headers(origin: str) -> list[tuple[bytes, bytes]]:
    return [(b"access-control-allow-origin", origin.encode("latin-1", "replace")), (b"vary", b"Origin"),
            (b"access-control-expose-headers", EXPOSED_HEADERS.encode())]
