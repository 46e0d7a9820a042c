//! The consumer over the real broker with a scripted handler: what a step
//! before the ack that cannot be done yet (the database is out) does to the
//! queue (issue 10, point 9). The handler fakes the outage, which the real
//! lifecycle cannot produce on demand; the broker is the real one.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::AMQPValue;
use lapin::{BasicProperties, Channel};
use rtmanager::config::SecretUrl;
use rtmanager::domain::{CommandRequest, OutcomeEvent};
use rtmanager::inbound::consumer::{CommandHandler, Consumer};
use rtmanager::lifecycle::{Handled, Interrupted};
use rtmanager::ports::{Admission, InboxClaim, Route, StoreError};
use rtmanager::readiness::Readiness;
use uuid::Uuid;

use crate::harness::{amqp_url, eventually, test_amqp, unique};

/// How long the fake database is out.
const OUTAGE: Duration = Duration::from_secs(3);

/// A handler whose outbox writes fail until `back`, as with PostgreSQL
/// down; every command is answered at once, game `dup`'s as a duplicate.
struct Flaky {
    back: Instant,
    event: OutcomeEvent,
    rejected_calls: AtomicU32,
    republish_calls: AtomicU32,
    /// Set once a republish was stored: the duplicate is acked next.
    republished: AtomicBool,
    handled: Mutex<Vec<(String, Instant)>>,
}

impl Flaky {
    fn outbox_write(&self, calls: &AtomicU32) -> Result<(), StoreError> {
        calls.fetch_add(1, Ordering::SeqCst);
        if Instant::now() < self.back {
            Err(StoreError::Unavailable(
                "PostgreSQL is down (scripted)".into(),
            ))
        } else {
            Ok(())
        }
    }

    fn handled(&self, command_id: &str) -> Vec<Instant> {
        let handled = self.handled.lock().unwrap();
        handled
            .iter()
            .filter(|(id, _)| id == command_id)
            .map(|(_, at)| *at)
            .collect()
    }
}

/// The handler the consumer holds, sharing its state with the test.
struct Scripted(Arc<Flaky>);

impl std::ops::Deref for Scripted {
    type Target = Flaky;

    fn deref(&self) -> &Flaky {
        &self.0
    }
}

impl CommandHandler for Scripted {
    fn handle(
        &self,
        request: CommandRequest,
        _claim: Option<InboxClaim>,
    ) -> BoxFuture<'_, Result<Handled, Interrupted>> {
        self.handled
            .lock()
            .unwrap()
            .push((request.command_id.clone(), Instant::now()));
        let handled = Handled {
            event: self.event.clone(),
            duplicate: request.game_id.as_deref() == Some("dup"),
        };
        Box::pin(async move { Ok(handled) })
    }

    fn fail_internal<'a>(
        &'a self,
        request: &'a CommandRequest,
        message: String,
    ) -> BoxFuture<'a, Result<Handled, Interrupted>> {
        no_internal_answers(request, &message)
    }

    fn append_rejected<'a>(&'a self, _: &'a OutcomeEvent) -> BoxFuture<'a, Result<(), StoreError>> {
        let result = self.outbox_write(&self.rejected_calls);
        Box::pin(async move { result })
    }

    fn republish(&self, _: Uuid) -> BoxFuture<'_, Result<(), StoreError>> {
        let result = self.outbox_write(&self.republish_calls);
        if result.is_ok() {
            self.republished.store(true, Ordering::SeqCst);
        }
        Box::pin(async move { result })
    }

    fn stop_operations(&self) {}
}

/// The test handlers answer nothing `internal`: a call is a bug in the test.
fn no_internal_answers(request: &CommandRequest, message: &str) -> ! {
    panic!(
        "{}: not expected to fail internal: {message}",
        request.command_id
    )
}

/// A consumer of `handler` on `amqp`'s private topology, consuming: its
/// shutdown trigger, its task, and a confirming channel to publish on.
async fn consuming(
    handler: impl CommandHandler,
    amqp: &rtmanager::config::AmqpConfig,
    url: &SecretUrl,
) -> (
    rtmanager::shutdown::Trigger,
    tokio::task::JoinHandle<()>,
    lapin::Connection,
    Channel,
) {
    let (trigger, shutdown) = rtmanager::shutdown::channel();
    let consumer = Consumer::new(
        handler,
        url.clone(),
        amqp.clone(),
        rtmanager::domain::NodeName::parse(crate::harness::TEST_NODE).unwrap(),
        Arc::new(Readiness::default()),
        Arc::new(tokio::sync::Notify::new()),
        shutdown,
    );
    let running = tokio::spawn(consumer.run(Duration::from_secs(10)));
    let conn = rtmanager::broker::connect(url, "consumer test")
        .await
        .unwrap();
    // Consuming, so the queue's binding (declared before) is in place too:
    // a command published before it would be dropped unrouted.
    eventually(Duration::from_secs(30), "the consumer", || async {
        crate::topology::declared_queue(&conn, &amqp.command_queue)
            .await
            .filter(|q| q.consumer_count() > 0)
    })
    .await;
    let channel = conn.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    (trigger, running, conn, channel)
}

