-- nbcron runtime SQL. One named block per query (`-- name: x`), `%(param)s` parameters only.
-- Code calls these by name through service.store.Store.

-- name: insert_task
INSERT INTO tasks (name, executor, spec, description, tags, schedule, timezone, enabled,
                   timeout_seconds, max_retries, retry_delay_seconds, depends_on, misfire_policy,
                   misfire_grace_seconds, max_catchup, overlap_policy, queue, env, next_fire_at,
                   notify, keep_last)
VALUES (%(name)s, %(executor)s, %(spec)s, %(description)s, %(tags)s, %(schedule)s, %(timezone)s,
        %(enabled)s, %(timeout_seconds)s, %(max_retries)s, %(retry_delay_seconds)s, %(depends_on)s,
        %(misfire_policy)s, %(misfire_grace_seconds)s, %(max_catchup)s, %(overlap_policy)s,
        %(queue)s, %(env)s, %(next_fire_at)s, %(notify)s, %(keep_last)s)
RETURNING *;

-- name: update_task
UPDATE tasks SET name = %(name)s, executor = %(executor)s, spec = %(spec)s,
       description = %(description)s, tags = %(tags)s, schedule = %(schedule)s,
       timezone = %(timezone)s, enabled = %(enabled)s, timeout_seconds = %(timeout_seconds)s,
       max_retries = %(max_retries)s, retry_delay_seconds = %(retry_delay_seconds)s,
       depends_on = %(depends_on)s, misfire_policy = %(misfire_policy)s,
       misfire_grace_seconds = %(misfire_grace_seconds)s, max_catchup = %(max_catchup)s,
       overlap_policy = %(overlap_policy)s, queue = %(queue)s, env = %(env)s,
       next_fire_at = %(next_fire_at)s, notify = %(notify)s, keep_last = %(keep_last)s,
       updated_at = now()
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

-- name: dependency_write_lock
-- Serialises writes to the dependency graph, so two concurrent writes cannot close a cycle.
SELECT pg_advisory_xact_lock(%(lock)s);

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

-- name: next_work_at
-- When the dispatcher has work next: the earliest unsent queued run and the earliest cron slot.
SELECT (SELECT min(not_before) FROM runs WHERE status = 'queued' AND dispatched_at IS NULL)
           AS pending_at,
       (SELECT min(next_fire_at) FROM tasks WHERE enabled AND next_fire_at IS NOT NULL)
           AS fire_at;

-- name: due_tasks
-- Due by the dispatcher's clock, the same `now` its plans use: were the database's clock ahead,
-- a task could be due here yet have no slot by `now`, and keep coming back unchanged.
SELECT * FROM tasks
WHERE enabled AND next_fire_at IS NOT NULL AND next_fire_at <= %(now)s
ORDER BY next_fire_at
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED;

-- name: set_next_fire_times
UPDATE tasks t SET next_fire_at = v.at
FROM unnest(%(ids)s::bigint[], %(ats)s::timestamptz[]) AS v(id, at)
WHERE t.id = v.id;

