//! Several Docker hosts (SPEC §12, issue 13's "Done when"): two nodes on
//! this machine — `n1` on the shared Docker engine, `n2` on a private
//! dockerd (its own data root, exec root, socket and bridge, the fault
//! suite's `PrivateDocker`) — each with its own in-process worker (`serve`)
//! and state root, sharing one database, one broker topology and one Redis
//! prefix, as a fleet does. The tests talk to the workers through the
//! broker only and ask both engines what they run. Everything is this
//! test's own (database, exchanges and queues, container prefix, private
//! engine) and goes away when it ends, also when it panics.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use rtmanager::config::Config;
use rtmanager::domain::{GameId, OutcomeEvent};
use rtmanager::error::ErrorCode;
use rtmanager::outbound::docker::DockerEngine;
use rtmanager::ports::{ContainerEngine, ContainerInfo};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::task::JoinHandle;

use crate::docker_support::ContainerGuard;
use crate::harness::{TestDb, assert_success, unique, worker_config, worker_env};
use crate::procs::{ScenarioDir, free_port};
use crate::schema::assert_valid_event;
use crate::services::PrivateDocker;
use crate::topology::Topology;

const OLD: &str = "rtm-test/engine:1.4.2";
const NEW: &str = "rtm-test/engine:1.4.3";
const WAIT: Duration = Duration::from_secs(120);
/// The nodes' names, unless a test names its own.
const NODES: [&str; 2] = ["n1", "n2"];