async fn publish(channel: &Channel, exchange: &str, key: &str, body: &str) {
    channel
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

/// With the database out, an undecodable message waits for its
/// `runtime.rejected` event to be stored and a duplicate for its outcome
/// to be queued again — in-process, holding up no other command — and
/// neither is requeued: requeues counted toward the delivery limit, and
/// the broker dead-lettered the message with no reason and no event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_before_the_ack_wait_out_an_outage_without_requeue_or_blocking() {
    crate::harness::init_logs();
    let id = unique("consumer");
    let amqp = test_amqp(&id);
    let url = SecretUrl::new(amqp_url());
    let event: OutcomeEvent = serde_json::from_str(include_str!(
        "../fixtures/events/runtime.stop.success--noop.json"
    ))
    .unwrap();
    let flaky = Arc::new(Flaky {
        back: Instant::now() + OUTAGE,
        event,
        rejected_calls: AtomicU32::new(0),
        republish_calls: AtomicU32::new(0),
        republished: AtomicBool::new(false),
        handled: Mutex::new(Vec::new()),
    });
    let (trigger, running, conn, channel) = consuming(Scripted(flaky.clone()), &amqp, &url).await;
    let exchange = amqp.command_exchange.as_str();
    publish(
        &channel,
        exchange,
        "runtime.explode",
        r#"{"op":"explode","command_id":"bad-1"}"#,
    )
    .await;
    publish(
        &channel,
        exchange,
        "runtime.stop",
        r#"{"op":"stop","game_id":"dup","command_id":"dup-1","op_source":"lobby"}"#,
    )
    .await;
    publish(
        &channel,
        exchange,
        "runtime.stop",
        r#"{"op":"stop","game_id":"quick","command_id":"quick-1","op_source":"lobby"}"#,
    )
    .await;

    let dead = eventually(Duration::from_secs(30), "the dead letter", || async {
        channel
            .basic_get(
                amqp.dead_letter_queue.as_str().into(),
                BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
    })
    .await;
    let quick = flaky.handled("quick-1");
    assert_eq!(quick.len(), 1, "the other command ran once");
    assert!(
        quick[0] < flaky.back,
        "the other command waited for the outage to end"
    );
    let headers = dead
        .delivery
        .properties
        .headers()
        .clone()
        .unwrap_or_default();
    match headers.inner().get("x-rtm-reject-reason") {
        Some(AMQPValue::LongString(reason)) => {
            assert!(reason.to_string().contains("explode"), "{reason}");
        }
        other => panic!("dead-lettered without its reason: {other:?}"),
    }
    assert!(
        headers.inner().get("x-delivery-count").is_none(),
        "the message was requeued: {headers:?}"
    );
    assert!(flaky.rejected_calls.load(Ordering::SeqCst) >= 2, "retried");

    eventually(
        Duration::from_secs(30),
        "the duplicate's republish",
        || async {
            (flaky.republished.load(Ordering::SeqCst)
                && flaky.republish_calls.load(Ordering::SeqCst) >= 2)
                .then_some(())
        },
    )
    .await;
    trigger.fire();
    tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("the consumer stops")
        .unwrap();
    assert_eq!(
        flaky.handled("dup-1").len(),
        1,
        "the duplicate was not redelivered"
    );
    let left = crate::topology::declared_queue(&conn, &amqp.command_queue)
        .await
        .unwrap()
        .message_count();
    assert_eq!(left, 0, "everything was acked");
    crate::topology::delete_topology(amqp, url, Vec::new());
}

/// What [`Timeline`] saw, in order: `("admit" | "begin" | "end", command_id)`.
type Seen = Arc<Mutex<Vec<(&'static str, String)>>>;

/// A handler that takes its time over each command and notes when each
/// is admitted, begins and ends.
struct Timeline {
    seen: Seen,
    event: OutcomeEvent,
}

impl Timeline {
    fn note(&self, what: &'static str, request: &CommandRequest) {
        self.seen
            .lock()
            .unwrap()
            .push((what, request.command_id.clone()));
    }
}

impl CommandHandler for Timeline {
    fn handle(
        &self,
        request: CommandRequest,
        _claim: Option<InboxClaim>,
    ) -> BoxFuture<'_, Result<Handled, Interrupted>> {
        Box::pin(async move {
            self.note("begin", &request);
            tokio::time::sleep(Duration::from_millis(300)).await;
            self.note("end", &request);
            Ok(Handled {
                event: self.event.clone(),
                duplicate: false,
            })
        })
    }

    fn fail_internal<'a>(
        &'a self,
        request: &'a CommandRequest,
        message: String,
    ) -> BoxFuture<'a, Result<Handled, Interrupted>> {
        no_internal_answers(request, &message)
    }

    fn append_rejected<'a>(&'a self, _: &'a OutcomeEvent) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async { Ok(()) })
    }

    fn republish(&self, _: Uuid) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async { Ok(()) })
    }

    fn stop_operations(&self) {}

    fn admit<'a>(
        &'a self,
        request: &'a CommandRequest,
    ) -> BoxFuture<'a, Result<Admission, StoreError>> {
        self.note("admit", request);
        Box::pin(async {
            Ok(Admission {
                route: Route::Here,
                claim: None,
            })
        })
    }
}

