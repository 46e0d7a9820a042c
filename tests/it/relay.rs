//! The outbox relay against a real PostgreSQL database and RabbitMQ, driven
//! directly: events are written into the outbox, relays run on this test's
//! own exchanges, and the test reads what reached its queues.
//!
//! - A `nack` (a queue at its length limit with `reject-publish`) or a
//!   return (`mandatory`, nothing bound) leaves the event unsent and retried;
//!   only its game's later events wait, and each game's order holds.
//! - A leader paused past its `relay_leader` lease (its broker link frozen
//!   while it waits for a confirm) neither publishes behind the relay that
//!   took over nor, with its late mark, swallows a replay owed since.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rtmanager::config::SecretUrl;
use rtmanager::domain::OutcomeEvent;
use rtmanager::outbound::postgres::PgStore;
use rtmanager::outbound::relay::Relay;
use rtmanager::ports::RuntimeStore;
use rtmanager::readiness::Readiness;
use rtmanager::shutdown::{self, Trigger};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::harness::{TestDb, amqp_url, eventually};
use crate::topology::Topology;

const WAIT: Duration = Duration::from_secs(40);

/// One written outbox event.
#[derive(Debug, Clone)]
struct Written {
    id: Uuid,
    game: String,
}

/// A running relay and how to stop it.
struct Running {
    stop: Trigger,
    task: JoinHandle<()>,
}

impl Running {
    /// Stops the relay and waits for it: its last pass is over, so every
    /// publication it made has been confirmed (and so enqueued).
    async fn shutdown(self) {
        self.stop.fire();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("the relay stops")
            .expect("the relay task");
    }
}

struct RelayRig {
    topology: Topology,
    db: TestDb,
}

impl std::ops::Deref for RelayRig {
    type Target = Topology;

    fn deref(&self) -> &Topology {
        &self.topology
    }
}

impl std::ops::DerefMut for RelayRig {
    fn deref_mut(&mut self) -> &mut Topology {
        &mut self.topology
    }
}

impl RelayRig {
    async fn new() -> Self {
        crate::harness::init_logs();
        Self {
            topology: Topology::new().await,
            db: TestDb::new().await,
        }
    }

    fn store(&self) -> PgStore {
        PgStore::new(self.db.pool.clone())
    }

    /// Writes events in one transaction (the relay sees all or none), in
    /// the given order: `(game, routing key)` each.
    async fn write(&self, events: &[(&str, &str)]) -> Vec<Written> {
        let mut tx = self.db.pool.begin().await.unwrap();
        let mut written = Vec::new();
        for (n, (game, routing_key)) in events.iter().enumerate() {
            let id = Uuid::new_v4();
            sqlx::query(
                "insert into outbox (event_id, game_id, routing_key, correlation_id, payload)
                 values ($1, $2, $3, $4, $5)",
            )
            .bind(id)
            .bind(game)
            .bind(routing_key)
            .bind(format!("corr-{n}"))
            .bind(json!({"event_id": id, "game_id": game, "n": n}))
            .execute(&mut *tx)
            .await
            .unwrap();
            written.push(Written {
                id,
                game: (*game).to_owned(),
            });
        }
        tx.commit().await.unwrap();
        written
    }

    /// Makes `event` the outer event of a request/reply command answering
    /// to `queue`.
    async fn reply_to(&self, event: &Written, queue: &str) {
        sqlx::query(
            "update outbox set reply_to = $2, reply_correlation_id = 'req-1' where event_id = $1",
        )
        .bind(event.id)
        .bind(queue)
        .execute(&self.db.pool)
        .await
        .unwrap();
    }

    /// Two events each of games a and b, interleaved: a1, b1, a2, b2.
    async fn write_two_games(&self) -> Vec<Written> {
        self.write(&[
            ("a", "runtime.a.success"),
            ("b", "runtime.b.success"),
            ("a", "runtime.a.failure"),
            ("b", "runtime.b.failure"),
        ])
        .await
    }

    /// Whether each event is marked sent, in the order given.
    async fn sent(&self, events: &[&Written]) -> Vec<bool> {
        let mut sent = Vec::new();
        for event in events {
            let at: Option<chrono::DateTime<chrono::Utc>> =
                sqlx::query_scalar("select sent_at from outbox where event_id = $1")
                    .bind(event.id)
                    .fetch_one(&self.db.pool)
                    .await
                    .unwrap();
            sent.push(at.is_some());
        }
        sent
    }

    /// Drains `queue` into `seen` until `done(seen)` holds.
    async fn collect_until(
        &self,
        queue: &str,
        seen: &mut Vec<String>,
        what: &str,
        done: impl Fn(&[String]) -> bool,
    ) {
        let collected = RefCell::new(std::mem::take(seen));
        eventually(WAIT, what, || async {
            let more = self.drain(queue).await;
            let mut collected = collected.borrow_mut();
            collected.extend(more);
            done(&collected).then_some(())
        })
        .await;
        *seen = collected.into_inner();
    }

