-- The operation log: one row per lifecycle step, append-only (SPEC §7).
--
-- An outer operation (what a command asked for) writes one entry; its inner
-- steps (the stop, start and remove a patch is made of) write one each, with
-- `outer_op` naming the operation they belong to. All entries of one command
-- share its `correlation_id`.
--
-- Rows are never updated or deleted by the manager. Each is written in the
-- same transaction as its outbox event, its runtime-record change and, for an
-- outer entry, the inbox row that marks the command finished.
create table operation_log
(
    -- A `bigserial`: ids grow with insertion, so "newest first" is simply
    -- `order by operation_id desc`, and they appear in events (`operation_id`).
    operation_id       bigserial primary key,

    -- As sent: an `invalid_request` entry records a game_id that failed
    -- validation (possibly empty), so this is plain text, not a reference
    -- to `runtime_records`.
    game_id            text        not null,

    -- The wire names of `OpKind`. Entries exist only for decoded operations;
    -- a message whose op cannot be read gets no entry (only a
    -- `runtime.rejected` event in the outbox).
    op                 text        not null
        check (op in ('start', 'stop', 'restart', 'patch', 'remove')),
    -- Null for an outer entry; the enclosing operation for an inner one.
    outer_op           text
        check (outer_op in ('start', 'stop', 'restart', 'patch', 'remove')),

    -- As sent (an invalid one is recorded too), hence no check.
    op_source          text        not null,
    -- The stop reason, for stops.
    reason             text,
    correlation_id     text        not null,
    command_id         text        not null,

    image_ref          text,
    previous_image_ref text,
    container_id       text,
    address            text,

    outcome            text        not null
        check (outcome in ('success', 'failure')),
    -- One of the stable codes of SPEC §5 (`ErrorCode`). Not checked against
    -- the list here: a new code would otherwise need a migration in lockstep
    -- with the release that introduces it.
    error_code         text,
    error_message      text,
    noop               boolean     not null default false,
    rolled_back        boolean     not null default false,

    -- When the operation began running (after the lease) and when its
    -- outcome was decided; both set by the worker, not by the database.
    started_at         timestamptz not null,
    finished_at        timestamptz not null,

    -- The fence the writer held; null for entries written without the lease
    -- (an invalid request, a lease conflict).
    fence              bigint,

    -- When the row was committed, by the database clock (debugging aid).
    recorded_at        timestamptz not null default now(),

    -- A failure always carries its code, a success never does: consumers
    -- branch on `error_code`, so the two must not disagree.
    constraint operation_log_failure_has_code
        check ((outcome = 'failure') = (error_code is not null)),
    -- A no-op is a kind of success.
    constraint operation_log_noop_is_success
        check (not noop or outcome = 'success')
);

-- `rtmanager log <game_id>`: a game's history, newest first.
create index operation_log_game_history on operation_log (game_id, operation_id desc);

-- `rtmanager log … --correlation ID` and `send … --wait`: the outer entry of a
-- command with its inner steps, in the order they were written.
create index operation_log_correlation on operation_log (correlation_id, operation_id);
