-- SQLite twin of migrations/postgres/0001_initial.sql (BLOB ids, TEXT timestamps).
-- Users, API tokens, targets, sealed secrets and policies.
-- Secrets are stored only as AES-256-GCM envelopes (see reflow-common's crypto module).

CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE users (
    id            BLOB PRIMARY KEY,
    email         TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    role          TEXT NOT NULL CHECK (role <> ''),
    active        BOOLEAN NOT NULL DEFAULT TRUE,
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL
);

CREATE TABLE user_groups (
    user_id    BLOB NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    group_name TEXT NOT NULL CHECK (group_name <> ''),
    PRIMARY KEY (user_id, group_name)
);

CREATE TABLE api_tokens (
    id           BLOB PRIMARY KEY,
    user_id      BLOB NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name         TEXT NOT NULL,
    token_hash   BLOB NOT NULL UNIQUE,
    prefix       TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    expires_at   TEXT,
    last_used_at TEXT
);
CREATE INDEX api_tokens_user ON api_tokens (user_id);

CREATE TABLE targets (
    id                 BLOB PRIMARY KEY,
    name               TEXT NOT NULL UNIQUE,
    description        TEXT NOT NULL DEFAULT '',
    transport_type     TEXT NOT NULL CHECK (transport_type IN ('streamable-http', 'sse', 'stdio', 'kubernetes')),
    url                TEXT,
    command            TEXT,
    args               TEXT NOT NULL DEFAULT '[]',
    image              TEXT,
    port               INTEGER,
    health_path        TEXT,
    statefulness       TEXT NOT NULL CHECK (statefulness IN ('stateless', 'stateful')),
    isolation_boundary TEXT NOT NULL CHECK (isolation_boundary IN ('shared', 'per_role', 'per_group', 'per_user')),
    auth_type          TEXT NOT NULL CHECK (auth_type IN ('bearer', 'header', 'none')),
    auth_header_name   TEXT,
    enabled            BOOLEAN NOT NULL DEFAULT TRUE,
    created_at         TEXT NOT NULL,
    updated_at         TEXT NOT NULL
);

-- One table for both kinds of per-scope secret: the target token (kind 'token', name '')
-- and env values (kind 'env', name = the env key). scope_value is '' for the default scope.
CREATE TABLE target_secrets (
    target_id   BLOB NOT NULL REFERENCES targets (id) ON DELETE CASCADE,
    kind        TEXT NOT NULL CHECK (kind IN ('token', 'env')),
    scope_type  TEXT NOT NULL CHECK (scope_type IN ('default', 'role', 'group', 'user')),
    scope_value TEXT NOT NULL,
    name        TEXT NOT NULL,
    ciphertext  BLOB NOT NULL,
    key_version INTEGER NOT NULL,
    updated_at  TEXT NOT NULL,
    PRIMARY KEY (target_id, kind, scope_type, scope_value, name)
);

CREATE TABLE policies (
    id            BLOB PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    description   TEXT NOT NULL DEFAULT '',
    target_id     BLOB REFERENCES targets (id) ON DELETE CASCADE,
    resource_type TEXT NOT NULL CHECK (resource_type IN ('all', 'tool', 'resource', 'prompt')),
    pattern       TEXT,
    effect        TEXT NOT NULL CHECK (effect IN ('allow', 'deny')),
    priority      INTEGER NOT NULL,
    enabled       BOOLEAN NOT NULL DEFAULT TRUE,
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL
);

CREATE TABLE policy_subjects (
    id            BLOB PRIMARY KEY,
    policy_id     BLOB NOT NULL REFERENCES policies (id) ON DELETE CASCADE,
    subject_type  TEXT NOT NULL CHECK (subject_type IN ('user', 'role', 'group', 'everyone')),
    subject_value TEXT NOT NULL,
    UNIQUE (policy_id, subject_type, subject_value)
);
