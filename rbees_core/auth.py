"""Who is calling, and what each route lets them do (CONTRACT section 1, "Credentials").

A credential (``Authorization: Bearer X`` or Anthropic's ``x-api-key: X``) resolves to a
:class:`Principal`: its name, its scopes and, for an API key, its model allow-list and rate
limit. Each route declares the scope it needs (:class:`rbees_core.api.openapi.Operation`'s
``scope``; plugin rooms through :func:`register_route_scope`) and :class:`RoutePolicy`
answers, for a method and path, which scope that is. The middleware
(:mod:`rbees_core.http.auth`) is the one place that applies it: 401 when no credential
resolves, 403 when the principal's scopes do not cover the route, 429 when its rate is spent.

Credentials:

- the **operator token** (today's token file, ``--api-token-file`` / ``RBEES_API_TOKEN_FILE``,
  made 0600 by ``rbees up``): every scope, on every daemon; the first admin credential;
- an **API key** ``rbk_<id>_<secret>`` (``rbees keys create``): scopes among
  :data:`KEY_SCOPES`, never ``pool``; only rbees-orcd knows keys;
- a **pool join token** ``rbj_<pool_id>_<mac>`` (``rbees pools join-token``): scope ``pool``
  for that one pool id: its heartbeats and its deregistration, nothing else;
- a pool's **control token** ``rbc_<mac>`` (:func:`control_token`): what rbees-orcd sends
  that pool and its workers; derived from the join token, so a pool that holds only its join
  token can check it; unknown to rbees-orcd's own routes and to clients.

Hashing: a key is 256 random bits, so a slow password KDF (scrypt, argon2) buys nothing
against guessing, while it would cost milliseconds on every request. The store keeps
``HMAC-SHA256(salt, secret)`` with a random 16-byte salt per key (no precomputed table fits
two keys) and compares digests with :func:`hmac.compare_digest` (constant time). The key's
``id`` part is public and only finds the row. A join token is
``HMAC-SHA256(operator token, "join:" + pool_id)``: nothing to store, and rotating the
operator token revokes every join token. Revoking one pool's join token
(``rbees pools join-token POOL --revoke``) bumps that pool's generation in rbees-orcd's
store; generation ``g > 0`` signs ``"join:" + pool_id + ":" + g`` instead, so the old token
(and the control token derived from it) stops working and a new one can be issued.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import math
import re
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import attrs

#: Scopes an API key may hold. ``admin`` covers ``read`` and ``inference`` too.
KEY_SCOPES = ("inference", "read", "admin")
#: What a route may require (:attr:`Operation.scope`): a key scope; ``jobs`` (``inference``
#: or ``read``: an inference-only key then sees its own jobs only); ``pool`` (a pool's join
#: token for the ``{pool_id}`` of the path, or the operator token); ``pool_admin`` (``pool``
#: or an ``admin`` key: deregistering a pool); ``operator`` (the
#: operator token only: pool-managerd's and workers' control routes); ``worker`` (a worker's
#: ready callback: the operator token or that pool's worker credential).
ROUTE_SCOPES = frozenset({*KEY_SCOPES, "jobs", "pool", "pool_admin", "operator", "worker"})
KEY_PREFIX = "rbk_"
JOIN_PREFIX = "rbj_"
OPERATOR = "operator"
_IMPLIED = {"admin": frozenset({"admin", "read", "inference", "jobs"}),
            "read": frozenset({"read", "jobs"}),
            "inference": frozenset({"inference", "jobs"})}

#: The principal of the request being served (set by the auth middleware; None when the
#: daemon runs without credentials). Read by admission (a job's owner) and the job routes.
current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "current_principal", default=None)


@attrs.frozen
class Principal:
    """A resolved credential. ``name`` is what jobs, logs and usage carry (never a secret)."""

    name: str
    scopes: frozenset[str]
    kind: str = "key"  # operator | key | pool | worker
    models: tuple[str, ...] | None = None
    pool_id: str | None = None
    rpm: int | None = None
    max_jobs: int | None = None  # jobs queued or running at once (admission checks it)
    tpm: int | None = None  # tokens of its jobs that ended in the last minute (admission)

    def allows(self, required: str, params: dict[str, str] | None = None) -> bool:
        """Whether this principal may call a route that requires ``required``."""
        if self.kind == OPERATOR:
            return True
        if required in ("pool", "pool_admin") and self.kind == "pool":
            return (params or {}).get("pool_id") == self.pool_id
        if required == "pool":
            return False
        if required == "pool_admin":
            required = "admin"
        if required == "worker":
            return self.kind == "worker"
        if required == "operator":
            return False
        granted: set[str] = set()
        for scope in self.scopes:
            granted |= _IMPLIED.get(scope, frozenset())
        return required in granted

    @property
    def sees_all_jobs(self) -> bool:
        """An operator, ``read`` or ``admin`` principal sees every job; ``inference`` alone
        sees (and cancels) its own."""
        return self.kind == OPERATOR or bool(self.scopes & {"read", "admin"})

    def may_use_model(self, model: str) -> bool:
        return self.models is None or model in self.models


OPERATOR_PRINCIPAL = Principal(name=OPERATOR, scopes=frozenset(KEY_SCOPES), kind=OPERATOR)


def owner_of_request() -> str | None:
    """The name a job admitted now belongs to (None without credentials)."""
    principal = current_principal.get()
    return None if principal is None else principal.name


def visible_to(principal: Principal | None, owner: str | None) -> bool:
    """Whether ``principal`` may see or cancel a job owned by ``owner``."""
    return principal is None or principal.sees_all_jobs or owner == principal.name


# -- secrets ------------------------------------------------------------------------------


def key_digest(salt: bytes, secret: str) -> bytes:
    """``HMAC-SHA256(salt, secret)``: what the store keeps of a key."""
    return hmac.new(salt, secret.encode(), hashlib.sha256).digest()


def new_key() -> tuple[str, str, str]:
    """A fresh key: ``(key_id, secret, the key as the client sends it)``."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return key_id, secret, f"{KEY_PREFIX}{key_id}_{secret}"


