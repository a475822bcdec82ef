-- The decision engine wakes when events are committed instead of waiting for its next
-- tick: every statement that inserts into `events` notifies `razar_events` (PostgreSQL
-- delivers it at commit and folds repeats within one transaction into one). The
-- engine's tick stays as the fallback when the notification is lost (a dropped
-- listening connection).
CREATE FUNCTION razar_events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('razar_events', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER events_notify AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION razar_events_notify();
