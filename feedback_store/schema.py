"""The DuckDB schema as an ordered list of forward migrations.

A file records the versions applied in `schema_version`. Opening a file runs every migration above its version,
each in its own transaction, so an older file is upgraded in place and a crash mid-upgrade leaves the last
complete version. Never edit a released migration: append a new one. All times are naive UTC TIMESTAMPs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import duckdb

from feedback_store.errors import SchemaError


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "conversations, answers, ratings with audit, runs, adapters", (
        """CREATE TABLE schema_version (
            version INTEGER NOT NULL PRIMARY KEY, description VARCHAR, applied_at TIMESTAMP NOT NULL)""",
        """CREATE TABLE conversations (
            id VARCHAR NOT NULL PRIMARY KEY, deployment VARCHAR NOT NULL, user_id VARCHAR NOT NULL,
            system_prompt VARCHAR, created_at TIMESTAMP NOT NULL)""",
        # user (and system) turns; parent_id points at the previous message or answer, so a chat is a tree
        """CREATE TABLE messages (
            id VARCHAR NOT NULL PRIMARY KEY, conversation_id VARCHAR NOT NULL, parent_id VARCHAR,
            role VARCHAR NOT NULL, content VARCHAR NOT NULL, created_at TIMESTAMP NOT NULL)""",
        # assistant turns; siblings (regenerations) share parent_id
        """CREATE TABLE answers (
            id VARCHAR NOT NULL PRIMARY KEY, deployment VARCHAR NOT NULL, conversation_id VARCHAR NOT NULL,
            parent_id VARCHAR NOT NULL, prompt_messages VARCHAR NOT NULL, text VARCHAR NOT NULL,
            adapter VARCHAR NOT NULL, sampling VARCHAR, prompt_tokens INTEGER, completion_tokens INTEGER,
            latency_ms DOUBLE, created_at TIMESTAMP NOT NULL)""",
        # the current rating per (answer, user); value NULL = withdrawn. deployment/adapter are copied from the
        # answer so every dashboard count is a scan of one table.
        """CREATE TABLE ratings (
            answer_id VARCHAR NOT NULL, user_id VARCHAR NOT NULL, id VARCHAR NOT NULL,
            deployment VARCHAR NOT NULL, adapter VARCHAR NOT NULL, value VARCHAR, reason VARCHAR, comment VARCHAR,
            created_at TIMESTAMP NOT NULL, updated_at TIMESTAMP NOT NULL, PRIMARY KEY (answer_id, user_id))""",
        # every change of a rating, in order; only `ratings` (the final state) feeds training
        """CREATE TABLE rating_events (
            id VARCHAR NOT NULL, rating_id VARCHAR NOT NULL, deployment VARCHAR NOT NULL,
            answer_id VARCHAR NOT NULL, user_id VARCHAR NOT NULL, value VARCHAR, reason VARCHAR,
            comment VARCHAR, event_at TIMESTAMP NOT NULL)""",
        """CREATE TABLE runs (
            id VARCHAR NOT NULL PRIMARY KEY, deployment VARCHAR NOT NULL, trigger VARCHAR NOT NULL,
            status VARCHAR NOT NULL, started_at TIMESTAMP NOT NULL, finished_at TIMESTAMP,
            snapshot_at TIMESTAMP, snapshot_sha256 VARCHAR, n_desirable INTEGER, n_undesirable INTEGER,
            lambda_d DOUBLE, lambda_u DOUBLE, params VARCHAR, metrics VARCHAR, error VARCHAR,
            adapter_version VARCHAR)""",
        # the rating ids a run trained on, with the label they had at snapshot time
        """CREATE TABLE run_examples (
            run_id VARCHAR NOT NULL, rating_id VARCHAR NOT NULL, label BOOLEAN NOT NULL,
            PRIMARY KEY (run_id, rating_id))""",
        """CREATE TABLE adapters (
            deployment VARCHAR NOT NULL, version VARCHAR NOT NULL, path VARCHAR NOT NULL, sha256 VARCHAR,
            parent VARCHAR, run_id VARCHAR, created_at TIMESTAMP NOT NULL, promoted_at TIMESTAMP,
            retired_at TIMESTAMP, PRIMARY KEY (deployment, version))""",
    )),
    Migration(2, "adapter events (promotions, rollbacks) and dropped examples", (
        """CREATE TABLE adapter_events (
            id VARCHAR NOT NULL PRIMARY KEY, deployment VARCHAR NOT NULL, event VARCHAR NOT NULL,
            from_version VARCHAR, to_version VARCHAR, reason VARCHAR, event_at TIMESTAMP NOT NULL)""",
        # the aligner may drop examples (too long, empty); lineage counts only the ones actually trained on
        "ALTER TABLE run_examples ADD COLUMN dropped BOOLEAN DEFAULT false",
    )),
    # DuckDB answers `answer_id = ? AND user_id = ?` with a full scan (the composite key's index is used only for
    # conflict checks); a one-column index turns `answer_id IN (...)` into a lookup: 55 ms -> 1.2 ms at 1 M rows
    Migration(3, "index ratings by answer, for batched rating lookups", (
        "CREATE INDEX ratings_answer_id ON ratings (answer_id)",
    )),
    # one write per new rating: a rating that never changed has its creation event implied by its own row
    # (audited = false); its first change writes the creation event (id = the rating id, at created_at) and the
    # change into rating_events and sets audited. A group commit of new ratings is then one INSERT, not two in a
    # transaction. Rows of older files already have their events, hence DEFAULT true. rating_audit is the audit.
    Migration(4, "ratings write their creation event lazily; rating_audit view", (
        "ALTER TABLE ratings ADD COLUMN audited BOOLEAN DEFAULT true",
        """CREATE VIEW rating_audit AS
            SELECT id, rating_id, deployment, answer_id, user_id, value, reason, comment, event_at FROM rating_events
            UNION ALL SELECT id, id, deployment, answer_id, user_id, value, reason, comment, created_at
            FROM ratings WHERE NOT audited""",
    )),
    # provenance for the anti-poisoning share caps: the network address each rating (and each change) came from,
    # and, per run, the caps its snapshot applied with what they dropped
    Migration(5, "client address of ratings and rating events; snapshot caps of runs", (
        "ALTER TABLE ratings ADD COLUMN client_addr VARCHAR",
        "ALTER TABLE rating_events ADD COLUMN client_addr VARCHAR",
        """CREATE OR REPLACE VIEW rating_audit AS
            SELECT id, rating_id, deployment, answer_id, user_id, value, reason, comment, event_at, client_addr
            FROM rating_events
            UNION ALL SELECT id, id, deployment, answer_id, user_id, value, reason, comment, created_at, client_addr
            FROM ratings WHERE NOT audited""",
        "ALTER TABLE runs ADD COLUMN snapshot_caps VARCHAR",
    )),
    # client applications' keys for the OpenAI-compatible API: only the SHA-256 of each key is kept
    Migration(6, "API keys of client applications", (
        """CREATE TABLE api_keys (
            id VARCHAR NOT NULL PRIMARY KEY, deployment VARCHAR NOT NULL, name VARCHAR NOT NULL,
            key_sha256 VARCHAR NOT NULL UNIQUE, prefix VARCHAR NOT NULL, created_at TIMESTAMP NOT NULL,
            revoked_at TIMESTAMP)""",
    )),
    # the aligner holds some snapshot ratings out to judge the new adapter: lineage tells them from trained ones
    Migration(7, "held-out examples of runs", (
        "ALTER TABLE run_examples ADD COLUMN heldout BOOLEAN DEFAULT false",
    )),
    # `kto-loop forget` and retention delete rows; this keeps what they deleted as counts (no user id: forget.py)
    # and the runs that had learnt from it
    Migration(8, "audit of forgotten users and expired conversations", (
        """CREATE TABLE forgotten (
            id VARCHAR NOT NULL PRIMARY KEY, deployment VARCHAR NOT NULL, reason VARCHAR NOT NULL, id_kind VARCHAR,
            cutoff TIMESTAMP, conversations INTEGER NOT NULL, messages INTEGER NOT NULL, answers INTEGER NOT NULL,
            ratings INTEGER NOT NULL, ratings_up INTEGER NOT NULL, ratings_down INTEGER NOT NULL,
            ratings_withdrawn INTEGER NOT NULL, rating_events INTEGER NOT NULL, runs VARCHAR,
            forgotten_at TIMESTAMP NOT NULL)""",
    )),
    # rate limits shared by the app processes on one PostgreSQL store (limits.py); times are epoch seconds
    Migration(9, "rate-limit token buckets", (
        """CREATE TABLE rate_buckets (
            deployment VARCHAR NOT NULL, limiter VARCHAR NOT NULL, bucket_key VARCHAR NOT NULL,
            tokens DOUBLE NOT NULL, seen_s DOUBLE NOT NULL, capacity DOUBLE NOT NULL, per_s DOUBLE NOT NULL,
            allowed BOOLEAN NOT NULL, PRIMARY KEY (deployment, limiter, bucket_key))""",
    )),
)

SCHEMA_VERSION = MIGRATIONS[-1].version


def file_version(conn: duckdb.DuckDBPyConnection) -> int:
    """The schema version of an open file; 0 for an empty file."""
    exists = conn.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_version'").fetchone()[0]
    if not exists:
        return 0
    return int(conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0])


def migrate(conn: duckdb.DuckDBPyConnection, now, target: int = SCHEMA_VERSION,
            ddl: Callable[[str], str] = lambda stmt: stmt) -> tuple[int, int]:
    """Apply every migration above the file's version up to `target`; returns (old, new) version. `ddl`: the
    engine's spelling of a statement (PostgreSQL: DOUBLE PRECISION)."""
    old = file_version(conn)
    if old > SCHEMA_VERSION:
        raise SchemaError(f"database schema version {old} is newer than this code ({SCHEMA_VERSION}); "
                          "upgrade kto-loop")
    for m in MIGRATIONS:
        if old < m.version <= target:
            conn.execute("BEGIN TRANSACTION")
            try:
                for stmt in m.statements:
                    conn.execute(ddl(stmt))
                conn.execute("INSERT INTO schema_version VALUES (?, ?, ?)", [m.version, m.description, now()])
                conn.execute("COMMIT")
            except BaseException:
                try:
                    conn.execute("ROLLBACK")
                except Exception:   # a failed COMMIT ended the transaction: keep its error, not this one
                    pass
                raise
    return old, max(old, min(target, SCHEMA_VERSION))
