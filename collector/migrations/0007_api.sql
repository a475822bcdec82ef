-- Operator API (collector/src/api): bearer tokens and the audit log.
--
-- api_tokens: a token is `rzr_<token_id>_<secret>`; only SHA-256(secret) is stored. The
-- id finds the row, the hash is compared in constant time by the collector. A revoked or
-- expired token is refused; `last_used` is advanced at most once a minute.
CREATE TABLE api_tokens (
    token_id    bigserial PRIMARY KEY,
    name        text NOT NULL,
    role        text NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    secret_hash bytea NOT NULL CHECK (octet_length(secret_hash) = 32),
    created_at  timestamptz NOT NULL,
    expires_at  timestamptz,
    revoked_at  timestamptz,
    last_used   timestamptz
);

-- Every mutating API call that took effect, written in the same transaction as its
-- effect: who (token name and id), role, method and route template, arguments, result,
-- the request id (also stored with the commands it creates).
CREATE TABLE audit_log (
    audit_id   bigserial PRIMARY KEY,
    at         timestamptz NOT NULL,
    token_id   bigint,
    who        text NOT NULL,
    role       text NOT NULL,
    method     text NOT NULL,
    route      text NOT NULL,
    arguments  jsonb NOT NULL,
    result     text NOT NULL,
    request_id text NOT NULL
);
CREATE INDEX audit_log_at ON audit_log (at);