def split_key(credential: str) -> tuple[str, str] | None:
    """``(key_id, secret)`` of an API key, or None when ``credential`` is not one."""
    if not credential.startswith(KEY_PREFIX):
        return None
    key_id, sep, secret = credential[len(KEY_PREFIX):].partition("_")
    return (key_id, secret) if sep and key_id and secret else None


def join_token(operator_token: str, pool_id: str, generation: int = 0) -> str:
    """The join token of ``pool_id`` (``rbees pools join-token``); ``generation``: how
    often it was revoked (rbees-orcd's store keeps it)."""
    message = f"join:{pool_id}" if not generation else f"join:{pool_id}:{generation}"
    mac = hmac.new(operator_token.encode(), message.encode(), hashlib.sha256)
    return f"{JOIN_PREFIX}{pool_id}_{mac.hexdigest()}"


CONTROL_PREFIX = "rbc_"


def control_token(join: str) -> str:
    """The credential rbees-orcd sends to the pool that holds join token ``join`` and to its
    workers: ``rbc_`` + ``HMAC-SHA256(join, "control")``. The pool computes it from its join
    token (or from the operator token and its id: :func:`pool_control_token`); no client
    holds it, and it opens nothing on rbees-orcd."""
    mac = hmac.new(join.encode(), b"control", hashlib.sha256)
    return f"{CONTROL_PREFIX}{mac.hexdigest()}"


def pool_control_token(operator_token: str, pool_id: str, generation: int = 0) -> str:
    """:func:`control_token` of ``pool_id``'s join token: what rbees-orcd sends that pool."""
    return control_token(join_token(operator_token, pool_id, generation))


def check_join_token(operator_token: str, credential: str,
                     generation_of: Callable[[str], int | None] | None = None
                     ) -> Principal | None:
    """The pool principal of a valid join token of the pool's current generation
    (``generation_of(pool_id)``, None or absent: 0), else None."""
    if not credential.startswith(JOIN_PREFIX):
        return None
    pool_id, _, _ = credential[len(JOIN_PREFIX):].rpartition("_")
    if not pool_id:
        return None
    generation = (generation_of(pool_id) if generation_of is not None else None) or 0
    if not hmac.compare_digest(credential.encode(), join_token(operator_token, pool_id,
                                                               generation).encode()):
        return None
    return Principal(name=f"pool:{pool_id}", scopes=frozenset({"pool"}), kind="pool",
                     pool_id=pool_id)


def same_secret(given: str, expected: str) -> bool:
    """Constant-time comparison of two credentials."""
    return hmac.compare_digest(given.encode(), expected.encode())


# -- route policy -------------------------------------------------------------------------

#: Scopes of routes no Operation describes (plugin rooms), as ``(method or "*", path
#: prefix or exact path, scope)``; the longest matching path wins. ``/v1/`` and ``/api/``
#: are client protocols: ``inference``; Ollama's model management under ``/api/`` is
#: ``admin``. Anything else no table names needs ``admin`` (closed by default).
_PLUGIN_SCOPES: list[tuple[str, str, str]] = [
    ("*", "/v1/", "inference"),
    ("*", "/api/", "inference"),
    ("POST", "/api/pull", "admin"),
    ("DELETE", "/api/delete", "admin"),
    ("POST", "/api/create", "admin"),
    ("POST", "/api/copy", "admin"),
    ("POST", "/api/push", "admin"),
    ("POST", "/api/blobs/", "admin"),
    ("HEAD", "/api/blobs/", "admin"),
]
DEFAULT_SCOPE = "admin"


