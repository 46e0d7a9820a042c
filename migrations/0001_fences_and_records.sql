-- The runtime state of every game, and the fence that guards it.
--
-- Style: lowercase SQL, one comment per decision. Table and column names are
-- interface (SPEC §7): operators and other teams query them, so renaming one
-- is a breaking change. Extra columns are fine.

-- The authoritative per-game fence counter (SPEC §10 "Fencing").
--
-- Every operation that takes a game's lease increments the fence here and then
-- makes each of its writes conditional on the value it got: a worker that lost
-- its lease (a long pause, a Redis restart) still holds the old number and is
-- refused.
--
-- Why a table of its own rather than a column of `runtime_records`: a `start`
-- of a game we have never seen takes a fence before any runtime record exists,
-- and the record may never exist at all (the start can fail). The fence must
-- outlive every record state, so it gets its own row, created on first use by
-- `insert … on conflict do update set fence = game_fences.fence + 1`.
create table game_fences
(
    game_id text primary key,
    -- The first fence handed out is 1, so 0 can mean "never fenced" elsewhere.
    fence   bigint not null check (fence > 0)
);

-- What the manager believes runs for each game: one row per game, created by
-- the first successful start and updated in the same transaction as the
-- operation-log entry that changed it.
create table runtime_records
(
    game_id              text primary key,

    -- A text column with a check rather than a Postgres enum: adding a status
    -- to an enum type cannot run inside a transaction on older servers and is
    -- awkward to roll back, while a check constraint is replaced in one
    -- migration. The values are the wire names of `RuntimeStatus`.
    status               text        not null
        check (status in ('running', 'stopped', 'removed')),

    -- The image the game runs, or ran last, exactly as the lobby sent it.
    -- Deliberately *not* `check (current_image_ref <> '')`: the original Go
    -- service treats an empty image as an `internal` error at read time
    -- (SPEC §3 step 3), and the adapter reports such a row as corrupt with a
    -- clear message instead of refusing the hand edit that produced it.
    current_image_ref    text        not null,

    -- Docker's id of the game's container. Null once removed, or after a
    -- start that failed before a container existed.
    current_container_id text,

    -- The container's address on `RTM_DOCKER_NETWORK` while it runs, so the
    -- lobby can route players.
    address              text,

    -- The host directory bind-mounted into the container; it survives every
    -- container replacement and even `remove`.
    state_dir            text        not null,

    -- The fence of the operation that wrote this row last (0 if written
    -- without one). Kept for operators: "which operation owns this state?".
    -- The check itself is made against `game_fences`, not against this value.
    fence                bigint      not null,

    created_at           timestamptz not null default now(),
    -- Set explicitly by every upsert (the adapter writes `updated_at = now()`)
    -- rather than by a trigger: the only writer is one statement.
    updated_at           timestamptz not null default now(),

    -- The shape of `RuntimeState`: a running game always has a container, a
    -- removed one never does. A row that breaks these cannot even be written,
    -- so the adapter never has to guess what it meant.
    constraint runtime_records_running_has_container
        check (status <> 'running' or current_container_id is not null),
    constraint runtime_records_removed_has_no_container
        check (status <> 'removed' or current_container_id is null)
);

-- "Which games are running?" is the dashboard's and the reconciler's question.
create index runtime_records_status on runtime_records (status);
