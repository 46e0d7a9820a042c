-- Exactly-once effects over at-least-once messaging (SPEC §10).
--
-- * The outbox makes "record the outcome" and "publish the outcome" one
--   decision: the event is written in the transaction of its log entry, and a
--   relay publishes it later (with publisher confirms) and marks it sent. A
--   broker outage delays events; it cannot drop them.
-- * The inbox makes a command take effect once: its command_id is claimed
--   before the lease, and its outer outcome is stored with it, so a duplicate
--   delivery gets the stored outcome (same event_id) instead of running again.

create table outbox
(
    -- Fixed by the writer before the transaction (`OutcomeEvent.event_id`),
    -- published as the AMQP `message_id`: a relay retry or a duplicate
    -- command republishes the same id, so consumers can deduplicate.
    event_id             uuid primary key,

    -- Publish order. Events of one game are written one after another (the
    -- lease and the fence serialize a game's writers), so ordering the
    -- unsent rows by `seq` publishes each game's events in the order their
    -- entries were written. A sequence value is taken at insert, not at
    -- commit, so across *different* games a lower seq may become visible
    -- after a higher one; it is then simply published on the relay's next
    -- pass. Nothing is skipped, because the relay selects on `sent_at is
    -- null`, never on "seq greater than the last one I saw".
    seq                  bigserial   not null unique,

    -- The entry this event reports; null only for a `runtime.rejected` event
    -- (a message that could not be decoded has no log entry). Unique: one
    -- event per entry. The unique index also serves the history join.
    operation_id         bigint unique references operation_log (operation_id),

    -- Copies of payload fields, for the relay and for operators' queries.
    game_id              text        not null,
    routing_key          text        not null,
    correlation_id       text        not null,

    -- The `OutcomeEvent` exactly as serde_json serializes it: the relay
    -- publishes these bytes' meaning unchanged, and a duplicate command
    -- replays it. `jsonb` so operators can query into it.
    payload              jsonb       not null,

    -- For the outer event of a request/reply command: the caller's queue and
    -- its AMQP correlation_id, copied from the inbox at write time.
    reply_to             text,
    reply_correlation_id text,

    created_at           timestamptz not null default now(),
    -- Null until the broker confirmed the publish.
    sent_at              timestamptz
);

-- The relay's only query: "the oldest unsent events". A partial index stays as
-- small as the backlog, however long the table grows.
create index outbox_unsent on outbox (seq) where sent_at is null;

create table inbox
(
    -- The idempotency key: the command's `command_id`, else the AMQP
    -- `message_id` (SPEC §6).
    command_id           text primary key,

    -- As sent, for operators (empty when the command had none): the claim is
    -- taken before validation.
    game_id              text        not null,
    op                   text        not null,

    -- Where a request/reply caller wants the outer outcome.
    reply_to             text,
    reply_correlation_id text,

    received_at          timestamptz not null default now(),
    -- Set with `outcome_event_id`, in the transaction of the outer entry.
    finished_at          timestamptz,
    -- The outer outcome, replayed as is to a duplicate of a finished command.
    outcome_event_id     uuid references outbox (event_id),

    -- Finished means "has its outcome", and nothing else.
    constraint inbox_finished_has_outcome
        check ((finished_at is null) = (outcome_event_id is null))
);
