-- The decision engine (collector/src/engine_loop.rs): leadership term, the durable cursor
-- over committed events, decisions, the actions they carry out (an outbox), escalations,
-- GPU health, and webhook notifications (collector/src/notify.rs).

-- The transaction that inserted each event. Event ids (bigserial) commit out of order
-- under concurrent ingest transactions, so the engine does not read "event_id > cursor":
-- it reads every event of the transactions below the oldest one still running
-- (pg_snapshot_xmin), which are all settled (committed or aborted) and visible. Rows
-- from before this migration keep NULL (the engine starts after them). Added without a
-- default first, then given one: no table rewrite.
ALTER TABLE events ADD COLUMN xact xid8;
ALTER TABLE events ALTER COLUMN xact SET DEFAULT pg_current_xact_id();
CREATE INDEX events_xact ON events (xact);

-- One row. `term` grows each time a collector becomes the engine's leader (it holds
-- the advisory lock on a dedicated connection); every decision is written in a
-- transaction that checks the term is still its own (fencing). `horizon`: every event of
-- a transaction below it has been decided (the cursor, advanced in the same
-- transaction as the decisions). `snapshot`: the engine's state (fleet view, open
-- escalations, history, breaker) as of the horizon, JSON.
CREATE TABLE engine_state (
    id           smallint PRIMARY KEY CHECK (id = 1),
    term         bigint NOT NULL,
    leader       text,
    leader_since timestamptz,
    horizon      xid8 NOT NULL,
    snapshot     jsonb,
    updated_at   timestamptz NOT NULL
);
INSERT INTO engine_state (id, term, horizon, updated_at)
VALUES (1, 0, pg_snapshot_xmin(pg_current_snapshot()), now());

-- Every decision the engine took (razar_engine::Decision), with the leader's term.
-- `seq` is the engine's own decision number, carried across leaders by the snapshot:
-- unique, so a decision is never stored twice.
CREATE TABLE decisions (
    decision_id      bigserial PRIMARY KEY,
    seq              bigint NOT NULL UNIQUE,
    term             bigint NOT NULL,
    rule             text NOT NULL,
    rule_version     integer NOT NULL,
    catalog_revision text NOT NULL,
    -- {"events": [event ids], "facts": ["..."]}
    evidence         jsonb NOT NULL,
    -- [{"alternative": "...", "reason": "..."}]
    rejected         jsonb NOT NULL,
    actions          jsonb NOT NULL,
    -- Actions the circuit breaker held back.
    held             jsonb NOT NULL,
    -- Breaker scopes not closed: [{"scope", "state", "held"}]
    breaker          jsonb NOT NULL,
    operator         text,
    decided_at       timestamptz NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX decisions_created ON decisions (created_at);
CREATE INDEX decisions_evidence ON decisions USING gin ((evidence -> 'events'));

-- The actions of decisions that reach outside the store (commands, deployment pauses),
-- written with the decision and carried out after commit; a command's idempotency key
-- is `engine-action-<action_id>`, so carrying one out again never sends it twice.
CREATE TABLE engine_actions (
    action_id   bigserial PRIMARY KEY,
    decision_id bigint NOT NULL REFERENCES decisions (decision_id),
    term        bigint NOT NULL,
    kind        text NOT NULL,
    host_id     text,
    action      jsonb NOT NULL,
    state       text NOT NULL CHECK (state IN ('pending', 'done', 'failed', 'skipped')),
    command_id  bytea,
    error       text,
    -- A GPU reset's result was fed back to the engine (as a gpu_reset_result event).
    result_fed  boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL,
    done_at     timestamptz
);
CREATE INDEX engine_actions_pending ON engine_actions (action_id) WHERE state = 'pending';
CREATE INDEX engine_actions_resets ON engine_actions (action_id)
    WHERE kind = 'reset_gpu' AND state = 'done' AND NOT result_fed;

-- Escalations, deduplicated by (host, subject, kind) while not resolved ('' host: fleet
-- wide). open -> acknowledged -> resolved (by the engine or an operator, with a note).
CREATE TABLE escalations (
    escalation_id   bigserial PRIMARY KEY,
    host_id         text NOT NULL,
    subject         text NOT NULL,
    kind            text NOT NULL,
    state           text NOT NULL CHECK (state IN ('open', 'acknowledged', 'resolved')),
    severity        text NOT NULL,
    summary         text NOT NULL,
    level           integer NOT NULL DEFAULT 0,
    occurrences     integer NOT NULL DEFAULT 1,
    opened_at       timestamptz NOT NULL,
    last_seen       timestamptz NOT NULL,
    acknowledged_at timestamptz,
    acknowledged_by text,
    resolved_at     timestamptz,
    resolved_by     text,
    note            text,
    -- The last decision that raised, re-notified or settled it.
    decision_id     bigint REFERENCES decisions (decision_id),
    updated_at      timestamptz NOT NULL
);
CREATE UNIQUE INDEX escalations_live_key ON escalations (host_id, subject, kind)
    WHERE state <> 'resolved';
CREATE INDEX escalations_opened ON escalations (opened_at);

-- Each GPU's health in the engine's eyes (the API shows it).
CREATE TABLE gpu_health (
    host_id     text NOT NULL,
    gpu_uuid    text NOT NULL,
    gpu_index   integer NOT NULL,
    state       text NOT NULL CHECK (state IN ('healthy', 'quarantined', 'probation', 'inspection')),
    -- quarantined / probation: the ladder's rung (reset, reboot).
    rung        text,
    since       timestamptz,
    -- probation: returns to service at this time unless it faults first.
    until       timestamptz,
    cycles      integer NOT NULL,
    updated_at  timestamptz NOT NULL,
    PRIMARY KEY (host_id, gpu_uuid)
);

-- Webhook notifications of escalations: persisted with the decision, delivered with
-- retries and exponential backoff; undeliverable ones are kept.
CREATE TABLE notifications (
    notification_id bigserial PRIMARY KEY,
    escalation_id   bigint NOT NULL REFERENCES escalations (escalation_id),
    url             text NOT NULL,
    level           integer NOT NULL,
    -- opened | renotify | resolved
    reason          text NOT NULL,
    payload         jsonb NOT NULL,
    state           text NOT NULL CHECK (state IN ('pending', 'delivered', 'undeliverable')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL,
    last_error      text,
    created_at      timestamptz NOT NULL,
    delivered_at    timestamptz
);
CREATE INDEX notifications_due ON notifications (next_attempt_at) WHERE state = 'pending';