/// An in-process worker and its stop signal.
struct Worker {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Worker {
    fn launch(config: Config) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(rtmanager::serve::run(config, async move {
            let _ = stopped.await;
        }));
        Self {
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// SIGTERM, in effect: stops consuming, finishes what is in flight,
    /// hands back the rest, exits.
    async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = self.task.take().expect("the worker task");
        tokio::time::timeout(WAIT, task)
            .await
            .expect("the worker stops within two minutes")
            .expect("the worker task")
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// One node: its worker's settings, its engine (for the test's own
/// checks), its state root, and its worker while it runs.
struct Node {
    name: String,
    // Declared first: the worker goes before its engine and state.
    worker: Option<Worker>,
    env: HashMap<String, String>,
    engine: DockerEngine,
    state_root: TempDir,
}

impl Node {
    fn launch(&mut self) {
        assert!(self.worker.is_none(), "{} already runs", self.name);
        let mut env = self.env.clone();
        // A fresh port each time: the last run's may still linger.
        env.insert("RTM_HTTP_ADDR".into(), format!("127.0.0.1:{}", free_port()));
        self.worker = Some(Worker::launch(worker_config(&env)));
    }

    async fn shutdown(&mut self) {
        let worker = self.worker.take().expect("the node's worker runs");
        worker
            .shutdown()
            .await
            .unwrap_or_else(|e| panic!("{}'s worker exits cleanly: {e:#}", self.name));
    }

    /// The game's containers on this engine: under its name, and under the
    /// temporary name a patch creates the new one with.
    async fn containers(&self, game: &GameId) -> Vec<ContainerInfo> {
        let named = self.engine.inspect(game).await.expect("inspect");
        let next = self.engine.inspect_next(game).await.expect("inspect");
        named.into_iter().chain(next).collect()
    }

    /// The engine boots of a game on this node (one line per boot, written
    /// by the test engine into its state directory).
    fn boots(&self, game: &GameId) -> String {
        std::fs::read_to_string(self.state_root.path().join(game.as_str()).join("boots"))
            .unwrap_or_default()
    }

    fn has_state(&self, game: &GameId) -> bool {
        self.state_root.path().join(game.as_str()).exists()
    }
}

/// A runtime record's columns the tests check.
#[derive(Debug, Clone, sqlx::FromRow)]
struct Record {
    status: String,
    node: Option<String>,
    current_image_ref: String,
    current_container_id: Option<String>,
}

/// Two nodes, one fleet.
struct TwoNodes {
    // Dropped in this order: workers first, then the broker topology, the
    // shared engine's containers, the database, and last the scenario
    // directory, whose teardown removes the private engine's containers,
    // stops that dockerd and deletes its bridge.
    nodes: Vec<Node>,
    /// The test's own connection, for queue depths.
    conn: lapin::Connection,
    topology: Topology,
    events: String,
    seen: Vec<OutcomeEvent>,
    _containers: ContainerGuard,
    db: TestDb,
    _private: PrivateDocker,
    _dir: ScenarioDir,
}

impl TwoNodes {
    /// Both nodes prepared, no worker running yet; `max_games` is each
    /// node's `RTM_MAX_GAMES`.
    async fn new(max_games: [u32; 2]) -> Self {
        Self::named(NODES.map(str::to_owned), max_games).await
    }

    /// Like `new`, with nodes of these names (the first on the shared
    /// engine). Their queues are deleted with the topology.
    async fn named(names: [String; 2], max_games: [u32; 2]) -> Self {
        crate::harness::init_logs();
        let dir = ScenarioDir::new("it-nodes");
        let id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        let private = PrivateDocker::launch(&dir, &id, &[OLD, NEW])
            .await
            .expect("a private dockerd for node n2");
        let db = TestDb::new().await;
        let mut topology = Topology::new().await;
        let conn = rtmanager::broker::connect(
            &rtmanager::config::SecretUrl::new(crate::harness::amqp_url()),
            "rtmanager test: queue depths",
        )
        .await
        .unwrap();
        let events = topology.queue("events", "runtime.#", None).await;
        // One prefix for the fleet, as one RTM_CONTAINER_PREFIX would be.
        let prefix = format!("{}-", unique("rtmt"));
        let containers = ContainerGuard::new(&prefix);
        let redis_prefix = format!("{}:", unique("rtmtest"));
        let shared_host = std::env::var("DOCKER_HOST").ok().filter(|h| !h.is_empty());
        let mut nodes = Vec::new();
        for ((name, host), max) in names
            .into_iter()
            .zip([shared_host, Some(private.host.clone())])
            .zip(max_games)
        {
            let state_root = TempDir::new().unwrap();
            let mut env = worker_env(&db.url, &topology.amqp, &prefix, state_root.path());
            for (key, value) in [
                ("RTM_NODE", name.clone()),
                ("RTM_MAX_GAMES", max.to_string()),
                ("RTM_REDIS_PREFIX", redis_prefix.clone()),
                // A hundred games at once stay affordable: no settle time,
                // room for them all in flight, and patience with a busy
                // engine on two cores.
                ("RTM_START_SETTLE", "0s".to_owned()),
                ("RTM_PREFETCH", "64".to_owned()),
                ("RTM_HEALTH_TIMEOUT", "60s".to_owned()),
                ("RTM_RETRY_FOR", "30s".to_owned()),
                ("RTM_LEASE_TTL", "10s".to_owned()),
                // Each node's reconciler checks its own node's records every
                // second: one that looked at the other node's games would
                // find no container for them on its engine and report them
                // exited.
                ("RTM_RECONCILE_INTERVAL", "1s".to_owned()),
            ] {
                env.insert(key.to_owned(), value);
            }
            if let Some(host) = host {
                env.insert("DOCKER_HOST".into(), host);
            }
            let engine = DockerEngine::connect(worker_config(&env).docker)
                .await
                .unwrap_or_else(|e| panic!("connect to {name}'s engine: {e}"));
            nodes.push(Node {
                name,
                worker: None,
                env,
                engine,
                state_root,
            });
        }
        Self {
            nodes,
            conn,
            topology,
            events,
            seen: Vec::new(),
            _containers: containers,
            db,
            _private: private,
            _dir: dir,
        }
    }

    /// Starts both workers and waits until both nodes are registered and
    /// both workers consume the shared queue and their node's queue.
    async fn launch(&mut self) {
        for node in &mut self.nodes {
            node.launch();
        }
        for node in self.names() {
            self.wait_consuming(&node).await;
        }
        let cq = self.topology.amqp.command_queue.clone();
        self.wait_for("both workers consume the shared queue", || async {
            (self.topology_depth(&cq).await.1 == 2).then_some(())
        })
        .await;
    }

    /// Waits until `node` is registered and its worker consumes its queue.
    async fn wait_consuming(&self, node: &str) {
        let queue = self.node_queue(node);
        self.wait_for(&format!("{node} registered and consuming"), || async {
            let live: bool = sqlx::query_scalar(
                "select exists(select 1 from nodes where name = $1
                                 and last_seen > now() - interval '15 seconds')",
            )
            .bind(node)
            .fetch_one(&self.db.pool)
            .await
            .unwrap();
            let consumers = self.topology_depth(&queue).await.1;
            (live && consumers == 1).then_some(())
        })
        .await;
    }

    async fn wait_for<T, F: Future<Output = Option<T>>>(
        &self,
        what: &str,
        probe: impl FnMut() -> F,
    ) -> T {
        crate::harness::eventually(WAIT, what, probe).await
    }

    fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    fn node_mut(&mut self, name: &str) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    fn names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// The node that is not `name`.
    fn other(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name != name)
            .expect("two nodes")
    }

    fn node_queue(&self, node: &str) -> String {
        format!("{}.node.{node}", self.topology.amqp.command_queue)
    }

    /// Ready messages and consumers of `queue`, (0, 0) while it does not
    /// exist yet.
    async fn topology_depth(&self, queue: &str) -> (u32, u32) {
        match crate::topology::declared_queue(&self.conn, queue).await {
            Some(q) => (q.message_count(), q.consumer_count()),
            None => (0, 0),
        }
    }

    fn game() -> GameId {
        GameId::parse(&unique("g")).unwrap()
    }

