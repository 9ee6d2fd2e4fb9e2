-- nbcron runtime SQL. One named block per query (`-- name: x`), `%(param)s` parameters only.
-- Code calls these by name through service.store.Store.

-- name: insert_task
INSERT INTO tasks (name, executor, spec, description, tags, schedule, timezone, enabled,
                   timeout_seconds, max_retries, retry_delay_seconds, depends_on, misfire_policy,
                   misfire_grace_seconds, max_catchup, overlap_policy, queue, env, next_fire_at)
VALUES (%(name)s, %(executor)s, %(spec)s, %(description)s, %(tags)s, %(schedule)s, %(timezone)s,
        %(enabled)s, %(timeout_seconds)s, %(max_retries)s, %(retry_delay_seconds)s, %(depends_on)s,
        %(misfire_policy)s, %(misfire_grace_seconds)s, %(max_catchup)s, %(overlap_policy)s,
        %(queue)s, %(env)s, %(next_fire_at)s)
RETURNING *;

-- name: update_task
UPDATE tasks SET name = %(name)s, executor = %(executor)s, spec = %(spec)s,
       description = %(description)s, tags = %(tags)s, schedule = %(schedule)s,
       timezone = %(timezone)s, enabled = %(enabled)s, timeout_seconds = %(timeout_seconds)s,
       max_retries = %(max_retries)s, retry_delay_seconds = %(retry_delay_seconds)s,
       depends_on = %(depends_on)s, misfire_policy = %(misfire_policy)s,
       misfire_grace_seconds = %(misfire_grace_seconds)s, max_catchup = %(max_catchup)s,
       overlap_policy = %(overlap_policy)s, queue = %(queue)s, env = %(env)s,
       next_fire_at = %(next_fire_at)s, updated_at = now()
WHERE id = %(id)s
RETURNING *;

-- name: get_task_by_id
SELECT * FROM tasks WHERE id = %(id)s;

-- name: get_task_by_name
SELECT * FROM tasks WHERE name = %(name)s;

-- name: get_task_for_update
SELECT * FROM tasks WHERE id = %(id)s FOR UPDATE;

-- name: existing_task_names
SELECT name FROM tasks WHERE name = ANY(%(names)s);

-- name: dependency_graph
SELECT name, depends_on FROM tasks WHERE depends_on <> '{}';

-- name: list_tasks
SELECT * FROM tasks
WHERE (%(cursor)s::bigint IS NULL OR id > %(cursor)s)
  AND (%(enabled)s::boolean IS NULL OR enabled = %(enabled)s)
  AND (%(executor)s::text IS NULL OR executor = %(executor)s)
  AND (%(tag)s::text IS NULL OR %(tag)s = ANY(tags))
  AND (%(q)s::text IS NULL OR name ILIKE '%%' || %(q)s || '%%')
ORDER BY id
LIMIT %(limit)s;

-- name: delete_task
DELETE FROM tasks WHERE id = %(id)s RETURNING id;

-- name: insert_run
INSERT INTO runs (task_id, trigger, attempt, retry_of, parameters, queue, scheduled_for,
                  not_before, idempotency_key)
VALUES (%(task_id)s, %(trigger)s, %(attempt)s, %(retry_of)s, %(parameters)s, %(queue)s,
        %(scheduled_for)s, coalesce(%(not_before)s, now()), %(idempotency_key)s)
ON CONFLICT DO NOTHING
RETURNING *;

-- name: get_run_by_idempotency_key
SELECT * FROM runs WHERE task_id = %(task_id)s AND idempotency_key = %(idempotency_key)s;

-- name: get_run
SELECT r.*, t.name AS task_name FROM runs r JOIN tasks t ON t.id = r.task_id WHERE r.id = %(id)s;

-- name: list_runs
SELECT r.*, t.name AS task_name FROM runs r JOIN tasks t ON t.id = r.task_id
WHERE (%(cursor)s::bigint IS NULL OR r.id < %(cursor)s)
  AND (%(task_id)s::bigint IS NULL OR r.task_id = %(task_id)s)
  AND (%(status)s::text IS NULL OR r.status = %(status)s)
