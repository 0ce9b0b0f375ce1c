-- The upstream processes each data plane runs, as it last reported them (JSON array).

ALTER TABLE data_planes ADD COLUMN instances TEXT NOT NULL DEFAULT '[]';
