-- One commit for a patch its record refuses (issue 11).
--
-- Every command under the lease took its fence (`rtm_begin`, a commit) and
-- then wrote its outcome (`rtm_append`, a second commit). For a command
-- answered from the record alone, with no Docker step in between, the
-- first commit bought nothing but a round trip: on one busy game, the two
-- commits were three quarters of each command's time.
--
-- `rtm_peek` reads what `rtm_begin` would, without taking the fence: the
-- game's fence, whether the command that took it has its outcome
-- (`settled`: then no attempt can write under that fence any more, so the
-- record read is the one the game keeps until a newer fence is taken),
-- whether this command has an earlier attempt's entries or journal steps
-- to resume, and the record. An answer decided from it is written by
-- `rtm_append` with `p_take_fence`: the write takes the next fence itself,
-- only if the fence is still the one read, so nothing that took the game
-- in between is overwritten or overlooked: the write is then refused
-- (`fence_lost`), and the attempt takes its fence as any other and
-- decides again. A write under a taken fence checks, as one without the
-- lease does, that no other attempt answered the command first.
--
-- plpgsql with `select … into`: as an SQL function, or as plpgsql's
-- `return (select …)`, PostgreSQL planned the query at every call, which
-- made this read cost 0.38 ms against 0.12 ms (pgbench, one client).
create function rtm_peek(p_game_id text, p_command_id text) returns jsonb
    language plpgsql stable as
$$
declare
    v_result jsonb;
begin
    select jsonb_build_object(
                   'fence', coalesce(f.fence, 0),
                   'settled', case
                                  when f.command_id is null then coalesce(f.fence, 0) = 0
                                  else exists (select 1
                                               from inbox i
                                               where i.command_id = f.command_id
                                                 and i.outcome_event_id is not null)
                       end,
                   -- As `rtm_begin`'s progress: `invalid_request` is never a
                   -- step of a run.
                   'progress', exists (select 1
                                       from operation_log l
                                       where l.command_id = p_command_id
                                         and l.error_code is distinct from 'invalid_request')
                       or exists (select 1 from operation_journal j where j.command_id = p_command_id),
                   'record', (select jsonb_build_object(
                                             'status', r.status,
                                             'current_image_ref', r.current_image_ref,
                                             'current_container_id', r.current_container_id,
                                             'address', r.address,
                                             'state_dir', r.state_dir,
                                             'fence', r.fence,
                                             'created_at', r.created_at,
                                             'updated_at', r.updated_at)
                              from runtime_records r
                              where r.game_id = p_game_id))
    into v_result
    from (select 1) as one
             left join game_fences f on f.game_id = p_game_id;
    return v_result;
end
$$;

-- `rtm_append` (0012) with `p_take_fence` added last, with a default, so a
-- worker of the previous build still calls it with the arguments it knows.
-- Otherwise unchanged.
drop function rtm_append(uuid, bigint, bigint, boolean, boolean, boolean, text, text, text,
                         text, text, text, text, text, text, text, text, text, text, text,
                         text, text, boolean, boolean, timestamptz, timestamptz, text, jsonb,
                         text, text, text, text, text);

create function rtm_append(
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
    p_record_state_dir text,
    -- `WriteFence::Take`: `p_expected_fence` is the fence the attempt read
    -- (`rtm_peek`), and the write takes the next one itself, if the game's
    -- fence is still that one; `p_held_fence` is then ignored.
    p_take_fence boolean default false
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

    -- Taking the fence here locks its row until commit, as `rtm_begin`'s
    -- upsert does; the check below then finds the fence just taken.
    if p_take_fence then
        update game_fences f
        set fence = f.fence + 1, command_id = p_command_id
        where f.game_id = p_game_id and f.fence = p_expected_fence
        returning f.fence into p_held_fence;
        if not found and p_expected_fence = 0 then
            -- Never read nor taken: no row yet.
            insert into game_fences (game_id, fence, command_id)
            values (p_game_id, 1, p_command_id)
            on conflict (game_id) do nothing
            returning fence into p_held_fence;
        end if;
        if p_held_fence is null then
            return jsonb_build_object('kind', 'fence_lost');
        end if;
        p_expected_fence := p_held_fence;
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

-- The relay's mark (issue 11), as `PgStore::mark` made it, with the commit
-- not waiting for the WAL flush (`synchronous_commit` off for this
-- transaction only). A mark lost in a database crash only republishes its
-- events with the same event_ids (delivery is at-least-once, and a
-- consumer drops a repeated event_id); it is never the fence, an entry, an
-- outcome or a claim, whose commits still wait. On one busy game the relay
-- marked about one event per pass, a flush per command beside the
-- command's own: the two waited on each other's.
create function rtm_mark_sent(p_event_ids uuid[], p_holder uuid) returns bigint
    language plpgsql as
$$
declare
    v_marked bigint;
begin
    perform set_config('synchronous_commit', 'off', true);
    update outbox
    set sent_at         = case when pending_replays = 0 then now() end,
        pending_replays = greatest(pending_replays - 1, 0)
    where event_id = any (p_event_ids)
      and sent_at is null
      and (p_holder is null
        or exists (select 1 from relay_leader where holder = p_holder));
    get diagnostics v_marked = row_count;
    return v_marked;
end
$$;