ORDER BY r.id DESC
LIMIT %(limit)s;

-- name: cancel_queued_run
UPDATE runs SET status = 'cancelled', finished_at = now(), reason = %(reason)s,
       cancel_requested = true
WHERE id = %(id)s AND status = 'queued'
RETURNING *;

-- name: request_cancel_running
UPDATE runs SET cancel_requested = true
WHERE id = %(id)s AND status = 'running'
RETURNING *;

-- name: claim_dispatch
-- Queued runs that are due and not yet sent (or whose send is stale), claimed once across
-- dispatchers with SKIP LOCKED and marked as sent in the same statement.
UPDATE runs SET dispatched_at = now()
WHERE id IN (
    SELECT id FROM runs
    WHERE status = 'queued' AND not_before <= now()
      AND (dispatched_at IS NULL
           OR dispatched_at < now() - make_interval(secs => %(redispatch_after)s))
      -- overlap 'replace': the new run waits until the replaced run's tree is gone
      AND NOT EXISTS (SELECT 1 FROM runs o WHERE o.task_id = runs.task_id
                      AND o.status = 'running' AND o.cancel_requested)
    ORDER BY not_before, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
RETURNING id, queue;

-- name: undo_dispatch
UPDATE runs SET dispatched_at = NULL WHERE id = ANY(%(ids)s) AND status = 'queued';

-- name: next_pending_at
SELECT min(not_before) AS at FROM runs WHERE status = 'queued' AND dispatched_at IS NULL;

-- name: due_tasks
SELECT * FROM tasks
WHERE enabled AND next_fire_at IS NOT NULL AND next_fire_at <= now()
ORDER BY next_fire_at
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED;

-- name: next_fire_at
SELECT min(next_fire_at) AS at FROM tasks WHERE enabled AND next_fire_at IS NOT NULL;

-- name: set_next_fire_at
UPDATE tasks SET next_fire_at = %(next_fire_at)s WHERE id = %(id)s;

-- name: active_run_of_task
SELECT id FROM runs WHERE task_id = %(task_id)s AND status IN ('queued', 'running') LIMIT 1;

-- name: cancel_active_runs
WITH queued AS (
    UPDATE runs SET status = 'cancelled', finished_at = now(), reason = %(reason)s,
           cancel_requested = true
    WHERE task_id = %(task_id)s AND status = 'queued'
    RETURNING id
)
UPDATE runs SET cancel_requested = true, reason = %(reason)s
WHERE task_id = %(task_id)s AND status = 'running';

-- name: insert_missed_run
INSERT INTO runs (task_id, status, trigger, queue, scheduled_for, finished_at, reason)
VALUES (%(task_id)s, 'missed', %(trigger)s, %(queue)s, %(scheduled_for)s, now(), %(reason)s)
ON CONFLICT DO NOTHING
RETURNING id;

-- name: claim_run
-- A worker takes a run; a duplicate delivery finds it no longer queued and does nothing.
UPDATE runs r SET status = 'running', started_at = now(), heartbeat_at = now(),
       worker = %(worker)s
FROM tasks t
WHERE r.id = %(id)s AND r.status = 'queued' AND t.id = r.task_id
RETURNING r.id, r.task_id, r.attempt, r.parameters, t.name AS task_name, t.executor, t.spec,
          t.env, t.timeout_seconds, t.max_retries, t.retry_delay_seconds, r.cancel_requested;

-- name: finish_run
UPDATE runs r SET status = %(status)s, finished_at = now(), exit_code = %(exit_code)s,
       error = %(error)s
FROM tasks t
WHERE r.id = %(id)s AND r.status = 'running' AND t.id = r.task_id
RETURNING r.*, t.name AS task_name;

-- name: dependents_of
SELECT id, name, depends_on, queue FROM tasks WHERE depends_on @> ARRAY[%(name)s::text] AND enabled;

-- name: lock_task
SELECT pg_advisory_xact_lock(7, %(id)s::int);

-- name: upstreams_ready
-- Every upstream has a run that succeeded after this task's own last run was queued.
SELECT coalesce(bool_and(EXISTS (
    SELECT 1 FROM runs r JOIN tasks u ON u.id = r.task_id
    WHERE u.name = up.name AND r.status = 'succeeded'
      AND r.finished_at > coalesce(
          (SELECT max(queued_at) FROM runs WHERE task_id = %(task_id)s), '-infinity')
)), false) AS ready
FROM unnest(%(depends_on)s::text[]) AS up(name);

-- name: append_log
INSERT INTO run_logs (run_id, seq, data) VALUES (%(run_id)s, %(seq)s, %(data)s);

-- name: add_log_bytes
UPDATE runs SET log_bytes = log_bytes + %(n)s, heartbeat_at = now() WHERE id = %(id)s;

-- name: get_logs
SELECT seq, data FROM run_logs WHERE run_id = %(run_id)s AND seq >= %(offset)s ORDER BY seq;

-- name: cancel_flags
SELECT id FROM runs WHERE id = ANY(%(ids)s) AND cancel_requested;

-- name: heartbeat_runs
UPDATE runs SET heartbeat_at = now() WHERE id = ANY(%(ids)s) AND status = 'running';

-- name: insert_retry
INSERT INTO runs (task_id, trigger, attempt, retry_of, parameters, queue, not_before)
SELECT task_id, 'retry', attempt + 1, id, parameters, queue,
       now() + make_interval(secs => %(delay)s)
FROM runs WHERE id = %(id)s
RETURNING id;

-- name: upsert_worker
INSERT INTO workers (name, hostname, pid, queues, threads, running, last_heartbeat, stopped_at)
VALUES (%(name)s, %(hostname)s, %(pid)s, %(queues)s, %(threads)s, %(running)s, now(), NULL)
ON CONFLICT (name) DO UPDATE SET hostname = excluded.hostname, pid = excluded.pid,
       queues = excluded.queues, threads = excluded.threads, running = excluded.running,
       last_heartbeat = now(), stopped_at = NULL;

-- name: stop_worker
UPDATE workers SET stopped_at = now(), running = 0 WHERE name = %(name)s;

-- name: list_workers
SELECT *, (stopped_at IS NULL
           AND last_heartbeat > now() - make_interval(secs => %(timeout)s)) AS alive
FROM workers ORDER BY name;

-- name: reap_lost_runs
-- Runs whose worker stopped heartbeating: failed with reason 'worker lost'.
UPDATE runs r SET status = 'failed', finished_at = now(), error = 'worker lost',
       reason = 'worker lost'
FROM tasks t
WHERE t.id = r.task_id AND r.id IN (
    SELECT id FROM runs
    WHERE status = 'running' AND heartbeat_at < now() - make_interval(secs => %(timeout)s)
    FOR UPDATE SKIP LOCKED
)
RETURNING r.id, r.task_id, r.attempt, r.worker, t.name AS task_name, t.max_retries,
          t.retry_delay_seconds;

-- name: dispatcher_heartbeat
INSERT INTO dispatchers (name, last_heartbeat) VALUES (%(name)s, now())
ON CONFLICT (name) DO UPDATE SET last_heartbeat = now();

-- name: insert_api_key
INSERT INTO api_keys (name, role, prefix, key_hash) VALUES (%(name)s, %(role)s, %(prefix)s, %(key_hash)s)
RETURNING id, name, role, prefix, created_at, last_used_at, revoked_at;

-- name: get_api_key_by_prefix
SELECT * FROM api_keys WHERE prefix = %(prefix)s;

-- name: touch_api_key
UPDATE api_keys SET last_used_at = now()
WHERE id = %(id)s AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute');

-- name: list_api_keys
SELECT id, name, role, prefix, created_at, last_used_at, revoked_at FROM api_keys ORDER BY id;

-- name: revoke_api_key
UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = %(id)s
RETURNING id, name, role, prefix, created_at, last_used_at, revoked_at;

-- name: count_admin_keys
SELECT count(*) AS n FROM api_keys WHERE role = 'admin' AND revoked_at IS NULL;

-- name: insert_audit
INSERT INTO audit_log (actor, action, object_type, object_id, remote, detail)
VALUES (%(actor)s, %(action)s, %(object_type)s, %(object_id)s, %(remote)s, %(detail)s);

-- name: ping
SELECT 1 AS ok;

-- dashboard
-- Read-only blocks for dashboards/data.py (called through Store.dashboard_rows). Every history
-- query is bounded by a time window on queued_at, so the cost follows the window, not the table.

-- name: dashboard_runs_per_hour
SELECT date_trunc('hour', r.queued_at) AS hour, r.status, count(*) AS n
FROM runs r JOIN tasks t ON t.id = r.task_id
WHERE r.queued_at >= %(since)s
  AND (%(task)s::text IS NULL OR t.name = %(task)s)
  AND (%(status)s::text IS NULL OR r.status = %(status)s)
  AND (%(tag)s::text IS NULL OR %(tag)s = ANY(t.tags))
GROUP BY 1, 2
ORDER BY 1, 2;

-- name: dashboard_duration_percentiles
SELECT t.name AS task, count(*) AS runs,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM r.finished_at - r.started_at)::float8) AS p50,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM r.finished_at - r.started_at)::float8) AS p95
FROM runs r JOIN tasks t ON t.id = r.task_id
WHERE r.queued_at >= %(since)s AND r.started_at IS NOT NULL AND r.finished_at IS NOT NULL
  AND (%(task)s::text IS NULL OR t.name = %(task)s)
  AND (%(status)s::text IS NULL OR r.status = %(status)s)
  AND (%(tag)s::text IS NULL OR %(tag)s = ANY(t.tags))