    async fn wait_sent(&self, events: &[&Written], what: &str) {
        eventually(WAIT, what, || async {
            self.sent(events)
                .await
                .iter()
                .all(|sent| *sent)
                .then_some(())
        })
        .await;
    }

    /// A relay on this test's database and exchanges, through `url`.
    fn spawn_relay(&self, url: &str) -> Running {
        let relay = Relay::new(
            self.store(),
            SecretUrl::new(url.to_owned()),
            self.amqp.clone(),
            Arc::new(Notify::new()),
            Arc::new(Readiness::default()),
        );
        Self::run(relay)
    }

    /// A relay woken by `wake` (its worker's store's), polling every `poll`.
    fn spawn_woken_relay(&self, wake: Arc<Notify>, poll: Duration) -> Running {
        let relay = Relay::new(
            self.store(),
            SecretUrl::new(amqp_url()),
            self.amqp.clone(),
            wake,
            Arc::new(Readiness::default()),
        )
        .with_poll(poll);
        Self::run(relay)
    }

    fn run(relay: Relay) -> Running {
        let (stop, signal) = shutdown::channel();
        Running {
            stop,
            task: tokio::spawn(relay.run(signal)),
        }
    }
}

/// Each game's events arrived in write order: once an event of a game was
/// seen, no earlier event of that game comes after it (a repeat of the same
/// event, a retry's, is fine). Ids not in `written` are ignored.
#[track_caller]
fn assert_per_game_order(seen: &[String], written: &[Written]) {
    let position: HashMap<String, (usize, &str)> = written
        .iter()
        .enumerate()
        .map(|(i, w)| (w.id.to_string(), (i, w.game.as_str())))
        .collect();
    let mut latest: HashMap<&str, usize> = HashMap::new();
    for id in seen {
        let Some(&(at, game)) = position.get(id) else {
            continue;
        };
        if let Some(&before) = latest.get(game) {
            assert!(
                at >= before,
                "game {game}: event #{at} arrived after event #{before}: {seen:?}"
            );
        }
        latest.insert(game, at);
    }
}

fn ids(events: &[&Written]) -> Vec<String> {
    events.iter().map(|e| e.id.to_string()).collect()
}

#[tokio::test]
async fn a_nacked_event_is_retried_unsent_and_only_its_games_later_events_wait() {
    let mut rig = RelayRig::new().await;
    let observer = rig.queue("observer", "#", None).await;
    // Game a's events also go to a queue of one message that refuses the
    // next (the broker nacks the publish); a filler makes it full.
    let limited = rig.queue("limited", "runtime.a.#", Some(1)).await;
    rig.put(&limited, b"filler").await;
    let written = rig.write_two_games().await;
    let [a1, b1, a2, b2] = [&written[0], &written[1], &written[2], &written[3]];
    let relay = rig.spawn_relay(&amqp_url());

    rig.wait_sent(
        &[b1, b2],
        "game b's events go out past game a's refused one",
    )
    .await;
    // The observer keeps its copy of each refused publish: a1 twice means
    // it was refused and tried again.
    let mut seen = Vec::new();
    let a1_id = a1.id.to_string();
    rig.collect_until(
        &observer,
        &mut seen,
        "the nacked event is published again",
        |seen| seen.iter().filter(|id| **id == a1_id).count() >= 2,
    )
    .await;
    assert_eq!(
        rig.sent(&[a1, a2]).await,
        [false, false],
        "a nacked event and the later one of its game stay unsent"
    );
    assert!(
        !seen.contains(&a2.id.to_string()),
        "a2 overtook the refused a1: {seen:?}"
    );

    // A consumer drains the full queue: the retries get through, in order.
    let mut took = Vec::new();
    rig.collect_until(
        &limited,
        &mut took,
        "game a's events reach the drained queue",
        |took| took.len() >= 3,
    )
    .await;
    let mut expected = vec!["filler".to_owned()];
    expected.extend(ids(&[a1, a2]));
    assert_eq!(
        took, expected,
        "the limited queue got a1 then a2, once each"
    );
    rig.wait_sent(&[a1, a2], "game a's events are marked sent once delivered")
        .await;

    relay.shutdown().await;
    seen.extend(rig.drain(&observer).await);
    assert_per_game_order(&seen, &written);
    for event in &written {
        assert!(seen.contains(&event.id.to_string()), "{event:?} never seen");
    }
}

