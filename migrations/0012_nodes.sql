-- Several Docker hosts (SPEC §12): nodes, where each game lives, and the
-- routing question every command asks first.
--
-- Placement and routing ride on PostgreSQL, which every worker already
-- shares: no scheduler of our own to keep alive. A worker answers "where
-- does this command run?" with one call (`rtm_route`), before the inbox
-- claim, so a command for another node's game is forwarded to that node's
-- queue untouched and claimed there.

-- One row per node, upserted by its workers' heartbeat. `draining` is the
-- operator's (`rtmanager drain`), never touched by the heartbeat;
-- `max_games` is the node's `RTM_MAX_GAMES`, as its workers last said.
-- A node is live when seen within three heartbeats (the caller passes the
-- window: the heartbeat is a worker setting, not schema).
create table nodes
(
    name       text primary key,
    last_seen  timestamptz not null default now(),
    max_games  integer     not null check (max_games >= 0),
    draining   boolean     not null default false,
    created_at timestamptz not null default now()
);

-- The node whose engine ran the game's last operation that wrote the record
-- (null: written before nodes existed, or by a store that names no node;
-- such a game runs on whichever node takes its command, as before).
-- Written by `rtm_append` from the event's `node`, so the record and the
-- event it came with always agree.
alter table runtime_records
    add column node text;

-- Placement counts a node's running games on every placement.
create index runtime_records_node on runtime_records (node, status);

