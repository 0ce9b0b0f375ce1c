-- The owner label of resources managed from declarative configuration (`reflow admin apply`):
-- `sync --prune` deletes only resources carrying the label of the document it applies.
-- (SQLite and PostgreSQL alike.)

ALTER TABLE targets ADD COLUMN owner TEXT;
ALTER TABLE policies ADD COLUMN owner TEXT;
ALTER TABLE target_secrets ADD COLUMN owner TEXT;
