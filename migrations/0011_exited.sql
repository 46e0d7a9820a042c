-- The reconciler (SPEC §11): an engine that stopped without a command.
--
-- `runtime_records.status` gains `exited`: the record of a game whose
-- engine crashed, was OOM-killed, or was stopped or removed behind the
-- manager's back. Like `stopped`, it may name the container Docker still
-- has, or none (the container is gone); the two shape checks of 0001 say
-- nothing about it, so they stay.
alter table runtime_records
    drop constraint runtime_records_status_check,
    add constraint runtime_records_status_check
        check (status in ('running', 'stopped', 'removed', 'exited'));

-- `operation_log.op` gains `exit`: the reconciler's entry for such an exit
-- (`op_source` `reconciler`, outcome `failure`, `engine_exited`). It is an
-- outer entry only, never a step of another op, so `outer_op` keeps its
-- five values.
alter table operation_log
    drop constraint operation_log_op_check,
    add constraint operation_log_op_check
        check (op in ('start', 'stop', 'restart', 'patch', 'remove', 'exit'));

-- "How many automatic restarts did this game have lately?" is asked before
-- every exit entry is written (`RTM_RESTART_ON_EXIT`): the reconciler's
-- restarts of a game, by time.
create index operation_log_auto_restarts on operation_log (game_id, started_at)
    where op = 'restart' and outer_op is null and op_source = 'reconciler';
