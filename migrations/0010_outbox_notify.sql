-- Wakes the relay as soon as an event can be published (issue 11). The
-- relay used to find other workers' events only by polling every 500 ms, and
-- its own worker's only once a whole command ended, so a patch's inner
-- events waited for its outer one.
--
-- NOTIFY is transactional: the notification is delivered when the writing
-- transaction commits, never before, so a woken relay always finds the row.
-- Notifications with the same payload in one transaction are folded into
-- one. The payload is empty: the relay reads the outbox in `seq` order
-- whatever woke it, so a missed or merged notification loses nothing (and
-- its poll still runs).

create function rtm_outbox_notify() returns trigger
    language plpgsql as
$$
begin
    perform pg_notify('rtm_outbox', '');
    return null;
end
$$;

-- Every insert is an unsent event.
create trigger outbox_written
    after insert
    on outbox
    for each statement
execute function rtm_outbox_notify();

-- An event queued to be published again (a duplicate's republish sets
-- `sent_at` back to null); the relay's own marks set it and notify nothing.
create trigger outbox_requeued
    after update of sent_at
    on outbox
    for each row
    when (new.sent_at is null and old.sent_at is not null)
execute function rtm_outbox_notify();
