-- SQLite twin of migrations/postgres/0005_target_env_keys.sql.

ALTER TABLE targets ADD COLUMN env_keys TEXT NOT NULL DEFAULT '[]';