/// Many games' events, more than one batch, interleaved unevenly: the
/// relay sends a wave of one event per game at a time, so every event
/// arrives exactly once and each game's in write order, however the
/// confirms of a wave interleave.
#[tokio::test]
async fn many_games_events_arrive_once_each_and_in_each_games_order() {
    let mut rig = RelayRig::new().await;
    let observer = rig.queue("observer", "#", None).await;
    let games = ["a", "b", "c", "d", "e", "f", "g"];
    // Game a writes most (a long one-game tail), the others fewer.
    let events: Vec<(&str, &str)> = (0..450)
        .map(|n| {
            let game = if n % 3 == 0 {
                "a"
            } else {
                games[n % games.len()]
            };
            (game, "runtime.stop.success")
        })
        .collect();
    let written = rig.write(&events).await;
    let relay = rig.spawn_relay(&amqp_url());
    let all: Vec<&Written> = written.iter().collect();
    rig.wait_sent(&all, "every event is marked sent").await;
    relay.shutdown().await;
    let mut seen = Vec::new();
    rig.collect_until(&observer, &mut seen, "every event arrives", |seen| {
        seen.len() >= written.len()
    })
    .await;
    assert_eq!(seen.len(), written.len(), "each event once: {seen:?}");
    for game in games {
        let expected: Vec<String> = written
            .iter()
            .filter(|w| w.game == game)
            .map(|w| w.id.to_string())
            .collect();
        let arrived: Vec<String> = seen
            .iter()
            .filter(|id| expected.contains(id))
            .cloned()
            .collect();
        assert_eq!(arrived, expected, "game {game}'s events in write order");
    }
}

/// An event written by a worker whose relay does not lead is published by
/// the leader at once, not at its next poll: the store wakes its own relay,
/// which passes the wake-up on (`NOTIFY rtm_outbox`) to the leader that
/// listens. Both relays poll only once a minute here, so within the wait
/// only the wake-up can get the event out.
#[tokio::test]
async fn a_followers_event_wakes_the_leader_without_a_poll() {
    const SLOW_POLL: Duration = Duration::from_secs(60);
    let mut rig = RelayRig::new().await;
    let observer = rig.queue("observer", "#", None).await;
    let leader = rig.spawn_woken_relay(Arc::new(Notify::new()), SLOW_POLL);
    eventually(WAIT, "the first relay leads and listens", || async {
        let (leaders, listening): (i64, i64) = sqlx::query_as(
            "select (select count(*) from relay_leader),
                    (select count(*) from pg_stat_activity
                     where datname = current_database() and query ilike 'listen%')",
        )
        .fetch_one(&rig.db.pool)
        .await
        .unwrap();
        (leaders == 1 && listening == 1).then_some(())
    })
    .await;
    let wake = Arc::new(Notify::new());
    let follower = rig.spawn_woken_relay(wake.clone(), SLOW_POLL);
    // Both first passes over: from here on only a wake-up makes a pass.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut event: OutcomeEvent = serde_json::from_str(include_str!(
        "../fixtures/events/runtime.stop.success--noop.json"
    ))
    .unwrap();
    event.event_id = Uuid::now_v7();
    rig.store()
        .notifying(wake)
        .append_rejected(&event)
        .await
        .unwrap();
    let id = event.event_id.to_string();
    let mut seen = Vec::new();
    rig.collect_until(
        &observer,
        &mut seen,
        "the follower's event, before any poll",
        |seen| seen.contains(&id),
    )
    .await;
    follower.shutdown().await;
    leader.shutdown().await;
}

#[tokio::test]
async fn an_unroutable_event_is_retried_unsent_until_a_queue_takes_it() {
    let mut rig = RelayRig::new().await;
    // Nothing is bound for game a's events yet: `mandatory` brings them back.
    let game_b = rig.queue("b", "runtime.b.#", None).await;
    let written = rig.write_two_games().await;
    let [a1, b1, a2, b2] = [&written[0], &written[1], &written[2], &written[3]];
    let relay = rig.spawn_relay(&amqp_url());

    // The relay walks the outbox in write order: b2 sent means a1 was
    // published before it, and came back.
    rig.wait_sent(
        &[b1, b2],
        "game b's events go out past game a's returned one",
    )
    .await;
    assert_eq!(
        rig.sent(&[a1, a2]).await,
        [false, false],
        "a returned (unroutable) event and the later one of its game stay unsent"
    );

    let late = rig.queue("late", "runtime.a.#", None).await;
    rig.wait_sent(&[a1, a2], "game a's events go out once a queue is bound")
        .await;
    relay.shutdown().await;
    assert_eq!(
        rig.drain(&late).await,
        ids(&[a1, a2]),
        "the late queue got a1 then a2, once each"
    );
    assert_eq!(rig.drain(&game_b).await, ids(&[b1, b2]));
}

