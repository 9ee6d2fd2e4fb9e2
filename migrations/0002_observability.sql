-- Observability and alerting.
-- * run_metrics: run counters and histograms kept by a trigger on runs, so the numbers of every
--   worker and dispatcher (on any machine) are in one place the API can expose at scrape time.
-- * tasks.notify and the notifications outbox: a finished run of a task with a notify rule gets
--   one pending row per channel in the same transaction as its final status (at-least-once).
-- * runs.traceparent: the W3C trace context of the request that queued the run (tracing on).
-- * workers.kernels: warm kernels a worker reports in its heartbeat.

ALTER TABLE tasks ADD COLUMN notify jsonb NOT NULL DEFAULT '{}'::jsonb;
ALTER TABLE workers ADD COLUMN kernels integer NOT NULL DEFAULT 0;
-- Set per transaction by a traced API (`SELECT set_config('nbcron.traceparent', …, true)`).
ALTER TABLE runs ADD COLUMN traceparent text
    DEFAULT nullif(current_setting('nbcron.traceparent', true), '');

-- Time-window reads (stats, dashboard) and the retry lookups of notification rules.
CREATE INDEX runs_queued_at_idx ON runs (queued_at);
CREATE INDEX runs_retry_of_idx ON runs (retry_of) WHERE retry_of IS NOT NULL;

CREATE TABLE run_metrics (
    metric    text NOT NULL,      -- created | finished | duration | dispatch_lag | notification
    executor  text NOT NULL,      -- the task's executor (the channel for notifications)
    label     text NOT NULL,      -- trigger (created), status (finished, duration, notification)
    bucket    smallint NOT NULL,  -- histogram bucket: index into nbcron_metric_bounds(); 0 else
    shard     smallint NOT NULL,  -- spreads concurrent writers over rows (backend pid mod 8)
    n         bigint NOT NULL DEFAULT 0,
    total     float8 NOT NULL DEFAULT 0,  -- sum of observed values (histograms)
    PRIMARY KEY (metric, executor, label, bucket, shard)
);

-- Histogram upper bounds in seconds (Prometheus `le`); the last bucket is +Inf.
CREATE FUNCTION nbcron_metric_bounds() RETURNS float8[] LANGUAGE sql IMMUTABLE AS $$
    SELECT '{0.05,0.1,0.25,0.5,1,2.5,5,10,30,60,120,300,600,1800,3600}'::float8[]
$$;

CREATE FUNCTION nbcron_count(p_metric text, p_executor text, p_label text, p_value float8)
RETURNS void LANGUAGE sql AS $$
    INSERT INTO run_metrics AS m (metric, executor, label, bucket, shard, n, total)
    VALUES (p_metric, coalesce(p_executor, '?'), p_label,
            CASE WHEN p_value IS NULL THEN 0
                 ELSE (SELECT count(*) FROM unnest(nbcron_metric_bounds()) b WHERE b < p_value)
            END,
            pg_backend_pid() % 8, 1, coalesce(p_value, 0))
    ON CONFLICT (metric, executor, label, bucket, shard)
    DO UPDATE SET n = m.n + 1, total = m.total + excluded.total;
$$;

CREATE FUNCTION nbcron_run_metrics() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    kind text;
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.status = OLD.status THEN
        RETURN NULL;
    END IF;
    SELECT executor INTO kind FROM tasks WHERE id = NEW.task_id;
    IF TG_OP = 'INSERT' AND NEW.status = 'queued' THEN
        PERFORM nbcron_count('created', kind, NEW.trigger, NULL);
    ELSIF NEW.status = 'running' THEN
        PERFORM nbcron_count('dispatch_lag', kind, '', greatest(0, extract(epoch FROM
            NEW.started_at - coalesce(NEW.scheduled_for, NEW.not_before)))::float8);
    ELSIF NEW.status <> 'queued' THEN
        PERFORM nbcron_count('finished', kind, NEW.status, NULL);
        IF NEW.started_at IS NOT NULL AND NEW.finished_at IS NOT NULL THEN
            PERFORM nbcron_count('duration', kind, NEW.status,
                extract(epoch FROM NEW.finished_at - NEW.started_at)::float8);
        END IF;
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER runs_metrics AFTER INSERT OR UPDATE OF status ON runs
    FOR EACH ROW EXECUTE FUNCTION nbcron_run_metrics();

CREATE TABLE notifications (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id           bigint NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    channel          text NOT NULL CHECK (channel IN ('webhook', 'email')),
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'sent', 'skipped', 'failed')),
    event            text,         -- failure | success | recovery | failures, once decided
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),  -- also the lease of a claimed row
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    UNIQUE (run_id, channel)
);
CREATE INDEX notifications_pending_idx ON notifications (next_attempt_at) WHERE status = 'pending';

-- One pending row per configured channel when a run of a task with a matching rule finishes.
CREATE FUNCTION nbcron_queue_notifications() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO notifications (run_id, channel)
    SELECT NEW.id, c.channel
    FROM tasks t
    CROSS JOIN LATERAL (VALUES
        ('webhook', t.notify ->> 'webhook' IS NOT NULL),
        ('email', jsonb_typeof(t.notify -> 'email') = 'array'
                  AND jsonb_array_length(t.notify -> 'email') > 0)
    ) AS c (channel, wanted)
    WHERE t.id = NEW.task_id AND c.wanted
      AND CASE WHEN NEW.status = 'succeeded'
               THEN coalesce(t.notify -> 'on', '[]') ?| ARRAY['success', 'recovery']
               ELSE coalesce(t.notify -> 'on', '[]') ? 'failure'
                    OR jsonb_typeof(t.notify -> 'after_failures') = 'number'
          END
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END;
$$;

CREATE TRIGGER runs_notifications AFTER UPDATE OF status ON runs
    FOR EACH ROW
    WHEN (NEW.status IN ('succeeded', 'failed', 'timed_out') AND OLD.status <> NEW.status)
    EXECUTE FUNCTION nbcron_queue_notifications();
