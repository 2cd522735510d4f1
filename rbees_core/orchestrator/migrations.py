"""Versioned schema of the orchestrator's SQLite database.

``MIGRATIONS[n - 1]`` is the SQL script that takes the database from version ``n - 1`` to
``n``. Scripts are only ever appended: a released script never changes. The version lives
in the one-row table ``schema_version``; :func:`migrate` applies each missing script in its
own ``BEGIN IMMEDIATE`` transaction together with the version bump, so a failure leaves the
database at the previous version and a second process opening it concurrently waits.
"""

from __future__ import annotations

import sqlite3

from rbees_core.orchestrator.errors import StoreError

_V1 = """
CREATE TABLE jobs (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id        TEXT    NOT NULL UNIQUE,
    model         TEXT    NOT NULL,
    prompt        TEXT,
    messages      TEXT,
    prompt_sha256 TEXT    NOT NULL,
    params        TEXT    NOT NULL,
    priority      TEXT    NOT NULL CHECK (priority IN ('interactive', 'batch')),
    status        TEXT    NOT NULL CHECK (status IN
                    ('queued', 'dispatched', 'running', 'completed', 'failed', 'cancelled')),
    seed          INTEGER NOT NULL,
    created_at    REAL    NOT NULL,
    queued_at     REAL,
    dispatched_at REAL,
    started_at    REAL,
    finished_at   REAL,
    retry_count   INTEGER NOT NULL DEFAULT 0,
    pool_id       TEXT,
    worker_id     TEXT,
    tokens_in     INTEGER,
    tokens_out    INTEGER NOT NULL DEFAULT 0,
    ttft_ms       REAL,
    stop_reason   TEXT,
    error_code    TEXT,
    error_message TEXT
);
CREATE INDEX jobs_status_seq ON jobs (status, seq);
CREATE TABLE events (
    job_id   TEXT    NOT NULL,
    event_id INTEGER NOT NULL,
    event    TEXT    NOT NULL,
    data     TEXT    NOT NULL,
    PRIMARY KEY (job_id, event_id)
) WITHOUT ROWID;
"""

_V2 = """
ALTER TABLE jobs ADD COLUMN correlation_id TEXT;
CREATE TABLE decisions (
    job_id      TEXT    NOT NULL,
    decision_id INTEGER NOT NULL,
    decided_at  REAL    NOT NULL,
    decision    TEXT    NOT NULL,
    PRIMARY KEY (job_id, decision_id)
) WITHOUT ROWID;
"""

#: Credentials (rbees_core.auth): a job's owner (the name of the key that submitted it),
#: API keys (only HMAC-SHA256(salt, secret): the key itself is never stored), and usage per
#: owner, model and UTC day, kept by a trigger when a job reaches a final status (so no code
#: path that ends a job can forget it).
_V3 = """
ALTER TABLE jobs ADD COLUMN owner TEXT;
CREATE TABLE api_keys (
    name        TEXT    PRIMARY KEY,
    key_id      TEXT    NOT NULL UNIQUE,
    salt        BLOB    NOT NULL,
    digest      BLOB    NOT NULL,
    scopes      TEXT    NOT NULL,
    models      TEXT,
    expires_at  REAL,
    rpm         INTEGER,
    created_at  REAL    NOT NULL,
    revoked_at  REAL
);
CREATE TABLE usage (
    owner             TEXT    NOT NULL,
    model             TEXT    NOT NULL,
    day               TEXT    NOT NULL,
    requests          INTEGER NOT NULL DEFAULT 0,
    prompt_tokens     INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (owner, model, day)
) WITHOUT ROWID;
CREATE TRIGGER jobs_usage AFTER UPDATE OF status ON jobs
WHEN NEW.status IN ('completed', 'failed', 'cancelled')
     AND OLD.status NOT IN ('completed', 'failed', 'cancelled')
BEGIN
    INSERT INTO usage (owner, model, day, requests, prompt_tokens, completion_tokens)
    VALUES (coalesce(NEW.owner, '-'), NEW.model,
            date(coalesce(NEW.finished_at, NEW.created_at), 'unixepoch'), 1,
            coalesce(NEW.tokens_in, 0), NEW.tokens_out)
    ON CONFLICT (owner, model, day) DO UPDATE SET
        requests = requests + 1,
        prompt_tokens = prompt_tokens + excluded.prompt_tokens,
        completion_tokens = completion_tokens + excluded.completion_tokens;
END;
"""

#: A key's limit of concurrent jobs (queued or running); the index finds them fast.
_V4 = """
ALTER TABLE api_keys ADD COLUMN max_jobs INTEGER;
CREATE INDEX jobs_owner_status ON jobs (owner, status) WHERE owner IS NOT NULL;
"""

