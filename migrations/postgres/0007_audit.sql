-- The audit trail: one record per MCP request, as data planes ship them. Each record is chained
-- to the one before it from the same data plane (hash = SHA-256 of the previous hash and the
-- record's body), so a record changed, removed or reordered in the database is detected when
-- the chain is verified (`audit::verify`). The columns beside the body are copies for filtering; verify checks
-- them against the body too. Pruning moves a data plane's anchor (the last pruned record's seq
-- and hash) so what remains still verifies.

CREATE TABLE audit_records (
    id         TEXT PRIMARY KEY,
    data_plane TEXT NOT NULL,
    seq        BIGINT NOT NULL,
    at         TIMESTAMPTZ NOT NULL,
    user_id    TEXT,
    method     TEXT NOT NULL,
    target     TEXT,
    name       TEXT,
    decision   TEXT NOT NULL,
    body       TEXT NOT NULL,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL,
    UNIQUE (data_plane, seq)
);
CREATE INDEX audit_records_at ON audit_records (at);
CREATE INDEX audit_records_user ON audit_records (user_id, at);
CREATE INDEX audit_records_target ON audit_records (target, at);
CREATE INDEX audit_records_method ON audit_records (method, at);
CREATE INDEX audit_records_name ON audit_records (name, at);
CREATE INDEX audit_records_decision ON audit_records (decision, at);

CREATE TABLE audit_chains (
    data_plane  TEXT PRIMARY KEY,
    seq         BIGINT NOT NULL,
    hash        TEXT NOT NULL,
    pruned_seq  BIGINT NOT NULL DEFAULT 0,
    pruned_hash TEXT NOT NULL DEFAULT ''
);
