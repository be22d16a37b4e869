"""Who may call the HTTP API: bearer tokens with a role, the Host header check, the generated local token.

Every endpoint except /healthz and /readyz needs `Authorization: Bearer <token>` (RFC 6750). A token is
configured as its SHA-256 only (`api_tokens: [{name, role, sha256}]`); a request's token is hashed and
compared with `hmac.compare_digest` against every configured one. Roles are ranked: `read` may GET,
`operate` may also replay and re-run jobs, `admin` may do everything. A missing, malformed or unknown
token gets 401 with `WWW-Authenticate: Bearer`; a known token below the endpoint's role gets 403.

With no `api_tokens` configured, the first start writes one admin token ("local-admin") into
`<data_dir>/api-token` (mode 0600) and prints it once; later starts read it.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import HTTPException, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from dicom_gateway.errors import ConfigError
from dicom_gateway.settings_security import ApiToken, Role

log = logging.getLogger("dicom_gateway.api")

ROLE_RANK: dict[str, int] = {"read": 0, "operate": 1, "admin": 2}
SAFE_METHODS = frozenset({"GET", "HEAD"})
REQUIRED_ROLE_KEY = "x-required-role"
"""OpenAPI extension naming the role a write endpoint needs (`role_needed`); writes without it need admin."""
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
TOKEN_FILE = "api-token"
LOCAL_ADMIN = "local-admin"
MIN_TOKEN_CHARS = 32

_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <token>`; see `dxgate token new`")


@dataclass(frozen=True)
class Principal:
    """The caller a token identifies: its configured name (recorded as the actor of replays) and its role."""

    name: str
    role: Role


def token_sha256(token: str) -> str:
    """The hex SHA-256 of a token, as `api_tokens[].sha256` stores it."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def role_needed(role: Role) -> dict[str, Any]:
    """`openapi_extra` for a write endpoint that a role below admin may call, e.g. `role_needed("operate")`."""
    return {REQUIRED_ROLE_KEY: role}


class TokenBook:
    """The configured tokens; `identify` finds the one a bearer token matches without early exit."""

    def __init__(self, tokens: Iterable[ApiToken]) -> None:
        self._tokens = [(bytes.fromhex(t.sha256), Principal(t.name, t.role)) for t in tokens]

    def identify(self, token: str) -> Principal | None:
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        found: Principal | None = None
        for expected, principal in self._tokens:  # every entry is compared, whichever matches
            if hmac.compare_digest(digest, expected):
                found = principal
        return found


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status_code=401, detail=detail, headers={"WWW-Authenticate": "Bearer"})


def authorizer(book: TokenBook) -> Callable[..., Awaitable[Principal]]:
    """The dependency every protected router carries: 401 without a known token, 403 below the route's role.

    GET and HEAD need `read`; any other method needs the role the route declares with `role_needed`, else
    `admin`. The caller is left in `request.state.principal` for handlers (`actor_of`)."""

    async def authorize(request: Request,
                        credentials: HTTPAuthorizationCredentials | None = Security(_bearer)) -> Principal:
        if credentials is None:
            raise _unauthorized("missing bearer token (Authorization: Bearer <token>)")
        principal = book.identify(credentials.credentials)
        if principal is None:
            log.warning("API request with an unknown token refused",
                        extra={"reason": f"{request.method} {request.url.path} from {_client(request)}"})
            raise _unauthorized("unknown or wrong token")
        needed = required_role(request)
        if ROLE_RANK[principal.role] < ROLE_RANK[needed]:
            log.warning("API request below the token's role refused",
                        extra={"reason": f"{request.method} {request.url.path}: token {principal.name} is"
                                         f" {principal.role}, {needed} needed"})
            raise HTTPException(status_code=403, detail=f"token {principal.name!r} has role {principal.role};"
                                                        f" this endpoint needs {needed}")
        request.state.principal = principal
        return principal

    return authorize


def required_role(request: Request) -> Role:
    """The role the matched route needs for this request's method."""
    if request.method in SAFE_METHODS:
        return "read"
    route = request.scope.get("route")
    extra = getattr(route, "openapi_extra", None) or {}
    return extra.get(REQUIRED_ROLE_KEY, "admin")


def actor_of(request: Request) -> str | None:
    """The calling token's name (set by the authorizer), recorded with the changes it asks for."""
    principal = getattr(request.state, "principal", None)
    return principal.name if principal is not None else None


def _client(request: Request) -> str | None:
    return request.client.host if request.client else None


# -- Host header ----------------------------------------------------------------------------------
def host_of(header: str) -> str:
    """The host of a Host header without its port: `[::1]:8080` -> `::1`, `Example.org:80` -> `example.org`."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    if header.count(":") == 1:
        return header.split(":", 1)[0]
    return header  # a bare IPv6 address or a name


def host_allowed(host: str, allowed: Sequence[str]) -> bool:
    """`*` allows any host; `*.example.org` any subdomain; otherwise an exact (IP-normalised) match."""
    for pattern in allowed:
        pattern = pattern.strip().lower().strip("[]")
        if pattern == "*" or pattern == host:
            return True
        if pattern.startswith("*.") and host.endswith(pattern[1:]):
            return True
        try:
            if ipaddress.ip_address(pattern) == ipaddress.ip_address(host):
                return True
        except ValueError:
            continue
    return False


class HostCheck:
    """ASGI middleware: 400 for a Host header outside the allowed hosts (a defence against DNS rebinding).

    /healthz and /readyz answer any Host, as load balancers and orchestrators probe by IP address."""

    def __init__(self, app: ASGIApp, allowed: Sequence[str]) -> None:
        self.app = app
        self.allowed = list(allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and scope.get("path") not in OPEN_PATHS:
            raw = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            if not raw or not host_allowed(host_of(raw), self.allowed):
                body = {"detail": f"Host header {raw[:100]!r} is not one this API answers;"
                                  " add it to http_allowed_hosts"}
                await JSONResponse(body, status_code=400)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# -- the generated local token --------------------------------------------------------------------
def local_admin_token(data_dir: Path) -> tuple[str, bool]:
    """The admin token in `<data_dir>/api-token`: (token, True) when this call created it, (token, False) when it
    was there. Created with secrets.token_urlsafe(32), mode 0600, written to a temporary file and renamed."""
    import secrets

    path = data_dir / TOKEN_FILE
    if path.exists():
        token = path.read_text(encoding="utf-8").strip()
        if len(token) < MIN_TOKEN_CHARS:
            raise ConfigError(f"{path} holds no usable API token; remove it and restart to generate a new one")
        if path.stat().st_mode & 0o077:
            log.warning("the API token file is readable by other users; chmod 600 it", extra={"reason": str(path)})
        return token, False
    data_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{TOKEN_FILE}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, f"{token}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(data_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return token, True


def api_tokens_for(configured: Sequence[ApiToken], data_dir: Path) -> tuple[list[ApiToken], str | None]:
    """The tokens the API accepts, and the generated token when this start created it (to print once).

    Configured tokens are used as they are (the token file is neither read nor written); with none, the local
    admin token of `local_admin_token`."""
    if configured:
        return list(configured), None
    token, created = local_admin_token(data_dir)
    return [ApiToken(name=LOCAL_ADMIN, role="admin", sha256=token_sha256(token))], token if created else None