#[tokio::test]
async fn a_refused_reply_is_not_retried_and_holds_nothing_up() {
    let mut rig = RelayRig::new().await;
    let observer = rig.queue("observer", "#", None).await;
    // The caller's reply queue is full and refuses the reply.
    let replies = rig.queue("replies", "replies.none", Some(1)).await;
    rig.put(&replies, b"filler").await;
    let written = rig.write_two_games().await;
    rig.reply_to(&written[0], &replies).await;
    let relay = rig.spawn_relay(&amqp_url());

    let all: Vec<&Written> = written.iter().collect();
    rig.wait_sent(&all, "every event goes out, the one whose reply failed too")
        .await;
    relay.shutdown().await;
    assert_eq!(
        rig.drain(&observer).await,
        ids(&all),
        "each event published once: a failed reply does not republish its event"
    );
    assert_eq!(
        rig.drain(&replies).await,
        ["filler"],
        "the reply was refused"
    );
}

/// A TCP proxy to the broker whose broker-to-client direction can be
/// frozen: a relay behind it keeps publishing into the broker but never
/// hears a confirm, as if its process were paused mid-publish.
struct FreezingProxy {
    port: u16,
    open: watch::Sender<bool>,
}

impl FreezingProxy {
    async fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (open, gate) = watch::channel(true);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                    continue;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                });
                let mut gate = gate.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match server_read.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if gate.wait_for(|open| *open).await.is_err()
                            || client_write.write_all(&buf[..n]).await.is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        Self { port, open }
    }

    fn url(&self) -> String {
        let base = amqp_url();
        let (scheme_auth, rest) = base.rsplit_once('@').expect("user@host in RTM_AMQP_URL");
        let vhost = rest.split_once('/').map(|(_, v)| v).unwrap_or("%2f");
        format!("{scheme_auth}@127.0.0.1:{}/{vhost}", self.port)
    }

    fn freeze(&self) {
        self.open.send_replace(false);
    }

    fn thaw(&self) {
        self.open.send_replace(true);
    }
}

/// The broker port of `RTM_AMQP_URL`.
fn broker_port() -> u16 {
    let base = amqp_url();
    let host = base.rsplit_once('@').map(|(_, h)| h).unwrap_or(&base);
    let host = host.split('/').next().unwrap_or(host);
    host.rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or(5672)
}

#[tokio::test]
async fn a_paused_relay_leader_that_lost_its_lease_neither_reorders_nor_marks_late() {
    let mut rig = RelayRig::new().await;
    let observer = rig.queue("observer", "#", None).await;
    let proxy = FreezingProxy::start(broker_port()).await;

    // Relay A leads and has a working link (its first event confirmed).
    let leader = rig.spawn_relay(&proxy.url());
    let warmup = rig.write(&[("w", "runtime.w.success")]).await;
    rig.wait_sent(&[&warmup[0]], "relay A publishes").await;
    assert_eq!(rig.drain(&observer).await, ids(&[&warmup[0]]));

    // A publishes e1 and waits for a confirm that does not come: paused.
    proxy.freeze();
    let written = rig
        .write(&[
            ("g", "runtime.g.one"),
            ("g", "runtime.g.two"),
            ("g", "runtime.g.three"),
        ])
        .await;
    let [e1, e2, e3] = [&written[0], &written[1], &written[2]];
    let mut seen = Vec::new();
    rig.collect_until(
        &observer,
        &mut seen,
        "paused relay A has published e1",
        |seen| !seen.is_empty(),
    )
    .await;
    assert_eq!(seen, ids(&[e1]), "A got no further than e1");
    assert_eq!(rig.sent(&[e1]).await, [false], "A cannot mark e1 yet");

    // Relay B takes over once A's lease runs out, and publishes everything.
    let taker = rig.spawn_relay(&amqp_url());
    rig.wait_sent(&[e1, e2, e3], "relay B takes over and publishes")
        .await;
    taker.shutdown().await;
    seen.extend(rig.drain(&observer).await);
    assert_eq!(
        seen,
        ids(&[e1, e1, e2, e3]),
        "B republished e1, then the rest"
    );

    // A duplicate of e1's command asks for e1 once more while A is still
    // paused; then A wakes up, gets e1's confirm, and marks it: that late
    // mark must not count as the replay, nor may A go on publishing e2, e3
    // behind B.
    rig.store().republish(e1.id).await.unwrap();
    proxy.thaw();
    rig.wait_sent(&[e1], "the replay of e1 is published").await;
    leader.shutdown().await;
    let after = rig.drain(&observer).await;
    assert_eq!(
        after,
        ids(&[e1]),
        "after waking, only the replay of e1 went out (A published nothing late)"
    );
}