-- name: active_tasks
-- Which of these tasks have a queued or running run (the overlap policies' question).
SELECT DISTINCT task_id FROM runs
WHERE task_id = ANY(%(ids)s::bigint[]) AND status IN ('queued', 'running');

-- name: cancel_active_runs
WITH queued AS (
    UPDATE runs SET status = 'cancelled', finished_at = now(), reason = %(reason)s,
           cancel_requested = true
    WHERE task_id = %(task_id)s AND status = 'queued'
    RETURNING id
)
UPDATE runs SET cancel_requested = true, reason = %(reason)s
WHERE task_id = %(task_id)s AND status = 'running';

-- name: insert_missed_runs
-- Slots (or dependency releases) recorded as missed, one array element per run.
INSERT INTO runs (task_id, status, trigger, queue, scheduled_for, finished_at, reason)
SELECT m.task_id, 'missed', %(trigger)s, m.queue, m.slot, now(), m.reason
FROM unnest(%(task_ids)s::bigint[], %(queues)s::text[], %(slots)s::timestamptz[],
            %(reasons)s::text[]) AS m(task_id, queue, slot, reason)
ON CONFLICT DO NOTHING;

-- name: insert_slot_runs
-- The cron slots of a batch of due tasks, one array element per slot; a slot already recorded
-- (another dispatcher fired it) is skipped by the unique (task_id, scheduled_for) index.
INSERT INTO runs (task_id, trigger, queue, scheduled_for)
SELECT s.task_id, 'schedule', s.queue, s.slot
FROM unnest(%(task_ids)s::bigint[], %(queues)s::text[], %(slots)s::timestamptz[])
         AS s(task_id, queue, slot)
ON CONFLICT DO NOTHING;

-- name: claim_runs
-- A worker takes runs (one, or a batch gathered from its threads); a duplicate delivery finds its
-- run no longer queued and gets no row back.
UPDATE runs r SET status = 'running', started_at = now(), heartbeat_at = now(),
       worker = %(worker)s
FROM tasks t
WHERE r.id = ANY(%(ids)s::bigint[]) AND r.status = 'queued' AND t.id = r.task_id
RETURNING r.id, r.task_id, r.attempt, r.parameters, t.name AS task_name, t.executor, t.spec,
          t.env, t.timeout_seconds, t.max_retries, t.retry_delay_seconds, r.cancel_requested,
          -- what the worker needs to know up front, so the common run costs two statements
          EXISTS (SELECT 1 FROM task_secrets s WHERE s.task_id = t.id) AS has_secrets,
          EXISTS (SELECT 1 FROM tasks d WHERE d.depends_on @> ARRAY[t.name]) AS has_dependents,
          -- a rule with somewhere to send (the same test as the notifications trigger)
          (t.notify ->> 'webhook' IS NOT NULL
           OR coalesce(jsonb_array_length(nullif(t.notify -> 'email', 'null'::jsonb)), 0) > 0)
              AS has_notify;

-- name: finish_runs
-- Final (or retryable) results of one or more running runs, one array element per run.
UPDATE runs r SET status = v.status, finished_at = now(), exit_code = v.exit_code,
       error = v.error
FROM unnest(%(ids)s::bigint[], %(statuses)s::text[], %(exit_codes)s::int[], %(errors)s::text[])
         AS v(id, status, exit_code, error),
     tasks t
WHERE r.id = v.id AND r.status = 'running' AND t.id = r.task_id
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
FROM runs r
WHERE r.queued_at >= %(since)s
  AND (%(status)s::text IS NULL OR r.status = %(status)s)
  AND ((%(task)s::text IS NULL AND %(tag)s::text IS NULL) OR r.task_id IN (
        SELECT id FROM tasks
        WHERE (%(task)s::text IS NULL OR name = %(task)s)
          AND (%(tag)s::text IS NULL OR %(tag)s = ANY(tags))))
GROUP BY 1, 2
ORDER BY 1, 2;

-- name: dashboard_duration_percentiles
-- Aggregated per task id first, so the sort works on integers and names are joined for 20 rows.
SELECT t.name AS task, d.runs, d.p50, d.p95
FROM (
    SELECT r.task_id, count(*) AS runs,
           extract(epoch FROM percentile_cont(0.5)
               WITHIN GROUP (ORDER BY r.finished_at - r.started_at))::float8 AS p50,
           extract(epoch FROM percentile_cont(0.95)
               WITHIN GROUP (ORDER BY r.finished_at - r.started_at))::float8 AS p95
    FROM runs r
    WHERE r.queued_at >= %(since)s AND r.started_at IS NOT NULL AND r.finished_at IS NOT NULL
      AND (%(status)s::text IS NULL OR r.status = %(status)s)
      AND ((%(task)s::text IS NULL AND %(tag)s::text IS NULL) OR r.task_id IN (
            SELECT id FROM tasks
            WHERE (%(task)s::text IS NULL OR name = %(task)s)
              AND (%(tag)s::text IS NULL OR %(tag)s = ANY(tags))))
    GROUP BY r.task_id
) d
JOIN tasks t ON t.id = d.task_id
ORDER BY d.p95 DESC, t.name
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
-- Tasks with their latest run (one index probe per task on runs_task_idx).
SELECT t.id, t.name, t.executor, t.schedule, t.timezone, t.enabled, t.tags, t.next_fire_at,
       last.id AS last_run_id, last.status AS last_status, last.queued_at AS last_queued_at
FROM tasks t
LEFT JOIN LATERAL (
    SELECT r.id, r.status, r.queued_at FROM runs r WHERE r.task_id = t.id ORDER BY r.id DESC LIMIT 1
) last ON true
WHERE (%(task)s::text IS NULL OR t.name = %(task)s)
  AND (%(tag)s::text IS NULL OR %(tag)s = ANY(t.tags))
ORDER BY t.name
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

-- artifacts

-- name: upsert_artifact
INSERT INTO artifacts (run_id, name, content_type, size, data)
VALUES (%(run_id)s, %(name)s, %(content_type)s, %(size)s, %(data)s)
ON CONFLICT (run_id, name) DO UPDATE
SET content_type = excluded.content_type, size = excluded.size, data = excluded.data,
    created_at = now();

-- name: list_artifacts
SELECT name, content_type, size, created_at FROM artifacts
WHERE run_id = %(run_id)s ORDER BY name;

-- name: get_artifact
SELECT name, content_type, size, created_at, data FROM artifacts
WHERE run_id = %(run_id)s AND name = %(name)s;

-- observability
-- Metrics, health, stats, notifications and trace context (service/metrics.py, service/notify.py,
-- service/api/system.py). Run counters live in run_metrics, kept by a trigger (0002).

-- name: metrics_run_counters
SELECT metric, executor, label, bucket, sum(n)::bigint AS n, sum(total)::float8 AS total
FROM run_metrics GROUP BY metric, executor, label, bucket ORDER BY 1, 2, 3, 4;

-- name: metrics_bounds
SELECT nbcron_metric_bounds() AS bounds;

-- name: metrics_queue_depth
SELECT queue, count(*) AS queued, count(*) FILTER (WHERE not_before <= now()) AS due,
       coalesce(extract(epoch FROM now() - min(not_before) FILTER (WHERE not_before <= now())),
                0)::float8 AS oldest_due_seconds
FROM runs WHERE status = 'queued' GROUP BY queue ORDER BY queue;

-- name: metrics_running
SELECT t.executor, count(*) AS n
FROM runs r JOIN tasks t ON t.id = r.task_id
WHERE r.status = 'running' GROUP BY t.executor ORDER BY 1;

-- name: metrics_workers
SELECT count(*) AS alive, coalesce(sum(threads), 0)::bigint AS threads,
       coalesce(sum(running), 0)::bigint AS busy, coalesce(sum(kernels), 0)::bigint AS kernels
FROM workers
WHERE stopped_at IS NULL AND last_heartbeat > now() - make_interval(secs => %(timeout)s);

-- name: metrics_dispatchers
SELECT count(*) FILTER (WHERE last_heartbeat > now() - make_interval(secs => %(timeout)s)) AS alive,
       extract(epoch FROM now() - max(last_heartbeat))::float8 AS last_heartbeat_age
FROM dispatchers;

-- name: metrics_notifications_pending
SELECT channel, count(*) AS n FROM notifications WHERE status = 'pending' GROUP BY 1 ORDER BY 1;

-- name: count_metric
SELECT nbcron_count(%(metric)s, %(executor)s, %(label)s, NULL);

-- name: report_kernels
UPDATE workers SET kernels = %(kernels)s WHERE name = %(name)s;

-- name: stats_tasks
SELECT count(*) AS total, count(*) FILTER (WHERE enabled) AS enabled,
       count(*) FILTER (WHERE schedule IS NOT NULL) AS scheduled
FROM tasks;

-- name: stats_runs
-- Runs queued in the last day, by status, with the last hour's share.
SELECT status, count(*) FILTER (WHERE queued_at >= now() - interval '1 hour') AS last_hour,
       count(*) AS last_day
FROM runs WHERE queued_at >= now() - interval '1 day'
GROUP BY status ORDER BY status;

-- name: stats_workers
SELECT count(*) AS registered,
       count(*) FILTER (WHERE stopped_at IS NULL
                        AND last_heartbeat > now() - make_interval(secs => %(timeout)s)) AS alive
FROM workers;

-- name: claim_notifications
-- Take due deliveries; the lease (next_attempt_at) hands a row to another notifier if this one dies.
UPDATE notifications n SET attempts = n.attempts + 1,
       next_attempt_at = now() + make_interval(secs => %(lease)s)
WHERE n.id IN (
    SELECT id FROM notifications
    WHERE status = 'pending' AND next_attempt_at <= now()
    ORDER BY next_attempt_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
RETURNING n.id, n.run_id, n.channel, n.attempts;

-- name: notification_context
-- The run, its task's rule, and what the rule needs: was it retried, the previous final outcome,
-- and the run of final failures ending here (an attempt followed by a retry is not final).
SELECT r.id, r.task_id, r.status, r.attempt, r.trigger, r.exit_code, r.error, r.reason,
       r.started_at, r.finished_at, r.worker, t.name AS task_name, t.executor, t.notify,
       EXISTS (SELECT 1 FROM runs x WHERE x.retry_of = r.id) AS retried,
       EXISTS (SELECT 1 FROM artifacts a WHERE a.run_id = r.id AND a.name = 'report.html')
           AS has_report,
       (SELECT p.status FROM runs p
        WHERE p.task_id = r.task_id AND p.id < r.id
          AND p.status IN ('succeeded', 'failed', 'timed_out')
          AND NOT EXISTS (SELECT 1 FROM runs x WHERE x.retry_of = p.id)
        ORDER BY p.id DESC LIMIT 1) AS previous_status,
       (SELECT count(*) FROM (
            SELECT 1 FROM runs p
            WHERE p.task_id = r.task_id AND p.id <= r.id AND p.status IN ('failed', 'timed_out')
              AND NOT EXISTS (SELECT 1 FROM runs x WHERE x.retry_of = p.id)
              AND p.id > coalesce((SELECT max(s.id) FROM runs s WHERE s.task_id = r.task_id
                                   AND s.id < r.id AND s.status = 'succeeded'), 0)
            LIMIT 10000) f) AS streak
FROM runs r JOIN tasks t ON t.id = r.task_id
WHERE r.id = %(run_id)s;

-- name: log_tail_chunks
SELECT data FROM run_logs WHERE run_id = %(run_id)s ORDER BY seq DESC LIMIT %(chunks)s;

-- name: notification_done
UPDATE notifications SET status = %(status)s, event = %(event)s, last_error = %(error)s,
       finished_at = now()
WHERE id = %(id)s AND status = 'pending';

-- name: notification_retry
UPDATE notifications SET last_error = %(error)s, event = %(event)s,
       next_attempt_at = now() + make_interval(secs => %(delay)s)
WHERE id = %(id)s AND status = 'pending';

-- name: notifications_of_run
SELECT id, channel, status, event, attempts, last_error FROM notifications
WHERE run_id = %(run_id)s ORDER BY channel;

-- name: set_traceparent
SELECT set_config('nbcron.traceparent', %(traceparent)s, true);

-- name: run_traceparents
SELECT id, task_id, traceparent FROM runs WHERE id = ANY(%(ids)s);

-- name: adopt_traceparent
UPDATE runs SET traceparent = %(traceparent)s WHERE id = %(id)s AND traceparent IS NULL;

-- security
-- API keys behind JWTs, the audit log for admins, and task secrets (sealed values, never shown).

-- name: get_api_key_by_id
SELECT * FROM api_keys WHERE id = %(id)s;

-- name: list_audit
SELECT id, at, actor, action, object_type, object_id, remote, detail FROM audit_log
WHERE (%(cursor)s::bigint IS NULL OR id < %(cursor)s)
  AND (%(actor)s::text IS NULL OR actor = %(actor)s)
  AND (%(action)s::text IS NULL OR action = %(action)s)
  AND (%(object_type)s::text IS NULL OR object_type = %(object_type)s)
  AND (%(object_id)s::text IS NULL OR object_id = %(object_id)s)
ORDER BY id DESC
LIMIT %(limit)s;

-- name: put_task_secret
INSERT INTO task_secrets (task_id, name, value) VALUES (%(task_id)s, %(name)s, %(value)s)
ON CONFLICT (task_id, name) DO UPDATE SET value = excluded.value, updated_at = now();

-- name: delete_task_secrets
DELETE FROM task_secrets WHERE task_id = %(task_id)s AND name = ANY(%(names)s);

-- name: task_secret_names
SELECT task_id, name FROM task_secrets WHERE task_id = ANY(%(task_ids)s) ORDER BY task_id, name;

-- name: task_secrets
SELECT name, value FROM task_secrets WHERE task_id = %(task_id)s ORDER BY name;

-- reports
-- A notebook task's latest successful HTML report (GET /api/tasks/{id}/report) and the pruning of
-- old artifacts by the task's keep_last (service/worker.py after each run).

-- name: latest_task_report
SELECT r.id AS run_id, a.content_type, a.size, a.created_at, a.data
FROM runs r JOIN artifacts a ON a.run_id = r.id AND a.name = 'report.html'
WHERE r.task_id = %(task_id)s AND r.status = 'succeeded'
ORDER BY r.id DESC
LIMIT 1;

-- name: prune_artifacts
-- Delete the artifacts of the run's task beyond its keep_last newest runs that have any, sparing
-- the latest successful report so the task's report link keeps working. No keep_last: no-op.
WITH task AS (
    SELECT t.id, t.keep_last FROM runs r JOIN tasks t ON t.id = r.task_id
    WHERE r.id = %(run_id)s AND t.keep_last IS NOT NULL
), holders AS (
    SELECT DISTINCT a.run_id FROM artifacts a JOIN runs r ON r.id = a.run_id
    WHERE r.task_id = (SELECT id FROM task)
), kept AS (
    (SELECT run_id FROM holders ORDER BY run_id DESC LIMIT (SELECT keep_last FROM task))
    UNION
    (SELECT r.id FROM runs r JOIN artifacts a ON a.run_id = r.id AND a.name = 'report.html'
     WHERE r.task_id = (SELECT id FROM task) AND r.status = 'succeeded'
     ORDER BY r.id DESC LIMIT 1)
)
DELETE FROM artifacts
WHERE run_id IN (SELECT run_id FROM holders) AND run_id NOT IN (SELECT run_id FROM kept)
RETURNING run_id, name;

-- name: dashboard_work_mem
-- Window aggregates sort ~10^5 rows; keep those sorts in memory, for the current transaction only.
SELECT set_config('work_mem', '64MB', true);

-- api hot path
-- Single statements for the API's busiest routes (GET /api/tasks/{id}, POST …/trigger, key
-- revocation): each is one round trip in autocommit, so one commit where anything is written.

-- name: get_task_view_by_id
SELECT t.*, ARRAY(SELECT s.name FROM task_secrets s WHERE s.task_id = t.id ORDER BY s.name)
       AS secret_names
FROM tasks t WHERE t.id = %(id)s;

-- name: get_task_view_by_name
SELECT t.*, ARRAY(SELECT s.name FROM task_secrets s WHERE s.task_id = t.id ORDER BY s.name)
       AS secret_names
FROM tasks t WHERE t.name = %(name)s;

-- name: insert_manual_run_audited
-- A run and its audit row (detail gains the run's id) in one statement, so both or neither are
-- committed. A replayed idempotency key inserts neither and returns no row. `traceparent`
-- (tracing on) wins over the transaction setting the column defaults to.
WITH run AS (
    INSERT INTO runs (task_id, trigger, attempt, parameters, queue, not_before, idempotency_key,
                      traceparent)
    VALUES (%(task_id)s, %(trigger)s, 1, %(parameters)s, %(queue)s, now(), %(idempotency_key)s,
            coalesce(%(traceparent)s, nullif(current_setting('nbcron.traceparent', true), '')))
    ON CONFLICT DO NOTHING
    RETURNING *
), audited AS (
    INSERT INTO audit_log (actor, action, object_type, object_id, remote, detail)
    SELECT %(actor)s, %(action)s, %(object_type)s, %(object_id)s, %(remote)s,
           %(detail)s::jsonb || jsonb_build_object('run_id', run.id)
    FROM run
)
SELECT * FROM run;

-- name: revoke_api_key_notify
-- Revoke, and tell every API process (LISTEN nbcron_keys) to drop its cached principals; the
-- notification is delivered at commit, so never for a revocation that did not happen.
WITH revoked AS (
    UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = %(id)s
    RETURNING id, name, role, prefix, created_at, last_used_at, revoked_at
)
SELECT revoked.*, pg_notify('nbcron_keys', revoked.id::text) AS notified FROM revoked;

-- name: list_runs_recent
-- The unfiltered runs page, newest first. No `IS NULL OR` filters: those make the cached generic
-- plan a scan and sort of the whole table; this one walks the primary key backwards.
SELECT r.*, t.name AS task_name FROM runs r JOIN tasks t ON t.id = r.task_id
WHERE r.id < coalesce(%(cursor)s::bigint, 9223372036854775807)
ORDER BY r.id DESC
LIMIT %(limit)s;