#: A key's limit of tokens (prompt and completion of its jobs that ended) per minute.
_V5 = """
ALTER TABLE api_keys ADD COLUMN tpm INTEGER;
CREATE INDEX jobs_owner_finished ON jobs (owner, finished_at) WHERE owner IS NOT NULL;
"""

#: OpenAI batches (rbees_core.orchestrator.batches): uploaded files, batches, their lines
#: and each line's answer; the index finds a line's jobs by correlation id after a crash.
_V6 = """
CREATE INDEX jobs_correlation ON jobs (correlation_id);
CREATE TABLE files (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    file_id    TEXT    NOT NULL UNIQUE,
    purpose    TEXT    NOT NULL,
    filename   TEXT    NOT NULL,
    created_at REAL    NOT NULL,
    content    BLOB    NOT NULL
);
CREATE TABLE batches (
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    batch_id          TEXT    NOT NULL UNIQUE,
    status            TEXT    NOT NULL CHECK (status IN ('validating', 'failed', 'in_progress',
                        'finalizing', 'completed', 'expired', 'cancelling', 'cancelled')),
    endpoint          TEXT    NOT NULL,
    input_file_id     TEXT    NOT NULL,
    completion_window TEXT    NOT NULL,
    metadata          TEXT,
    errors            TEXT,
    created_at        REAL    NOT NULL,
    expires_at        REAL    NOT NULL,
    in_progress_at    REAL,
    finalizing_at     REAL,
    completed_at      REAL,
    failed_at         REAL,
    expired_at        REAL,
    cancelling_at     REAL,
    cancelled_at      REAL,
    output_file_id    TEXT,
    error_file_id     TEXT
);
CREATE TABLE batch_lines (
    batch_id  TEXT    NOT NULL,
    line      INTEGER NOT NULL,
    custom_id TEXT    NOT NULL,
    request   TEXT    NOT NULL,
    job_ids   TEXT,
    ok        INTEGER,
    result    TEXT,
    PRIMARY KEY (batch_id, line),
    UNIQUE (batch_id, custom_id)
) WITHOUT ROWID;
"""

#: A batch's owner (the name of the key that made it) and the models that key may use: its
#: lines' jobs are admitted as that key's (rbees_core.auth).
_V7 = """
ALTER TABLE batches ADD COLUMN owner TEXT;
ALTER TABLE batches ADD COLUMN owner_models TEXT;
"""

#: Decision replay (rbees_core.orchestrator.decisions): the snapshot each decision was made
#: from (zlib of its JSON; NULL past the retention, or for a decision of no policy), found
#: by time; a file's owner (the key that uploaded it: an ``inference`` key sees its own).
_V8 = """
ALTER TABLE decisions ADD COLUMN snapshot BLOB;
CREATE INDEX decisions_snapshot_at ON decisions (decided_at) WHERE snapshot IS NOT NULL;
ALTER TABLE files ADD COLUMN owner TEXT;
"""

#: Revoked join tokens (rbees_core.auth.join_token): a pool's generation, bumped by each
#: revocation; a pool absent here is at generation 0.
_V9 = """
CREATE TABLE join_generations (
    pool_id    TEXT    PRIMARY KEY,
    generation INTEGER NOT NULL,
    revoked_at REAL    NOT NULL
) WITHOUT ROWID;
"""

#: The schema's history; version ``len(MIGRATIONS)`` is what this code reads and writes.
MIGRATIONS: list[str] = [_V1, _V2, _V3, _V4, _V5, _V6, _V7, _V8, _V9]
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(conn: sqlite3.Connection) -> int:
    """The database's version; 0 for a new database."""
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    ).fetchone()
    if exists is None:
        return 0
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    return 0 if row is None else int(row[0])


def statements(script: str) -> list[str]:
    """Split a script into complete statements (``executescript`` would commit mid-way)."""
    out: list[str] = []
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    if buf.strip():
        raise ValueError(f"incomplete SQL statement: {buf.strip()[:60]}")
    return out


def migrate(conn: sqlite3.Connection, target: int | None = None,
            migrations: list[str] | None = None) -> int:
    """Bring the database up to ``target`` (default: the latest); return the new version.

    ``conn`` must be in autocommit mode (``isolation_level=None``). Raises
    :class:`StoreError` when the database is newer than ``migrations`` knows.
    """
    scripts = MIGRATIONS if migrations is None else migrations
    target = len(scripts) if target is None else target
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                conn.execute("INSERT INTO schema_version (version) VALUES (0)")
            current = 0 if row is None else int(row[0])
            if current > len(scripts):
                raise StoreError(
                    f"the database has schema version {current}; this rbees knows up to "
                    f"{len(scripts)}: upgrade rbees",
                    details={"version": current, "known": len(scripts)},
                )
            if current >= target:
                conn.execute("COMMIT")
                return current
            for statement in statements(scripts[current]):
                conn.execute(statement)
            conn.execute("UPDATE schema_version SET version = ?", (current + 1,))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
