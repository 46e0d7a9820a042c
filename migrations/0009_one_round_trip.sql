-- One round trip per durable step (issue 11). A command answered without
-- Docker work used to pay ~23 round trips to the database; an append alone
-- was nine statements (read-back, fence check, log insert, reply_to lookup,
-- outbox insert, record upsert, inbox upsert, begin, commit). These two
-- functions run the same statements, in the same order and with the same
-- locks, inside the database: one call, one commit each.
--
-- Both are plpgsql and VOLATILE (the default): under READ COMMITTED every
-- statement in them takes a fresh snapshot, exactly as the statements did
-- when the adapter sent them one by one. That matters for `rtm_begin`: its
-- reads must see everything an earlier attempt committed while the fence
-- upsert waited for that attempt's `for share` lock, and a single statement
-- (a CTE) would read from a snapshot taken before the wait.
--
-- The adapter (`src/outbound/postgres/port.rs`) owns the meaning; these are
-- its statements moved, not new rules. Change them only with a new
-- migration (`create or replace`), never by editing this file.

-- An attempt's start, once it holds the game's lease: takes the game's next
-- fence (`RuntimeStore::advance_fence`), then, reading after it, the
-- command's inbox row (claiming it if missing, as `claim`), what earlier
-- attempts recorded (`progress`) and the game's record (`load`). Returns
-- one jsonb object; the adapter decodes it.
create function rtm_begin(
    p_game_id text,
    p_command_id text,
    p_claim_game_id text,
    p_op text,
    p_reply_to text,
    p_reply_correlation_id text,
    p_fingerprint text
) returns jsonb
    language plpgsql as
$$
declare
    v_fence   bigint;
    v_claimed boolean;
    v_result  jsonb;
begin
    -- The fence first: an earlier attempt can no longer write once it moved,
    -- so what is read below is all that attempt will ever have done.
    insert into game_fences as f (game_id, fence, command_id)
    values (p_game_id, 1, p_command_id)
    on conflict (game_id) do update
        set fence = f.fence + 1, command_id = excluded.command_id
    returning f.fence into v_fence;

    insert into inbox (command_id, game_id, op, reply_to, reply_correlation_id, fingerprint)
    values (p_command_id, p_claim_game_id, p_op, p_reply_to, p_reply_correlation_id,
            p_fingerprint)
    on conflict (command_id) do nothing;
    v_claimed := found;

    select jsonb_build_object(
                   'fence', v_fence,
                   'claimed', v_claimed,
                   'inbox', (select jsonb_build_object(
                                            'fingerprint', i.fingerprint,
                                            'op', i.op,
                                            'game_id', i.game_id,
                                            'outcome_event_id', i.outcome_event_id,
                                            'payload', o.payload)
                             from inbox i
                                      left join outbox o on o.event_id = i.outcome_event_id
                             where i.command_id = p_command_id),
                   -- `invalid_request` is answered before any lease, so it is
                   -- never a step of a run (see `progress`).
                   'entries', (select coalesce(jsonb_agg(jsonb_build_array(o.event_id, o.payload)
                                                         order by l.operation_id), '[]')
                               from operation_log l
                                        join outbox o on o.operation_id = l.operation_id
                               where l.command_id = p_command_id
                                 and l.error_code is distinct from 'invalid_request'),
                   'steps', (select coalesce(jsonb_agg(jsonb_build_array(j.step, j.detail)), '[]')
                             from operation_journal j
                             where j.command_id = p_command_id),
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
    into v_result;
    return v_result;
end
$$;

-- `RuntimeStore::append`'s transaction as one call. Returns
-- `{"kind": …, "operation_id": …, "payload": …}`, kind one of:
--   stored       a retry of a write that committed (its reply was lost):
--                its own row, found by the event id fixed per write;
--   fence_lost   the game's fence is no longer `p_expected_fence`: nothing
--                written;
--   answered     an answer given without the lease for a command another
--                attempt answered first: nothing written, that answer back;
--   appended     written; the payload is `p_payload` with `operation_id` set.
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
                                          current_container_id, address, state_dir, fence)
        values (p_game_id, p_record_status, p_record_image_ref, p_record_container_id,
                p_record_address, p_record_state_dir, coalesce(p_held_fence, 0))
        on conflict (game_id) do update set
            status               = excluded.status,
            current_image_ref    = excluded.current_image_ref,
            current_container_id = excluded.current_container_id,
            address              = excluded.address,
            state_dir            = excluded.state_dir,
            fence                = coalesce(p_held_fence, r.fence),
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
