"""A pool's credentials (rbees_core.auth): what it sends rbees-orcd, what it sends its
workers and what it accepts.

- towards rbees-orcd (heartbeats, deregistration): its join token (``--join-token-file``,
  ``rbees pools join-token``), else the operator token;
- rbees-orcd sends the pool and its workers the pool's **control token**
  (:func:`rbees_core.auth.control_token`), derived from the join token, or from the operator
  token and the pool id: the pool accepts it (and the operator token, when it has one), and
  hands it to each worker it starts in a 0600 file (``--control-token-file``).

Called by :class:`rbees_core.pool.daemon.PoolService` and pool-managerd's app factory.
"""

from __future__ import annotations

from typing import Any


def control_token(settings: Any) -> str | None:
    """The control token of a pool with these :class:`PoolSettings` (None without any
    credential)."""
    from rbees_core.auth import control_token as of_join
    from rbees_core.auth import pool_control_token

    if settings.join_token:
        return of_join(settings.join_token)
    return pool_control_token(settings.token, settings.pool_id) if settings.token else None


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def orcd_headers(settings: Any) -> dict[str, str]:
    """Headers of a request to rbees-orcd: the join token, else the operator token."""
    return bearer(settings.join_token or settings.token)


def control_token_file(settings: Any) -> str | None:
    """Write the control token to a 0600 file for the workers; its path (None without)."""
    token = control_token(settings)
    if token is None:
        return None
    from rbees_core.config import runtime_dir
    from rbees_core.files import open_private

    path = runtime_dir() / f"pool-{settings.pool_id}.control"
    with open_private(path, "w") as out:
        out.write(token + "\n")
    return str(path)