    /// A command as the lobby sends it, with a fresh command_id.
    fn command(op: &str, game: &GameId, fields: Value) -> Value {
        let mut body = json!({
            "command_id": unique("cmd"), "op": op, "game_id": game.as_str(),
            "op_source": "lobby",
        });
        if let (Some(body), Some(fields)) = (body.as_object_mut(), fields.as_object()) {
            body.extend(fields.clone());
        }
        body
    }

    /// Publishes `body` to the command exchange with `routing_key`
    /// (`runtime.<op>`: the shared queue; `node.<node>`: that node's).
    async fn publish_to(&self, routing_key: &str, body: &Value) {
        self.topology
            .publish(
                &self.topology.amqp.command_exchange,
                routing_key,
                &serde_json::to_vec(body).unwrap(),
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2),
            )
            .await;
    }

    /// Publishes a command to the shared queue; its command_id.
    async fn publish(&self, op: &str, game: &GameId, fields: Value) -> String {
        let body = Self::command(op, game, fields);
        self.publish_to(&format!("runtime.{op}"), &body).await;
        body["command_id"].as_str().unwrap().to_owned()
    }

    /// Takes the events waiting in the test's queue (each checked against
    /// the schema).
    async fn drain(&mut self) {
        for (_, body) in self.topology.drain_messages(&self.events).await {
            let value: Value = serde_json::from_slice(&body).expect("an event is JSON");
            assert_valid_event(&value);
            self.seen
                .push(serde_json::from_value(value).expect("an OutcomeEvent"));
        }
    }

    /// Every outer event of `command_id` received so far.
    fn outer(&self, command_id: &str) -> Vec<&OutcomeEvent> {
        self.seen
            .iter()
            .filter(|e| e.command_id == command_id && e.outer_op.is_none())
            .collect()
    }

