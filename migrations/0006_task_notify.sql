-- Wake dispatchers when a task is created or changed, as 0001 does when a run is queued. The
-- payload says what changed: a dispatcher woken by runs alone ('' from 0001) skips its cron
-- query while it knows the next slot is still ahead; a task write makes it look again at once.
CREATE FUNCTION nbcron_notify_tasks() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('nbcron_runs', 'tasks');
    RETURN NULL;
END;
$$;

CREATE TRIGGER tasks_notify AFTER INSERT OR UPDATE ON tasks
    FOR EACH STATEMENT EXECUTE FUNCTION nbcron_notify_tasks();
