//! rtmanager — the Runtime Manager of the game platform.
//!
//! Every game runs its engine in one Docker container whose state lives in a
//! bind-mounted host directory. The lobby publishes lifecycle commands; this
//! crate runs them under a per-game lease, records every operation, and
//! publishes an outcome event for each.
//!
//! # Map
//!
//! - [`domain`]: the vocabulary — `GameId`, `ImageRef` and its semver rules,
//!   runtime records, operation entries, journal steps, commands, outcome
//!   events. No I/O.
//! - [`error`]: `ErrorCode`, the one list of stable wire codes.
//! - [`ports`]: the traits the domain owns — `RuntimeStore` (PostgreSQL),
//!   `LeaseStore` (Redis), `ContainerEngine` (Docker).
//! - [`lifecycle`]: one service per op (start, stop, restart, patch, remove),
//!   generic over the ports; callable without a broker. Holds the command
//!   gate (inbox, lease, fence), the operation journal and resume; its
//!   in-memory ports test every op rule without a service.
//! - [`messages`]: the wire command, decoded (or refused) at the boundary.
//! - [`inbound`]: the AMQP command consumer (`consumer/`: the session,
//!   per-game lanes, the attempt policy that decides ack, requeue or
//!   dead-letter, and dead-lettering) and HTTP (`/healthz`, `/readyz`,
//!   `/metrics`).
//! - [`outbound`]: the adapters — `postgres/` (split by client: the port,
//!   the outbox, the history, bootstrap), `redis_lease`, `docker` — and the
//!   outbox `relay` that publishes the events.
//! - [`broker`]: the RabbitMQ topology of SPEC §6 and the one confirmed
//!   publish every publisher uses.
//! - [`readiness`]: the dependency states `/readyz` reports, written by the
//!   probes, the consumer and the relay.
//! - [`reconciler`]: notices engines that stop without a command (SPEC
//!   §11): the engine's event stream and a periodic pass name games to
//!   look at; the look and its `exit` entry are the lifecycle's
//!   (`lifecycle/exit.rs`), under the game's lease and fence.
//! - [`pauses`]: the backoff of the loops that retry until shutdown.
//! - [`serve`]: wires it all and runs the worker until shutdown
//!   ([`shutdown`]); [`telemetry`]: logs and metric names; [`config`]: the
//!   typed settings, loaded once from the environment.
//! - [`cli`]: the operator commands (`send`, `status`, `log`, `migrate`).
//!
//! # The path of one command
//!
//! decode (wire → `CommandRequest`) → inbox claim → validate (→ `Command`) →
//! lease + fence → run the op (Docker steps, each checked against what Docker
//! reports; every step's entry + outbox event in one fenced transaction) →
//! outer entry (marks the inbox) → release the lease → ack; the relay then
//! publishes the outbox rows with publisher confirms.

pub mod broker;
pub mod cli;
pub mod config;
pub mod domain;
pub mod error;
pub mod inbound;
pub mod lifecycle;
pub mod messages;
pub mod outbound;
pub mod pauses;
pub mod ports;
pub mod readiness;
pub mod reconciler;
pub mod serve;
pub mod shutdown;
pub mod telemetry;