    /// Waits until `done` holds for the events received.
    async fn until(&mut self, what: &str, within: Duration, done: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + within;
        loop {
            self.drain().await;
            if done(self) {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: not within {within:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for the outer event of each of `ids`; the first of each.
    async fn outcomes(
        &mut self,
        ids: &[String],
        within: Duration,
    ) -> HashMap<String, OutcomeEvent> {
        self.until("every command answered", within, |rig| {
            ids.iter().all(|id| !rig.outer(id).is_empty())
        })
        .await;
        ids.iter()
            .map(|id| (id.clone(), self.outer(id)[0].clone()))
            .collect()
    }

    /// Publishes a command to the shared queue and waits for its outcome.
    async fn run(&mut self, op: &str, game: &GameId, fields: Value) -> OutcomeEvent {
        let id = self.publish(op, game, fields).await;
        self.outcomes(std::slice::from_ref(&id), WAIT)
            .await
            .remove(&id)
            .unwrap()
    }

    /// Where Docker runs the game: every container of it, on each engine.
    async fn where_is(&self, game: &GameId) -> Vec<(String, ContainerInfo)> {
        let mut found = Vec::new();
        for node in &self.nodes {
            for info in node.containers(game).await {
                found.push((node.name.clone(), info));
            }
        }
        found
    }

    /// The game has one container, on `node`'s engine, running `image`, and
    /// none on the other engine; its record names `node` and that container.
    async fn assert_runs_on(&self, game: &GameId, node: &str, image: &str) -> ContainerInfo {
        let found = self.where_is(game).await;
        let shown: Vec<_> = found
            .iter()
            .map(|(n, c)| format!("{n}: {} {} running={}", c.id, c.image_ref, c.running))
            .collect();
        assert_eq!(
            found.len(),
            1,
            "{game}: one container on one engine, found {shown:?}"
        );
        let (on, info) = &found[0];
        assert_eq!(*on, node, "{game} runs on the wrong engine: {shown:?}");
        assert!(info.running, "{game} is not running: {shown:?}");
        assert_eq!(info.image_ref, image, "{game}: {shown:?}");
        let record = self.record(game).await.expect("a record");
        assert_eq!(
            self.placement(game).await.as_deref(),
            Some(node),
            "{game} runs where it was placed"
        );
        assert_eq!(record.status, "running", "{game}: {record:?}");
        assert_eq!(
            record.node.as_deref(),
            Some(node),
            "{game}'s record names the engine that runs it"
        );
        assert_eq!(record.current_image_ref, image, "{game}: {record:?}");
        assert_eq!(
            record.current_container_id.as_deref(),
            Some(info.id.as_str()),
            "{game}: {record:?}"
        );
        info.clone()
    }

    /// No engine has a container of the game and no node its state.
    async fn assert_nowhere(&self, game: &GameId) {
        let found = self.where_is(game).await;
        assert!(found.is_empty(), "{game} has containers: {found:?}");
        for node in &self.nodes {
            assert!(!node.has_state(game), "{game} has state on {}", node.name);
        }
    }

    /// No engine has a container of the game (its state may stay).
    async fn assert_nowhere_running(&self, game: &GameId) {
        let found = self.where_is(game).await;
        assert!(found.is_empty(), "{game} has containers: {found:?}");
    }

    async fn record(&self, game: &GameId) -> Option<Record> {
        sqlx::query_as(
            "select status, node, current_image_ref, current_container_id
               from runtime_records where game_id = $1",
        )
        .bind(game.as_str())
        .fetch_optional(&self.db.pool)
        .await
        .unwrap()
    }

    /// The node the game was placed on.
    async fn placement(&self, game: &GameId) -> Option<String> {
        sqlx::query_scalar("select node from placements where game_id = $1")
            .bind(game.as_str())
            .fetch_optional(&self.db.pool)
            .await
            .unwrap()
    }

    /// The outer operation-log entries of `command_id`.
    async fn outer_entries(&self, command_id: &str) -> i64 {
        sqlx::query_scalar(
            "select count(*) from operation_log where command_id = $1 and outer_op is null",
        )
        .bind(command_id)
        .fetch_one(&self.db.pool)
        .await
        .unwrap()
    }

    /// The command_ids of the game's outer entries, in the order written.
    async fn outer_order(&self, game: &GameId) -> Vec<String> {
        sqlx::query_scalar(
            "select command_id from operation_log
              where game_id = $1 and outer_op is null order by operation_id",
        )
        .bind(game.as_str())
        .fetch_all(&self.db.pool)
        .await
        .unwrap()
    }

    /// Sets a node's `draining`, as `rtmanager drain`/`undrain` do.
    async fn set_draining(&self, node: &str, draining: bool) {
        let done = sqlx::query("update nodes set draining = $2 where name = $1")
            .bind(node)
            .bind(draining)
            .execute(&self.db.pool)
            .await
            .unwrap();
        assert_eq!(done.rows_affected(), 1, "node {node} is registered");
    }

    /// Nothing is left in any command queue, and nothing was dead-lettered;
    /// and no reconciler reported an exit or restarted a game (every engine
    /// in these tests keeps running until a command stops it).
    async fn assert_queues_empty(&mut self) {
        self.drain().await;
        let reconciled: Vec<_> = self
            .seen
            .iter()
            .filter(|e| e.op_source.as_deref() == Some("reconciler"))
            .map(|e| {
                (
                    e.game_id.clone(),
                    e.op.clone(),
                    e.node.clone(),
                    e.error_message.clone(),
                )
            })
            .collect();
        assert!(reconciled.is_empty(), "a reconciler acted: {reconciled:?}");
        let amqp = &self.topology.amqp;
        let node_queues = self.names().into_iter().map(|n| self.node_queue(&n));
        for queue in node_queues.chain([amqp.command_queue.clone(), amqp.dead_letter_queue.clone()])
        {
            assert_eq!(
                self.topology_depth(&queue).await.0,
                0,
                "{queue} holds messages"
            );
        }
    }

    async fn shutdown(&mut self) {
        for node in &mut self.nodes {
            if node.worker.is_some() {
                node.shutdown().await;
            }
        }
    }
}

impl Drop for TwoNodes {
    fn drop(&mut self) {
        // Nodes named by a test have queues the topology's cleanup does not
        // know (it deletes n1's, n2's and n3's).
        let queues = self.names().iter().map(|n| self.node_queue(n)).collect();
        crate::topology::delete_topology(
            self.topology.amqp.clone(),
            rtmanager::config::SecretUrl::new(crate::harness::amqp_url()),
            queues,
        );
    }
}

/// Commands forwarded to `node` by the workers of this process (the
/// metrics recorder is the process's: a node name of the test's own keeps
/// other tests out of the count).
fn forwarded_to(node: &str) -> f64 {
    let handle = rtmanager::telemetry::metrics_handle().expect("the metrics recorder");
    let label = format!("node=\"{node}\"");
    handle
        .render()
        .lines()
        .filter(|l| l.starts_with(rtmanager::telemetry::COMMANDS_FORWARDED) && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |total, n| total + n)
}

/// Counts, by node, what the events name.
fn by_node<'a>(events: impl IntoIterator<Item = &'a OutcomeEvent>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for e in events {
        *counts
            .entry(e.node.clone().unwrap_or_else(|| "(none)".into()))
            .or_default() += 1;
    }
    counts
}

/// Issue 13, point 1: 100 starts published to the shared queue, taken by
/// whichever worker; every game runs on exactly one engine, the split is
/// within 40/60, each record and start event names the engine that runs
/// the game. Then a patch of each game, published to the shared queue (so
/// often taken by the other node's worker, which forwards it), runs on the
/// game's own engine: the new image there, nothing on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_starts_spread_over_both_engines_and_each_patch_runs_on_its_games_engine() {
    // Nodes of this test's own names: its forwards are counted apart.
    let names = ["n1", "n2"].map(unique);
    let mut rig = TwoNodes::named(names.clone(), [200, 200]).await;
    rig.launch().await;
    let games: Vec<GameId> = (0..100).map(|_| TwoNodes::game()).collect();
    let began = Instant::now();
    let mut starts = Vec::new();
    for game in &games {
        starts.push(rig.publish("start", game, json!({"image_ref": OLD})).await);
    }
    let started = rig.outcomes(&starts, Duration::from_secs(400)).await;
    eprintln!(
        "100 starts answered in {:.1} s",
        began.elapsed().as_secs_f64()
    );

    let mut placed: HashMap<&GameId, String> = HashMap::new();
    for (game, id) in games.iter().zip(&starts) {
        let event = &started[id];
        assert_success(event);
        let node = event
            .node
            .clone()
            .unwrap_or_else(|| panic!("{game}: the start's event names no node"));
        let info = rig.assert_runs_on(game, &node, OLD).await;
        assert_eq!(
            event.container_id.as_deref(),
            Some(info.id.as_str()),
            "{game}: the event names the container that runs"
        );
        assert_eq!(rig.node(&node).boots(game), "1.4.2\n", "{game} on {node}");
        assert!(!rig.other(&node).has_state(game));
        placed.insert(game, node);
    }
    let split = by_node(starts.iter().map(|id| &started[id]));
    eprintln!("placement: {split:?}");
    assert_eq!(split.values().sum::<usize>(), 100, "{split:?}");
    for node in &names {
        let n = split.get(node).copied().unwrap_or(0);
        assert!((40..=60).contains(&n), "{node} got {n} of 100: {split:?}");
    }

    // The patches go out one node's games first, then the other's: the
    // broker hands the shared queue's messages to the two workers in turn,
    // so about half of each node's patches reach the other node's worker,
    // whatever order the starts went in (sent in the start order, each
    // would go to the worker that took its start, often its own node's).
    let began = Instant::now();
    let forwarded_before = names.clone().map(|n| forwarded_to(&n));
    let mut order: Vec<&GameId> = games.iter().collect();
    order.sort_by_key(|game| &placed[game]);
    let mut patches = HashMap::new();
    for game in order {
        let id = rig
            .publish("patch", game, json!({"new_image_ref": NEW}))
            .await;
        patches.insert(game, id);
    }
    let patches: Vec<String> = games.iter().map(|g| patches[g].clone()).collect();
    let patched = rig.outcomes(&patches, Duration::from_secs(400)).await;
    eprintln!(
        "100 patches answered in {:.1} s",
        began.elapsed().as_secs_f64()
    );
    for (game, id) in games.iter().zip(&patches) {
        let event = &patched[id];
        assert_success(event);
        let node = &placed[game];
        assert_eq!(
            event.node.as_deref(),
            Some(node.as_str()),
            "{game}'s patch ran on its own node"
        );
        rig.assert_runs_on(game, node, NEW).await;
        assert_eq!(
            rig.node(node).boots(game),
            "1.4.2\n1.4.3\n",
            "{game} on {node}"
        );
        assert!(!rig.other(node).has_state(game));
    }
    let forwarded = [0, 1].map(|i| forwarded_to(&names[i]) - forwarded_before[i]);
    eprintln!("patches forwarded to {names:?}: {forwarded:?}");
    for (node, n) in names.iter().zip(forwarded) {
        assert!(
            n >= 10.0,
            "only {n} patches were taken by the other worker and forwarded to {node}"
        );
    }
    // One outcome each, and each answered once.
    rig.drain().await;
    for id in starts.iter().chain(&patches) {
        assert_eq!(rig.outer(id).len(), 1, "{id}: one outer event");
        assert_eq!(rig.outer_entries(id).await, 1, "{id}: one outer entry");
    }
    rig.assert_queues_empty().await;
    rig.shutdown().await;
}

/// Issue 13, point 2: an explicit `node` places the game there; an unknown
/// one is `invalid_request`; a full node (its `RTM_MAX_GAMES` reached) is
/// refused by name and passed over otherwise; both full is
/// `service_unavailable` ("no node has room"); a draining node takes no
/// new game, yet its games are still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn placement_honours_an_explicit_node_an_unknown_one_full_nodes_and_a_drain() {
    let mut rig = TwoNodes::new([2, 2]).await;
    rig.launch().await;
    let g: Vec<GameId> = (0..7).map(|_| TwoNodes::game()).collect();
    let old = json!({"image_ref": OLD});
    let on = |node: &str| json!({"image_ref": OLD, "node": node});
    let refused = |event: &OutcomeEvent, code: ErrorCode, words: &str| {
        assert_eq!(event.error_code, Some(code), "{event:?}");
        let message = event.error_message.as_deref().unwrap_or_default();
        assert!(message.contains(words), "{message}");
    };

    // An explicit node: placed there.
    let e = rig.run("start", &g[0], on("n2")).await;
    assert_success(&e);
    assert_eq!(e.node.as_deref(), Some("n2"));
    rig.assert_runs_on(&g[0], "n2", OLD).await;

    // An unknown node: refused, nothing placed, nothing run.
    let e = rig.run("start", &g[1], on("n9")).await;
    refused(&e, ErrorCode::InvalidRequest, "\"n9\" is unknown");
    rig.assert_nowhere(&g[1]).await;
    assert!(rig.record(&g[1]).await.is_none());

    // n2 holds its two games: named, it is refused as full ...
    let e = rig.run("start", &g[1], on("n2")).await;
    assert_success(&e);
    rig.assert_runs_on(&g[1], "n2", OLD).await;
    let e = rig.run("start", &g[2], on("n2")).await;
    refused(&e, ErrorCode::ServiceUnavailable, "is full");
    rig.assert_nowhere(&g[2]).await;
    // ... and a start naming no node goes to the other.
    for game in &g[2..4] {
        let e = rig.run("start", game, old.clone()).await;
        assert_success(&e);
        assert_eq!(e.node.as_deref(), Some("n1"), "{game}");
        rig.assert_runs_on(game, "n1", OLD).await;
    }
    // Both full.
    let e = rig.run("start", &g[4], old.clone()).await;
    refused(&e, ErrorCode::ServiceUnavailable, "no node has room");
    rig.assert_nowhere(&g[4]).await;

    // n1 drains (what `rtmanager drain n1` writes). Its games are still
    // served: a stop (which frees a slot there) and a patch.
    rig.set_draining("n1", true).await;
    let e = rig.run("stop", &g[2], json!({})).await;
    assert_success(&e);
    assert_eq!(e.node.as_deref(), Some("n1"));
    assert!(
        rig.node("n1")
            .containers(&g[2])
            .await
            .iter()
            .all(|c| !c.running)
    );
    assert_eq!(rig.record(&g[2]).await.unwrap().status, "stopped");
    let e = rig.run("patch", &g[3], json!({"new_image_ref": NEW})).await;
    assert_success(&e);
    assert_eq!(e.node.as_deref(), Some("n1"));
    rig.assert_runs_on(&g[3], "n1", NEW).await;
    // n1 has room now, but takes no new game: named, it is refused as
    // draining; unnamed, no node has room (n2 is full).
    let e = rig.run("start", &g[4], on("n1")).await;
    refused(&e, ErrorCode::ServiceUnavailable, "is draining");
    let e = rig.run("start", &g[4], old.clone()).await;
    refused(&e, ErrorCode::ServiceUnavailable, "no node has room");
    rig.assert_nowhere(&g[4]).await;
    // n2 frees a slot: the next new game goes there, not to the draining n1.
    let e = rig.run("stop", &g[0], json!({})).await;
    assert_success(&e);
    assert_eq!(e.node.as_deref(), Some("n2"));
    let e = rig.run("start", &g[4], old.clone()).await;
    assert_success(&e);
    assert_eq!(e.node.as_deref(), Some("n2"));
    rig.assert_runs_on(&g[4], "n2", OLD).await;
    // A stopped game of the draining node is started again there.
    let e = rig.run("start", &g[2], old.clone()).await;
    assert_success(&e);
    assert_eq!(e.node.as_deref(), Some("n1"));
    rig.assert_runs_on(&g[2], "n1", OLD).await;

    // Undrained, n1 takes new games again once it has room.
    rig.set_draining("n1", false).await;
    let e = rig.run("stop", &g[3], json!({})).await;
    assert_success(&e);
    let e = rig.run("start", &g[5], old.clone()).await;
    assert_success(&e);
    assert_eq!(e.node.as_deref(), Some("n1"));
    rig.assert_runs_on(&g[5], "n1", OLD).await;
    rig.assert_queues_empty().await;
    rig.shutdown().await;
}

/// Issue 13, point 3: a `start` delivered to both nodes' workers at once
/// (one copy straight into each node's queue, and, for other games, two
/// copies into the shared queue) makes one container on one engine and
/// one outcome: one outer entry, every copy answered with the same
/// event_id.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_duplicate_start_delivered_to_both_nodes_at_once_makes_one_container_and_one_outcome() {
    let mut rig = TwoNodes::new([200, 200]).await;
    rig.launch().await;
    let mut sent: Vec<(GameId, String)> = Vec::new();
    for round in 0..20 {
        let game = TwoNodes::game();
        let body = TwoNodes::command("start", &game, json!({"image_ref": OLD}));
        let keys = if round % 2 == 0 {
            ["node.n1", "node.n2"]
        } else {
            ["runtime.start", "runtime.start"]
        };
        // Back to back, unconfirmed in between: both copies are in their
        // queues within a millisecond or so.
        let publish = keys.map(|key| rig.publish_to(key, &body));
        let [a, b] = publish;
        tokio::join!(a, b);
        sent.push((game, body["command_id"].as_str().unwrap().to_owned()));
    }
    rig.until("every copy answered", WAIT, |rig| {
        sent.iter().all(|(_, id)| rig.outer(id).len() >= 2)
    })
    .await;
    // Late copies (a third answer would be a bug) get a moment to land.
    tokio::time::sleep(Duration::from_secs(2)).await;
    rig.drain().await;