-- Where each game is placed: the decision for a `start` of an unknown or
-- removed game, recorded *before* the command is forwarded, so a duplicate
-- start (redelivered, or taken by another node's worker at the same time)
-- lands on the same node. A game keeps its placement for the rest of its
-- life (its state directory is on that node); a start after a `remove` is
-- placed afresh (its old node first, if it has room: its state is there).
-- Why a table and not only `runtime_records.node`: a game that was never
-- started has no record, and its record may never exist (the start can
-- fail), yet its placement must hold for the commands that follow.
create table placements
(
    game_id    text primary key,
    node       text        not null,
    -- The start that placed it: that start's copies find the same node.
    command_id text        not null,
    placed_at  timestamptz not null default now()
);

create index placements_node on placements (node, placed_at);

-- Where a command runs. Returns `{"kind": …, "node": …}`, kind one of:
--   node          run it on `node` (the caller runs it if that is itself,
--                 else forwards it there);
--   unknown_node  a start named a node that never registered;
--   draining      a start named a draining node;
--   full          a start named a node at its `max_games`;
--   no_room       no live, non-draining node below its `max_games`.
-- `node` is null for a game the call knows no node of (never placed, from
-- before nodes): the caller runs it itself.
--
-- Placements are serialized by one advisory lock (transaction scope): two
-- starts placed at once by two workers must not both pick the node with
-- one free slot, and a game's two copies must not get two placements. Only
-- the start of an unknown or removed game takes it; every other command
-- reads two rows by primary key.
create function rtm_route(
    p_game_id text,
    p_op text,
    p_command_id text,
    -- A start's explicit `node` (null: any).
    p_node text,
    -- How long ago a node must have been seen to be live.
    p_live interval
) returns jsonb
    language plpgsql as
$$
declare
    v_status      text;
    v_record_node text;
    v_updated     timestamptz;
    v_placed      text;
    v_placed_by   text;
    v_placed_at   timestamptz;
    v_draining    boolean;
    v_max         integer;
    v_chosen      text;
begin
    select r.status, r.node, r.updated_at
    into v_status, v_record_node, v_updated
    from runtime_records r
    where r.game_id = p_game_id;
    select p.node, p.command_id, p.placed_at
    into v_placed, v_placed_by, v_placed_at
    from placements p
    where p.game_id = p_game_id;
    -- A placement made before the game's removal belongs to its earlier life.
    if v_placed is not null and v_status = 'removed' and v_placed_at <= v_updated then
        v_placed := null;
    end if;

    -- The game lives somewhere: every command, a start included (noop,
    -- conflict, or a stopped game started again), runs there.
    if p_op <> 'start' or (v_status is not null and v_status <> 'removed') then
        return jsonb_build_object('kind', 'node', 'node', coalesce(v_placed, v_record_node));
    end if;

    -- A start of an unknown or removed game already placed: a copy of the
    -- start that placed it, or a later start (it runs after that one, where
    -- that one runs), unless it names another node.
    if v_placed is not null and (v_placed_by = p_command_id or p_node is null
        or p_node = v_placed) then
        return jsonb_build_object('kind', 'node', 'node', v_placed);
    end if;

    perform pg_advisory_xact_lock(hashtextextended('rtmanager.placement', 0));
    -- Read again under the lock: a copy of this start may have placed it.
    select p.node, p.command_id, p.placed_at
    into v_placed, v_placed_by, v_placed_at
    from placements p
    where p.game_id = p_game_id;
    if v_placed is not null and (v_status is null or v_status <> 'removed'
        or v_placed_at > v_updated) and (v_placed_by = p_command_id or p_node is null
        or p_node = v_placed) then
        return jsonb_build_object('kind', 'node', 'node', v_placed);
    end if;

    if p_node is not null then
        select n.draining, n.max_games into v_draining, v_max from nodes n where n.name = p_node;
        if not found then
            return jsonb_build_object('kind', 'unknown_node', 'node', p_node);
        elsif v_draining then
            return jsonb_build_object('kind', 'draining', 'node', p_node);
        elsif rtm_node_games(p_node) >= v_max then
            return jsonb_build_object('kind', 'full', 'node', p_node);
        end if;
        v_chosen := p_node;
    else
        -- The live, non-draining node with the fewest games below its limit;
        -- a removed game's old node first (its state directory is there).
        select n.name
        into v_chosen
        from nodes n
                 cross join lateral (select rtm_node_games(n.name) as games) g
        where n.last_seen > now() - p_live
          and not n.draining
          and g.games < n.max_games
        order by n.name is not distinct from v_record_node desc, g.games, n.name
        limit 1;
        if v_chosen is null then
            return jsonb_build_object('kind', 'no_room');
        end if;
    end if;

    insert into placements as p (game_id, node, command_id)
    values (p_game_id, v_chosen, p_command_id)
    on conflict (game_id) do update
        set node = excluded.node, command_id = excluded.command_id, placed_at = now();
    return jsonb_build_object('kind', 'node', 'node', v_chosen);
end
$$;

-- How many games a node holds, for placement: its running games, and the
-- games placed there whose start has not run yet (without them, 100 starts
-- placed at once would all see the same empty node). A placement whose
-- start never made a record (it failed) stops counting after two minutes,
-- so a failed start does not hold a slot for good.
create function rtm_node_games(p_node text) returns bigint
    language sql stable as
$$
select (select count(*) from runtime_records r where r.node = p_node and r.status = 'running')
     + (select count(*)
        from placements p
                 left join runtime_records r on r.game_id = p.game_id
        where p.node = p_node
          and p.placed_at > now() - interval '2 minutes'
          and (r.game_id is null or r.updated_at < p.placed_at))
$$;

-- `rtm_append` (0009) writes `runtime_records.node` from the event's `node`
-- (kept when an event names none). Otherwise unchanged.
create or replace function rtm_append(
    p_event_id uuid,
    -- The fence the write is checked against (null: unchecked) and the one
    -- it is written under (a lease holder's, else null).
    p_expected_fence bigint,
    p_held_fence bigint,
    -- Check first that no other attempt answered the command (an outer
    -- answer given without the lease).
    p_check_answered boolean,
    -- Mark the command finished with this event.
    p_answers_inbox boolean,
    -- Take the reply address from the command's inbox row (its outer
    -- event); else `p_reply_to`/`p_reply_correlation_id` as given.
    p_reply_from_inbox boolean,
    p_reply_to text,
    p_reply_correlation_id text,
    p_game_id text,
    p_op text,
    p_outer_op text,
    p_op_source text,
    p_reason text,
    p_correlation_id text,
    p_command_id text,
    p_image_ref text,
    p_previous_image_ref text,
    p_container_id text,
    p_address text,
    p_outcome text,
    p_error_code text,
    p_error_message text,
    p_noop boolean,
    p_rolled_back boolean,
    p_started_at timestamptz,
    p_finished_at timestamptz,
    p_routing_key text,
    p_payload jsonb,
    -- The record update, if any (`p_record_status` null: none).
    p_record_status text,
    p_record_image_ref text,
    p_record_container_id text,
    p_record_address text,
    p_record_state_dir text
) returns jsonb
    language plpgsql as
$$
declare
    v_operation_id bigint;
    v_payload      jsonb;
    v_fence        bigint;
    v_answered     uuid;
begin
    select o.operation_id, o.payload
    into v_operation_id, v_payload
    from outbox o
    where o.event_id = p_event_id;
    if v_operation_id is not null then
        return jsonb_build_object('kind', 'stored', 'operation_id', v_operation_id,
                                  'payload', v_payload);
    end if;

    -- Locked `for share` until commit: `advance_fence` (an upsert) waits for
    -- us, so either this write commits before a newer fence exists or it
    -- reads the newer fence here and writes nothing.
    if p_expected_fence is not null then
        select f.fence into v_fence from game_fences f where f.game_id = p_game_id for share;
        if v_fence is distinct from p_expected_fence then
            return jsonb_build_object('kind', 'fence_lost');
        end if;
    end if;

    -- After the fence row, in the order every append locks them.
    if p_check_answered then
        select i.outcome_event_id
        into v_answered
        from inbox i
        where i.command_id = p_command_id
            for update;
        if v_answered is not null then
            select o.operation_id, o.payload
            into v_operation_id, v_payload
            from outbox o
            where o.event_id = v_answered;
            return jsonb_build_object('kind', 'answered', 'operation_id', v_operation_id,
                                      'payload', v_payload, 'event_id', v_answered);
        end if;
    end if;

    insert into operation_log (game_id, op, outer_op, op_source, reason, correlation_id,
                               command_id, image_ref, previous_image_ref, container_id,
                               address, outcome, error_code, error_message, noop,
                               rolled_back, started_at, finished_at, fence)
    values (p_game_id, p_op, p_outer_op, p_op_source, p_reason, p_correlation_id,
            p_command_id, p_image_ref, p_previous_image_ref, p_container_id, p_address,
            p_outcome, p_error_code, p_error_message, p_noop, p_rolled_back, p_started_at,
            p_finished_at, p_held_fence)
    returning operation_id into v_operation_id;

    if p_reply_from_inbox then
        select i.reply_to, i.reply_correlation_id
        into p_reply_to, p_reply_correlation_id
        from inbox i
        where i.command_id = p_command_id;
    end if;

    insert into outbox (event_id, operation_id, game_id, routing_key, correlation_id,
                        payload, reply_to, reply_correlation_id)
    values (p_event_id, v_operation_id, p_game_id, p_routing_key, p_correlation_id,
            jsonb_set(p_payload, '{operation_id}', to_jsonb(v_operation_id)), p_reply_to,
            p_reply_correlation_id);

    if p_record_status is not null then
        insert into runtime_records as r (game_id, status, current_image_ref,
                                          current_container_id, address, state_dir, fence,
                                          node)
        values (p_game_id, p_record_status, p_record_image_ref, p_record_container_id,
                p_record_address, p_record_state_dir, coalesce(p_held_fence, 0),
                p_payload ->> 'node')
        on conflict (game_id) do update set
            status               = excluded.status,
            current_image_ref    = excluded.current_image_ref,
            current_container_id = excluded.current_container_id,
            address              = excluded.address,
            state_dir            = excluded.state_dir,
            fence                = coalesce(p_held_fence, r.fence),
            node                 = coalesce(excluded.node, r.node),
            updated_at           = now();
    end if;

    -- The first outcome stands: a duplicate gets that one. A command that
    -- never went through the inbox (tests, tools) gets its row here.
    if p_answers_inbox then
        insert into inbox as i (command_id, game_id, op, finished_at, outcome_event_id)
        values (p_command_id, p_game_id, p_op, now(), p_event_id)
        on conflict (command_id) do update set
            finished_at      = now(),
            outcome_event_id = excluded.outcome_event_id
        where i.outcome_event_id is null;
    end if;

    return jsonb_build_object('kind', 'appended', 'operation_id', v_operation_id);
end
$$;
