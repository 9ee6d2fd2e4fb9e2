-- nbcron initial schema: tasks, runs, run logs, artifacts, workers, api keys, audit.
-- Postgres is the single source of truth; the broker only carries run ids.

CREATE TABLE tasks (
    id                     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name                   text NOT NULL UNIQUE
                           CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$' AND name !~ '^[0-9]+$'),
    executor               text NOT NULL,
    spec                   jsonb NOT NULL DEFAULT '{}'::jsonb,  -- executor-specific fields
    description            text NOT NULL DEFAULT '',
    tags                   text[] NOT NULL DEFAULT '{}',
    schedule               text,
    timezone               text NOT NULL DEFAULT 'UTC',
    enabled                boolean NOT NULL DEFAULT true,
    timeout_seconds        integer CHECK (timeout_seconds IS NULL OR timeout_seconds > 0),
    max_retries            integer NOT NULL DEFAULT 0 CHECK (max_retries >= 0),
    retry_delay_seconds    integer NOT NULL DEFAULT 60 CHECK (retry_delay_seconds >= 0),
    depends_on             text[] NOT NULL DEFAULT '{}',
    misfire_policy         text NOT NULL DEFAULT 'run_once'
                           CHECK (misfire_policy IN ('skip', 'run_once', 'run_all')),
    misfire_grace_seconds  integer NOT NULL DEFAULT 60 CHECK (misfire_grace_seconds >= 0),
    max_catchup            integer NOT NULL DEFAULT 10 CHECK (max_catchup >= 1),
    overlap_policy         text NOT NULL DEFAULT 'allow'
                           CHECK (overlap_policy IN ('allow', 'forbid', 'replace')),
    queue                  text NOT NULL DEFAULT 'default',
    env                    jsonb NOT NULL DEFAULT '{}'::jsonb,
    next_fire_at           timestamptz,  -- next cron slot; NULL when unscheduled or paused
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now()
);

-- The dispatcher's cron tick reads only tasks that are due: cost follows due tasks, not all tasks.
CREATE INDEX tasks_due_idx ON tasks (next_fire_at) WHERE enabled AND next_fire_at IS NOT NULL;
-- Finding the dependents of a task that just finished must not scan every task.
CREATE INDEX tasks_depends_on_idx ON tasks USING gin (depends_on);

CREATE TABLE runs (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id          bigint NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    status           text NOT NULL DEFAULT 'queued'
                     CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'timed_out',
                                       'cancelled', 'missed')),
    trigger          text NOT NULL
                     CHECK (trigger IN ('manual', 'schedule', 'retry', 'dependency', 'api')),
    attempt          integer NOT NULL DEFAULT 1,
    retry_of         bigint REFERENCES runs (id) ON DELETE SET NULL,
    parameters       jsonb NOT NULL DEFAULT '{}'::jsonb,
    queue            text NOT NULL DEFAULT 'default',
    scheduled_for    timestamptz,  -- the cron slot, for schedule-triggered runs
    not_before       timestamptz NOT NULL DEFAULT now(),
    queued_at        timestamptz NOT NULL DEFAULT now(),
    dispatched_at    timestamptz,  -- last time the dispatcher sent it to the broker
    started_at       timestamptz,
    finished_at      timestamptz,
    heartbeat_at     timestamptz,
    worker           text,
    exit_code        integer,
    error            text,
    reason           text,  -- why a run was missed or cancelled
    cancel_requested boolean NOT NULL DEFAULT false,
    idempotency_key  text,
    log_bytes        bigint NOT NULL DEFAULT 0
);

-- Each cron slot fires once, however many dispatchers run.
CREATE UNIQUE INDEX runs_task_slot_uniq ON runs (task_id, scheduled_for)
    WHERE scheduled_for IS NOT NULL AND trigger = 'schedule';
CREATE UNIQUE INDEX runs_idempotency_uniq ON runs (task_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- Work the dispatcher still has to send, cheapest first.
CREATE INDEX runs_pending_idx ON runs (not_before, id) WHERE status = 'queued';
CREATE INDEX runs_running_idx ON runs (heartbeat_at) WHERE status = 'running';
CREATE INDEX runs_task_active_idx ON runs (task_id) WHERE status IN ('queued', 'running');
-- Runs being replaced (overlap 'replace'); normally empty, probed for every dispatch.
CREATE INDEX runs_replacing_idx ON runs (task_id) WHERE status = 'running' AND cancel_requested;
CREATE INDEX runs_task_idx ON runs (task_id, id DESC);
CREATE INDEX runs_status_idx ON runs (status, id DESC);

CREATE TABLE run_logs (
    run_id      bigint NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    seq         integer NOT NULL,
    data        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, seq)
);

CREATE TABLE artifacts (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id        bigint NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    name          text NOT NULL CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$'),
    content_type  text NOT NULL,
    size          bigint NOT NULL,
    data          bytea NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (run_id, name)
);

CREATE TABLE workers (
    name            text PRIMARY KEY,
    hostname        text NOT NULL,
    pid             integer NOT NULL,
    queues          text[] NOT NULL DEFAULT '{}',
    threads         integer NOT NULL DEFAULT 1,
    running         integer NOT NULL DEFAULT 0,
    started_at      timestamptz NOT NULL DEFAULT now(),
    last_heartbeat  timestamptz NOT NULL DEFAULT now(),
    stopped_at      timestamptz
);

CREATE TABLE api_keys (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name          text NOT NULL,
    role          text NOT NULL CHECK (role IN ('viewer', 'operator', 'author', 'admin')),
    prefix        text NOT NULL UNIQUE,  -- visible part, for identification and lookup
    key_hash      text NOT NULL,         -- sha256 of the whole key; the key itself is never stored
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz,
    revoked_at    timestamptz
);

CREATE TABLE audit_log (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL,
    action      text NOT NULL,
    object_type text NOT NULL,
    object_id   text,
    remote      text,
    detail      jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX audit_log_at_idx ON audit_log (at DESC);

CREATE TABLE dispatchers (
    name            text PRIMARY KEY,
    last_heartbeat  timestamptz NOT NULL DEFAULT now()
);

-- Wake dispatchers as soon as a run is queued (inside the same transaction, so the
-- notification is delivered only if the run really exists).
CREATE FUNCTION nbcron_notify_runs() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('nbcron_runs', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER runs_notify AFTER INSERT ON runs
    FOR EACH STATEMENT EXECUTE FUNCTION nbcron_notify_runs();
