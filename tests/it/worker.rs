//! The worker end to end through RabbitMQ: `serve` runs in-process on this
//! test's own exchanges, queues, database, Redis prefix and container
//! prefix; the test talks to it only through the broker (and the CLI binary).

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, Consumer};
use rtmanager::broker;
use rtmanager::config::Config;
use rtmanager::domain::{GameId, OutcomeEvent};
use rtmanager::error::ErrorCode;
use rtmanager::outbound::docker::DockerEngine;
use rtmanager::ports::ContainerEngine;
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

use crate::docker_support::ContainerGuard;
use crate::harness::{
    TestDb, eventually, test_amqp, unique, wait_for_lease, worker_config, worker_env,
};
use crate::procs::free_port;
use crate::schema::assert_valid_event;

const WAIT: Duration = Duration::from_secs(60);

/// A published event as a consumer sees it.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub(crate) routing_key: String,
    pub(crate) body: Value,
    pub(crate) event: OutcomeEvent,
    pub(crate) correlation_property: Option<String>,
    pub(crate) message_id: Option<String>,
    pub(crate) kind: Option<String>,
}

pub(crate) struct WorkerRig {
    pub(crate) env: HashMap<String, String>,
    pub(crate) config: Config,
    channel: Channel,
    conn: Connection,
    events: Consumer,
    worker: Option<JoinHandle<anyhow::Result<()>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub(crate) state_root: TempDir,
    _containers: ContainerGuard,
    pub(crate) _db: TestDb,
}

impl WorkerRig {
    /// Everything but the worker: topology declared, event queue bound.
    pub(crate) async fn prepare() -> Self {
        Self::prepare_with(|_| {}).await
    }

    /// Like `prepare`, with the worker's environment edited first.
    pub(crate) async fn prepare_with(edit: impl FnOnce(&mut HashMap<String, String>)) -> Self {
        crate::harness::init_logs();
        let db = TestDb::new().await;
        let id = unique("t");
        let prefix = format!("{}-", unique("rtmt"));
        let containers = ContainerGuard::new(&prefix);
        let state_root = TempDir::new().unwrap();
        let mut env = worker_env(&db.url, &test_amqp(&id), &prefix, state_root.path());
        edit(&mut env);
        let config = worker_config(&env);

        // The test declares the topology too, so it can publish before the
        // worker is up, and binds its own event queue first: no event missed.
        let conn = broker::connect(&config.amqp_url, "rtmanager test")
            .await
            .unwrap();
        let channel = conn.create_channel().await.unwrap();
        broker::declare_topology(&channel, &config.amqp)
            .await
            .unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let events = Self::bind_events(&channel, &config, "runtime.#").await;

        Self {
            env,
            config,
            channel,
            conn,
            events,
            worker: None,
            stop: None,
            state_root,
            _containers: containers,
            _db: db,
        }
    }

    pub(crate) async fn start() -> Self {
        let mut rig = Self::prepare().await;
        rig.launch();
        rig
    }

    /// Runs `serve` in-process.
    pub(crate) fn launch(&mut self) {
        self.launch_with(|docker| docker);
    }

    /// Runs `serve` in-process over the engine `engine` makes of Docker.
    pub(crate) fn launch_with<E: ContainerEngine>(
        &mut self,
        engine: impl FnOnce(DockerEngine) -> E + Send + 'static,
    ) {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        self.worker = Some(tokio::spawn(rtmanager::serve::run_with(
            self.config.clone(),
            engine,
            async move {
                let _ = stop_rx.await;
            },
        )));
        self.stop = Some(stop_tx);
    }

    async fn bind_events(channel: &Channel, config: &Config, key: &str) -> Consumer {
        broker::subscribe_events(channel, &config.amqp.event_exchange, key)
            .await
            .expect("subscribe to the events")
    }

    pub(crate) fn game(&self) -> GameId {
        GameId::parse(&unique("g")).unwrap()
    }

