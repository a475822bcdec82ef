-- Issue 15: GPU faults stored with what ran on the GPU when they were seen, queryable
-- without parsing text (protocol version 3, `EventKind::GpuFault`). The event row keeps
-- its version 1 `kind` and `payload` (`xid`, `{"Xid": {...}}`), so older readers go on.
--   Which faults hit revision R of component C:
--     SELECT e.* FROM fault_components f JOIN events e USING (event_id)
--     WHERE f.component = C AND f.revision = R;
--   Which revisions ran on GPU U when it faulted:
--     SELECT e.ts, e.xid, f.component, f.revision, f.spec_hash, f.pid
--     FROM events e JOIN fault_components f USING (event_id) WHERE e.gpu_uuid = U;
--   Component events of revision R, and those of components that used GPU U:
--     SELECT * FROM events WHERE subject_id = C AND component_revision = R;
--     SELECT * FROM events WHERE gpu_uuids @> ARRAY[U];
ALTER TABLE events
    -- The GPU of a GPU event (UUID and PCI bus id: attributed events only; the index
    -- for every GPU event, also in subject_id).
    ADD COLUMN gpu_uuid    text,
    ADD COLUMN gpu_index   integer,
    ADD COLUMN pci_bus_id  text,
    -- An XID event: the XID, how many XIDs the event stands for (repeats on one GPU
    -- coalesced by the agent), the first and last of them.
    ADD COLUMN xid         integer,
    ADD COLUMN fault_count bigint,
    ADD COLUMN first_ts    timestamptz,
    ADD COLUMN last_ts     timestamptz,
    -- Read from the kernel log as written before the agent started (its own time): not a
    -- new fault.
    ADD COLUMN historical  boolean NOT NULL DEFAULT false,
    -- A component event (subject_id the component): the revision it ran (version label
    -- and spec hash) and the UUIDs of the GPUs its processes used.
    ADD COLUMN component_revision  text,
    ADD COLUMN component_spec_hash text,
    ADD COLUMN gpu_uuids           text[];
CREATE INDEX events_gpu_uuid_ts ON events (gpu_uuid, ts) WHERE gpu_uuid IS NOT NULL;
CREATE INDEX events_xid_ts ON events (xid, ts) WHERE xid IS NOT NULL;
CREATE INDEX events_component_revision ON events (subject_id, component_revision)
    WHERE component_revision IS NOT NULL;
CREATE INDEX events_gpu_uuids ON events USING gin (gpu_uuids) WHERE gpu_uuids IS NOT NULL;

-- The components mapped to the GPU (a process of theirs ran on it) when the fault was
-- seen, with the revision they ran: version label and spec hash (sha256 of the spec).
CREATE TABLE fault_components (
    event_id  bigint NOT NULL REFERENCES events (event_id) ON DELETE CASCADE,
    host_id   text NOT NULL,
    gpu_uuid  text NOT NULL,
    component text NOT NULL,
    revision  text NOT NULL,
    spec_hash text NOT NULL,
    pid       bigint,
    PRIMARY KEY (event_id, component)
);
CREATE INDEX fault_components_revision ON fault_components (component, revision);
CREATE INDEX fault_components_spec_hash ON fault_components (spec_hash);
CREATE INDEX fault_components_gpu ON fault_components (gpu_uuid);

-- The compute processes on the GPU when the fault was seen (NVML's running processes).
CREATE TABLE fault_processes (
    event_id          bigint NOT NULL REFERENCES events (event_id) ON DELETE CASCADE,
    pid               bigint NOT NULL,
    name              text NOT NULL,
    used_memory_bytes bigint,
    PRIMARY KEY (event_id, pid)
);
