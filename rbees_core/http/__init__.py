"""What every rbees daemon shares on the HTTP side (CONTRACT section 1).

- :mod:`rbees_core.http.app`: the ASGI app built by :func:`build_app` from routes, its
  middleware (correlation id, bearer token, error envelope), body readers, the SSE response
  of a job and the routes and lifespan every daemon has;
- :mod:`rbees_core.http.server`: :func:`serve` runs an app under uvicorn until a shutdown
  event is set; the bind policy;
- :mod:`rbees_core.http.daemon`: the process around it, one for the three daemons
  (:class:`Daemon`: pid file, signals, exit; :func:`launch`: one-line errors).

The names below are the package's public interface; import them from here.
"""

from __future__ import annotations

from rbees_core.http.app import (
    OPEN_PATHS,
    OPEN_PREFIX,
    OPENAI_PREFIX,
    BearerAuthMiddleware,
    CorrelationMiddleware,
    ErrorShape,
    EventStreamResponse,
    build_app,
    daemon_lifespan,
    daemon_routes,
    error_response,
    error_shape,
    health_endpoint,
    json_response,
    openai_error_body,
    parse_json,
    read_body,
    read_json,
    register_error_shape,
)
from rbees_core.http.daemon import (
    Daemon,
    ca_file_option,
    fail,
    launch,
    log_level_option,
    log_to_option,
    tls_cert_option,
    tls_key_option,
)
from rbees_core.http.server import (
    FullCollections,
    check_bind_policy,
    is_loopback,
    listen,
    parse_bind,
    run_daemon,
    serve,
)

__all__ = [
    "OPENAI_PREFIX", "OPEN_PATHS", "OPEN_PREFIX", "BearerAuthMiddleware",
    "CorrelationMiddleware", "Daemon", "ErrorShape",
    "EventStreamResponse", "FullCollections", "build_app", "ca_file_option", "check_bind_policy",
    "daemon_lifespan", "daemon_routes", "error_response", "error_shape", "fail", "health_endpoint",
    "is_loopback", "json_response", "launch", "listen", "log_level_option", "log_to_option",
    "openai_error_body",
    "parse_bind", "parse_json",
    "read_body", "read_json", "register_error_shape", "run_daemon", "serve", "tls_cert_option",
    "tls_key_option",
]