    let mut landed: BTreeMap<String, usize> = BTreeMap::new();
    for (game, id) in &sent {
        let answers = rig.outer(id);
        let event_ids: BTreeSet<_> = answers.iter().map(|e| e.event_id).collect();
        assert_eq!(
            event_ids.len(),
            1,
            "{game}: one outcome, republished to the duplicate: {answers:#?}"
        );
        assert_eq!(answers.len(), 2, "{game}: each copy answered once");
        assert_success(answers[0]);
        assert_eq!(rig.outer_entries(id).await, 1, "{game}: one outer entry");
        let node = answers[0].node.clone().expect("the event names its node");
        rig.assert_runs_on(game, &node, OLD).await;
        assert_eq!(
            rig.node(&node).boots(game),
            "1.4.2\n",
            "{game}: booted once"
        );
        assert!(!rig.other(&node).has_state(game));
        *landed.entry(node).or_default() += 1;
    }
    eprintln!("duplicated starts placed: {landed:?}");
    rig.assert_queues_empty().await;
    rig.shutdown().await;
}

/// Issue 13, point 4: node n2's worker stops. Commands for n2's games,
/// published to the shared queue, are forwarded by n1 and wait in n2's
/// queue; n1's games are served meanwhile, and placement passes over n2
/// once it missed three heartbeats. n2's worker back: its commands run, in
/// the order sent, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commands_for_a_stopped_nodes_games_wait_for_it_and_run_in_order_when_it_returns() {
    let mut rig = TwoNodes::new([200, 200]).await;
    rig.launch().await;
    let a: Vec<GameId> = (0..2).map(|_| TwoNodes::game()).collect();
    let b: Vec<GameId> = (0..2).map(|_| TwoNodes::game()).collect();
    let mut starts = Vec::new();
    for (games, node) in [(&a, "n1"), (&b, "n2")] {
        for game in games {
            starts.push(
                rig.publish("start", game, json!({"image_ref": OLD, "node": node}))
                    .await,
            );
        }
    }
    for event in rig.outcomes(&starts, WAIT).await.values() {
        assert_success(event);
    }

    rig.node_mut("n2").shutdown().await;
    let n2_queue = rig.node_queue("n2");
    assert_eq!(rig.topology_depth(&n2_queue).await.1, 0, "n2 is down");

    // n2's games: four commands each, which only make sense in order.
    let b_ops: [(&str, Value); 4] = [
        ("restart", json!({})),
        ("stop", json!({})),
        ("start", json!({"image_ref": OLD})),
        ("patch", json!({"new_image_ref": NEW})),
    ];
    let mut b_sent: HashMap<&GameId, Vec<String>> = HashMap::new();
    let mut a_sent = Vec::new();
    for (op, fields) in &b_ops {
        for game in &b {
            let id = rig.publish(op, game, fields.clone()).await;
            b_sent.entry(game).or_default().push(id);
        }
        for game in &a {
            a_sent.push(rig.publish("restart", game, json!({})).await);
        }
    }
    let b_ids: Vec<String> = b_sent.values().flatten().cloned().collect();

    // n1's games are served while n2 is down.
    for event in rig.outcomes(&a_sent, WAIT).await.values() {
        assert_success(event);
        assert_eq!(event.node.as_deref(), Some("n1"));
    }
    // n2's wait in its queue, forwarded there by n1, unanswered.
    rig.wait_for("n2's commands wait in its queue", || async {
        (rig.topology_depth(&n2_queue).await == (8, 0)).then_some(())
    })
    .await;
    rig.drain().await;
    for id in &b_ids {
        assert!(rig.outer(id).is_empty(), "{id} answered while n2 is down");
    }
    assert_eq!(
        rig.topology_depth(&rig.topology.amqp.command_queue).await.0,
        0
    );

    // Once n2 missed three heartbeats, new games go to n1.
    rig.wait_for("n2 no longer live", || async {
        let stale: bool = sqlx::query_scalar(
            "select last_seen < now() - interval '15 seconds' from nodes where name = 'n2'",
        )
        .fetch_one(&rig.db.pool)
        .await
        .unwrap();
        stale.then_some(())
    })
    .await;
    let c: Vec<GameId> = (0..2).map(|_| TwoNodes::game()).collect();
    for game in &c {
        let e = rig.run("start", game, json!({"image_ref": OLD})).await;
        assert_success(&e);
        assert_eq!(e.node.as_deref(), Some("n1"), "{game}: n2 is down");
        rig.assert_runs_on(game, "n1", OLD).await;
    }
    rig.drain().await;
    for id in &b_ids {
        assert!(rig.outer(id).is_empty(), "{id} answered while n2 is down");
    }

    // n2 back: its commands run, in order, each once.
    rig.node_mut("n2").launch();
    let answered = rig.outcomes(&b_ids, WAIT).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    rig.drain().await;
    for game in &b {
        let ids = &b_sent[game];
        for id in ids {
            let event = &answered[id];
            assert_success(event);
            assert_eq!(event.node.as_deref(), Some("n2"));
            assert_eq!(rig.outer(id).len(), 1, "{game}: {id} answered once");
            assert_eq!(rig.outer_entries(id).await, 1, "{game}: {id}");
        }
        let order = rig.outer_order(game).await;
        assert_eq!(
            &order[1..],
            ids.as_slice(),
            "{game}: its commands ran in the order sent"
        );
        rig.assert_runs_on(game, "n2", NEW).await;
        // start, restart, (stop), start, patch: four boots, none redone.
        assert_eq!(
            rig.node("n2").boots(game),
            "1.4.2\n1.4.2\n1.4.2\n1.4.3\n",
            "{game}"
        );
        assert!(!rig.node("n1").has_state(game));
    }
    rig.assert_queues_empty().await;
    rig.shutdown().await;
}

