-- One round trip to admit a command (issue 11): where it runs and, when it
-- runs here, its inbox claim.
--
-- Every command asked `rtm_route` and then claimed its command_id in the
-- inbox, two statements back to back on the path of every command. A
-- rejected patch is three committing statements and this one more; the
-- round trip, the worker's wake-up and PostgreSQL's per-statement work of
-- that extra call were a fifth of the control plane's cost.
--
-- `rtm_admit` routes exactly as `rtm_route` does (it calls it, so placement
-- stays in one place) and then, unless the command is forwarded to another
-- node (which claims it there), inserts the inbox row in the same
-- transaction. A command refused placement is answered here, so it is
-- claimed here too. The answer carries the route, whether this call
-- claimed the command, and when it did not, the inbox row (with the stored
-- outcome's payload) the adapter turns into the claim, as `rtm_begin` does.
create function rtm_admit(
    p_game_id text,
    p_op text,
    p_command_id text,
    p_node text,
    p_live interval,
    p_me text,
    p_claim_game_id text,
    p_reply_to text,
    p_reply_correlation_id text,
    p_fingerprint text
) returns jsonb
    language plpgsql as
$$
declare
    v_route   jsonb;
    v_claimed boolean;
begin
    v_route := rtm_route(p_game_id, p_op, p_command_id, p_node, p_live);
    if v_route ->> 'kind' = 'node' and v_route ->> 'node' is distinct from p_me
        and v_route ->> 'node' is not null then
        return jsonb_build_object('route', v_route);
    end if;

    insert into inbox (command_id, game_id, op, reply_to, reply_correlation_id, fingerprint)
    values (p_command_id, p_claim_game_id, p_op, p_reply_to, p_reply_correlation_id,
            p_fingerprint)
    on conflict (command_id) do nothing;
    v_claimed := found;

    return jsonb_build_object(
            'route', v_route,
            'claimed', v_claimed,
            'inbox', case
                         when not v_claimed then
                             (select jsonb_build_object(
                                             'fingerprint', i.fingerprint,
                                             'op', i.op,
                                             'game_id', i.game_id,
                                             'outcome_event_id', i.outcome_event_id,
                                             'payload', o.payload)
                              from inbox i
                                       left join outbox o on o.event_id = i.outcome_event_id
                              where i.command_id = p_command_id)
                end);
end
$$;
