//! The Redis lease (SPEC §10) against a real Redis: each script's contract,
//! expiry, a race of acquirers, and an outage failing fast.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use rtmanager::config::SecretUrl;
use rtmanager::domain::GameId;
use rtmanager::outbound::redis_lease::RedisLeases;
use rtmanager::ports::{Acquired, LeaseHolder, LeaseStore};
use tokio::time::timeout;

use crate::harness::{redis_url, unique};

/// Bound on every Redis call a test makes.
const CALL: Duration = Duration::from_secs(10);
const TTL: Duration = Duration::from_secs(30);

/// A test's own key prefix, its adapter, and a raw connection to look at
/// the keys; every key under the prefix is deleted on drop (also when the
/// test panics).
struct Fixture {
    leases: RedisLeases,
    raw: MultiplexedConnection,
    prefix: String,
}

impl Fixture {
    async fn new() -> Self {
        let prefix = format!("{}:", unique("rtmtest"));
        let url = SecretUrl::new(redis_url());
        let leases = timeout(CALL, RedisLeases::connect(&url, &prefix))
            .await
            .expect("connect in time")
            .expect("connect to Redis");
        let raw = redis::Client::open(redis_url())
            .expect("Redis URL")
            .get_multiplexed_async_connection()
            .await
            .expect("raw connection to Redis");
        Self {
            leases,
            raw,
            prefix,
        }
    }

    fn game(&self) -> GameId {
        GameId::parse(&unique("g")).expect("game id")
    }

    async fn get(&self, game: &GameId) -> Option<String> {
        redis::cmd("GET")
            .arg(self.leases.key(game))
            .query_async(&mut self.raw.clone())
            .await
            .expect("GET")
    }

    /// Milliseconds left on the lease: -2 when the key is gone.
    async fn pttl(&self, game: &GameId) -> i64 {
        redis::cmd("PTTL")
            .arg(self.leases.key(game))
            .query_async(&mut self.raw.clone())
            .await
            .expect("PTTL")
    }

    async fn acquire(&self, game: &GameId, holder: &LeaseHolder, ttl: Duration) -> Acquired {
        timeout(CALL, self.leases.acquire(game, holder, ttl))
            .await
            .expect("acquire in time")
            .expect("acquire")
    }

    async fn renew(&self, game: &GameId, holder: &LeaseHolder, ttl: Duration) -> bool {
        timeout(CALL, self.leases.renew(game, holder, ttl))
            .await
            .expect("renew in time")
            .expect("renew")
    }

    async fn release(&self, game: &GameId, holder: &LeaseHolder) -> bool {
        timeout(CALL, self.leases.release(game, holder))
            .await
            .expect("release in time")
            .expect("release")
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let Ok(client) = redis::Client::open(redis_url()) else {
            return;
        };
        let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_secs(2)) else {
            return;
        };
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", self.prefix))
            .query(&mut conn)
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: redis::RedisResult<i64> = redis::cmd("DEL").arg(&keys).query(&mut conn);
        }
    }
}

#[tokio::test]
async fn acquire_on_a_free_lease_takes_it() {
    let fx = Fixture::new().await;
    let game = fx.game();
    let holder = LeaseHolder::new("cmd-1");

    assert_eq!(fx.acquire(&game, &holder, TTL).await, Acquired::Yes);

    assert_eq!(fx.leases.key(&game), format!("{}lease:{game}", fx.prefix));
    let stored = fx.get(&game).await.expect("the lease key is set");
    assert_eq!(stored, format!("cmd-1:{}", holder.token));
    assert_eq!(stored, holder.value());
    let pttl = fx.pttl(&game).await;
    assert!(pttl > 0 && pttl <= 30_000, "PTTL {pttl} within the TTL");
    assert_eq!(fx.leases.holder_of(&game).await, Ok(Some(stored)));
}

#[tokio::test]
async fn a_second_holder_learns_who_holds_it() {
    let fx = Fixture::new().await;
    let game = fx.game();
    let first = LeaseHolder::new("cmd-first");
    let second = LeaseHolder::new("cmd-second");
    assert_eq!(fx.acquire(&game, &first, TTL).await, Acquired::Yes);

    let answer = fx.acquire(&game, &second, TTL).await;

    let Acquired::HeldBy(value) = answer else {
        panic!("expected HeldBy, got {answer:?}");
    };
    assert_eq!(value, first.value());
    assert_eq!(LeaseHolder::command_of(&value), "cmd-first");
    assert_eq!(fx.get(&game).await, Some(first.value()), "lease untouched");
}