/// SPEC §12 and migration 0012: a game keeps its node for life, and a
/// start after its `remove` is placed afresh, its old node first (its
/// state directory is there) even when another node holds fewer games;
/// a start naming another node moves it there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_removed_game_started_again_goes_back_to_its_old_node_unless_told_otherwise() {
    let mut rig = TwoNodes::new([200, 200]).await;
    rig.launch().await;
    let game = TwoNodes::game();
    let others: Vec<GameId> = (0..3).map(|_| TwoNodes::game()).collect();
    let on = |node: &str| json!({"image_ref": OLD, "node": node});
    // n2 holds three games, n1 one.
    for (g, node) in [
        (&game, "n2"),
        (&others[0], "n2"),
        (&others[1], "n2"),
        (&others[2], "n1"),
    ] {
        let e = rig.run("start", g, on(node)).await;
        assert_success(&e);
        rig.assert_runs_on(g, node, OLD).await;
    }
    let e = rig.run("remove", &game, json!({})).await;
    assert_success(&e);
    rig.assert_nowhere_running(&game).await;
    // n2 now holds two, n1 one: fewest would be n1, yet the old node wins.
    let e = rig.run("start", &game, json!({"image_ref": OLD})).await;
    assert_success(&e);
    assert_eq!(e.node.as_deref(), Some("n2"), "back on its old node");
    rig.assert_runs_on(&game, "n2", OLD).await;
    assert_eq!(rig.node("n2").boots(&game), "1.4.2\n1.4.2\n");
    // Removed again and started naming n1: it moves.
    let e = rig.run("remove", &game, json!({})).await;
    assert_success(&e);
    let e = rig.run("start", &game, on("n1")).await;
    assert_success(&e);
    assert_eq!(e.node.as_deref(), Some("n1"));
    rig.assert_runs_on(&game, "n1", OLD).await;
    assert_eq!(rig.node("n1").boots(&game), "1.4.2\n");
    rig.assert_queues_empty().await;
    rig.shutdown().await;
}

