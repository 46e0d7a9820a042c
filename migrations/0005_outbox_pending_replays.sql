-- A duplicate of a finished command gets its stored outcome published again
-- (SPEC §10). Clearing `sent_at` alone is not enough: when the original
-- publication has not happened yet, or is in flight (read, not yet marked),
-- the two publications would merge into one. Each duplicate adds a replay;
-- each confirmed publication consumes the original or one replay, and the
-- row counts as sent once none is left.
alter table outbox
    add column pending_replays integer not null default 0
        constraint outbox_pending_replays_not_negative check (pending_replays >= 0);
