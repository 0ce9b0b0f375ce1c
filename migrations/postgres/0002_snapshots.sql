-- Snapshot distribution: change notification for control-plane replicas, and the status of
-- control planes and data planes.

CREATE TABLE control_planes (
    id         TEXT PRIMARY KEY,
    version    TEXT NOT NULL,
    started_at TIMESTAMPTZ NOT NULL,
    last_seen  TIMESTAMPTZ NOT NULL
);

CREATE TABLE data_planes (
    node_id          TEXT PRIMARY KEY,
    node_group       TEXT NOT NULL,
    labels           TEXT NOT NULL,
    build_version    TEXT NOT NULL,
    control_plane_id TEXT NOT NULL,
    connected        BOOLEAN NOT NULL,
    connected_since  TIMESTAMPTZ NOT NULL,
    last_seen        TIMESTAMPTZ NOT NULL,
    acked_version    TEXT,
    acked_at         TIMESTAMPTZ,
    nack_version     TEXT,
    nack_reason      TEXT,
    nack_at          TIMESTAMPTZ
);

-- Every committed change to what snapshots are compiled from wakes every replica's compiler.
CREATE FUNCTION reflow_notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('reflow_changes', TG_TABLE_NAME);
    RETURN NULL;
END;
$$;

CREATE TRIGGER users_changed AFTER INSERT OR UPDATE OR DELETE ON users
    FOR EACH STATEMENT EXECUTE FUNCTION reflow_notify_change();
CREATE TRIGGER user_groups_changed AFTER INSERT OR UPDATE OR DELETE ON user_groups
    FOR EACH STATEMENT EXECUTE FUNCTION reflow_notify_change();
-- last_used_at is not part of snapshots; updating only it wakes nobody.
CREATE TRIGGER api_tokens_changed AFTER INSERT OR DELETE OR UPDATE OF user_id, token_hash, expires_at ON api_tokens
    FOR EACH STATEMENT EXECUTE FUNCTION reflow_notify_change();
CREATE TRIGGER targets_changed AFTER INSERT OR UPDATE OR DELETE ON targets
    FOR EACH STATEMENT EXECUTE FUNCTION reflow_notify_change();
CREATE TRIGGER target_secrets_changed AFTER INSERT OR UPDATE OR DELETE ON target_secrets
    FOR EACH STATEMENT EXECUTE FUNCTION reflow_notify_change();
CREATE TRIGGER policies_changed AFTER INSERT OR UPDATE OR DELETE ON policies
    FOR EACH STATEMENT EXECUTE FUNCTION reflow_notify_change();
CREATE TRIGGER policy_subjects_changed AFTER INSERT OR UPDATE OR DELETE ON policy_subjects
    FOR EACH STATEMENT EXECUTE FUNCTION reflow_notify_change();
