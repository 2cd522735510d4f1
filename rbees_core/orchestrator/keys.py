"""rbees-orcd's API keys and usage (``rbees keys ...``; CONTRACT section 5, "Keys").

:class:`KeyRing` keeps the keys in the store's ``api_keys`` table (only
``HMAC-SHA256(salt, secret)``, :mod:`rbees_core.auth` says why) and a copy in memory, so
that checking a key on a request reads no database: one dict look-up and one HMAC. Every
change goes to the store first, then to the copy (rbees-orcd is the only writer).
:meth:`KeyRing.resolve` is rbees-orcd's credential resolver (the operator token, a key, a
pool's join token), used by :class:`rbees_core.http.auth.AuthMiddleware`.
"""

from __future__ import annotations

import json
import re
import secrets
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import attrs

from rbees_core.auth import (
    KEY_SCOPES,
    OPERATOR,
    OPERATOR_PRINCIPAL,
    Principal,
    check_join_token,
    join_token,
    key_digest,
    new_key,
    same_secret,
    split_key,
)
from rbees_core.errors import ConflictError, InvalidParamsError, NotFoundError, UnauthenticatedError
from rbees_core.orchestrator.store import Store

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
_COLUMNS = ("name, key_id, salt, digest, scopes, models, expires_at, rpm, created_at, "
            "revoked_at, max_jobs, tpm")


@attrs.frozen
class KeyEntry:
    """One key as the store keeps it (no secret)."""

    name: str
    key_id: str
    salt: bytes
    digest: bytes
    scopes: tuple[str, ...]
    models: tuple[str, ...] | None
    expires_at: float | None
    rpm: int | None
    created_at: float
    revoked_at: float | None
    max_jobs: int | None = None
    tpm: int | None = None

    def public(self) -> dict[str, Any]:
        """What ``GET /v2/keys`` shows of it."""
        return {"name": self.name, "id": self.key_id, "scopes": list(self.scopes),
                "models": None if self.models is None else list(self.models),
                "expires_at": self.expires_at, "rpm": self.rpm,
                "created_at": self.created_at, "revoked_at": self.revoked_at,
                "max_jobs": self.max_jobs, "tpm": self.tpm}

    def principal(self) -> Principal:
        return Principal(name=self.name, scopes=frozenset(self.scopes), models=self.models,
                         rpm=self.rpm, max_jobs=self.max_jobs, tpm=self.tpm)


def _entry(row: tuple[Any, ...]) -> KeyEntry:
    name, key_id, salt, digest, scopes, models, expires_at, rpm, created, revoked, jobs, tpm \
        = row
    return KeyEntry(name=name, key_id=key_id, salt=bytes(salt), digest=bytes(digest),
                    scopes=tuple(json.loads(scopes)),
                    models=None if models is None else tuple(json.loads(models)),
                    expires_at=expires_at, rpm=rpm, created_at=created, revoked_at=revoked,
                    max_jobs=jobs, tpm=tpm)


