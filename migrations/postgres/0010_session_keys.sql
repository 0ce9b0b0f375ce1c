-- Keys that seal MCP session ids, so any data plane can resume any session. The newest
-- generation seals new ids; an older one still opens ids until its retire_at. Stored sealed
-- with the store keyring; snapshots carry them sealed for the data planes.

CREATE TABLE session_keys (
    generation BIGINT PRIMARY KEY,
    ciphertext BYTEA NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    retire_at  TIMESTAMPTZ
);

CREATE TRIGGER session_keys_changed AFTER INSERT OR UPDATE OR DELETE ON session_keys
    FOR EACH STATEMENT EXECUTE FUNCTION reflow_notify_change();
