-- A target's restart generation: `POST /api/targets/{id}/restart-instances` bumps it, the
-- snapshot carries it, and data planes restart the target's processes when it changes.

ALTER TABLE targets ADD COLUMN restart_generation INTEGER NOT NULL DEFAULT 0;
