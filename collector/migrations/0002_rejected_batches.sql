-- Batches the database refused alone with a data error (SQLSTATE class 22, 23 or 54)
-- after the store boundary made their values storable: kept here for an operator with
-- the error and the raw batch, while the agent's cursor moves past them (the batch is
-- acknowledged, so one bad batch never stalls a host). `payload` is the batch as one
-- protocol frame (razar_shared::protocol::codec::encode_into of the Batch).
CREATE TABLE rejected_batches (
    host_id     text NOT NULL,
    seq         bigint NOT NULL,
    rejected_at timestamptz NOT NULL,
    sqlstate    text,
    error       text NOT NULL,
    samples     bigint NOT NULL,
    events      bigint NOT NULL,
    payload     bytea NOT NULL,
    PRIMARY KEY (host_id, seq)
);
CREATE INDEX rejected_batches_at ON rejected_batches (rejected_at);
