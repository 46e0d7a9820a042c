//! The scenarios. Each builds its own rig, does its damage, and ends with
//! `Rig::finish` (the common checks) plus its own expectations.

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use bollard::query_parameters::EventsOptions;
use futures_util::StreamExt as _;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::checks::{Expect, records, short};
use crate::procs::poll_for;
use crate::registry::Registry;
use crate::report::{Row, title};
use crate::rig::{Cmd, Rig, RigOptions};
use crate::services::Dep;

/// The per-game command stream: start, patch, stop, then a restart of the
/// stopped game (which leaves it running, SPEC §2); open-loop streams then
/// remove every third game, so games end both running and removed.
const STREAM: [Cmd; 4] = [
    Cmd::Start(Cow::Borrowed("rtm-test/engine:1.4.2")),
    Cmd::Patch(Cow::Borrowed("rtm-test/engine:1.4.3")),
    Cmd::Stop,
    Cmd::Restart,
];

fn games(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("g{i:02}")).collect()
}

/// Sends the stream round-robin over `games`, `pause` apart (open loop: no
/// waiting for outcomes), each command `copies` times.
async fn open_stream(rig: &Rig, games: &[String], pause: Duration, copies: u32) {
    for cmd in STREAM {
        for game in games {
            rig.send(game, cmd.clone(), copies).await;
            tokio::time::sleep(pause).await;
        }
    }
    for game in games.iter().step_by(3) {
        rig.send(game, Cmd::Remove, copies).await;
        tokio::time::sleep(pause).await;
    }
}

/// Sends each game's stream only after the previous command's outcome was
/// observed (closed loop per game, games concurrent).
async fn closed_stream(rig: &Rig, games: &[String], copies: u32) {
    let runs = games.iter().map(|game| async move {
        for cmd in STREAM {
            let id = rig.send(game, cmd.clone(), copies).await;
            if rig
                .wait_outer(&id, Duration::from_secs(150))
                .await
                .is_none()
            {
                rig.note(format!(
                    "{game}: no outcome for {} {} within 150 s; stream stopped for this game",
                    cmd.op(),
                    short(&id)
                ));
                return;
            }
        }
    });
    futures_util::future::join_all(runs).await;
}

// ------------------------------------------------- 1. kills mid-patch

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillAt {
    AfterLease,
    /// Docker is downloading the new image's layer from a local registry.
    DuringPull,
    InnerStop,
    OldRemoved,
    /// The new container exists (created), not started yet.
    NewCreated,
    /// The new container runs but its HEALTHCHECK has not passed yet.
    NewStarting,
}

/// Docker events (action, container id) of one container name, from a
/// second before the call on.
fn watch_container(
    rig: &Rig,
    game: &str,
) -> (mpsc::UnboundedReceiver<(String, String)>, JoinHandle<()>) {
    let filters = HashMap::from([
        ("type".to_owned(), vec!["container".to_owned()]),
        ("container".to_owned(), vec![rig.container_name(game)]),
    ]);
    let options = EventsOptions {
        since: Some((chrono::Utc::now().timestamp() - 1).to_string()),
        until: None,
        filters: Some(filters),
    };
    let docker = rig.docker.clone();
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut stream = docker.events(Some(options));
        while let Some(Ok(event)) = stream.next().await {
            let action = event.action.unwrap_or_default();
            let id = event.actor.and_then(|a| a.id).unwrap_or_default();
            if tx.send((action, id)).is_err() {
                break;
            }
        }
    });
    (rx, task)
}

