-- SQLite twin of migrations/postgres/0002_snapshots.sql. A SQLite store has one process, which
-- signals its own compiler, so there are no change triggers.

CREATE TABLE control_planes (
    id         TEXT PRIMARY KEY,
    version    TEXT NOT NULL,
    started_at TEXT NOT NULL,
    last_seen  TEXT NOT NULL
);

CREATE TABLE data_planes (
    node_id          TEXT PRIMARY KEY,
    node_group       TEXT NOT NULL,
    labels           TEXT NOT NULL,
    build_version    TEXT NOT NULL,
    control_plane_id TEXT NOT NULL,
    connected        BOOLEAN NOT NULL,
    connected_since  TEXT NOT NULL,
    last_seen        TEXT NOT NULL,
    acked_version    TEXT,
    acked_at         TEXT,
    nack_version     TEXT,
    nack_reason      TEXT,
    nack_at          TEXT
);