def check_new_key(name: str, scopes: list[str], models: list[str] | None,
                  rpm: int | None, max_jobs: int | None = None,
                  tpm: int | None = None) -> None:
    """Validate a new key's settings; raises :class:`InvalidParamsError` naming the field."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name == OPERATOR \
            or name.startswith("pool:"):
        raise InvalidParamsError("name", "1-64 of A-Z a-z 0-9 _ . @ -, starting with a letter "
                                 "or digit; not `operator`")
    if not scopes or not isinstance(scopes, list) or any(s not in KEY_SCOPES for s in scopes):
        raise InvalidParamsError("scopes", f"a non-empty list of {', '.join(KEY_SCOPES)}")
    if models is not None and (not isinstance(models, list) or not models
                               or not all(isinstance(m, str) and m for m in models)):
        raise InvalidParamsError("models", "a non-empty list of model ids, or null (any)")
    for field, value in (("rpm", rpm), ("max_jobs", max_jobs), ("tpm", tpm)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise InvalidParamsError(field, "a positive integer, or null (no limit)")


class KeyRing:
    """The keys of one rbees-orcd. ``token`` is the operator token (None: no credentials,
    and then nothing resolves). Methods that write block on the store: call them off the
    event loop. ``clock`` gives Unix seconds (expiry)."""

    def __init__(self, store: Store, token: str | None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store, self.token, self._clock = store, token, clock
        self._by_id: dict[str, KeyEntry] = {}
        #: each pool's join-token generation (absent: 0), shared with the pool control and
        #: the runner, which derive the control token they send from it
        self.join_generations: dict[str, int] = {}
        self.reload()

    def reload(self) -> None:
        rows = self.store.query(f"SELECT {_COLUMNS} FROM api_keys WHERE revoked_at IS NULL")
        self._by_id = {e.key_id: e for e in map(_entry, rows)}
        self.join_generations.clear()
        self.join_generations.update(
            (str(r[0]), int(r[1]))
            for r in self.store.query("SELECT pool_id, generation FROM join_generations"))

    # -- resolving ---------------------------------------------------------------------------

    def resolve(self, credential: str) -> Principal | None:
        """The principal of ``credential``: the operator token, a live key or a join token;
        None when it is none of these; :class:`UnauthenticatedError` for an expired key."""
        if self.token is None:
            return None
        if same_secret(credential, self.token):
            return OPERATOR_PRINCIPAL
        parts = split_key(credential)
        if parts is not None:
            entry = self._by_id.get(parts[0])
            if entry is None or not same_secret(
                    key_digest(entry.salt, parts[1]).hex(), entry.digest.hex()):
                return None
            if entry.expires_at is not None and entry.expires_at <= self._clock():
                raise UnauthenticatedError(f"the key {entry.name!r} has expired")
            return entry.principal()
        return check_join_token(self.token, credential, self.join_generations.get)

    def join_token(self, pool_id: str) -> str:
        """Pool ``pool_id``'s current join token (the operator token must be set)."""
        assert self.token is not None
        return join_token(self.token, pool_id, self.join_generations.get(pool_id, 0))

    def revoke_join_token(self, pool_id: str) -> str:
        """Revoke ``pool_id``'s join token at once (its next heartbeat gets 401, and the
        pool no longer accepts what rbees-orcd sends it until it runs with the new one);
        the new join token. Blocks on the store."""
        generation = self.join_generations.get(pool_id, 0) + 1
        now = self._clock()
        self.store.write(lambda conn: conn.execute(
            "INSERT INTO join_generations (pool_id, generation, revoked_at) VALUES (?, ?, ?) "
            "ON CONFLICT (pool_id) DO UPDATE SET generation = excluded.generation, "
            "revoked_at = excluded.revoked_at", (pool_id, generation, now)))
        self.join_generations[pool_id] = generation
        return self.join_token(pool_id)

    # -- managing ----------------------------------------------------------------------------

    def create(self, name: str, scopes: list[str], *, models: list[str] | None = None,
               expires_at: float | None = None, rpm: int | None = None,
               max_jobs: int | None = None, tpm: int | None = None
               ) -> tuple[KeyEntry, str]:
        """Make a key; returns it and the secret form, shown once. Raises
        :class:`InvalidParamsError`, :class:`ConflictError` (the name is taken)."""
        check_new_key(name, scopes, models, rpm, max_jobs, tpm)
        key_id, secret, full = new_key()
        salt = secrets.token_bytes(16)
        entry = KeyEntry(name=name, key_id=key_id, salt=salt, digest=key_digest(salt, secret),
                         scopes=tuple(dict.fromkeys(scopes)),
                         models=None if models is None else tuple(models),
                         expires_at=expires_at, rpm=rpm, created_at=self._clock(),
                         revoked_at=None, max_jobs=max_jobs, tpm=tpm)

        def op(conn: sqlite3.Connection) -> None:
            # a revoked key's name may be reused: its row goes
            conn.execute("DELETE FROM api_keys WHERE name = ? AND revoked_at IS NOT NULL",
                         (name,))
            try:
                conn.execute(f"INSERT INTO api_keys ({_COLUMNS}) VALUES "
                             "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", self._row(entry))
            except sqlite3.IntegrityError as exc:
                raise ConflictError(f"a key named {name!r} exists",
                                    details={"name": name}) from exc

        self.store.write(op)
        self._by_id[key_id] = entry
        return entry, full

    @staticmethod
    def _row(e: KeyEntry) -> tuple[Any, ...]:
        return (e.name, e.key_id, e.salt, e.digest, json.dumps(list(e.scopes)),
                None if e.models is None else json.dumps(list(e.models)), e.expires_at,
                e.rpm, e.created_at, e.revoked_at, e.max_jobs, e.tpm)

    def entries(self) -> list[KeyEntry]:
        """Every key, revoked ones included, oldest first."""
        rows = self.store.query(f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at")
        return [_entry(r) for r in rows]

    def _live(self, name: str) -> KeyEntry:
        for entry in self._by_id.values():
            if entry.name == name:
                return entry
        raise NotFoundError(f"no key named {name!r}", details={"name": name})

    def revoke(self, name: str) -> KeyEntry:
        """Revoke a key at once (its next request gets 401). Raises NotFoundError."""
        entry = self._live(name)
        now = self._clock()
        self.store.write(lambda conn: conn.execute(
            "UPDATE api_keys SET revoked_at = ? WHERE name = ?", (now, name)))
        del self._by_id[entry.key_id]
        return attrs.evolve(entry, revoked_at=now)

    def rotate(self, name: str) -> tuple[KeyEntry, str]:
        """A new secret for a key, same name, scopes and limits; the old one stops working.
        Raises NotFoundError."""
        old = self._live(name)
        key_id, secret, full = new_key()
        salt = secrets.token_bytes(16)
        entry = attrs.evolve(old, key_id=key_id, salt=salt, digest=key_digest(salt, secret))
        self.store.write(lambda conn: conn.execute(
            "UPDATE api_keys SET key_id = ?, salt = ?, digest = ? WHERE name = ?",
            (key_id, salt, entry.digest, name)))
        del self._by_id[old.key_id]
        self._by_id[key_id] = entry
        return entry, full

    def totals(self) -> list[tuple[str, str, int, int, int]]:
        """``(key, model, requests, prompt_tokens, completion_tokens)`` over all days."""
        return [(str(r[0]), str(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in
                self.store.query("SELECT owner, model, sum(requests), sum(prompt_tokens), "
                                 "sum(completion_tokens) FROM usage GROUP BY owner, model")]

    def usage(self, since: str | None = None) -> list[dict[str, Any]]:
        """Requests and tokens per key (``owner``), model and UTC day (``YYYY-MM-DD``), from
        ``since`` (a day) on; jobs count once they are final."""
        sql = ("SELECT owner, model, day, requests, prompt_tokens, completion_tokens "
               "FROM usage")
        args: tuple[Any, ...] = ()
        if since is not None:
            if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", since):
                raise InvalidParamsError("since", "a day, YYYY-MM-DD")
            sql += " WHERE day >= ?"
            args = (since,)
        sql += " ORDER BY day, owner, model"
        names = ("key", "model", "day", "requests", "prompt_tokens", "completion_tokens")
        return [dict(zip(names, row, strict=True)) for row in self.store.query(sql, args)]


class UsageCollector:
    """Prometheus counters of usage per key and model, read from the store at scrape time:
    ``rbees_key_requests_total`` and ``rbees_key_tokens_total{kind="prompt"|"completion"}``,
    labelled with the key's name (never the key). Registered by the service on its
    registry."""

    def __init__(self, keys: KeyRing) -> None:
        self.keys = keys

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily

        requests = CounterMetricFamily("rbees_key_requests", "Final jobs per API key and "
                                       "model", labels=["key", "model"])
        tokens = CounterMetricFamily("rbees_key_tokens", "Tokens per API key, model and kind",
                                     labels=["key", "model", "kind"])
        for key, model, count, prompt, completion in self.keys.totals():
            requests.add_metric([key, model], count)
            tokens.add_metric([key, model, "prompt"], prompt)
            tokens.add_metric([key, model, "completion"], completion)
        yield requests
        yield tokens
