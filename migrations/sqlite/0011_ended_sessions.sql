-- MCP sessions a client ended (DELETE) on some data plane, so that a control plane that
-- restarts still tells its data planes not to resume them. A row is of no use once until_unix
-- has passed: the session's id could not be resumed by then anyway.
CREATE TABLE ended_sessions (
    nonce      TEXT PRIMARY KEY,
    until_unix INTEGER NOT NULL
);