#[tokio::test]
async fn an_earlier_attempt_of_the_same_command_is_a_different_holder() {
    let fx = Fixture::new().await;
    let game = fx.game();
    let earlier = LeaseHolder::new("cmd-1");
    let retry = LeaseHolder::new("cmd-1");
    assert_eq!(fx.acquire(&game, &earlier, TTL).await, Acquired::Yes);

    let answer = fx.acquire(&game, &retry, TTL).await;

    assert_eq!(answer, Acquired::HeldBy(earlier.value()));
    assert_eq!(LeaseHolder::command_of(&earlier.value()), "cmd-1");
}

#[tokio::test]
async fn the_same_holder_may_acquire_again_and_refreshes_the_ttl() {
    let fx = Fixture::new().await;
    let game = fx.game();
    let holder = LeaseHolder::new("cmd-1");
    assert_eq!(
        fx.acquire(&game, &holder, Duration::from_secs(1)).await,
        Acquired::Yes
    );

    assert_eq!(
        fx.acquire(&game, &holder, Duration::from_secs(60)).await,
        Acquired::Yes
    );

    assert_eq!(fx.get(&game).await, Some(holder.value()));
    let pttl = fx.pttl(&game).await;
    assert!(pttl > 1_000 && pttl <= 60_000, "PTTL {pttl} refreshed");
}

#[tokio::test]
async fn renew_by_the_holder_extends_the_ttl() {
    let fx = Fixture::new().await;
    let game = fx.game();
    let holder = LeaseHolder::new("cmd-1");
    assert_eq!(
        fx.acquire(&game, &holder, Duration::from_secs(1)).await,
        Acquired::Yes
    );
    assert!(fx.pttl(&game).await <= 1_000);

    assert!(fx.renew(&game, &holder, Duration::from_secs(60)).await);

    let pttl = fx.pttl(&game).await;
    assert!(pttl > 1_000 && pttl <= 60_000, "PTTL {pttl} extended");
    assert_eq!(fx.get(&game).await, Some(holder.value()));
}

#[tokio::test]
async fn a_non_holder_can_neither_renew_nor_release() {
    let fx = Fixture::new().await;
    let game = fx.game();
    let holder = LeaseHolder::new("cmd-1");
    let other = LeaseHolder::new("cmd-2");
    assert_eq!(
        fx.acquire(&game, &holder, Duration::from_secs(5)).await,
        Acquired::Yes
    );

    assert!(!fx.renew(&game, &other, Duration::from_secs(60)).await);
    assert!(!fx.release(&game, &other).await);

    assert_eq!(fx.get(&game).await, Some(holder.value()), "lease untouched");
    let pttl = fx.pttl(&game).await;
    assert!(pttl > 0 && pttl <= 5_000, "PTTL {pttl} not extended");
}

#[tokio::test]
async fn release_by_the_holder_deletes_the_key() {
    let fx = Fixture::new().await;
    let game = fx.game();
    let holder = LeaseHolder::new("cmd-1");
    assert_eq!(fx.acquire(&game, &holder, TTL).await, Acquired::Yes);

    assert!(fx.release(&game, &holder).await);

    assert_eq!(fx.get(&game).await, None);
    assert_eq!(fx.pttl(&game).await, -2);
    assert_eq!(fx.leases.holder_of(&game).await, Ok(None));
    assert!(
        !fx.release(&game, &holder).await,
        "a second release is a no"
    );
    let next = LeaseHolder::new("cmd-2");
    assert_eq!(fx.acquire(&game, &next, TTL).await, Acquired::Yes);
}

