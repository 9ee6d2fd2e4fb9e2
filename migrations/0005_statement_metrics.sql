-- Run metrics and notification rows written once per statement instead of once per row.
-- The row triggers of 0002 ran up to three upserts and a notification lookup for every status
-- change; a worker that claims or finishes a batch of runs in one statement now costs one grouped
-- upsert and one insert. Updates that leave the status alone add nothing. What is recorded is
-- unchanged. Concurrent writers spread over 64 shards (pid mod 64) instead of 8, so two workers'
-- statements rarely wait on the same counter row. The counted events:
--   created       a run inserted as queued (label: trigger)
--   dispatch_lag  a run that became running (seconds from its slot or not_before to its start)
--   finished      a run that reached any other status (label: status), and its duration.

CREATE FUNCTION nbcron_bucket(p_value float8) RETURNS smallint LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN p_value IS NULL THEN 0
                ELSE (SELECT count(*) FROM unnest(nbcron_metric_bounds()) b WHERE b < p_value)
           END::smallint
$$;

-- What one run whose status is new observes: (metric, label, value). A single SELECT, so the
-- planner inlines it into the triggers' queries.
CREATE FUNCTION nbcron_observations(
    p_status text, p_trigger text, p_inserted boolean, p_started timestamptz,
    p_finished timestamptz, p_slot timestamptz
) RETURNS TABLE (metric text, label text, v float8) LANGUAGE sql IMMUTABLE AS $$
    SELECT 'created', p_trigger, NULL::float8 WHERE p_inserted AND p_status = 'queued'
    UNION ALL
    SELECT 'dispatch_lag', '', greatest(0, extract(epoch FROM p_started - p_slot))::float8
    WHERE p_status = 'running'
    UNION ALL
    SELECT 'finished', p_status, NULL WHERE p_status NOT IN ('queued', 'running')
    UNION ALL
    SELECT 'duration', p_status, extract(epoch FROM p_finished - p_started)::float8
    WHERE p_status NOT IN ('queued', 'running') AND p_started IS NOT NULL
      AND p_finished IS NOT NULL
$$;

DROP TRIGGER runs_metrics ON runs;
DROP FUNCTION nbcron_run_metrics();

CREATE FUNCTION nbcron_run_metrics_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO run_metrics AS m (metric, executor, label, bucket, shard, n, total)
    SELECT o.metric, coalesce(t.executor, '?'), o.label, nbcron_bucket(o.v),
           pg_backend_pid() % 64, count(*), coalesce(sum(o.v), 0)
    FROM new_runs n
    LEFT JOIN tasks t ON t.id = n.task_id
    CROSS JOIN LATERAL nbcron_observations(n.status, n.trigger, true, n.started_at,
                                           n.finished_at, coalesce(n.scheduled_for, n.not_before)) o
    GROUP BY 1, 2, 3, 4
    ON CONFLICT (metric, executor, label, bucket, shard)
    DO UPDATE SET n = m.n + excluded.n, total = m.total + excluded.total;
    RETURN NULL;
END;
$$;

DROP TRIGGER runs_notifications ON runs;
DROP FUNCTION nbcron_queue_notifications();

CREATE FUNCTION nbcron_runs_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO run_metrics AS m (metric, executor, label, bucket, shard, n, total)
    SELECT o.metric, coalesce(t.executor, '?'), o.label, nbcron_bucket(o.v),
           pg_backend_pid() % 64, count(*), coalesce(sum(o.v), 0)
    FROM new_runs n
    JOIN old_runs p ON p.id = n.id AND p.status IS DISTINCT FROM n.status
    LEFT JOIN tasks t ON t.id = n.task_id
    CROSS JOIN LATERAL nbcron_observations(n.status, n.trigger, false, n.started_at,
                                           n.finished_at, coalesce(n.scheduled_for, n.not_before)) o
    GROUP BY 1, 2, 3, 4
    ON CONFLICT (metric, executor, label, bucket, shard)
    DO UPDATE SET n = m.n + excluded.n, total = m.total + excluded.total;

    -- One pending notification per configured channel of a run that just ended, when its task's
    -- rule asks for it (the outbox of 0002, same rule).
    INSERT INTO notifications (run_id, channel)
    SELECT n.id, c.channel
    FROM new_runs n
    JOIN old_runs p ON p.id = n.id AND p.status <> n.status
    JOIN tasks t ON t.id = n.task_id
    CROSS JOIN LATERAL (VALUES
        ('webhook', t.notify ->> 'webhook' IS NOT NULL),
        ('email', jsonb_typeof(t.notify -> 'email') = 'array'
                  AND jsonb_array_length(t.notify -> 'email') > 0)
    ) AS c (channel, wanted)
    WHERE n.status IN ('succeeded', 'failed', 'timed_out') AND c.wanted
      AND CASE WHEN n.status = 'succeeded'
               THEN coalesce(t.notify -> 'on', '[]') ?| ARRAY['success', 'recovery']
               ELSE coalesce(t.notify -> 'on', '[]') ? 'failure'
                    OR jsonb_typeof(t.notify -> 'after_failures') = 'number'
          END
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END;
$$;

CREATE TRIGGER runs_metrics_inserted AFTER INSERT ON runs
    REFERENCING NEW TABLE AS new_runs
    FOR EACH STATEMENT EXECUTE FUNCTION nbcron_run_metrics_inserted();

-- Transition tables rule out `UPDATE OF status`; the joins keep only changed statuses.
CREATE TRIGGER runs_updated AFTER UPDATE ON runs
    REFERENCING OLD TABLE AS old_runs NEW TABLE AS new_runs
    FOR EACH STATEMENT EXECUTE FUNCTION nbcron_runs_updated();

-- Room on each page for updates that change no indexed column (dispatched_at, log_bytes) to stay
-- heap-only (HOT), instead of adding an entry to every index of runs.
ALTER TABLE runs SET (fillfactor = 80);
