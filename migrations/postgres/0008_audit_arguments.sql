-- Whether audit records of calls to a target keep their arguments (secrets masked).

ALTER TABLE targets ADD COLUMN audit_arguments BOOLEAN NOT NULL DEFAULT FALSE;
