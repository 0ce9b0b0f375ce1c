-- MCP sessions a client ended (DELETE) on some data plane. Every control-plane replica learns
-- of each one (pg_notify on reflow_sessions) and tells the data planes it streams to, so no
-- replica resumes the session; a replica that starts later reads them here. A row is of no use
-- once until_unix has passed: the session's id could not be resumed by then anyway.
CREATE TABLE ended_sessions (
    nonce      TEXT PRIMARY KEY,
    until_unix BIGINT NOT NULL
);

CREATE FUNCTION reflow_notify_session_ended() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('reflow_sessions', NEW.nonce || ' ' || NEW.until_unix);
    RETURN NULL;
END;
$$;

CREATE TRIGGER session_ended AFTER INSERT ON ended_sessions
    FOR EACH ROW EXECUTE FUNCTION reflow_notify_session_ended();