    /// Publishes a raw body to the command exchange.
    async fn publish_raw(&self, routing_key: &str, body: &[u8], properties: BasicProperties) {
        let confirm = self
            .channel
            .basic_publish(
                self.config.amqp.command_exchange.as_str().into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                properties
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(
            matches!(confirm, lapin::Confirmation::Ack(None)),
            "{confirm:?}"
        );
    }

    /// Publishes a command; returns its command_id.
    pub(crate) async fn publish(&self, mut command: Value) -> String {
        let command_id = unique("cmd");
        if command.get("command_id").is_none() {
            command["command_id"] = json!(command_id);
        }
        if command.get("op_source").is_none() {
            command["op_source"] = json!("lobby");
        }
        let op = command["op"].as_str().unwrap().to_owned();
        let body = serde_json::to_vec(&command).unwrap();
        self.publish_raw(&format!("runtime.{op}"), &body, BasicProperties::default())
            .await;
        command["command_id"].as_str().unwrap().to_owned()
    }

    /// The next event on the test's queue, checked against the schema.
    pub(crate) async fn next_event(&mut self) -> Seen {
        next_event(&mut self.events).await
    }

    /// Events until the outer event of `command_id` (inclusive).
    pub(crate) async fn until_outer(&mut self, command_id: &str) -> Vec<Seen> {
        let mut seen = Vec::new();
        loop {
            let event = self.next_event().await;
            let done = event.event.command_id == command_id && event.event.outer_op.is_none();
            seen.push(event);
            if done {
                return seen;
            }
        }
    }

    pub(crate) async fn run(&mut self, command: Value) -> Vec<Seen> {
        let id = self.publish(command).await;
        self.until_outer(&id).await
    }

    async fn http_get(&self, path: &str) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(self.config.http_addr)
            .await
            .unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let status = response[9..12].parse().unwrap();
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    async fn queue_depth(&self, queue: &str) -> u32 {
        self.declared(queue)
            .await
            .expect("the queue exists")
            .message_count()
    }

    /// Consumers on `queue`, `None` while it does not exist.
    async fn consumers_on(&self, queue: &str) -> Option<u32> {
        Some(self.declared(queue).await?.consumer_count())
    }

    /// `queue` as the broker has it, `None` if it does not exist.
    async fn declared(&self, queue: &str) -> Option<lapin::Queue> {
        crate::topology::declared_queue(&self.conn, queue).await
    }

    /// Runs the real `rtmanager serve` binary with this rig's environment.
    fn spawn_binary(&self) -> std::process::Child {
        std::process::Command::new(env!("CARGO_BIN_EXE_rtmanager"))
            .arg("serve")
            .env_clear()
            .envs(&self.env)
            .env("PATH", std::env::var("PATH").unwrap())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start rtmanager serve")
    }

    /// The worker's leases, as Redis has them.
    pub(crate) async fn leases(&self) -> rtmanager::outbound::redis_lease::RedisLeases {
        rtmanager::outbound::redis_lease::RedisLeases::connect(
            &self.config.redis_url,
            &self.config.redis_prefix,
        )
        .await
        .unwrap()
    }

    pub(crate) fn boots(&self, game: &GameId) -> String {
        std::fs::read_to_string(self.state_root.path().join(game.as_str()).join("boots"))
            .unwrap_or_default()
    }

    /// Stops the worker gracefully and checks it exits cleanly.
    pub(crate) async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(worker) = self.worker.take() {
            tokio::time::timeout(WAIT, worker)
                .await
                .expect("the worker stops within a minute")
                .expect("the worker task")
                .expect("the worker exits cleanly");
        }
    }
}

impl Drop for WorkerRig {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        crate::topology::delete_topology(
            self.config.amqp.clone(),
            self.config.amqp_url.clone(),
            Vec::new(),
        );
    }
}

/// Sends SIGTERM to a worker process.
fn sigterm(worker: &std::process::Child) {
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
}

/// Waits for a worker process to exit; its exit code.
async fn exit_code(mut worker: std::process::Child) -> Option<i32> {
    tokio::task::spawn_blocking(move || worker.wait())
        .await
        .unwrap()
        .unwrap()
        .code()
}

async fn next_event(consumer: &mut Consumer) -> Seen {
    let delivery = tokio::time::timeout(WAIT, consumer.next())
        .await
        .expect("an event within a minute")
        .expect("the event stream is open")
        .expect("a delivery");
    let body: Value = serde_json::from_slice(&delivery.data).expect("an event is JSON");
    assert_valid_event(&body);
    let event: OutcomeEvent = serde_json::from_value(body.clone()).expect("an OutcomeEvent");
    let props = &delivery.properties;
    Seen {
        routing_key: delivery.routing_key.to_string(),
        body,
        event,
        correlation_property: props.correlation_id().as_ref().map(ToString::to_string),
        message_id: props.message_id().as_ref().map(ToString::to_string),
        kind: props.kind().as_ref().map(ToString::to_string),
    }
}

