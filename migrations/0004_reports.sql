-- Scheduled reports: a task may keep only the artifacts (output notebook, HTML report) of its
-- `keep_last` newest runs; the worker prunes older ones after each run (service/store.py,
-- `prune_artifacts`). NULL keeps everything.

ALTER TABLE tasks ADD COLUMN keep_last integer CHECK (keep_last IS NULL OR keep_last >= 1);
