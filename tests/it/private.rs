//! README "Dependencies come and go": PostgreSQL goes down while a command
//! is in flight and the worker stops meanwhile; once PostgreSQL is back, a
//! new worker gets the command redelivered and answers it exactly once,
//! without redoing its Docker work. The worker runs in-process (`serve`)
//! against a private PostgreSQL cluster this test stops and starts.

use std::cell::RefCell;
use std::time::Duration;

use rtmanager::config::Config;
use rtmanager::domain::{GameId, OutcomeEvent};
use rtmanager::ports::ContainerEngine;
use serde_json::json;
use tokio::task::JoinHandle;

use crate::docker_support::DockerTestEnv;
use crate::harness::{assert_success, eventually, unique, worker_config, worker_env};
use crate::procs::ScenarioDir;
use crate::services;
use crate::topology::Topology;

const WAIT: Duration = Duration::from_secs(60);

/// An in-process worker and its stop signal.
struct Worker {
    stop: tokio::sync::oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Worker {
    fn launch(config: Config) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(rtmanager::serve::run(config, async move {
            let _ = stopped.await;
        }));
        Self { stop, task }
    }

    /// SIGTERM, in effect; returns how `serve` ended.
    async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("the worker stops within a minute")
            .expect("the worker task")
    }
}

/// The worker's settings: this test's database URL, topology, container
/// prefix and state root; a fresh HTTP port each time.
fn config(database_url: &str, topology: &Topology, docker: &DockerTestEnv) -> Config {
    let mut env = worker_env(
        database_url,
        &topology.amqp,
        &docker.prefix,
        docker.state_root.path(),
    );
    for (key, value) in [
        // A long settle: the command is still running when PostgreSQL goes.
        ("RTM_START_SETTLE", "3s"),
        // The service's default: no test timing here.
        ("RTM_HEALTH_TIMEOUT", "60s"),
        ("RTM_LEASE_TTL", "4s"),
        ("RTM_RETRY_FOR", "2s"),
        // Long enough for the operation to reach its (failing) record step.
        ("RTM_SHUTDOWN_TIMEOUT", "15s"),
    ] {
        env.insert(key.to_owned(), value.to_owned());
    }
    worker_config(&env)
}

#[tokio::test]
async fn a_command_unrecorded_while_postgres_is_down_and_the_worker_stops_is_redelivered_and_answered_once()
 {
    crate::harness::init_logs();
    let dir = ScenarioDir::new("it-pg-down-stop");
    let pg = services::Postgres::launch(&dir)
        .await
        .expect("a private PostgreSQL");
    let database_url = pg.url("rtm");
    let mut topology = Topology::new().await;
    let events = topology.queue("events", "#", None).await;
    let docker = DockerTestEnv::new().await;
    let game = GameId::parse(&unique("g")).unwrap();
    let command_id = unique("cmd");
    let queue = topology.amqp.command_queue.clone();

    let first = Worker::launch(config(&database_url, &topology, &docker));
    eventually(WAIT, "the first worker consumes", || async {
        (topology.depth(&queue).await.1 == 1).then_some(())
    })
    .await;
    let command = json!({
        "command_id": command_id, "op": "start", "game_id": game.as_str(),
        "image_ref": "rtm-test/engine:1.4.2", "op_source": "lobby",
    });
    topology
        .publish(
            &topology.amqp.command_exchange,
            "runtime.start",
            command.to_string().as_bytes(),
            lapin::BasicProperties::default().with_content_type("application/json".into()),
        )
        .await;

    // The engine runs, and the start waits out its settle time: take
    // PostgreSQL away now, then stop the worker.
    eventually(WAIT, "the start boots the engine", || async {
        let info = docker.engine.inspect(&game).await.unwrap();
        info.is_some_and(|i| i.running).then_some(())
    })
    .await;
    pg.stop().await.expect("stop PostgreSQL");
    let ended = first.shutdown().await;
    eprintln!("the first worker ended: {ended:?}");
    assert_eq!(
        topology.drain(&events).await,
        Vec::<String>::new(),
        "premise: nothing was answered before PostgreSQL went"
    );
    assert_eq!(
        topology.depth(&queue).await,
        (1, 0),
        "premise: the command went back to the queue unanswered (unacked at the stop)"
    );

    pg.start().await.expect("start PostgreSQL again");
    let second = Worker::launch(config(&database_url, &topology, &docker));
    let seen: RefCell<Vec<OutcomeEvent>> = RefCell::default();
    let take = || async {
        let more = topology.drain_messages(&events).await;
        seen.borrow_mut().extend(
            more.iter()
                .map(|(_, body)| serde_json::from_slice::<OutcomeEvent>(body).unwrap()),
        );
    };
    eventually(WAIT, "the redelivered command is answered", || async {
        take().await;
        let answered = seen.borrow().iter().any(|e| e.command_id == command_id);
        answered.then_some(())
    })
    .await;
    second
        .shutdown()
        .await
        .expect("the second worker exits cleanly");
    take().await;
    let seen = seen.into_inner();

    let answers: Vec<&OutcomeEvent> = seen.iter().filter(|e| e.command_id == command_id).collect();
    assert_eq!(answers.len(), 1, "answered exactly once: {answers:#?}");
    assert_success(answers[0]);
    assert_eq!(
        topology.depth(&queue).await,
        (0, 0),
        "the command was acknowledged"
    );
    let boots = std::fs::read_to_string(docker.state_root.path().join(game.as_str()).join("boots"))
        .unwrap_or_default();
    assert_eq!(
        boots, "1.4.2\n",
        "the engine booted once: the start was not redone"
    );
    let rows: i64 = {
        let pool = sqlx::PgPool::connect(&database_url).await.unwrap();
        let n = sqlx::query_scalar("select count(*) from operation_log where command_id = $1")
            .bind(&command_id)
            .fetch_one(&pool)
            .await
            .unwrap();
        pool.close().await;
        n
    };
    assert_eq!(rows, 1, "one operation-log entry");
}
