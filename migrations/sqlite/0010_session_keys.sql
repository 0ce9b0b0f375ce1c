-- Keys that seal MCP session ids, so any data plane can resume any session. The newest
-- generation seals new ids; an older one still opens ids until its retire_at. Stored sealed
-- with the store keyring; snapshots carry them sealed for the data planes.

CREATE TABLE session_keys (
    generation INTEGER PRIMARY KEY,
    ciphertext BLOB NOT NULL,
    created_at TEXT NOT NULL,
    retire_at  TEXT
);
