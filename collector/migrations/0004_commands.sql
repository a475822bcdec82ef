-- Commands to agents (collector/src/dispatch.rs): persisted before they are sent, delivered
-- on every (re)connect of their host until their deadline, and settled once by the
-- agent's first result. `command_id` is the wire's CommandId (16 random bytes); the agent
-- executes an id at most once, so delivering a command twice is safe.
--   state: queued (not handed to a connection yet) → sent (handed to a live connection,
--   perhaps more than once: `attempts`) → succeeded | failed | expired.
CREATE TABLE commands (
    command_id      bytea PRIMARY KEY CHECK (octet_length(command_id) = 16),
    host_id         text NOT NULL REFERENCES hosts (host_id),
    kind            text NOT NULL,
    component       text,
    gpu             integer,
    -- The wire's CommandAction as JSON (serde's externally tagged form): what is
    -- delivered again after a reconnect.
    action          jsonb NOT NULL,
    state           text NOT NULL
                    CHECK (state IN ('queued', 'sent', 'succeeded', 'failed', 'expired')),
    -- Who asked (an operator, the engine); an idempotency key is unique per caller.
    caller          text NOT NULL,
    idempotency_key text,
    request_id      text,
    created_at      timestamptz NOT NULL,
    sent_at         timestamptz,
    finished_at     timestamptz,
    deadline        timestamptz NOT NULL,
    message         text,
    attempts        integer NOT NULL DEFAULT 0,
    -- The stored outcome came from a redelivery's answer (the agent had already run it).
    duplicate       boolean NOT NULL DEFAULT false,
    -- Insertion order: commands of a host are delivered in this order.
    seq             bigserial NOT NULL,
    UNIQUE (caller, idempotency_key)
);
CREATE INDEX commands_open ON commands (host_id, seq) WHERE state IN ('queued', 'sent');
CREATE INDEX commands_created ON commands (created_at);