/// The broker's `x-delivery-count` of a delivery (absent on the first).
fn redeliveries(properties: &BasicProperties) -> u64 {
    match properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-delivery-count"))
    {
        None => 0,
        Some(AMQPValue::LongLongInt(n)) => u64::try_from(*n).unwrap(),
        Some(other) => panic!("x-delivery-count is {other:?}"),
    }
}

fn keys(events: &[Seen]) -> Vec<&str> {
    events.iter().map(|e| e.routing_key.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_then_patch_publishes_three_linked_events() {
    let mut rig = WorkerRig::start().await;
    let game = rig.game();
    let started = rig
        .run(json!({"op": "start", "game_id": game, "image_ref": "rtm-test/engine:1.4.2"}))
        .await;
    assert_eq!(keys(&started), ["runtime.start.success"]);
    assert!(
        started[0].event.address.is_some(),
        "the address is in the start event"
    );

    let patch = rig
        .run(
            json!({"op": "patch", "game_id": game, "new_image_ref": "rtm-test/engine:1.4.3",
                    "source_ref": "lobby-req-77"}),
        )
        .await;
    assert_eq!(
        keys(&patch),
        [
            "runtime.patch.stop.success",
            "runtime.patch.start.success",
            "runtime.patch.success"
        ]
    );
    for seen in &patch {
        assert_eq!(seen.event.correlation_id, "lobby-req-77");
        assert_eq!(seen.correlation_property.as_deref(), Some("lobby-req-77"));
        assert_eq!(
            seen.message_id.as_deref(),
            Some(seen.event.event_id.to_string().as_str())
        );
        assert_eq!(seen.kind.as_deref(), Some(seen.routing_key.as_str()));
    }
    let outer = &patch[2].body;
    assert_eq!(outer["op"], "patch");
    assert_eq!(outer["outer_op"], Value::Null);
    assert_eq!(outer["image_ref"], "rtm-test/engine:1.4.3");
    assert_eq!(outer["previous_image_ref"], "rtm-test/engine:1.4.2");
    assert_eq!(patch[0].body["outer_op"], "patch");
    assert_eq!(patch[0].body["reason"], "admin_request");
    assert_eq!(
        rig.boots(&game),
        "1.4.2\n1.4.3\n",
        "the engine's state survived"
    );

    let (status, ready) = rig.http_get("/readyz").await;
    assert_eq!(status, 200, "{ready}");
    for dep in ["broker", "database", "redis", "docker"] {
        assert!(ready.contains(&format!("\"{dep}\":\"up\"")), "{ready}");
    }
    let (status, metrics) = rig.http_get("/metrics").await;
    assert_eq!(status, 200);
    assert!(metrics.contains("rtmanager_operations_total"), "{metrics}");
    assert!(
        metrics.contains("rtmanager_lease_acquire_seconds"),
        "{metrics}"
    );
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_patch_has_one_event_and_leaves_the_game_alone() {
    let mut rig = WorkerRig::start().await;
    let game = rig.game();
    let started = rig
        .run(json!({"op": "start", "game_id": game, "image_ref": "rtm-test/engine:1.4.2"}))
        .await;
    let container = started[0].event.container_id.clone();

    let rejected = rig
        .run(json!({"op": "patch", "game_id": game, "new_image_ref": "rtm-test/engine:1.5.0"}))
        .await;
    assert_eq!(keys(&rejected), ["runtime.patch.failure"]);
    assert_eq!(rejected[0].body["error_code"], "semver_patch_only");

    // The game is untouched: a no-op start confirms the same container runs.
    let again = rig
        .run(json!({"op": "start", "game_id": game, "image_ref": "rtm-test/engine:1.4.2"}))
        .await;
    assert_eq!(
        keys(&again),
        ["runtime.start.success"],
        "and nothing else was published"
    );
    assert!(again[0].event.noop);
    assert_eq!(again[0].event.container_id, container);
    assert_eq!(rig.boots(&game), "1.4.2\n");
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_and_the_worker_lives_on() {
    let mut rig = WorkerRig::start().await;
    let big = format!(
        r#"{{"op":"start","pad":"{}"}}"#,
        "x".repeat(2 * 1024 * 1024)
    );
    let poison: [(&str, Vec<u8>); 5] = [
        ("invalid JSON", b"{\"op\": \"start\",".to_vec()),
        ("invalid UTF-8", b"\xff\xfe\xfd".to_vec()),
        ("a JSON array", b"[\"start\"]".to_vec()),
        (
            "an unknown op",
            br#"{"op":"explode","command_id":"poison-op","game_id":"g"}"#.to_vec(),
        ),
        ("a 2 MB body", big.into_bytes()),
    ];
    for (_, body) in &poison {
        rig.publish_raw("runtime.start", body, BasicProperties::default())
            .await;
    }
    // A good command behind them is still served.
    let game = rig.game();
    let ok = rig
        .run(json!({"op": "start", "game_id": game, "image_ref": "rtm-test/engine:1.4.2"}))
        .await;
    let outer = ok.last().unwrap();
    assert_eq!(outer.routing_key, "runtime.start.success");
    let rejected: Vec<_> = ok
        .iter()
        .filter(|e| e.routing_key == "runtime.rejected")
        .collect();
    assert_eq!(rejected.len(), 1, "{:?}", keys(&ok));
    assert_eq!(rejected[0].event.command_id, "poison-op");
    assert_eq!(rejected[0].body["op"], "explode");
    assert_eq!(rejected[0].body["error_code"], "invalid_request");

    let dlq = rig.config.amqp.dead_letter_queue.clone();
    let mut reasons = Vec::new();
    for _ in 0..poison.len() {
        let message = rig
            .channel
            .basic_get(dlq.as_str().into(), BasicGetOptions::default())
            .await
            .unwrap()
            .expect("a dead letter");
        let headers = message
            .delivery
            .properties
            .headers()
            .clone()
            .unwrap_or_default();
        let reason = match headers.inner().get("x-rtm-reject-reason") {
            Some(AMQPValue::LongString(s)) => s.to_string(),
            other => panic!("no reject reason header: {other:?}"),
        };
        reasons.push(reason);
        message
            .delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .unwrap();
    }
    let all = reasons.join("\n");
    for expected in ["not JSON", "not UTF-8", "array", "unknown", "64 KiB"] {
        assert!(all.contains(expected), "{expected:?} in {all}");
    }
    assert_eq!(
        rig.queue_depth(&rig.config.amqp.command_queue).await,
        0,
        "drained"
    );
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_to_receives_the_outer_event() {
    let rig = WorkerRig::start().await;
    let (reply, mut replies) = broker::private_queue(&rig.channel).await.unwrap();
    let game = rig.game();
    let body = json!({"command_id": "rpc-cmd", "op": "start", "game_id": game,
                      "image_ref": "rtm-test/engine:1.4.2", "op_source": "admin"});
    rig.publish_raw(
        "runtime.start",
        &serde_json::to_vec(&body).unwrap(),
        BasicProperties::default()
            .with_reply_to(reply.as_str().into())
            .with_correlation_id("rpc-1".into()),
    )
    .await;
    let answer = next_event(&mut replies).await;
    assert_eq!(answer.correlation_property.as_deref(), Some("rpc-1"));
    assert_eq!(answer.event.command_id, "rpc-cmd");
    assert_eq!(answer.event.op.as_deref(), Some("start"));
    assert!(
        answer.event.outer_op.is_none(),
        "only the outer event is a reply"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_then_start_back_to_back_run_in_order() {
    let mut rig = WorkerRig::start().await;
    let game = rig.game();
    rig.run(json!({"op": "start", "game_id": game, "image_ref": "rtm-test/engine:1.4.2"}))
        .await;
    let stop = rig.publish(json!({"op": "stop", "game_id": game})).await;
    let start = rig
        .publish(json!({"op": "start", "game_id": game, "image_ref": "rtm-test/engine:1.4.2"}))
        .await;
    let events = rig.until_outer(&start).await;
    assert_eq!(
        keys(&events),
        ["runtime.stop.success", "runtime.start.success"]
    );
    assert_eq!(events[0].event.command_id, stop);
    assert!(!events[1].event.noop, "the start came after the stop");
    assert_eq!(rig.boots(&game), "1.4.2\n1.4.2\n");
}

/// Deleting the command queue makes the broker cancel the worker's
/// consumer (basic.cancel, not a closed connection): the worker must
/// declare its topology again and go on consuming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_the_broker_cancels_comes_back() {
    let mut rig = WorkerRig::start().await;
    let game = rig.game();
    rig.run(json!({"op": "start", "game_id": game, "image_ref": "rtm-test/engine:1.4.2"}))
        .await;
    let queue = rig.config.amqp.command_queue.clone();
    rig.channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete the command queue");
    // Publishing before the queue is back would route the command nowhere.
    eventually(
        WAIT,
        &format!("the worker consumes {queue} again"),
        || async { (rig.consumers_on(&queue).await == Some(1)).then_some(()) },
    )
    .await;
    let events = rig.run(json!({"op": "stop", "game_id": game})).await;
    assert_eq!(keys(&events), ["runtime.stop.success"]);
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_command_gets_the_same_outcome_without_running_again() {
    let mut rig = WorkerRig::start().await;
    let game = rig.game();
    let command = json!({"command_id": unique("dup"), "op": "start", "game_id": game,
                         "image_ref": "rtm-test/engine:1.4.2"});
    let first = rig.run(command.clone()).await;
    let second = rig.run(command).await;
    assert_eq!(
        first.last().unwrap().event.event_id,
        second.last().unwrap().event.event_id
    );
    assert_eq!(rig.boots(&game), "1.4.2\n", "ran once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_wait_exits_0_on_success_and_1_on_a_failure() {
    let rig = WorkerRig::start().await;
    let game = rig.game();
    let send = |args: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_rtmanager"));
        cmd.args(args)
            .env_clear()
            .envs(&rig.env)
            .env("PATH", std::env::var("PATH").unwrap());
        cmd
    };
    let run = |mut cmd: std::process::Command| {
        tokio::task::spawn_blocking(move || cmd.output().expect("run rtmanager"))
    };
    let out = run(send(&[
        "send",
        "start",
        game.as_str(),
        "rtm-test/engine:1.4.2",
        "--wait",
        "--timeout",
        "60s",
    ]))
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The CLI's own line, then the outcome's: op, outcome and image in their
    // columns (the first line alone names `start` too).
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(
        lines[0].starts_with(&format!("sent start {game} (command ")),
        "{stdout}"
    );
    let columns: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        columns.get(1..4),
        Some(&["start", "success", "rtm-test/engine:1.4.2"][..]),
        "{stdout}"
    );

    let out = run(send(&[
        "send",
        "patch",
        game.as_str(),
        "rtm-test/engine:2.0.0",
        "--wait",
        "--json",
        "--timeout",
        "60s",
    ]))
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_valid_event(&line);
    assert_eq!(line["error_code"], "semver_patch_only");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_fails_that_command_with_internal_and_the_worker_lives_on() {
    let mut rig = WorkerRig::prepare().await;
    // An engine that panics when it creates a container.
    rig.launch_with(|docker| {
        let engine = crate::fakes::HangingEngine::new(docker);
        engine
            .panic_on_create
            .store(true, std::sync::atomic::Ordering::SeqCst);
        engine
    });
    let game = rig.game();
    let events = rig
        .run(json!({"op": "start", "game_id": game, "image_ref": "rtm-test/engine:1.4.2"}))
        .await;
    assert_eq!(keys(&events), ["runtime.start.failure"]);
    assert_eq!(events[0].body["error_code"], "internal");
    let message = events[0].event.error_message.clone().unwrap_or_default();
    assert!(message.contains("panic"), "{message}");
    // The same worker still answers the next command.
    let events = rig.run(json!({"op": "stop", "game_id": game})).await;
    assert_eq!(keys(&events), ["runtime.stop.failure"]);
    assert_eq!(events[0].body["error_code"], "not_found");
    // Ready messages only (an unacked one is not counted): the next
    // command's answer above is what shows this one was settled.
    assert_eq!(rig.queue_depth(&rig.config.amqp.command_queue).await, 0);
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_keeps_killing_workers_is_answered_internal_on_its_last_delivery() {
    let mut rig = WorkerRig::prepare().await;
    let game = rig.game();
    let command_id = rig
        .publish(json!({"op": "start", "game_id": game, "image_ref": "rtm-test/engine:1.4.2"}))
        .await;
    // Three workers took it and died before answering (RTM_DELIVERY_LIMIT=3):
    // each a consumer of its own connection that takes the delivery and
    // goes away without acking, which is what the broker sees of a worker
    // killed mid-command. No nack: the broker alone returns it.
    let queue = rig.config.amqp.command_queue.clone();
    for death in 0..3u64 {
        let conn = broker::connect(&rig.config.amqp_url, "rtmanager test: doomed worker")
            .await
            .unwrap();
        let channel = conn.create_channel().await.unwrap();
        channel
            .basic_qos(1, BasicQosOptions::default())
            .await
            .unwrap();
        let mut doomed = channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let delivery = tokio::time::timeout(WAIT, doomed.next())
            .await
            .expect("the command is delivered to the doomed worker")
            .expect("the consumer is open")
            .expect("a delivery");
        assert_eq!(
            redeliveries(&delivery.properties),
            death,
            "the broker counted each death"
        );
        // The connection dies with the delivery unacked.
        drop(doomed);
        conn.close(320, "worker killed".into()).await.unwrap();
    }
    rig.launch();
    let events = rig.until_outer(&command_id).await;
    assert_eq!(keys(&events), ["runtime.start.failure"]);
    assert_eq!(events[0].body["error_code"], "internal");
    let message = events[0].event.error_message.clone().unwrap_or_default();
    assert!(message.contains("gave up after 4 deliveries"), "{message}");
    assert_eq!(rig.boots(&game), "", "it was not run again");
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_operation_in_flight_finish_and_exits_0() {
    let mut rig = WorkerRig::prepare().await;
    let worker = rig.spawn_binary();
    let game = rig.game();
    rig.run(json!({"op": "start", "game_id": game, "image_ref": "rtm-test/slow:1.4.2"}))
        .await;
    // The patch's inner stop of the slow engine takes the 2 s grace period:
    // SIGTERM lands in the middle of it.
    let leases = rig.leases().await;
    let patch = rig
        .publish(json!({"op": "patch", "game_id": game, "new_image_ref": "rtm-test/slow:1.4.3"}))
        .await;
    wait_for_lease(&leases, &game, &patch).await;
    sigterm(&worker);
    let events = rig.until_outer(&patch).await;
    assert_eq!(
        keys(&events),
        [
            "runtime.patch.stop.success",
            "runtime.patch.start.success",
            "runtime.patch.success"
        ],
        "the operation in flight finished"
    );
    assert_eq!(exit_code(worker).await, Some(0), "graceful exit");
    // Its lease was released on the way out.
    assert_eq!(leases.holder_of(&game).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_the_dependency_that_is_down() {
    // Redis on a port nothing listens on: the worker starts anyway and says so.
    let dead = format!("redis://127.0.0.1:{}", free_port());
    let mut rig = WorkerRig::prepare_with(|env| {
        env.insert("RTM_REDIS_URL".into(), dead);
    })
    .await;
    rig.launch();
    let deadline = std::time::Instant::now() + WAIT;
    let body = loop {
        if let Ok(Ok(mut stream)) = tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::TcpStream::connect(rig.config.http_addr),
        )
        .await
        {
            drop(stream.shutdown().await);
            let (status, body) = rig.http_get("/readyz").await;
            if body.contains("\"broker\":\"up\"") && body.contains("\"database\":\"up\"") {
                assert_eq!(status, 503, "{body}");
                break body;
            }
        }
        assert!(std::time::Instant::now() < deadline, "no readiness answer");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(body.contains("\"redis\":\"down\""), "{body}");
    assert!(body.contains("\"docker\":\"up\""), "{body}");
    let (status, _) = rig.http_get("/healthz").await;
    assert_eq!(status, 200, "alive even when not ready");
    rig.shutdown().await;
}

/// Issue 10, point 7: `RTM_PREFETCH` commands queued behind one slow game
/// must not keep another game's command from starting. With 4 slots, five
/// restarts of a game whose engine takes its 2 s grace period to stop are
/// published, then a stop of another game: that stop must be answered
/// before even the first restart (which alone takes over 2 s), not after
/// the slow game frees a slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_queued_behind_a_slow_game_do_not_hold_up_another_game() {
    let mut rig = WorkerRig::prepare_with(|env| {
        env.insert("RTM_PREFETCH".into(), "4".into());
    })
    .await;
    rig.launch();
    let (slow, quick) = (rig.game(), rig.game());
    for (game, image) in [
        (&slow, "rtm-test/slow:1.4.2"),
        (&quick, "rtm-test/engine:1.4.2"),
    ] {
        let events = rig
            .run(json!({"op": "start", "game_id": game, "image_ref": image}))
            .await;
        assert_eq!(keys(&events), ["runtime.start.success"]);
    }
    let mut restarts = Vec::new();
    for _ in 0..5 {
        restarts.push(rig.publish(json!({"op": "restart", "game_id": slow})).await);
    }
    let stop = rig.publish(json!({"op": "stop", "game_id": quick})).await;

    let mut outer = Vec::new();
    while outer.len() < 6 {
        let seen = rig.next_event().await;
        if seen.event.outer_op.is_none() {
            outer.push(seen);
        }
    }
    let order: Vec<&str> = outer.iter().map(|s| s.event.command_id.as_str()).collect();
    assert_eq!(
        order[0],
        stop,
        "the other game's stop waited behind the slow game's queue: {:?}",
        keys(&outer)
    );
    assert_eq!(&order[1..], restarts, "the slow game's restarts, in order");
    for seen in &outer {
        assert_eq!(seen.event.error_code, None, "{:?}", seen.body);
    }
    rig.shutdown().await;
}

/// Issue 10, point 1: a `reply_to` naming the command queue made the reply
/// come back as a command, answered as a duplicate, replied to again —
/// thousands of events for one command. Now it is refused (one
/// `invalid_request`, no reply), so is one naming the dead-letter queue, and
/// an outcome event published as a command is dead-lettered unanswered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_to_naming_the_command_queue_is_refused_and_never_loops() {
    let mut rig = WorkerRig::start().await;
    let own = [
        rig.config.amqp.command_queue.clone(),
        rig.config.amqp.dead_letter_queue.clone(),
    ];
    let mut refused = Vec::new();
    for queue in &own {
        let command_id = unique("loop");
        let body = json!({"command_id": command_id, "op": "stop", "game_id": rig.game(),
                          "op_source": "lobby"});
        rig.publish_raw(
            "runtime.stop",
            &serde_json::to_vec(&body).unwrap(),
            BasicProperties::default().with_reply_to(queue.as_str().into()),
        )
        .await;
        refused.push(command_id);
    }
    // An outcome event, as a reply that found its way back would be.
    let answer = rig.next_event().await;
    rig.publish_raw(
        "runtime.stop",
        &serde_json::to_vec(&answer.body).unwrap(),
        BasicProperties::default(),
    )
    .await;

    // A loop shows within seconds (2,386 events in 6 s before the fix).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sentinel = rig
        .publish(json!({"op": "stop", "game_id": rig.game()}))
        .await;
    let mut seen = vec![answer];
    seen.extend(rig.until_outer(&sentinel).await);
    let mut per_command: HashMap<String, Vec<Seen>> = HashMap::new();
    for event in seen {
        per_command
            .entry(event.event.command_id.clone())
            .or_default()
            .push(event);
    }
    for (queue, command_id) in own.iter().zip(&refused) {
        let events = &per_command[command_id];
        assert_eq!(keys(events), ["runtime.stop.failure"], "{command_id}");
        let event = &events[0].event;
        assert_eq!(event.error_code, Some(ErrorCode::InvalidRequest));
        let message = event.error_message.as_deref().unwrap();
        assert!(
            message.contains("own queue") && message.contains(queue.as_str()),
            "{message}"
        );
    }
    assert_eq!(
        per_command.len(),
        3,
        "only the refusals and the sentinel: {:?}",
        per_command.keys()
    );
    assert_eq!(
        rig.queue_depth(&rig.config.amqp.dead_letter_queue).await,
        1,
        "the republished event is dead-lettered, nothing replied there"
    );
    assert_eq!(rig.queue_depth(&rig.config.amqp.command_queue).await, 0);
    rig.shutdown().await;
}

/// Issue 10, point 3: an 8,000-character game_id is answered
/// `invalid_request` (echo cut to 256 bytes) and acknowledged, not
/// dead-lettered unanswered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_8000_character_game_id_is_answered_invalid_request_by_the_worker() {
    let mut rig = WorkerRig::start().await;
    let long = "g".repeat(8000);
    let events = rig.run(json!({"op": "stop", "game_id": long})).await;
    assert_eq!(keys(&events), ["runtime.stop.failure"]);
    let event = &events[0].event;
    assert_eq!(event.error_code, Some(ErrorCode::InvalidRequest));
    assert!(event.game_id.len() <= 256 && event.game_id.ends_with('…'));
    assert!(long.starts_with(event.game_id.trim_end_matches('…')));
    assert_eq!(rig.queue_depth(&rig.config.amqp.dead_letter_queue).await, 0);
    assert_eq!(rig.queue_depth(&rig.config.amqp.command_queue).await, 0);
    rig.shutdown().await;
}

/// SPEC §6: the delivery count used for poison protection is the broker's
/// alone, so a publisher cannot make a first delivery look like a last one.
/// The worker relies on RabbitMQ's quorum queue to overwrite a published
/// `x-delivery-count` on a first delivery; this pins that behaviour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publishers_forged_delivery_count_never_reaches_the_worker() {
    let rig = WorkerRig::prepare().await;
    let mut headers = FieldTable::default();
    headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(99));
    rig.publish_raw(
        "runtime.stop",
        br#"{"op":"stop","game_id":"g-1","op_source":"lobby"}"#,
        BasicProperties::default().with_headers(headers),
    )
    .await;
    let message = rig
        .channel
        .basic_get(
            rig.config.amqp.command_queue.as_str().into(),
            BasicGetOptions::default(),
        )
        .await
        .unwrap()
        .expect("the command");
    assert_eq!(
        redeliveries(&message.delivery.properties),
        0,
        "a first delivery, whatever the publisher wrote"
    );
    message
        .delivery
        .ack(BasicAckOptions::default())
        .await
        .unwrap();
}

/// Issue 10, point 8, with the real binary: at `RTM_SHUTDOWN_TIMEOUT` an
/// operation still in a Docker call is stopped before its next step and
/// its lease is released only once that call has returned (it used to be
/// released while the slow engine was still stopping, letting another
/// worker take the game mid-stop); a command waiting in the game's lane is
/// handed back unstarted; the worker exits 0 holding nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_shutdown_timeout_a_lease_is_released_only_once_docker_is_done() {
    let mut rig = WorkerRig::prepare_with(|env| {
        env.insert("RTM_SHUTDOWN_TIMEOUT".into(), "500ms".into());
    })
    .await;
    let worker = rig.spawn_binary();
    let game = rig.game();
    let started = rig
        .run(json!({"op": "start", "game_id": game, "image_ref": "rtm-test/slow:1.4.2"}))
        .await;
    assert_eq!(keys(&started), ["runtime.start.success"]);
    let leases = rig.leases().await;
    let docker = DockerEngine::connect(rig.config.docker.clone())
        .await
        .unwrap();
    // The slow engine takes its whole 2 s grace period to stop: the
    // shutdown timeout (0.5 s) runs out in the middle of the restart's stop.
    let restart = rig.publish(json!({"op": "restart", "game_id": game})).await;
    let queued = rig.publish(json!({"op": "restart", "game_id": game})).await;
    wait_for_lease(&leases, &game, &restart).await;
    sigterm(&worker);

    let deadline = tokio::time::Instant::now() + WAIT;
    while leases.holder_of(&game).await.unwrap().is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lease is never released"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let info = docker.inspect(&game).await.unwrap().expect("the container");
    assert!(
        !info.running,
        "the lease was released while the engine was still being stopped"
    );

    assert_eq!(exit_code(worker).await, Some(0), "graceful exit");
    assert_eq!(leases.holder_of(&game).await.unwrap(), None);
    // Neither restart finished: both wait in the queue for the next worker.
    eventually(WAIT, "both restarts back in the queue", || async {
        (rig.queue_depth(&rig.config.amqp.command_queue).await == 2).then_some(())
    })
    .await;
    let after = docker.inspect(&game).await.unwrap().expect("the container");
    assert!(
        !after.running,
        "no step was taken after the stop: {after:?}"
    );
    let _ = queued;
}