#[tokio::test]
async fn a_lease_expires_after_its_ttl_and_cannot_be_renewed() {
    let fx = Fixture::new().await;
    let game = fx.game();
    let holder = LeaseHolder::new("cmd-1");
    assert_eq!(
        fx.acquire(&game, &holder, Duration::from_millis(300)).await,
        Acquired::Yes
    );

    tokio::time::sleep(Duration::from_millis(600)).await;

    assert_eq!(fx.get(&game).await, None, "expired");
    assert!(!fx.renew(&game, &holder, TTL).await);
    assert_eq!(fx.get(&game).await, None, "renew did not revive it");
    let next = LeaseHolder::new("cmd-2");
    assert_eq!(fx.acquire(&game, &next, TTL).await, Acquired::Yes);
    assert!(
        !fx.release(&game, &holder).await,
        "the old holder cannot free it"
    );
    assert_eq!(fx.get(&game).await, Some(next.value()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_one_of_many_concurrent_acquirers_wins() {
    let fx = Fixture::new().await;
    let game = fx.game();

    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let leases = fx.leases.clone();
            let game = game.clone();
            tokio::spawn(async move {
                let holder = LeaseHolder::new(&format!("cmd-{i}"));
                let answer = timeout(CALL, leases.acquire(&game, &holder, TTL))
                    .await
                    .expect("acquire in time")
                    .expect("acquire");
                (holder, answer)
            })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.expect("task"));
    }

    let winners: Vec<_> = answers
        .iter()
        .filter(|(_, answer)| *answer == Acquired::Yes)
        .map(|(holder, _)| holder.value())
        .collect();
    assert_eq!(winners.len(), 1, "exactly one winner: {winners:?}");
    let winner = &winners[0];
    for (_, answer) in &answers {
        if let Acquired::HeldBy(value) = answer {
            assert_eq!(value, winner, "every loser is told the winner");
        }
    }
    assert_eq!(fx.get(&game).await.as_ref(), Some(winner));
}

#[tokio::test]
async fn ping_answers_when_redis_is_up() {
    let fx = Fixture::new().await;
    assert_eq!(timeout(CALL, fx.leases.ping()).await, Ok(Ok(())));
}

#[tokio::test]
async fn an_unreachable_redis_is_an_error_not_a_hang() {
    // A port nothing listens on: bind one, then free it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let url = SecretUrl::new(format!("redis://:s3cret@127.0.0.1:{port}"));
    let game = GameId::parse("g-outage").expect("game id");
    let holder = LeaseHolder::new("cmd-1");
    let bound = Duration::from_secs(10);

    let connected = timeout(bound, RedisLeases::connect(&url, "rtmtest-outage:"))
        .await
        .expect("connect fails in time, not hangs");
    let error = connected.expect_err("nothing listens there");
    let message = format!("{error:#}");
    assert!(!message.contains("s3cret"), "password leaked: {message}");
    assert!(message.contains("127.0.0.1"), "names the server: {message}");

    let lazy = RedisLeases::connect_lazy(&url, "rtmtest-outage:").expect("lazy connect");
    let acquired = timeout(bound, lazy.acquire(&game, &holder, TTL))
        .await
        .expect("acquire fails in time, not hangs");
    let error = acquired.expect_err("nothing listens there");
    assert!(!error.to_string().contains("s3cret"), "password leaked");
    let renewed = timeout(bound, lazy.renew(&game, &holder, TTL)).await;
    assert!(matches!(renewed, Ok(Err(_))), "renew: {renewed:?}");
    let released = timeout(bound, lazy.release(&game, &holder)).await;
    assert!(matches!(released, Ok(Err(_))), "release: {released:?}");
    let pinged = timeout(bound, lazy.ping()).await;
    assert!(matches!(pinged, Ok(Err(_))), "ping: {pinged:?}");
}

#[tokio::test]
async fn a_redis_that_never_answers_is_an_error_not_a_hang() {
    // Accepts connections and reads nothing back, like a paused server.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("address").port();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let url = SecretUrl::new(format!("redis://127.0.0.1:{port}"));
    let bound = Duration::from_secs(15);

    let connected = timeout(bound, RedisLeases::connect(&url, "rtmtest-silent:"))
        .await
        .expect("connect fails in time, not hangs");
    assert!(connected.is_err(), "a silent server is not a connection");

    let lazy = RedisLeases::connect_lazy(&url, "rtmtest-silent:").expect("lazy connect");
    let game = GameId::parse("g-silent").expect("game id");
    let holder = LeaseHolder::new("cmd-1");
    let acquired = timeout(bound, lazy.acquire(&game, &holder, TTL))
        .await
        .expect("acquire fails in time, not hangs");
    assert!(acquired.is_err(), "acquire: {acquired:?}");
    silent.abort();
}