/// A game's next command is admitted while the one before it runs (its
/// round trip leaves the path a busy game's commands take one after
/// another), but only once that one is admitted, and never a `start`,
/// whose route depends on what the commands before it leave; the commands
/// still run one at a time, in the order published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_games_next_command_is_admitted_while_the_one_before_runs_but_a_start_waits_its_turn() {
    crate::harness::init_logs();
    let id = unique("lookahead");
    let amqp = test_amqp(&id);
    let url = SecretUrl::new(amqp_url());
    let event: OutcomeEvent = serde_json::from_str(include_str!(
        "../fixtures/events/runtime.stop.success--noop.json"
    ))
    .unwrap();
    let seen = Seen::default();
    let (trigger, running, _conn, channel) = consuming(
        Timeline {
            seen: seen.clone(),
            event,
        },
        &amqp,
        &url,
    )
    .await;
    // w0 runs while the others arrive, so they wait in the game's lane.
    let commands = [
        ("w0", "stop", ""),
        ("p1", "patch", r#","image_ref":"rtm-test/engine:1.4.3""#),
        ("s2", "stop", ""),
        ("t3", "start", r#","image_ref":"rtm-test/engine:1.4.2""#),
        ("p4", "patch", r#","image_ref":"rtm-test/engine:1.4.3""#),
    ];
    for (command_id, op, extra) in commands {
        let body = format!(
            r#"{{"op":"{op}","game_id":"g","command_id":"{command_id}","op_source":"lobby"{extra}}}"#
        );
        publish(
            &channel,
            amqp.command_exchange.as_str(),
            &format!("runtime.{op}"),
            &body,
        )
        .await;
    }
    eventually(Duration::from_secs(30), "all five commands", || async {
        let done = seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(w, _)| *w == "end")
            .count();
        (done == 5).then_some(())
    })
    .await;
    trigger.fire();
    tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("the consumer stops")
        .unwrap();

    let seen = seen.lock().unwrap().clone();
    let at = |what: &str, command_id: &str| {
        seen.iter()
            .position(|(w, id)| *w == what && id == command_id)
            .unwrap_or_else(|| panic!("no {what} of {command_id} in {seen:?}"))
    };
    let runs: Vec<&str> = seen
        .iter()
        .filter(|(w, _)| *w == "begin")
        .map(|(_, id)| id.as_str())
        .collect();
    assert_eq!(runs, ["w0", "p1", "s2", "t3", "p4"], "in order: {seen:?}");
    for (before, after) in [("w0", "p1"), ("p1", "s2"), ("s2", "t3"), ("t3", "p4")] {
        assert!(
            at("end", before) < at("begin", after),
            "{after} began before {before} ended: {seen:?}"
        );
    }
    assert!(
        at("admit", "s2") < at("end", "p1"),
        "the stop was not admitted ahead, while the patch before it ran: {seen:?}"
    );
    assert!(
        at("admit", "p1") < at("admit", "s2"),
        "admitted before the command ahead of it: {seen:?}"
    );
    assert!(
        at("admit", "t3") > at("end", "s2"),
        "the start was admitted ahead of its turn: {seen:?}"
    );
    assert!(
        at("admit", "p4") < at("end", "t3"),
        "the patch after the start was not admitted ahead: {seen:?}"
    );
    crate::topology::delete_topology(amqp, url, Vec::new());
}