/// forward.rs: a node's queue lost (a broker reset) while its worker is
/// down does not drop the commands forwarded there: the broker returns
/// the first copy (`mandatory`), the forwarding worker declares the queue
/// again and forwards once more; the command waits there for the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nodes_lost_queue_is_declared_again_by_the_worker_forwarding_to_it() {
    let mut rig = TwoNodes::new([200, 200]).await;
    rig.launch().await;
    let game = TwoNodes::game();
    let e = rig
        .run("start", &game, json!({"image_ref": OLD, "node": "n2"}))
        .await;
    assert_success(&e);
    rig.node_mut("n2").shutdown().await;
    let queue = rig.node_queue("n2");
    let channel = rig.conn.create_channel().await.unwrap();
    channel
        .queue_delete(queue.as_str().into(), Default::default())
        .await
        .unwrap();
    assert!(
        crate::topology::declared_queue(&rig.conn, &queue)
            .await
            .is_none()
    );

    let restart = rig.publish("restart", &game, json!({})).await;
    rig.wait_for(
        "the restart waits in n2's queue, declared again",
        || async { (rig.topology_depth(&queue).await == (1, 0)).then_some(()) },
    )
    .await;
    rig.drain().await;
    assert!(rig.outer(&restart).is_empty(), "answered while n2 is down");

    rig.node_mut("n2").launch();
    let e = rig
        .outcomes(std::slice::from_ref(&restart), WAIT)
        .await
        .remove(&restart)
        .unwrap();
    assert_success(&e);
    assert_eq!(e.node.as_deref(), Some("n2"));
    rig.assert_runs_on(&game, "n2", OLD).await;
    assert_eq!(rig.node("n2").boots(&game), "1.4.2\n1.4.2\n");
    rig.assert_queues_empty().await;
    rig.shutdown().await;
}
