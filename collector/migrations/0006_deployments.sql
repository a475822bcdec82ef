-- Deployments (issue 12 item 3): a revision of one component rolled out to a set of
-- hosts in waves, driven by the collector's deployments task through the engine's
-- wave machine (razar-engine `deployment.rs`), whose state is stored with the row.

CREATE TABLE deployments (
    deployment_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    component           text NOT NULL,
    -- The version label of the revision rolled out, and the revision itself (the
    -- wire's RevisionSpec as JSON: version, command, args, env).
    revision            text NOT NULL,
    spec                jsonb NOT NULL,
    -- How the hosts were chosen ({"hosts": [...], "profile": ..., "all": ...}).
    selector            jsonb NOT NULL,
    canaries            integer NOT NULL CHECK (canaries >= 0),
    max_parallel        integer NOT NULL CHECK (max_parallel >= 1),
    min_healthy_ms      bigint NOT NULL CHECK (min_healthy_ms > 0),
    healthy_deadline_ms bigint NOT NULL CHECK (healthy_deadline_ms > min_healthy_ms),
    auto_revert         boolean NOT NULL,
    promotion           text NOT NULL CHECK (promotion IN ('manual', 'auto')),
    state               text NOT NULL CHECK (state IN ('created', 'canary',
                            'waiting_promotion', 'rolling', 'succeeded', 'paused',
                            'reverting', 'reverted', 'failed')),
    paused              boolean NOT NULL DEFAULT false,
    -- Why it is paused, reverting, reverted or failed (shown to operators).
    reason              text,
    -- The wave machine (razar_engine::deployment::Rollout) as JSON; null while created.
    rollout             jsonb,
    created_by          text NOT NULL,
    created_at          timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL,
    finished_at         timestamptz
);
CREATE INDEX deployments_active ON deployments (deployment_id)
    WHERE state NOT IN ('succeeded', 'reverted', 'failed');
CREATE INDEX deployments_component ON deployments (component, revision);

CREATE TABLE deployment_hosts (
    deployment_id  bigint NOT NULL REFERENCES deployments (deployment_id) ON DELETE CASCADE,
    host_id        text NOT NULL REFERENCES hosts (host_id),
    -- Rollout order; the first `canaries` are the canaries.
    position       integer NOT NULL,
    canary         boolean NOT NULL,
    -- The revision the host ran when the deployment was created (a revert returns to it).
    from_revision  text NOT NULL,
    state          text NOT NULL CHECK (state IN ('pending', 'deploying', 'healthy',
                       'failed', 'reverting', 'reverted')),
    -- The last command sent for this host (deploy, then revert).
    command_id     bytea CHECK (octet_length(command_id) = 16),
    reason         text,
    deploying_at   timestamptz,
    running_at     timestamptz,
    healthy_at     timestamptz,
    failed_at      timestamptz,
    reverting_at   timestamptz,
    reverted_at    timestamptz,
    updated_at     timestamptz NOT NULL,
    PRIMARY KEY (deployment_id, host_id)
);