GROUP BY t.name
ORDER BY p95 DESC, t.name
LIMIT %(limit)s;

-- name: dashboard_running_now
SELECT r.id, t.name AS task, r.attempt, r.worker, r.started_at,
       extract(epoch FROM now() - r.started_at)::float8 AS elapsed
FROM runs r JOIN tasks t ON t.id = r.task_id
WHERE r.status = 'running'
  AND (%(task)s::text IS NULL OR t.name = %(task)s)
  AND (%(tag)s::text IS NULL OR %(tag)s = ANY(t.tags))
ORDER BY r.started_at, r.id
LIMIT %(limit)s;

-- name: dashboard_queue_depth
SELECT count(*) AS queued, count(*) FILTER (WHERE not_before <= now()) AS due
FROM runs WHERE status = 'queued';

-- name: dashboard_tasks
SELECT id, name, executor, schedule, timezone, enabled, tags, next_fire_at
FROM tasks
WHERE (%(task)s::text IS NULL OR name = %(task)s)
  AND (%(tag)s::text IS NULL OR %(tag)s = ANY(tags))
ORDER BY name
LIMIT %(limit)s;

-- name: dashboard_tags
SELECT DISTINCT unnest(tags) AS tag FROM tasks ORDER BY 1;

-- name: dashboard_task_runs
SELECT id, status, trigger, attempt, queued_at, started_at, finished_at,
       extract(epoch FROM finished_at - started_at)::float8 AS duration, worker, exit_code
FROM runs
WHERE task_id = %(task_id)s
  AND (%(status)s::text IS NULL OR status = %(status)s)
  AND (%(since)s::timestamptz IS NULL OR queued_at >= %(since)s)
ORDER BY id DESC
LIMIT %(limit)s;

-- name: dashboard_latest_report
-- The newest succeeded run of a task that left an HTML report.
SELECT r.id AS run_id
FROM runs r JOIN artifacts a ON a.run_id = r.id AND a.name = %(name)s
WHERE r.task_id = %(task_id)s AND r.status = 'succeeded'
ORDER BY r.id DESC
LIMIT 1;

-- name: dashboard_run_artifacts
SELECT name, content_type, size, created_at FROM artifacts WHERE run_id = %(run_id)s ORDER BY name;

-- name: dashboard_artifact
SELECT name, content_type, data FROM artifacts WHERE run_id = %(run_id)s AND name = %(name)s;