def register_route_scope(path: str, scope: str, method: str = "*") -> None:
    """Require ``scope`` on ``method`` ``path`` (a path ending in ``/`` is a prefix), for
    routes a plugin adds (``rbees_register_routes``) that no Operation describes. Called by
    client-protocol plugins at registration; raises ValueError for an unknown scope."""
    if scope not in ROUTE_SCOPES and scope != "open":
        raise ValueError(f"unknown scope {scope!r}")
    _PLUGIN_SCOPES.append((method.upper(), path, scope))


def plugin_scope(method: str, path: str) -> str:
    """The scope :func:`register_route_scope`'s table gives ``method path``."""
    best, scope = -1, DEFAULT_SCOPE
    for m, p, s in _PLUGIN_SCOPES:
        if m not in ("*", method):
            continue
        hit = path.startswith(p) if p.endswith("/") else path == p
        rank = len(p) * 2 + (m != "*")
        if hit and rank > best:
            best, scope = rank, s
    return scope


def _pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[^}]+\})", template)
    out = []
    for part in parts:
        if part.startswith("{") and part.endswith("}"):
            name, _, kind = part[1:-1].partition(":")
            out.append(f"(?P<{name}>.+)" if kind == "path" else f"(?P<{name}>[^/]+)")
        else:
            out.append(re.escape(part))
    return re.compile("".join(out))


_PLUGIN = "<plugin>"


class RoutePolicy:
    """Method and path -> the scope required (``None``: open).

    Built from a daemon's route table (starlette routes: ``path``, ``path_regex``,
    ``methods``) and its Operations (``method``, ``path``, ``scope``, ``open``): a route
    takes the scope of the Operation with its method and path; a route no Operation
    describes (a plugin's) takes :func:`plugin_scope`'s; a path no route holds needs
    :data:`DEFAULT_SCOPE` (the router then answers 404 or 405 to whoever may know)."""

    def __init__(self, operations: Iterable[Any], routes: Iterable[Any] = (), *,
                 open_paths: Iterable[str] = (), open_prefixes: Iterable[str] = ()) -> None:
        declared = {(op.method, op.path): None if op.open else op.scope for op in operations}
        self._table: list[tuple[frozenset[str], re.Pattern[str], str | None]] = []
        covered: set[tuple[str, str]] = set()
        for route in routes:
            regex, methods = getattr(route, "path_regex", None), getattr(route, "methods", None)
            if regex is None or not methods:
                continue
            template = re.sub(r":[A-Za-z_]+}", "}", route.path)
            for method in methods:
                scope = declared.get((method, template), _PLUGIN)
                covered.add((method, template))
                self._table.append((frozenset({method}), regex, scope))
        for (method, template), scope in declared.items():
            if (method, template) not in covered:  # no route table given (embedders)
                self._table.append((frozenset({method}), _pattern(template), scope))
        self._open_paths = frozenset(open_paths)
        self._open_prefixes = tuple(open_prefixes)

    def required(self, method: str, path: str) -> tuple[str | None, dict[str, str]]:
        """``(scope or None when open, the path's parameters)`` for a request."""
        if path in self._open_paths or path.startswith(self._open_prefixes):
            return None, {}
        method = "GET" if method == "HEAD" else method
        for methods, pattern, scope in self._table:
            if method in methods:
                match = pattern.fullmatch(path) if pattern.pattern[:1] != "^" \
                    else pattern.match(path)
                if match:
                    if scope == _PLUGIN:
                        scope = plugin_scope(method, path)
                        return (None if scope == "open" else scope), {}
                    return scope, {k: str(v) for k, v in match.groupdict().items()}
        scope = plugin_scope(method, path)
        return (None if scope == "open" else scope), {}


# -- rate limits --------------------------------------------------------------------------


class RateLimiter:
    """Requests per minute per principal name, over a sliding 60 s window (in memory)."""

    WINDOW_S = 60.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._seen: dict[str, deque[float]] = {}

    def take(self, name: str, rpm: int) -> int | None:
        """Count one request; None when it is within ``rpm``, else the seconds to wait."""
        now = self._clock()
        seen = self._seen.setdefault(name, deque())
        while seen and seen[0] <= now - self.WINDOW_S:
            seen.popleft()
        if len(seen) >= rpm:
            return max(1, math.ceil(seen[0] + self.WINDOW_S - now))
        seen.append(now)
        return None
