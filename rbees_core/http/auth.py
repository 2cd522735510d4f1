"""The one place a daemon checks credentials (CONTRACT section 1, "Credentials").

:class:`AuthMiddleware` reads the credential (``Authorization: Bearer X``, or ``x-api-key: X``
as Anthropic's clients send it), resolves it to a :class:`~rbees_core.auth.Principal` with the
daemon's resolver, checks the scope the route declares (:class:`~rbees_core.auth.RoutePolicy`)
and the principal's rate limit, then puts the principal on ``request.state.principal`` and
in :data:`rbees_core.auth.current_principal` (and its name in the logs' ``key`` field).
401 when nothing resolves, 403 when the scope is not granted, 429 with ``Retry-After``
when the rate is spent; each in the error shape of the path's protocol.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from rbees_core.auth import (
    OPERATOR_PRINCIPAL,
    Principal,
    RateLimiter,
    RoutePolicy,
    current_principal,
    same_secret,
)
from rbees_core.errors import (
    ForbiddenError,
    RateLimitedError,
    RbeesError,
    UnauthenticatedError,
)
from rbees_core.log import key_name

#: credential -> principal, None when unknown; may raise UnauthenticatedError (expired key)
Resolver = Callable[[str], Principal | None]


def token_resolver(*tokens: str | None) -> Resolver:
    """The resolver of a pool or a worker: each of ``tokens`` (the operator token, the
    pool's control token: :func:`rbees_core.auth.control_token`) opens every route."""
    known = [t for t in tokens if t]

    def resolve(credential: str) -> Principal | None:
        hits = [same_secret(credential, t) for t in known]  # all compared: constant time
        return OPERATOR_PRINCIPAL if any(hits) else None
    return resolve


def credential_of(scope: Scope) -> str:
    """The credential a request carries: the bearer token, else ``x-api-key``, else ''."""
    bearer = api_key = ""
    for name, value in scope["headers"]:
        if name == b"authorization":
            text = value.decode("latin-1")
            if text[:7].lower() == "bearer ":
                bearer = text[7:].strip()
        elif name == b"x-api-key":
            api_key = value.decode("latin-1").strip()
    return bearer or api_key


class AuthMiddleware:
    """Resolves and checks the credential of every request (see the module docstring)."""

    def __init__(self, app: ASGIApp, resolve: Resolver, policy: RoutePolicy,
                 answer: Callable[[RbeesError, str], ASGIApp],
                 limiter: RateLimiter | None = None) -> None:
        """``answer``: an error and the request's path -> the response (in the shape of
        the path's protocol: :func:`rbees_core.http.app.error_response`)."""
        self.app = app
        self.answer = answer
        self.resolve = resolve
        self.policy = policy
        self.limiter = limiter or RateLimiter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        required, params = self.policy.required(scope.get("method", "GET"), path)
        if required is None:
            await self.app(scope, receive, send)
            return
        try:
            principal = self._check(credential_of(scope), required, params)
        except RbeesError as exc:
            await self.answer(exc, path)(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        token = current_principal.set(principal)
        name = key_name.set(principal.name)
        try:
            await self.app(scope, receive, send)
        finally:
            key_name.reset(name)
            current_principal.reset(token)

    def _check(self, credential: str, required: str, params: dict[str, str]) -> Principal:
        principal = self.resolve(credential) if credential else None
        if principal is None:
            raise UnauthenticatedError("missing or wrong credential (bearer token or API key)")
        if not principal.allows(required, params):
            raise ForbiddenError(f"the credential {principal.name!r} lacks the {required} "
                                 "scope this route needs",
                                 details={"scope": required, "key": principal.name})
        if principal.rpm is not None:
            wait = self.limiter.take(principal.name, principal.rpm)
            if wait is not None:
                raise RateLimitedError(
                    f"key {principal.name!r} is limited to {principal.rpm} requests per "
                    f"minute; retry in {wait} s", retry_after_s=wait)
        return principal
