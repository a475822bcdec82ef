-- Razar collector store: hosts, sessions, components, events, series, GPU inventory,
-- per-agent ingest cursors, and samples kept in three layouts:
--   samples       recent raw rows (series_id, ts, value), daily partitions, BRIN on ts only;
--   sample_chunks settled samples, one row per series and 10-minute window, encoded by the
--                 collector (delta-of-delta timestamps, decimal-scaled or XOR values);
--   rollups_1m    1-minute min/max/avg/last/count per series, one row per 10-minute window.
-- All three are partitioned by day; retention drops whole partitions.

CREATE TABLE hosts (
    host_id       text PRIMARY KEY,
    first_seen    timestamptz NOT NULL,
    last_seen     timestamptz NOT NULL,
    state         text NOT NULL CHECK (state IN ('online', 'lost')),
    lost_since    timestamptz,
    agent_version text NOT NULL,
    profile       text NOT NULL
);

CREATE TABLE agent_sessions (
    session_id       bigserial PRIMARY KEY,
    host_id          text NOT NULL REFERENCES hosts (host_id),
    connected_at     timestamptz NOT NULL,
    disconnected_at  timestamptz,
    remote_addr      text NOT NULL,
    protocol_version integer NOT NULL
);
CREATE INDEX agent_sessions_host ON agent_sessions (host_id, connected_at);

CREATE TABLE components (
    host_id    text NOT NULL REFERENCES hosts (host_id),
    name       text NOT NULL,
    state      text NOT NULL,
    revision   text NOT NULL,
    critical   boolean NOT NULL,
    updated_at timestamptz NOT NULL,
    PRIMARY KEY (host_id, name)
);

CREATE TABLE gpus (
    host_id            text NOT NULL REFERENCES hosts (host_id),
    gpu_index          integer NOT NULL,
    uuid               text NOT NULL,
    name               text NOT NULL,
    pci_bus_id         text NOT NULL,
    memory_total_bytes bigint NOT NULL,
    updated_at         timestamptz NOT NULL,
    PRIMARY KEY (host_id, gpu_index)
);

-- Events from agents and from the collector itself (host lost/back).
CREATE TABLE events (
    event_id     bigserial PRIMARY KEY,
    host_id      text NOT NULL,
    ts           timestamptz NOT NULL,
    severity     text NOT NULL,
    subject_kind text NOT NULL,
    subject_id   text,
    kind         text NOT NULL,
    payload      jsonb NOT NULL,
    message      text NOT NULL
);
CREATE INDEX events_ts ON events (ts);
CREATE INDEX events_host_ts ON events (host_id, ts);

-- Series dictionary: agents reference series by a per-agent id, mapped to series_id here.
CREATE TABLE series (
    series_id bigserial PRIMARY KEY,
    host_id   text NOT NULL,
    metric    text NOT NULL,
    labels    jsonb NOT NULL,
    UNIQUE (host_id, metric, labels)
);

-- Highest batch sequence stored per agent, advanced in the ingest transaction.
CREATE TABLE agent_cursors (
    host_id        text PRIMARY KEY,
    acked_seq      bigint NOT NULL,
    samples_stored bigint NOT NULL DEFAULT 0,
    events_stored  bigint NOT NULL DEFAULT 0,
    updated_at     timestamptz NOT NULL
);

CREATE TABLE samples (
    series_id bigint NOT NULL,
    ts        timestamptz NOT NULL,
    value     double precision NOT NULL
) PARTITION BY RANGE (ts);

CREATE TABLE sample_chunks (
    series_id    bigint NOT NULL,
    window_start timestamptz NOT NULL,
    n            integer NOT NULL,
    data         bytea NOT NULL,
    PRIMARY KEY (series_id, window_start)
) PARTITION BY RANGE (window_start);

CREATE TABLE rollups_1m (
    series_id    bigint NOT NULL,
    window_start timestamptz NOT NULL,
    data         bytea NOT NULL,
    PRIMARY KEY (series_id, window_start)
) PARTITION BY RANGE (window_start);

-- Creates the day's partition of each sample table (idempotent). Chunk and rollup
-- partitions compress their encoded column with lz4 where the server supports it.
CREATE FUNCTION razar_ensure_day(day date) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    suffix text := to_char(day, 'YYYYMMDD');
    lo text := quote_literal(day::timestamp AT TIME ZONE 'UTC');
    hi text := quote_literal((day + 1)::timestamp AT TIME ZONE 'UTC');
    tbl text;
BEGIN
    -- Serialise concurrent creators of the same day.
    PERFORM pg_advisory_xact_lock(7265617, day - date '2000-01-01');
    IF to_regclass('samples_p' || suffix) IS NULL THEN
        EXECUTE format('CREATE TABLE %I PARTITION OF samples FOR VALUES FROM (%s) TO (%s)',
                       'samples_p' || suffix, lo, hi);
        EXECUTE format('CREATE INDEX %I ON %I USING brin (ts) WITH (autosummarize = on)',
                       'samples_p' || suffix || '_ts', 'samples_p' || suffix);
    END IF;
    FOREACH tbl IN ARRAY ARRAY['sample_chunks', 'rollups_1m'] LOOP
        IF to_regclass(tbl || '_p' || suffix) IS NULL THEN
            EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%s) TO (%s) WITH (toast_tuple_target = 128)',
                           tbl || '_p' || suffix, tbl, lo, hi);
            EXECUTE format('ALTER TABLE %I ALTER COLUMN data SET STORAGE MAIN', tbl || '_p' || suffix);
            BEGIN
                EXECUTE format('ALTER TABLE %I ALTER COLUMN data SET COMPRESSION lz4', tbl || '_p' || suffix);
            EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN
                NULL; -- built without lz4: pglz stays
            END;
        END IF;
    END LOOP;
END
$$;
