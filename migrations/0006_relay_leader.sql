-- Which worker's outbox relay publishes. One relay at a time keeps each
-- game's events in write order across any number of workers.
--
-- A lease rather than a session advisory lock: a paused or partitioned
-- leader keeps its database session (and a session lock) alive, stalling
-- every event; a lease runs out on the database's clock and another worker
-- takes over. The holder renews it on every pass and stops publishing once
-- its own view of the lease has run out.
create table relay_leader
(
    -- A single row.
    id         boolean primary key default true
        constraint relay_leader_single_row check (id),
    -- A random id per relay (per worker process).
    holder     uuid        not null,
    expires_at timestamptz not null
);
