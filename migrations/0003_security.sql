-- Security: task secrets kept outside the task row, sealed with AES-256-GCM by the API
-- (service/secrets.py); only the API and workers hold the key. Deleting a task deletes them.

CREATE TABLE task_secrets (
    task_id     bigint NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    name        text NOT NULL CHECK (name ~ '^[A-Za-z_][A-Za-z0-9_]{0,127}$'),
    value       bytea NOT NULL,  -- version byte, nonce, ciphertext and tag; never plain text
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task_id, name)
);

-- GET /api/audit filters by action and object as well as by time.
CREATE INDEX audit_log_object_idx ON audit_log (object_type, object_id, id DESC);
