"""A pool's credentials (rbees_core.auth): what it sends rbees-orcd, what it sends its
workers and what it accepts.

- towards rbees-orcd (heartbeats, deregistration): its join token (``--join-token-file``,
  ``rbees pools join-token``), else the operator token;
- rbees-orcd sends the pool and its workers the pool's **control token**
  (:func:`rbees_core.auth.control_token`), derived from the join token, or from the operator
  token and the pool id: the pool accepts it (and the operator token, when it has one), and
  hands it to each worker it starts in a 0600 file (``--control-token-file``);
- each worker gets a token of its own (``--callback-token-file``): its ready callback carries
  it, and it opens that worker id's ready callback only (:func:`worker_principal`).

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


WORKER_PREFIX = "rbw_"


def new_worker_token(worker_id: str) -> tuple[str, str]:
    """A worker's own token for its ready callback and its SHA-256 (what the pool keeps):
    ``rbw_<worker_id>_<secret>``. It opens the ready callback of that worker id and nothing
    else (rbees_core.auth scope ``worker``)."""
    import hashlib
    import secrets

    token = f"{WORKER_PREFIX}{worker_id}_{secrets.token_hex(24)}"  # hex: no "_" in it
    return token, hashlib.sha256(token.encode()).hexdigest()


def worker_token_file(worker_id: str, token: str) -> str:
    """Write a worker's token to a 0600 file (its ``--callback-token-file``); the path."""
    from rbees_core.config import runtime_dir
    from rbees_core.files import open_private

    path = runtime_dir() / f"worker-{worker_id}.callback"
    with open_private(path, "w") as out:
        out.write(token + "\n")
    return str(path)


def worker_principal(credential: str, digests: dict[str, str]) -> Any:
    """The principal of one of this pool's worker tokens (``digests``: worker id -> SHA-256
    of its token), else None."""
    import hashlib

    from rbees_core.auth import Principal, same_secret

    if not credential.startswith(WORKER_PREFIX):
        return None
    worker_id = credential[len(WORKER_PREFIX):].rpartition("_")[0]
    expected = digests.get(worker_id)
    if expected is None or not same_secret(hashlib.sha256(credential.encode()).hexdigest(),
                                           expected):
        return None
    return Principal(name=f"worker:{worker_id}", scopes=frozenset({"worker"}), kind="worker")
