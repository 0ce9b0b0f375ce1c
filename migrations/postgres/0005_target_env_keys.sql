-- The env keys a target declares: name, description, the scopes that may set each, and whether
-- a user may set their own value (JSON array). Users may write only declared, user-settable keys.

ALTER TABLE targets ADD COLUMN env_keys TEXT NOT NULL DEFAULT '[]';