async fn wait_event(
    rx: &mut mpsc::UnboundedReceiver<(String, String)>,
    timeout: Duration,
    want: impl Fn(&str, &str) -> bool,
) -> Option<(String, String)> {
    tokio::time::timeout(timeout, async {
        while let Some((action, id)) = rx.recv().await {
            if want(&action, &id) {
                return Some((action, id));
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
}

pub async fn kill_mid_patch(at: KillAt) -> Result<Row, String> {
    let (key, old, new, stop_timeout) = match at {
        KillAt::AfterLease => (
            "kill_after_lease",
            "rtm-test/engine:1.4.2",
            "rtm-test/engine:1.4.3",
            "2s",
        ),
        // The new image is the registry's name for rtm-test/engine:1.4.3,
        // known once it listens.
        KillAt::DuringPull => (
            "kill_during_pull",
            "rtm-test/engine:1.4.2",
            "rtm-test/engine:1.4.3",
            "2s",
        ),
        KillAt::InnerStop => (
            "kill_during_inner_stop",
            "rtm-test/slow:1.4.2",
            "rtm-test/engine:1.4.3",
            "3s",
        ),
        KillAt::OldRemoved => (
            "kill_after_old_removed",
            "rtm-test/engine:1.4.2",
            "rtm-test/engine:1.4.3",
            "2s",
        ),
        KillAt::NewCreated => (
            "kill_after_create",
            "rtm-test/healthy:1.4.2",
            "rtm-test/healthy:1.4.3",
            "2s",
        ),
        KillAt::NewStarting => (
            "kill_during_start",
            "rtm-test/healthy:1.4.2",
            "rtm-test/healthy:1.4.3",
            "2s",
        ),
    };
    let rig = Rig::new(
        key,
        RigOptions {
            lease_ttl: "3s",
            stop_timeout,
            ..RigOptions::default()
        },
    )
    .await?;
    let registry = match at {
        KillAt::DuringPull => Some(Registry::serve(&rig.docker, new).await?),
        _ => None,
    };
    let new: Cow<'static, str> = match &registry {
        Some(registry) => {
            rig.remove_image_at_teardown(&registry.image);
            registry.image.clone().into()
        }
        None => new.into(),
    };
    rig.start_workers().await?;
    let game = "g1";
    let start = rig.send(game, Cmd::Start(old.into()), 1).await;
    let started = rig
        .wait_outer(&start, Duration::from_secs(60))
        .await
        .ok_or("the initial start has no outcome within 60 s")?;
    if started.str("outcome") != Some("success") {
        return Err(format!("the initial start failed: {}", started.body));
    }
    let old_c = rig
        .inspect(game)
        .await?
        .ok_or("no container after the initial start")?;

    // The watcher replays from a second before it started.
    let (mut docker_events, watcher) = watch_container(&rig, game);
    let patch = rig.send(game, Cmd::Patch(new.clone()), 1).await;
    let (lease_at, lease) = rig
        .wait_lease(game, &patch, Duration::from_secs(30))
        .await
        .ok_or("the patch never took the game's lease")?;
    let trigger = match at {
        KillAt::DuringPull => {
            let registry = registry
                .as_ref()
                .expect("the pull scenario serves a registry");
            if !registry.wait_mid_layer(Duration::from_secs(30)).await {
                return Err("Docker never began downloading the new image's layer".into());
            }
            // Part of the layer is on its way.
            tokio::time::sleep(Duration::from_millis(800)).await;
            let (begun, done) = registry.layer_downloads();
            format!(
                "the registry was sending the layer ({begun} download(s) begun, {done} finished)"
            )
        }
        KillAt::AfterLease => "the lease appeared".to_owned(),
        KillAt::InnerStop => {
            // `docker stop` sends SIGTERM (a `kill` event), which this engine
            // ignores: the stop now waits out its 3 s grace period.
            wait_event(&mut docker_events, Duration::from_secs(30), |a, id| {
                a == "kill" && id == old_c.id
            })
            .await
            .ok_or("Docker never reported the inner stop's SIGTERM")?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            "0.3 s after Docker reported the inner stop's SIGTERM".to_owned()
        }
        KillAt::OldRemoved => {
            wait_event(&mut docker_events, Duration::from_secs(30), |a, id| {
                a == "destroy" && id == old_c.id
            })
            .await
            .ok_or("Docker never reported the old container destroyed")?;
            "Docker reported the old container destroyed".to_owned()
        }
        KillAt::NewCreated | KillAt::NewStarting => {
            let action = if at == KillAt::NewCreated {
                "create"
            } else {
                "start"
            };
            let (_, new_id) = wait_event(&mut docker_events, Duration::from_secs(30), |a, id| {
                a == action && id != old_c.id
            })
            .await
            .ok_or_else(|| format!("Docker never reported a new container's {action}"))?;
            format!(
                "Docker reported the new container {}'s {action}",
                short(&new_id)
            )
        }
    };
    rig.workers[0].kill();
    let killed_after = lease_at.elapsed();
    let downloads_at_kill = registry.as_ref().map(Registry::layer_downloads);
    watcher.abort();

    // What the dead attempt left behind.
    let at_kill = rig.inspect(game).await?;
    let done_before_kill = rig.wait_outer(&patch, Duration::ZERO).await.is_some();
    let journal = rig.journal(&patch).await;
    let left = match &at_kill {
        None => "no container".to_owned(),
        Some(c) if c.id == old_c.id => format!(
            "the old container (running={}{})",
            c.running,
            c.health
                .as_deref()
                .map(|h| format!(", {h}"))
                .unwrap_or_default()
        ),
        Some(c) => format!(
            "a new container {} of {} (running={}{})",
            short(&c.id),
            c.image,
            c.running,
            c.health
                .as_deref()
                .map(|h| format!(", {h}"))
                .unwrap_or_default()
        ),
    };
    rig.note(format!(
        "killed w1 {} ms after the patch's lease appeared ({trigger}); lease value {}; \
         Docker then showed {left}; journal steps by then: [{}]",
        killed_after.as_millis(),
        lease,
        journal.join(", ")
    ));
    let mut invalid = Vec::new();
    if done_before_kill {
        invalid.push(format!(
            "scenario did not hit its step: the patch had already finished when w1 was killed ({trigger})"
        ));
    }
    if let Some((begun, done)) = downloads_at_kill
        && begun <= done
    {
        invalid.push(format!(
            "scenario did not hit its step: no layer download was under way at the kill ({begun} begun, {done} finished)"
        ));
    }
    if matches!(at, KillAt::InnerStop | KillAt::DuringPull)
        && !at_kill
            .as_ref()
            .is_some_and(|c| c.id == old_c.id && c.running)
    {
        invalid.push(format!(
            "scenario did not hit its step: the old container was not running at the kill ({left})"
        ));
    }
    if matches!(at, KillAt::NewCreated | KillAt::NewStarting) {
        let new_seen = at_kill.as_ref().filter(|c| c.id != old_c.id);
        if new_seen.is_none() {
            invalid.push(format!(
                "scenario did not hit its step: no new container at the kill ({left})"
            ));
        }
        if new_seen.is_some_and(|c| c.health.as_deref() == Some("healthy")) {
            invalid.push(
                "scenario did not hit its step: the new container was already healthy".into(),
            );
        }
    }

    let restarted = Instant::now();
    rig.workers[0].spawn();
    let outcome = rig.wait_outer(&patch, Duration::from_secs(120)).await;
    if outcome.is_some() {
        rig.note(format!(
            "the redelivered patch finished {:.1} s after the restart",
            restarted.elapsed().as_secs_f64()
        ));
    }
    let mut row = rig
        .finish(
            title(key),
            Expect {
                allow_rolled_back: true,
                ..Expect::default()
            },
        )
        .await;
    row.violations.extend(invalid);

    // The patch finished (new image runs) or restored the previous one.
    let record = records(&rig).await?.remove(game);
    let running = record
        .as_ref()
        .filter(|r| r.status == "running")
        .map(|r| r.image.clone());
    match outcome
        .as_ref()
        .and_then(|o| o.str("outcome").map(str::to_owned))
    {
        Some(o) if o == "success" => {
            if running.as_deref() != Some(&*new) {
                row.violations.push(format!(
                    "the patch succeeded but the record shows {record:?}, not {new} running"
                ));
            }
        }
        Some(_) => {
            let rolled_back = outcome
                .as_ref()
                .and_then(|o| o.body.get("rolled_back"))
                .and_then(serde_json::Value::as_bool)
                == Some(true);
            if !(rolled_back && running.as_deref() == Some(old)) {
                row.violations.push(format!(
                    "the patch failed without restoring {old}: {} (record {record:?})",
                    outcome
                        .as_ref()
                        .map(|o| o.body.to_string())
                        .unwrap_or_default()
                ));
            }
        }
        None => row
            .violations
            .push("the redelivered patch has no outcome".into()),
    }
    row.notes.push(format!(
        "patch journal at the end: [{}]",
        rig.journal(&patch).await.join(", ")
    ));
    if let Some(registry) = &registry {
        let (begun, done) = registry.layer_downloads();
        row.notes.push(format!(
            "registry: {begun} layer download(s) begun, {done} finished"
        ));
    }
    Ok(row)
}

// ------------------------------------ 2. dependency restarts mid-stream

pub async fn restart_dep(dep: Dep) -> Result<Row, String> {
    let key = match dep {
        Dep::RabbitMq => "restart_rabbitmq",
        Dep::Redis => "restart_redis",
        Dep::Postgres => "restart_postgres",
        Dep::Docker => "restart_dockerd",
    };
    let rig = Rig::new(
        key,
        RigOptions {
            private_docker: dep == Dep::Docker,
            ..RigOptions::default()
        },
    )
    .await?;
    rig.start_workers().await?;
    let games = games(10);
    let down = if dep == Dep::Docker {
        Duration::from_secs(3)
    } else {
        Duration::from_secs(5)
    };
    let stream_start = Instant::now();
    let outage = async {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let sent_before = rig.ledger.lock().unwrap().len();
        let t = Instant::now();
        rig.stop_dep(dep).await?;
        let stop_took = t.elapsed();
        // /readyz must name the dependency down while it is down (the
        // probes run every 2 s): polled every 250 ms through the outage.
        let name = dep.readyz_name();
        let mut during = Err(format!("never answered 503 with \"{name}\":\"down\""));
        let mut last = None;
        while t.elapsed() < stop_took + down {
            let answer = rig.workers[0].http_get("/readyz").await;
            if during.is_err()
                && let Ok((503, body)) = &answer
                && body.contains(&format!("\"{name}\":\"down\""))
            {
                during = Ok((t.elapsed() - stop_took, body.trim().to_owned()));
            }
            last = Some(answer);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let during = during.map_err(|e| format!("{e}; last answer {last:?}"));
        let t2 = Instant::now();
        rig.start_dep(dep).await?;
        rig.note(format!(
            "{} taken down {:.1} s into the stream after {sent_before} command(s) were sent \
             (stopping took {} ms), down {:.1} s in all, back up {} ms after its start began",
            dep.name(),
            (t - stream_start).as_secs_f64(),
            stop_took.as_millis(),
            (t2 - t).as_secs_f64() + t2.elapsed().as_secs_f64(),
            t2.elapsed().as_millis()
        ));
        Ok::<_, String>(during)
    };
    let ((), outage) = tokio::join!(
        open_stream(&rig, &games, Duration::from_millis(200), 1),
        outage
    );
    let during = outage?;
    let mut readyz = Vec::new();
    match &during {
        Ok((after, body)) => rig.note(format!(
            "/readyz reported it down {} ms after it stopped: 503 {body}",
            after.as_millis()
        )),
        Err(e) => readyz.push(format!(
            "/readyz never reported {} down during its {:.0} s outage: {e}",
            dep.name(),
            down.as_secs_f64()
        )),
    }
    // And it recovers by itself.
    if let Err(e) = rig.workers[0].wait_ready(Duration::from_secs(30)).await {
        readyz.push(format!("/readyz not 200 within 30 s of the restart: {e}"));
    }
    rig.note(format!(
        "stream of {} commands sent in {:.1} s",
        rig.ledger.lock().unwrap().len(),
        stream_start.elapsed().as_secs_f64()
    ));
    let mut row = rig.finish(title(key), Expect::all_success()).await;
    row.violations.extend(readyz);
    Ok(row)
}

// ------------------------------------------------------ 3. duplicates

pub async fn duplicates() -> Result<Row, String> {
    let key = "duplicates";
    let rig = Rig::new(key, RigOptions::default()).await?;
    rig.start_workers().await?;
    open_stream(&rig, &games(10), Duration::from_millis(150), 2).await;
    Ok(rig.finish(title(key), Expect::all_success()).await)
}

// ------------------------------------------------- 4. two workers

pub async fn two_workers() -> Result<Row, String> {
    let key = "two_workers";
    let rig = Rig::new(
        key,
        RigOptions {
            workers: 2,
            ..RigOptions::default()
        },
    )
    .await?;
    rig.start_workers().await?;
    // 40 ms apart: a game's next command arrives while its previous one
    // still runs, often on the other worker.
    open_stream(&rig, &games(10), Duration::from_millis(40), 1).await;
    Ok(rig
        .finish(
            title(key),
            Expect {
                // Commands of one game spread over two workers contend for
                // its lease (`conflict`); a patch overtaking its start finds
                // no record (`not_found`). Both are correct answers.
                allowed_failures: &["conflict", "not_found"],
                ..Expect::default()
            },
        )
        .await)
}

pub async fn two_workers_closed_loop_kill() -> Result<Row, String> {
    let key = "two_workers_closed_loop_kill";
    let rig = Rig::new(
        key,
        RigOptions {
            workers: 2,
            lease_ttl: "3s",
            ..RigOptions::default()
        },
    )
    .await?;
    rig.start_workers().await?;
    let stream_start = Instant::now();
    let chaos = async {
        tokio::time::sleep(Duration::from_secs(4)).await;
        let sent = rig.ledger.lock().unwrap().len();
        let at = stream_start.elapsed();
        rig.workers[0].kill();
        tokio::time::sleep(Duration::from_secs(1)).await;
        rig.workers[0].spawn();
        rig.note(format!(
            "w1 SIGKILLed {:.1} s into the stream ({sent} commands sent by then), restarted 1 s later",
            at.as_secs_f64()
        ));
    };
    let games = games(8);
    tokio::join!(closed_stream(&rig, &games, 2), chaos);
    Ok(rig.finish(title(key), Expect::all_success()).await)
}

// ------------------------------------------- 5. a paused worker is fenced

pub async fn paused_worker_fenced() -> Result<Row, String> {
    let key = "paused_worker_fenced";
    let rig = Rig::new(
        key,
        RigOptions {
            workers: 2,
            lease_ttl: "3s",
            // w1 holds only the patch, so the next command goes to w2.
            prefetch: Some("1"),
            ..RigOptions::default()
        },
    )
    .await?;
    let (w1, w2) = (&rig.workers[0], &rig.workers[1]);
    w1.spawn();
    w1.wait_ready(Duration::from_secs(90)).await?;
    let game = "g1";
    let start = rig
        .send(game, Cmd::Start("rtm-test/engine:1.4.2".into()), 1)
        .await;
    let started = rig
        .wait_outer(&start, Duration::from_secs(60))
        .await
        .ok_or("the initial start has no outcome within 60 s")?;
    if started.str("outcome") != Some("success") {
        return Err(format!("the initial start failed: {}", started.body));
    }
    let patch = rig
        .send(game, Cmd::Patch("rtm-test/engine:1.4.3".into()), 1)
        .await;
    let (lease_at, _) = rig
        .wait_lease(game, &patch, Duration::from_secs(30))
        .await
        .ok_or("the patch never took the game's lease")?;
    w1.pause();
    let paused_at = Instant::now();
    let journal = rig.journal(&patch).await;
    rig.note(format!(
        "w1 SIGSTOPped {} ms after the patch's lease appeared (journal: [{}])",
        lease_at.elapsed().as_millis(),
        journal.join(", ")
    ));
    w2.spawn();
    w2.wait_ready(Duration::from_secs(90)).await?;
    // Wait for the paused holder's lease to expire.
    if !rig.wait_lease_gone(game, Duration::from_secs(20)).await? {
        return Err("the paused worker's lease did not expire within 20 s".into());
    }
    let restart = rig.send(game, Cmd::Restart, 1).await;
    let sent_at = Instant::now();
    // The restart's outcome as recorded, then as published.
    let recorded = poll_for(
        Duration::from_secs(40),
        Duration::from_millis(100),
        || async {
            let row: Option<(String, Option<String>)> = sqlx::query_as(
                "select outcome, error_code from operation_log
              where command_id = $1 and outer_op is null",
            )
            .bind(&restart)
            .fetch_optional(&rig.db)
            .await
            .ok()
            .flatten();
            row.map(|r| (r, sent_at.elapsed()))
        },
    )
    .await;
    let published = rig.wait_outer(&restart, Duration::from_secs(10)).await;
    let mut findings = Vec::new();
    match &recorded {
        None => rig.note("w2's restart, sent while w1 was paused: no outcome recorded within 40 s"),
        Some(((outcome, code), after)) => {
            rig.note(format!(
                "w2's restart, sent while w1 was paused, recorded {outcome}{} after {:.1} s; \
                 its event {}",
                code.as_deref().map(|c| format!(" {c}")).unwrap_or_default(),
                after.as_secs_f64(),
                if published.is_some() {
                    "was published".to_owned()
                } else {
                    "was still unpublished 10 s later".to_owned()
                }
            ));
            if published.is_none() {
                findings.push(
                    "outcome events stall while a worker is paused: w2's restart was recorded \
                     but no event was published until w1 was resumed (w1 started first and holds \
                     the relay's advisory lock on a live PostgreSQL session; a paused or \
                     partitioned leader keeps it until its session dies)"
                        .to_owned(),
                );
            }
        }
    }
    w1.resume();
    let resumed_at = Instant::now();
    rig.note(format!(
        "w1 SIGCONTed after {:.1} s paused",
        paused_at.elapsed().as_secs_f64()
    ));
    if published.is_none() && recorded.is_some() {
        let late = rig.wait_outer(&restart, Duration::from_secs(30)).await;
        rig.note(format!(
            "the restart's event {}",
            if late.is_some() {
                format!(
                    "was published {} ms after w1 resumed",
                    resumed_at.elapsed().as_millis()
                )
            } else {
                "was not published within 30 s of w1 resuming".into()
            }
        ));
    }
    let mut row = rig.finish(title(key), Expect::all_success()).await;
    row.findings.extend(findings);
    // Evidence: what w1 logged about its lease once resumed.
    let text = std::fs::read_to_string(&w1.log).unwrap_or_default();
    let after: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.contains("SIGCONT"))
        .filter(|l| l.contains("lease") || l.contains("fence") || l.contains("interrupted"))
        .take(6)
        .collect();
    for line in after {
        row.notes
            .push(format!("w1 after SIGCONT: {}", compact_log_line(line)));
    }
    Ok(row)
}

/// A JSON log line reduced to level, message and the interesting fields.
pub fn compact_log_line(line: &str) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
        return line.chars().take(300).collect();
    };
    // Flattened (`message` at the top) or nested under `fields`.
    let fields = v.get("fields").cloned().unwrap_or_else(|| v.clone());
    let mut out = format!(
        "{} {}",
        v.get("level").and_then(|l| l.as_str()).unwrap_or(""),
        fields.get("message").and_then(|m| m.as_str()).unwrap_or("")
    );
    if let Some(obj) = fields.as_object() {
        for (k, val) in obj.iter().filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "message" | "level" | "timestamp" | "fields" | "spans"
            )
        }) {
            out.push_str(&format!(" {k}={val}"));
        }
    }
    out.chars().take(400).collect()
}
