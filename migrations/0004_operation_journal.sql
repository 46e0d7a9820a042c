-- Crash recovery: the steps an operation has done (SPEC §10 "A crash
-- mid-operation is recovered").
--
-- A worker that dies mid-command leaves the message unacknowledged; the
-- redelivered command (on any worker) reads the journal to learn which Docker
-- steps already happened (old container stopped, removed, new image pulled,
-- …), checks each against what Docker reports, and finishes the operation or
-- restores the previous image.
--
-- Keyed by command_id rather than by operation_id: the steps belong to the
-- command across its attempts, and an attempt may die before it wrote any
-- entry. No foreign key to `inbox`: the lifecycle services can be driven
-- without a broker (tests, the CLI), in which case no inbox row may exist.
create table operation_journal
(
    command_id text        not null,
    -- A step name chosen by the lifecycle code (`stopped_old`, `pulled`, …);
    -- recording a step twice is a no-op for the writer (`on conflict do
    -- nothing`), so a retried step is harmless.
    step       text        not null,
    done_at    timestamptz not null default now(),
    -- What the step needs to be resumed or undone (e.g. the previous image
    -- and container id).
    detail     jsonb,
    primary key (command_id, step)
);
