-- What the original gateway's REST surface shows and this one now keeps too: a description
-- per env entry, when a policy subject was added, and a user's session generation (bumped by
-- `POST /api/users/{id}/recycle` and `POST /api/sessions/recycle`; data planes recycle that
-- user's sessions when their snapshot carries a new one).

ALTER TABLE target_secrets ADD COLUMN description TEXT NOT NULL DEFAULT '';
ALTER TABLE policy_subjects ADD COLUMN created_at TEXT NOT NULL DEFAULT '';
UPDATE policy_subjects SET created_at = (SELECT created_at FROM policies WHERE policies.id = policy_subjects.policy_id);
ALTER TABLE users ADD COLUMN session_generation INTEGER NOT NULL DEFAULT 0;
-- What each data plane last reported beyond its processes: recycles and restarts applied,
-- and the health of each target it serves (JSON).
ALTER TABLE data_planes ADD COLUMN report TEXT NOT NULL DEFAULT '{}';
