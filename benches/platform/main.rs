//! `make bench`: rtmanager driven from outside — commands published to
//! RabbitMQ as the lobby sends them, outcome events read from the event
//! exchange, the release binary run as `rtmanager serve` — against the
//! local services under private names, each figure beside its floor from
//! the same run (the raw Docker API sequence, the docker CLI, the
//! database's own floor for the same durable writes). Writes `BENCH.md`
//! (`--smoke`: tiny counts, `target/bench-smoke.md`) and prints the table.
//!
//! Issue 11 says what is measured and why; BENCH.md's method section says
//! how.

mod amqp;
mod floor;
mod profile;
mod report;
mod rig;
mod stats;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use bollard::Docker;

use crate::amqp::{Got, Hub, Publisher, command, confirmed, round_trip, wait_all};
use crate::floor::{DbFloor, DockerEvents, FloorGame};
use crate::report::{Row, mib, ms, rate, secs};
use crate::rig::{Names, Rig, Worker};

pub const REPO: &str = "rtm-test/engine";
/// Patches alternate between these (SPEC §3: same major.minor, downgrades
/// allowed).
pub const TAGS: [&str; 2] = ["1.4.2", "1.4.3"];
/// A patch to another minor: refused by semver before any Docker work.
pub const REJECTED_IMAGE: &str = "rtm-test/engine:1.5.0";

fn image(tag_index: usize) -> String {
    format!("{REPO}:{}", TAGS[tag_index % 2])
}

static STARTED: OnceLock<Instant> = OnceLock::new();

/// A progress line on stderr.
pub fn say(msg: &str) {
    let t = STARTED.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("[bench {t:>6.1}s] {msg}");
}

/// Counts of one run (`--smoke`: tiny ones).
#[derive(Debug, Clone)]
struct Settings {
    smoke: bool,
    /// Sequential patches of one game, each way (after one warm-up).
    patch_iters: usize,
    /// Games patched at once, and the games rejected patches spread over.
    games: usize,
    /// Games started in all (the peak-RSS burst patches all of them).
    rss_games: usize,
    /// Rounds of the burst, rtmanager and API alternating (ABBA…).
    burst_rounds: usize,
    rejected_spread: usize,
    rejected_one: usize,
    soak_secs: u64,
    soak_rate: f64,
    events_count: usize,
    events_rate: f64,
    events_patches: usize,
    one_at_a_time: usize,
}

impl Settings {
    fn new(smoke: bool) -> Self {
        let soak = |default: u64| {
            std::env::var("BENCH_SOAK")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        if smoke {
            Self {
                smoke,
                patch_iters: 2,
                games: 5,
                rss_games: 8,
                burst_rounds: 1,
                rejected_spread: 200,
                rejected_one: 50,
                soak_secs: soak(10),
                soak_rate: 50.0,
                events_count: 100,
                events_rate: 50.0,
                events_patches: 3,
                one_at_a_time: 10,
            }
        } else {
            Self {
                smoke,
                patch_iters: 15,
                games: 100,
                rss_games: 128,
                burst_rounds: 2,
                rejected_spread: 4000,
                rejected_one: 1500,
                soak_secs: soak(60),
                soak_rate: 100.0,
                events_count: 1000,
                events_rate: 100.0,
                events_patches: 10,
                one_at_a_time: 60,
            }
        }
    }
}

// Tags of the phases, for the observer's latency samples.
const TAG_SETUP: u32 = 1;
const TAG_PATCH: u32 = 2;
const TAG_BURST: u32 = 3;
const TAG_REJECT_SPREAD: u32 = 4;
const TAG_REJECT_ONE: u32 = 5;
const TAG_RSS: u32 = 6;
const TAG_SOAK: u32 = 7;
const TAG_EVENTS: u32 = 8;
const TAG_EVENTS_PATCH: u32 = 9;
const TAG_ONE_AT_A_TIME: u32 = 10;

const PATCH_WAIT: Duration = Duration::from_secs(120);
const BURST_WAIT: Duration = Duration::from_secs(600);

fn main() -> ExitCode {
    STARTED.get_or_init(Instant::now);
    // `cargo bench` passes `--bench`; only `--smoke` means anything here.
    let smoke = std::env::args().any(|a| a == "--smoke");
    let settings = Settings::new(smoke);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async_main(settings))
}

async fn async_main(settings: Settings) -> ExitCode {
    let rig = match Rig::new() {
        Ok(rig) => Arc::new(rig),
        Err(e) => {
            eprintln!("bench: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    say(&format!(
        "bench {} ({}): private names rtmb.{}.*, database {}, containers {}*",
        rig.names.id,
        if settings.smoke { "smoke" } else { "full" },
        rig.names.id,
        rig.names.worker_db,
        rig.names.container_prefix
    ));
    let task = tokio::spawn(run(rig.clone(), settings.clone()));
    let abort = task.abort_handle();
    let outcome = tokio::select! {
        joined = task => joined.unwrap_or_else(|e| Err(anyhow::anyhow!("the bench panicked: {e}"))),
        _ = tokio::signal::ctrl_c() => {
            abort.abort();
            Err(anyhow::anyhow!("interrupted"))
        }
    };
    rig.cleanup(outcome.is_err()).await;
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What one run needs at hand.
struct Ctx {
    rig: Arc<Rig>,
    names: Names,
    hub: Arc<Hub>,
    publisher: Publisher,
    docker: Docker,
    events: Arc<DockerEvents>,
    /// Per rtmanager game: the tag index it runs and its container.
    games: HashMap<String, (usize, String)>,
    notes: Vec<String>,
    /// Worker A's pid, for the CPU profile.
    worker_pid: u32,
}

impl Ctx {
    fn floor_game(&self, label: &str) -> FloorGame {
        let game_id = self.names.game(label);
        FloorGame {
            name: format!("{}{game_id}", self.names.container_prefix),
            state_dir: self.rig.state_root.path().join(&game_id),
            game_id,
        }
    }

    fn note(&mut self, note: String) {
        say(&format!("note: {note}"));
        self.notes.push(note);
    }
}

#[derive(Default)]
struct Figures {
    patch_rtm: Vec<f64>,
    patch_api: Vec<f64>,
    patch_cli: Vec<f64>,
    down_rtm: Vec<f64>,
    down_api: Vec<f64>,
    down_cli: Vec<f64>,
    burst_rtm: Vec<f64>,
    burst_api: Vec<f64>,
    /// Docker's CPU ms per patch and the machine's busy share, in the first
    /// rtmanager burst and the first raw-API one.
    burst_docker_cpu: [Option<(f64, f64)>; 2],
    rejected_spread: Option<f64>,
    rejected_one: Option<f64>,
    /// Where a rejected phase's CPU went, spread and one game.
    cpu_spread: Option<RejectedCpu>,
    cpu_one: Option<RejectedCpu>,
    /// PostgreSQL's CPU ms per command in the database floor, spread and
    /// one game.
    floor_pg_spread: Option<f64>,
    floor_pg_one: Option<f64>,
    floor_spread: Option<f64>,
    floor_one: Option<f64>,
    events_rejected: Vec<f64>,
    events_patch_two: Vec<f64>,
    events_patch_one: Vec<f64>,
    one_at_a_time: Vec<f64>,
    /// Per raw-API patch: the four calls' times, in ms.
    api_calls: Vec<[(&'static str, f64); 4]>,
    hwm_mib: Option<f64>,
    /// (seconds into the soak, VmRSS MiB)
    soak: Vec<(f64, f64)>,
}

async fn run(rig: Arc<Rig>, s: Settings) -> anyhow::Result<()> {
    let machine_before = machine_load();
    let docker = Docker::connect_with_unix_defaults()
        .context("docker")?
        .negotiate_version()
        .await
        .context("docker: negotiate the API version")?;
    for tag in TAGS {
        docker
            .inspect_image(&format!("{REPO}:{tag}"))
            .await
            .with_context(|| format!("image {REPO}:{tag} (run scripts/images.sh)"))?;
    }
    let events = DockerEvents::watch(docker.clone(), rig.names.game_prefix.clone()).await?;

    say("starting worker A (release binary, RTM_PREFETCH=128, RTM_START_SETTLE=0s)");
    let worker_a = rig.spawn_worker("A").await?;
    let hub = Hub::start(&rig.names).await?;
    let publisher = Publisher::connect(&rig.names).await?;
    let mut ctx = Ctx {
        names: rig.names.clone(),
        rig: rig.clone(),
        hub,
        publisher,
        docker,
        events,
        games: HashMap::new(),
        notes: Vec::new(),
        worker_pid: worker_a.pid(),
    };
    let mut f = Figures::default();

    // `BENCH_ONLY=<phase>`: one phase alone, its figures on stderr, no
    // BENCH.md (for iterating on one figure; the table needs the full run).
    if let Ok(only) = std::env::var("BENCH_ONLY") {
        return only_phase(&mut ctx, &s, &mut f, &only).await;
    }

    patch_one_at_a_time(&mut ctx, &s, &mut f).await?;

    let games: Vec<String> = (1..=s.rss_games)
        .map(|i| ctx.names.game(&format!("m{i:03}")))
        .collect();
    start_games(&mut ctx, &games).await?;
    bursts(&mut ctx, &s, &games[..s.games], &mut f).await?;

    rejected(&mut ctx, &s, &games[..s.games], &mut f).await?;

    say(&format!("peak RSS: {} games patched at once", games.len()));
    let t0 = Instant::now();
    patch_burst(&mut ctx, &games, TAG_RSS).await?;
    say(&format!(
        "peak RSS: burst done in {:.1} s",
        t0.elapsed().as_secs_f64()
    ));
    f.hwm_mib = worker_a.memory().map(|m| m.hwm_mib);

    let soak_games = if games.len() > s.games {
        &games[s.games..]
    } else {
        &games[..]
    };
    soak(
        &mut ctx,
        &s,
        &worker_a,
        &games[..s.games],
        soak_games,
        &mut f,
    )
    .await?;

    say("starting worker B: two workers from here on");
    let worker_b = rig.spawn_worker("B").await?;
    // The soak is over: reading /metrics no longer disturbs a memory figure.
    let before = [consumed(&worker_a).await, consumed(&worker_b).await];
    two_workers(&mut ctx, &s, &games, &mut f).await?;
    let after = [consumed(&worker_a).await, consumed(&worker_b).await];
    let split: Vec<String> = [&worker_a, &worker_b]
        .iter()
        .zip(before.iter().zip(after))
        .map(|(w, (b, a))| match (b, a) {
            (Some(b), Some(a)) => format!("worker {} took {:.0}", w.name, a - b),
            _ => format!(
                "worker {} took ? (no `rtmanager_commands_consumed_total`)",
                w.name
            ),
        })
        .collect();
    ctx.note(format!(
        "two-worker phase: {} of its commands (`rtmanager_commands_consumed_total`, read before and after the phase)",
        split.join(", ")
    ));
    for w in [&worker_a, &worker_b] {
        match w.terminate(Duration::from_secs(40)).await {
            Ok(Some(status)) if status.success() => {}
            Ok(Some(status)) => ctx.note(format!("worker {} exited {status} on SIGTERM", w.name)),
            Ok(None) => {}
            Err(e) => ctx.note(format!("worker {}: {e:#}", w.name)),
        }
    }
    let foreign = ctx.hub.foreign.load(std::sync::atomic::Ordering::Relaxed);
    if foreign > 0 {
        ctx.note(format!(
            "{foreign} event(s) on the event exchange matched no command the bench published"
        ));
    }

    write_report(&ctx, &s, &f, machine_before).await
}

/// One phase of the bench alone (`BENCH_ONLY`): `patch`, `burst`,
/// `rejected` or `memory`. Its figures go to stderr; nothing is written.
async fn only_phase(
    ctx: &mut Ctx,
    s: &Settings,
    f: &mut Figures,
    only: &str,
) -> anyhow::Result<()> {
    let games: Vec<String> = (1..=s.games)
        .map(|i| ctx.names.game(&format!("m{i:03}")))
        .collect();
    match only {
        "patch" => patch_one_at_a_time(ctx, s, f).await?,
        "burst" => {
            start_games(ctx, &games).await?;
            bursts(ctx, s, &games, f).await?;
        }
        "rejected" => {
            start_games(ctx, &games).await?;
            rejected(ctx, s, &games, f).await?;
        }
        // The peak-RSS burst on its own: every game started, the rejected
        // patches, then all of them patched at once.
        "memory" => {
            let all: Vec<String> = (1..=s.rss_games)
                .map(|i| ctx.names.game(&format!("m{i:03}")))
                .collect();
            start_games(ctx, &all).await?;
            rejected(ctx, s, &games, f).await?;
            patch_burst(ctx, &all, TAG_RSS).await?;
            let status = std::fs::read_to_string(format!("/proc/{}/status", ctx.worker_pid))?;
            for line in status.lines().filter(|l| l.starts_with("Vm")) {
                say(&format!("BENCH_ONLY=memory: {line}"));
            }
        }
        other => {
            anyhow::bail!("BENCH_ONLY={other:?}: expected patch, burst, rejected or memory")
        }
    }
    let median = |v: &[f64]| stats::median(v);
    say(&format!(
        "BENCH_ONLY={only}: patch rtm {:?} api {:?} cli {:?}; downtime rtm {:?} api {:?}; burst rtm {:?} api {:?}; rejected spread {:?} (floor {:?}), one {:?} (floor {:?})",
        median(&f.patch_rtm),
        median(&f.patch_api),
        median(&f.patch_cli),
        median(&f.down_rtm),
        median(&f.down_api),
        median(&f.burst_rtm),
        median(&f.burst_api),
        f.rejected_spread,
        f.floor_spread,
        f.rejected_one,
        f.floor_one,
    ));
    for note in &ctx.notes {
        say(note);
    }
    Ok(())
}

/// Starts `games` with rtmanager, all at once, and waits for each success.
async fn start_games(ctx: &mut Ctx, games: &[String]) -> anyhow::Result<()> {
    say(&format!(
        "setup: starting {} games with rtmanager",
        games.len()
    ));
    let mut receivers = Vec::new();
    let mut confirms = Vec::new();
    for game in games {
        let (id, body) = command("start", game, Some(&image(0)));
        receivers.push(ctx.hub.expect(&id, TAG_SETUP));
        confirms.push(ctx.publisher.publish("start", &id, &body).await?);
    }
    for c in confirms {
        confirmed(c).await?;
    }
    let gots = wait_all(&ctx.hub, receivers, BURST_WAIT, "setup: starts").await?;
    for (game, got) in games.iter().zip(gots) {
        ensure!(got.success(), "start of {game} failed: {}", got.code());
        let id = got
            .container_id
            .context("a start event without container_id")?;
        ctx.games.insert(game.clone(), (0, id));
    }
    Ok(())
}

/// Measures 1 and 2: one game patched again and again, three ways in turn
/// (rtmanager, the raw API calls, the CLI), each with its downtime.
async fn patch_one_at_a_time(ctx: &mut Ctx, s: &Settings, f: &mut Figures) -> anyhow::Result<()> {
    say("patch: starting one game three ways (rtmanager, raw API, docker CLI)");
    let game = ctx.names.game("p");
    let (_, got) = round_trip(
        &ctx.hub,
        &ctx.publisher,
        "start",
        &game,
        Some(&image(0)),
        TAG_SETUP,
        PATCH_WAIT,
    )
    .await?;
    ensure!(got.success(), "start of {game} failed: {}", got.code());
    let mut rtm_id = got
        .container_id
        .context("a start event without container_id")?;
    let api = ctx.floor_game("api-p");
    let mut api_id = floor::api_create_start(&ctx.docker, &api, &image(0)).await?;
    let cli = ctx.floor_game("cli-p");
    let mut cli_id = floor::cli_run(&cli, &image(0)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut lost_downtimes = 0;
    // Iteration 0 warms every path up and is not counted.
    for i in 0..=s.patch_iters {
        let img = image(i + 1);
        for k in 0..3 {
            // The order rotates, so no way always goes first.
            match (i + k) % 3 {
                0 => {
                    let (took, got) = round_trip(
                        &ctx.hub,
                        &ctx.publisher,
                        "patch",
                        &game,
                        Some(&img),
                        TAG_PATCH,
                        PATCH_WAIT,
                    )
                    .await?;
                    ensure!(got.success(), "patch of {game} failed: {}", got.code());
                    let new = got
                        .container_id
                        .context("a patch event without container_id")?;
                    let down = ctx
                        .events
                        .downtime(&rtm_id, &new, Duration::from_secs(5))
                        .await;
                    rtm_id = new;
                    if i > 0 {
                        f.patch_rtm.push(ms_of(took));
                        match down {
                            Some(d) => f.down_rtm.push(ms_of(d)),
                            None => lost_downtimes += 1,
                        }
                    }
                }
                1 => {
                    let t0 = Instant::now();
                    let (new, calls) = floor::api_replace_timed(&ctx.docker, &api, &img).await?;
                    let took = t0.elapsed();
                    if i > 0 {
                        f.api_calls.push(calls.map(|(call, d)| (call, ms_of(d))));
                    }
                    let down = ctx
                        .events
                        .downtime(&api_id, &new, Duration::from_secs(5))
                        .await;
                    api_id = new;
                    if i > 0 {
                        f.patch_api.push(ms_of(took));
                        match down {
                            Some(d) => f.down_api.push(ms_of(d)),
                            None => lost_downtimes += 1,
                        }
                    }
                }
                _ => {
                    let t0 = Instant::now();
                    let new = floor::cli_replace(&cli, &img).await?;
                    let took = t0.elapsed();
                    let down = ctx
                        .events
                        .downtime(&cli_id, &new, Duration::from_secs(5))
                        .await;
                    cli_id = new;
                    if i > 0 {
                        f.patch_cli.push(ms_of(took));
                        match down {
                            Some(d) => f.down_cli.push(ms_of(d)),
                            None => lost_downtimes += 1,
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        say(&format!(
            "patch: {}/{} rounds (rtmanager, API, CLI each){}",
            i,
            s.patch_iters,
            if i == 0 { " — warm-up done" } else { "" }
        ));
    }
    if lost_downtimes > 0 {
        ctx.note(format!(
            "{lost_downtimes} patch(es) had no kill/die → start pair in Docker's event stream within 5 s; their downtime is left out"
        ));
    }
    if let Some(first) = f.api_calls.first() {
        let medians: Vec<String> = (0..first.len())
            .map(|k| {
                let times: Vec<f64> = f.api_calls.iter().map(|c| c[k].1).collect();
                format!(
                    "{} {:.0} ms",
                    first[k].0,
                    stats::median(&times).unwrap_or(0.0)
                )
            })
            .collect();
        ctx.note(format!(
            "profile, the raw API patch, each call (medians of {}): {}. The downtime holds all four but for the stop's first moments; create-before-stop takes only the create out of it, so the create's share of the downtime is the most that can be saved that way",
            f.api_calls.len(),
            medians.join(", ")
        ));
    }
    f.events_patch_one = ctx.hub.samples(TAG_PATCH).iter().map(|s| s.ms).collect();
    Ok(())
}

/// Publishes a patch of every game at once (each to its other tag) and
/// waits for every outer event: the makespan.
async fn patch_burst(ctx: &mut Ctx, games: &[String], tag: u32) -> anyhow::Result<Duration> {
    let mut receivers = Vec::new();
    let mut confirms = Vec::new();
    let t0 = Instant::now();
    for game in games {
        let next = ctx.games[game].0 + 1;
        let (id, body) = command("patch", game, Some(&image(next)));
        receivers.push(ctx.hub.expect(&id, tag));
        confirms.push(ctx.publisher.publish("patch", &id, &body).await?);
    }
    for c in confirms {
        confirmed(c).await?;
    }
    let gots = wait_all(&ctx.hub, receivers, BURST_WAIT, "burst").await?;
    let last = gots.iter().map(|g| g.at).max().context("no games")?;
    let mut failed = BTreeMap::new();
    for (game, got) in games.iter().zip(gots) {
        let entry = ctx.games.get_mut(game).expect("a started game");
        if got.success() {
            entry.0 += 1;
            if let Some(id) = got.container_id {
                entry.1 = id;
            }
        } else {
            *failed.entry(got.code().to_owned()).or_insert(0) += 1;
        }
    }
    ensure!(failed.is_empty(), "patches failed in a burst: {failed:?}");
    Ok(last - t0)
}

/// Measure 3: the games patched at once, rtmanager and the raw API calls
/// on as many containers, in ABBA order.
async fn bursts(
    ctx: &mut Ctx,
    s: &Settings,
    games: &[String],
    f: &mut Figures,
) -> anyhow::Result<()> {
    say(&format!(
        "burst: creating {} floor containers (raw API)",
        games.len()
    ));
    let floors: Vec<FloorGame> = (1..=games.len())
        .map(|i| ctx.floor_game(&format!("api-m{i:03}")))
        .collect();
    let first = image(0);
    let created = futures_util::future::join_all(
        floors
            .iter()
            .map(|g| floor::api_create_start(&ctx.docker, g, &first)),
    )
    .await;
    for c in created {
        c?;
    }
    let mut floor_tag = 0;
    tokio::time::sleep(Duration::from_secs(1)).await;
    for round in 0..s.burst_rounds * 2 {
        // ABBA: rtmanager, API, API, rtmanager, …
        let rtm_turn = (round % 4 == 0) || (round % 4 == 3);
        if rtm_turn {
            say(&format!(
                "burst: rtmanager patches {} games at once",
                games.len()
            ));
            let before = profile::Cpu::sample(ctx.worker_pid);
            let took = patch_burst(ctx, games, TAG_BURST).await?;
            say(&format!(
                "burst: rtmanager makespan {:.1} s",
                took.as_secs_f64()
            ));
            if round == 0 {
                let after = profile::Cpu::sample(ctx.worker_pid);
                f.burst_docker_cpu[0] = Some(docker_cpu(&after, &before, games.len()));
                let cpu = after.since(&before, games.len());
                ctx.note(format!(
                    "profile, {} games patched at once by rtmanager, CPU per patch: {cpu}",
                    games.len()
                ));
            }
            f.burst_rtm.push(took.as_secs_f64());
        } else {
            floor_tag += 1;
            say(&format!(
                "burst: raw API replaces {} containers at once",
                floors.len()
            ));
            let img = image(floor_tag);
            let before = profile::Cpu::sample(ctx.worker_pid);
            let t0 = Instant::now();
            let done = futures_util::future::join_all(
                floors
                    .iter()
                    .map(|g| floor::api_replace(&ctx.docker, g, &img)),
            )
            .await;
            let took = t0.elapsed();
            for d in done {
                d?;
            }
            say(&format!(
                "burst: raw API makespan {:.1} s",
                took.as_secs_f64()
            ));
            if round == 1 {
                let after = profile::Cpu::sample(ctx.worker_pid);
                f.burst_docker_cpu[1] = Some(docker_cpu(&after, &before, floors.len()));
                let cpu = after.since(&before, floors.len());
                ctx.note(format!(
                    "profile, {} containers replaced at once through the raw API, CPU per patch: {cpu}",
                    floors.len()
                ));
            }
            f.burst_api.push(took.as_secs_f64());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(())
}

/// Docker's CPU per patch (dockerd and containerd, ms) and the machine's
/// busy share over a burst.
fn docker_cpu(after: &profile::Cpu, before: &profile::Cpu, patches: usize) -> (f64, f64) {
    (
        after.ms_per_command(before, patches, &["dockerd", "containerd"]),
        after.busy_since(before),
    )
}

/// Publishes `n` rejected patches over `games` (round robin), paced at
/// `per_sec` (or all at once), and waits for their outcomes. Returns the
/// outcomes and the time from the first publish to the last outcome.
async fn rejected_load(
    ctx: &Ctx,
    games: &[String],
    n: usize,
    per_sec: Option<f64>,
    tag: u32,
    what: &str,
) -> anyhow::Result<Load> {
    let mut receivers = Vec::with_capacity(n);
    let mut confirms = Vec::with_capacity(n);
    let t0 = Instant::now();
    let mut sent = 0;
    while sent < n {
        let due = match per_sec {
            Some(r) => ((t0.elapsed().as_secs_f64() * r) as usize + 1).min(n),
            None => n,
        };
        while sent < due {
            let game = &games[sent % games.len()];
            let (id, body) = command("patch", game, Some(REJECTED_IMAGE));
            receivers.push(ctx.hub.expect(&id, tag));
            confirms.push(ctx.publisher.publish("patch", &id, &body).await?);
            sent += 1;
        }
        if sent < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let published = t0.elapsed();
    for c in confirms {
        confirmed(c).await?;
    }
    let gots = wait_all(&ctx.hub, receivers, BURST_WAIT, what).await?;
    let last = gots.iter().map(|g| g.at).max().context("no commands")?;
    Ok(Load {
        gots,
        took: last - t0,
        published,
    })
}

/// The outcomes of a load, the time from its first publish to its last
/// outcome, and the time it took to publish it all.
struct Load {
    gots: Vec<Got>,
    took: Duration,
    published: Duration,
}

fn codes(gots: &[Got]) -> BTreeMap<String, usize> {
    let mut codes = BTreeMap::new();
    for g in gots {
        *codes.entry(g.code().to_owned()).or_insert(0) += 1;
    }
    codes
}

/// Measure 4: rejected patches over the games, then on one game; then the
/// database's floor for the same writes at the same concurrency.
async fn rejected(
    ctx: &mut Ctx,
    s: &Settings,
    games: &[String],
    f: &mut Figures,
) -> anyhow::Result<()> {
    for (label, set, n, tag) in [
        ("spread", games, s.rejected_spread, TAG_REJECT_SPREAD),
        ("one game", &games[..1], s.rejected_one, TAG_REJECT_ONE),
    ] {
        say(&format!(
            "rejected ({label}): {n} patches to {REJECTED_IMAGE} over {} game(s)",
            set.len()
        ));
        let before = profile::Cpu::sample(ctx.worker_pid);
        let Load { gots, took, .. } =
            rejected_load(ctx, set, n, None, tag, &format!("rejected ({label})")).await?;
        let per_sec = n as f64 / took.as_secs_f64();
        say(&format!("rejected ({label}): {per_sec:.0} /s"));
        let after = profile::Cpu::sample(ctx.worker_pid);
        let cpu = after.since(&before, n);
        ctx.note(format!("profile, rejected patches ({label}), CPU: {cpu}"));
        let phase_cpu = after
            .ceiling_without_worker(&before, n)
            .map(|(cap, rest_ms)| RejectedCpu {
                cap,
                rest_ms,
                pg_ms: after.ms_per_command(&before, n, &["PostgreSQL"]),
            });
        let codes = codes(&gots);
        if codes.keys().any(|c| c != "semver_patch_only") {
            ctx.note(format!(
                "rejected patches ({label}, one worker): outcomes {codes:?} (all were expected to be semver_patch_only)"
            ));
        }
        if tag == TAG_REJECT_SPREAD {
            f.rejected_spread = Some(per_sec);
            f.cpu_spread = phase_cpu;
        } else {
            f.rejected_one = Some(per_sec);
            f.cpu_one = phase_cpu;
        }
    }

    say("database floor: a private migrated database, the three commits of a rejected command");
    rig::create_database(&ctx.names.floor_db).await?;
    let db = DbFloor::connect(&Names::database_url(&ctx.names.floor_db)).await?;
    let floor_games: Vec<String> = (1..=games.len())
        .map(|i| ctx.names.game(&format!("floor-m{i:03}")))
        .collect();
    db.run(&floor_games, 200.min(s.rejected_spread)).await?; // warm-up
    let before = profile::Cpu::sample(ctx.worker_pid);
    let spread = db.run(&floor_games, s.rejected_spread).await?;
    let after = profile::Cpu::sample(ctx.worker_pid);
    f.floor_pg_spread = Some(after.ms_per_command(&before, s.rejected_spread, &["PostgreSQL"]));
    let cpu = after.since(&before, s.rejected_spread);
    ctx.note(format!("profile, the database floor (spread), CPU: {cpu}"));
    say(&format!(
        "database floor (spread, {} tasks): {spread:.0} /s",
        floor_games.len()
    ));
    let before = profile::Cpu::sample(ctx.worker_pid);
    let one = db.run(&floor_games[..1], s.rejected_one).await?;
    let after = profile::Cpu::sample(ctx.worker_pid);
    f.floor_pg_one = Some(after.ms_per_command(&before, s.rejected_one, &["PostgreSQL"]));
    ctx.note(format!(
        "profile, the database floor (one game), CPU: {}",
        after.since(&before, s.rejected_one)
    ));
    say(&format!("database floor (one game): {one:.0} /s"));
    db.close().await;
    f.floor_spread = Some(spread);
    f.floor_one = Some(one);
    Ok(())
}

/// Measure 7's soak: steady rejected patches and a real patch every 2 s,
/// VmRSS sampled every second, no /metrics scrape.
async fn soak(
    ctx: &mut Ctx,
    s: &Settings,
    worker: &Worker,
    reject_games: &[String],
    patch_games: &[String],
    f: &mut Figures,
) -> anyhow::Result<()> {
    say(&format!(
        "soak: {} s, {:.0} rejected patches/s and a real patch every 2 s; VmRSS every second, no /metrics scrape",
        s.soak_secs, s.soak_rate
    ));
    let soak = Duration::from_secs(s.soak_secs);
    let mut receivers = Vec::new();
    let mut confirms = Vec::new();
    let mut patched = Vec::new();
    let t0 = Instant::now();
    let mut sent = 0usize;
    let mut next_sample = t0;
    let mut next_patch = t0 + Duration::from_secs(2);
    let mut patches = 0usize;
    let mut next_say = t0 + Duration::from_secs(10);
    while t0.elapsed() < soak {
        let now = Instant::now();
        let due = (t0.elapsed().as_secs_f64() * s.soak_rate) as usize;
        while sent < due {
            let game = &reject_games[sent % reject_games.len()];
            let (id, body) = command("patch", game, Some(REJECTED_IMAGE));
            receivers.push(ctx.hub.expect(&id, TAG_SOAK));
            confirms.push(ctx.publisher.publish("patch", &id, &body).await?);
            sent += 1;
        }
        if now >= next_patch {
            let game = &patch_games[patches % patch_games.len()];
            let next = ctx.games[game].0 + 1;
            let (id, body) = command("patch", game, Some(&image(next)));
            patched.push((game.clone(), ctx.hub.expect(&id, TAG_SOAK)));
            confirms.push(ctx.publisher.publish("patch", &id, &body).await?);
            ctx.games.get_mut(game).expect("a started game").0 = next;
            patches += 1;
            next_patch += Duration::from_secs(2);
        }
        if now >= next_sample {
            if let Some(m) = worker.memory() {
                f.soak.push((t0.elapsed().as_secs_f64(), m.rss_mib));
            }
            next_sample += Duration::from_secs(1);
        }
        if now >= next_say {
            say(&format!(
                "soak: {:.0}/{} s, {sent} rejected and {patches} real patches sent, VmRSS {}",
                t0.elapsed().as_secs_f64(),
                s.soak_secs,
                mib(f.soak.last().map(|p| p.1))
            ));
            next_say += Duration::from_secs(10);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for c in confirms {
        confirmed(c).await?;
    }
    let gots = wait_all(&ctx.hub, receivers, BURST_WAIT, "soak: rejected").await?;
    let codes = codes(&gots);
    if codes.keys().any(|c| c != "semver_patch_only") {
        ctx.note(format!("soak: rejected patches' outcomes {codes:?}"));
    }
    let (games, receivers): (Vec<_>, Vec<_>) = patched.into_iter().unzip();
    let gots = wait_all(&ctx.hub, receivers, BURST_WAIT, "soak: patches").await?;
    for (game, got) in games.iter().zip(gots) {
        ensure!(
            got.success(),
            "soak: patch of {game} failed: {}",
            got.code()
        );
        if let Some(id) = got.container_id {
            ctx.games.get_mut(game).expect("a started game").1 = id;
        }
    }
    if let Some(m) = worker.memory() {
        f.soak.push((t0.elapsed().as_secs_f64(), m.rss_mib));
    }
    Ok(())
}

/// Measures 5 and 6, with two worker processes on one queue.
async fn two_workers(
    ctx: &mut Ctx,
    s: &Settings,
    games: &[String],
    f: &mut Figures,
) -> anyhow::Result<()> {
    let spread = &games[..s.games];
    say(&format!(
        "events (two workers): {} rejected patches paced at {:.0}/s over {} games",
        s.events_count,
        s.events_rate,
        spread.len()
    ));
    let load = rejected_load(
        ctx,
        spread,
        s.events_count,
        Some(s.events_rate),
        TAG_EVENTS,
        "events (two workers)",
    )
    .await?;
    let lag = load.took.saturating_sub(load.published);
    ctx.note(format!(
        "paced load (two workers): {} commands published over {:.1} s, the last outcome {:.0} ms after the last publish{}",
        s.events_count,
        load.published.as_secs_f64(),
        ms_of(lag),
        if lag > Duration::from_secs(1) {
            " — the workers fell behind the pace, so the latencies include a backlog"
        } else {
            " (the workers kept up with the pace)"
        }
    ));
    let codes = codes(&load.gots);
    if codes.keys().any(|c| c != "semver_patch_only") {
        ctx.note(format!(
            "two workers, paced rejected patches: outcomes {codes:?} (a conflict is two workers taking one game's commands at once: the lease refuses the second)"
        ));
    }
    f.events_rejected = ctx.hub.samples(TAG_EVENTS).iter().map(|s| s.ms).collect();

    let patch_games = &games[games.len() - s.events_patches.min(games.len())..];
    say(&format!(
        "events (two workers): {} games patched at once (inner events included)",
        patch_games.len()
    ));
    patch_burst(ctx, patch_games, TAG_EVENTS_PATCH).await?;
    f.events_patch_two = ctx
        .hub
        .samples(TAG_EVENTS_PATCH)
        .iter()
        .map(|s| s.ms)
        .collect();

    say(&format!(
        "one at a time (two workers): {} rejected patches",
        s.one_at_a_time
    ));
    for i in 0..s.one_at_a_time {
        let game = &spread[i % spread.len()];
        let (took, got) = round_trip(
            &ctx.hub,
            &ctx.publisher,
            "patch",
            game,
            Some(REJECTED_IMAGE),
            TAG_ONE_AT_A_TIME,
            PATCH_WAIT,
        )
        .await?;
        if got.code() != "semver_patch_only" {
            ctx.note(format!("one at a time: an outcome {}", got.code()));
        }
        f.one_at_a_time.push(ms_of(took));
        if (i + 1) % 20 == 0 {
            say(&format!("one at a time: {}/{}", i + 1, s.one_at_a_time));
        }
    }
    Ok(())
}

fn ms_of(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The commands a worker consumed so far, from its `/metrics`.
async fn consumed(worker: &Worker) -> Option<f64> {
    match worker.http_get("/metrics").await {
        Ok((200, text)) => metric_sum(&text, "rtmanager_commands_consumed_total"),
        _ => None,
    }
}

/// The sum of a Prometheus counter's series.
fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn machine_load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn read_first(path: &str, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    Some(line.split_once(':')?.1.trim().to_owned())
}

fn git(args: &[&str]) -> String {
    std::process::Command::new("git")
        .args(["-C", env!("CARGO_MANIFEST_DIR")])
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "?".into())
}

/// The median time of one raw-API call (`create`, …) over the patches.
fn api_call(f: &Figures, call: &str) -> Option<f64> {
    let times: Vec<f64> = f
        .api_calls
        .iter()
        .filter_map(|calls| calls.iter().find(|(c, _)| *c == call).map(|(_, ms)| *ms))
        .collect();
    stats::median(&times)
}

/// Where a rejected phase's CPU went: the rate no worker could pass on
/// these cores (`cap`) given what everything but the worker spent per
/// command (`rest_ms`), PostgreSQL's share of it included (`pg_ms`).
#[derive(Debug, Clone, Copy)]
struct RejectedCpu {
    cap: f64,
    rest_ms: f64,
    pg_ms: f64,
}

/// A rejected phase's missed target, explained from this run's figures:
/// beyond the machine where the database's own floor for these writes, or
/// the CPU everything else spent, leaves no room for it; otherwise, and
/// for any database work above the floor's, the worker's, said so.
fn rejected_why(
    rate: Option<f64>,
    target: f64,
    floor: Option<f64>,
    cpu: Option<RejectedCpu>,
    floor_pg_ms: Option<f64>,
) -> Option<String> {
    let (rate, cpu) = (rate?, cpu?);
    let mut why = Vec::new();
    let floor_short = floor.filter(|floor| *floor < target);
    if let Some(floor) = floor_short {
        why.push(format!(
            "PostgreSQL alone, committing the same writes at the same concurrency, reaches \
             {floor:.0} /s on this machine"
        ));
    }
    let floor_pg = floor_pg_ms.map_or(String::new(), |ms| {
        format!(" (the database floor's own statements: {ms:.2} ms)")
    });
    why.push(format!(
        "PostgreSQL spent {:.2} ms of CPU per command{floor_pg}, and everything but the worker \
         — PostgreSQL, RabbitMQ, Redis, the bench publishing and consuming — {:.2} ms, which \
         leaves these cores room for {:.0} /s at most, however little the worker itself cost",
        cpu.pg_ms, cpu.rest_ms, cpu.cap
    ));
    let heavier = floor_pg_ms.filter(|floor| cpu.pg_ms > 1.2 * floor);
    if let Some(floor) = heavier {
        why.push(format!(
            "but the database work the worker causes is {:.1} × the floor's (each command's \
             admission, read and entry alone, and the relay's read and mark per event): that \
             part is the worker's, not closed",
            cpu.pg_ms / floor
        ));
    }
    // Beyond the machine only where the database's own floor is short, or
    // the CPU ceiling is with database work no heavier than the floor's.
    let beyond = floor_short.is_some() || (cpu.cap < target && heavier.is_none());
    if beyond {
        why.push("the target is beyond this machine (CPU per component under Observations)".into());
    } else {
        why.push(format!(
            "the machine is not shown to stop it: a game's commands run one after another \
             (the lease with the game's read beside it, the entry's commit, which takes the \
             fence, the lease's release: {:.1} ms per command here), \
             the worker's serial path, not closed",
            1000.0 / rate
        ));
    }
    Some(why.join("; "))
}

async fn write_report(
    ctx: &Ctx,
    s: &Settings,
    f: &Figures,
    load_before: String,
) -> anyhow::Result<()> {
    use stats::{median, percentile, slope};

    let p = |v: &[f64], q: f64| percentile(v, q);
    let n_games = s.games;
    let mut rows = Vec::new();

    let patch_rtm = median(&f.patch_rtm);
    let patch_api = median(&f.patch_api);
    let patch_cli = median(&f.patch_cli);
    let r_api = ratio(patch_rtm, patch_api);
    let r_cli = ratio(patch_rtm, patch_cli);
    rows.push(
        Row::new(format!(
            "patch, publish → outer event (median of {})",
            f.patch_rtm.len()
        ))
        .rtm(ms(patch_rtm))
        .floor(format!(
            "raw API stop+remove+create+start {}",
            ms(patch_api)
        ))
        .ratio(r_api)
        .target("≤ 0.95 × API", r_api.map(|r| r <= 0.95))
        .why(Some(
            "rtmanager's patch makes the raw sequence's four calls and a rename (SPEC §3: \
             the new container is created before the old one stops and renamed once it is \
             removed); creating first moves the create ahead of the stop but keeps it on \
             this path, so the sequence itself is at least 1.00 × API before the control \
             plane's own work (lease, journal commits, the outcome's publication). Below it \
             only by overlapping Docker calls the sequence orders"
                .to_owned(),
        )),
    );
    rows.push(
        Row::new("same, against the docker CLI")
            .rtm(ms(patch_rtm))
            .floor(format!("docker stop; rm; run -d {}", ms(patch_cli)))
            .ratio(r_cli)
            .target("≤ 0.90 × CLI", r_cli.map(|r| r <= 0.90)),
    );
    let down_rtm = median(&f.down_rtm);
    let down_api = median(&f.down_api);
    let r_down = ratio(down_rtm, down_api);
    rows.push(
        Row::new(format!(
            "game downtime: old container's kill → new one's start, Docker's clock (median of {})",
            f.down_rtm.len()
        ))
        .rtm(ms(down_rtm))
        .floor(format!("same four API calls {}", ms(down_api)))
        .ratio(r_down)
        .target("≤ 0.75 × API", r_down.map(|r| r <= 0.75))
        .why(api_call(f, "create").zip(down_api).map(|(create, down)| {
            format!(
                "creating before the stop takes only the create out of the downtime, and the \
                 raw sequence's create is {create:.0} ms of its {down:.0} ms downtime (median): \
                 the stop, remove and start that remain put this sequence at {:.2} × API at \
                 best (profile under Observations); 0.75 × would need the create to be a \
                 quarter of the downtime",
                (down - create) / down
            )
        })),
    );
    rows.push(
        Row::new("same, the docker CLI sequence (for reference)")
            .rtm(ms(down_rtm))
            .floor(format!(
                "docker stop; rm; run -d {}",
                ms(median(&f.down_cli))
            ))
            .ratio(ratio(down_rtm, median(&f.down_cli))),
    );
    let burst_rtm = median(&f.burst_rtm);
    let burst_api = median(&f.burst_api);
    let r_burst = ratio(burst_rtm, burst_api);
    rows.push(
        Row::new(format!(
            "{n_games} games patched at once, makespan (median of {})",
            f.burst_rtm.len()
        ))
        .rtm(secs(burst_rtm))
        .floor(format!(
            "four API calls on {n_games} containers at once {}",
            secs(burst_api)
        ))
        .ratio(r_burst)
        .target("≤ 0.85 × API", r_burst.map(|r| r <= 0.85))
        .why(match f.burst_docker_cpu {
            [Some((rtm_ms, rtm_busy)), Some((api_ms, api_busy))] => Some(format!(
                "both makespans are Docker's work: dockerd and containerd spent \
                 {rtm_ms:.1} ms of CPU per patch under rtmanager and {api_ms:.1} ms under the \
                 raw API, with the machine {:.0} % and {:.0} % busy; creating before the stop \
                 reorders Docker's work, it does not remove any, and the worker's own CPU \
                 comes on top on the same cores",
                rtm_busy * 100.0,
                api_busy * 100.0
            )),
            _ => None,
        }),
    );
    rows.push(
        Row::new(format!(
            "rejected patches (semver, no Docker work), {} over {n_games} games",
            s.rejected_spread
        ))
        .rtm(rate(f.rejected_spread))
        .floor(format!(
            "PostgreSQL, the same 3 commits, {n_games} tasks {}",
            rate(f.floor_spread)
        ))
        .ratio(ratio(f.rejected_spread, f.floor_spread))
        .target("≥ 2,000 /s", f.rejected_spread.map(|r| r >= 2000.0))
        .why(rejected_why(
            f.rejected_spread,
            2000.0,
            f.floor_spread,
            f.cpu_spread,
            f.floor_pg_spread,
        )),
    );
    rows.push(
        Row::new(format!("the same, {} all on one game", s.rejected_one))
            .rtm(rate(f.rejected_one))
            .floor(format!("PostgreSQL, one task {}", rate(f.floor_one)))
            .ratio(ratio(f.rejected_one, f.floor_one))
            .target("≥ 500 /s", f.rejected_one.map(|r| r >= 500.0))
            .why(rejected_why(
                f.rejected_one,
                500.0,
                f.floor_one,
                f.cpu_one,
                f.floor_pg_one,
            )),
    );
    let ev50 = p(&f.events_rejected, 50.0);
    let ev99 = p(&f.events_rejected, 99.0);
    rows.push(
        Row::new(format!(
            "events commit → published, two workers, p50 ({} events of paced rejected patches)",
            f.events_rejected.len()
        ))
        .rtm(ms(ev50))
        .target("≤ 5 ms", ev50.map(|v| v <= 5.0)),
    );
    rows.push(
        Row::new("same, p99")
            .rtm(ms(ev99))
            .target("≤ 50 ms", ev99.map(|v| v <= 50.0)),
    );
    rows.push(
        Row::new(format!(
            "events commit → published, two workers, {} patches at once, inner events included ({} events): p50 / p99",
            s.events_patches.min(s.rss_games),
            f.events_patch_two.len()
        ))
        .rtm(format!(
            "{} / {}",
            ms(p(&f.events_patch_two, 50.0)),
            ms(p(&f.events_patch_two, 99.0))
        )),
    );
    rows.push(
        Row::new(format!(
            "events commit → published, one worker, sequential patches, inner events included ({} events): p50 / p99",
            f.events_patch_one.len()
        ))
        .rtm(format!(
            "{} / {}",
            ms(p(&f.events_patch_one, 50.0)),
            ms(p(&f.events_patch_one, 99.0))
        )),
    );
    rows.push(
        Row::new(format!(
            "two workers: a rejected patch, publish → outer event, one at a time ({} commands): p50 / p99",
            f.one_at_a_time.len()
        ))
        .rtm(format!(
            "{} / {}",
            ms(p(&f.one_at_a_time, 50.0)),
            ms(p(&f.one_at_a_time, 99.0))
        )),
    );
    rows.push(
        Row::new(format!(
            "peak RSS of worker A (VmHWM), {} patches in flight at once included",
            s.rss_games
        ))
        .rtm(mib(f.hwm_mib))
        .target("≤ 50 MiB", f.hwm_mib.map(|m| m <= 50.0)),
    );
    // The slope over the soak after its first fifth (start-up growth of
    // the allocator is not a leak), projected to 10 minutes.
    let soak_secs = f.soak.last().map_or(0.0, |p| p.0);
    let settled: Vec<(f64, f64)> = f
        .soak
        .iter()
        .copied()
        .filter(|p| p.0 >= soak_secs / 5.0)
        .collect();
    let per_min = slope(&settled).map(|mib_per_s| mib_per_s * 60.0);
    let first = f.soak.first().map(|p| p.1);
    let last = f.soak.last().map(|p| p.1);
    let max_rss = stats::max(&f.soak.iter().map(|p| p.1).collect::<Vec<_>>());
    // A fit over less than 5 minutes cannot tell a leak from the page-sized
    // steps of a settled heap (0.1 MiB over 60 s projects to 1 MiB/10 min).
    let judged = soak_secs >= 300.0;
    let flat = per_min
        .zip(max_rss)
        .map(|(m, x)| m * 10.0 <= 2.0 && x <= 50.0)
        .filter(|_| judged);
    rows.push(
        Row::new(format!(
            "RSS over a {} s soak ({:.0} rejected/s + a patch every 2 s, no scrape): slope",
            s.soak_secs, s.soak_rate
        ))
        .rtm(match per_min {
            Some(m) => format!(
                "{m:+.2} MiB/min ({} → {}, max {})",
                mib(first),
                mib(last),
                mib(max_rss)
            ),
            None => "n/a".into(),
        })
        .target(
            if judged {
                "flat: ≤ 2 MiB per 10 min, max ≤ 50 MiB"
            } else {
                "flat: judged on a soak of ≥ 5 min (`make soak`)"
            },
            flat,
        ),
    );
    let mut notes = ctx.notes.clone();
    let series: Vec<String> = f
        .soak
        .iter()
        .step_by(10.max(f.soak.len() / 12))
        .map(|(t, m)| format!("{t:.0} s {m:.1}"))
        .collect();
    if !series.is_empty() {
        notes.push(format!(
            "soak VmRSS of worker A (MiB): {}; the last sample after the soak's outcomes drained: {}",
            series.join(", "),
            mib(last)
        ));
    }

    let table = report::table(&rows);
    println!("\n{table}");

    let docker_version = ctx
        .docker
        .version()
        .await
        .ok()
        .and_then(|v| v.version)
        .unwrap_or_else(|| "?".into());
    let pg_version = pg_version().await.unwrap_or_else(|| "?".into());
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]);
    let header = vec![
        format!(
            "machine: {} cores ({}), {} memory, kernel {}",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            read_first("/proc/cpuinfo", "model name").unwrap_or_else(|| "?".into()),
            read_first("/proc/meminfo", "MemTotal")
                .and_then(|kb| kb.trim_end_matches(" kB").trim().parse::<f64>().ok())
                .map_or("?".into(), |kb| format!("{:.1} GiB", kb / 1024.0 / 1024.0)),
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
        ),
        format!(
            "date: {}; run took {:.0} s; load average {} at the start, {} at the end (the machine is shared: other builds and tests ran meanwhile)",
            chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
            STARTED.get().map_or(0.0, |t| t.elapsed().as_secs_f64()),
            load_before,
            machine_load()
        ),
        format!(
            "commit: {}{} ({})",
            git(&["rev-parse", "--short=12", "HEAD"]),
            if dirty.is_empty() || dirty == "?" {
                ""
            } else {
                " with uncommitted changes"
            },
            git(&["log", "-1", "--format=%s"])
                .chars()
                .take(80)
                .collect::<String>()
        ),
        format!(
            "services on this machine: PostgreSQL {pg_version}, Docker {docker_version}, RabbitMQ and Redis; worker, services and bench on the same cores"
        ),
        format!(
            "settings: the release binary, `RTM_PREFETCH=128`, `RTM_START_SETTLE=0s`, `RTM_STOP_TIMEOUT=10s`, \
             limits 1 CPU / 1g / 512 pids (the defaults), engine `{REPO}:{{{}}}` (busybox), rejected patches to `{REJECTED_IMAGE}`; \
             {} sequential patches each way after a warm-up, {} burst round(s) each, {} games started, soak {} s{}",
            TAGS.join(","),
            s.patch_iters,
            s.burst_rounds,
            s.rss_games,
            s.soak_secs,
            if s.smoke {
                "; **smoke run: tiny counts, figures are not meaningful**"
            } else {
                ""
            }
        ),
    ];
    let method = method_notes(s);
    let doc = report::Document {
        title: if s.smoke {
            "rtmanager bench (smoke)"
        } else {
            "rtmanager bench"
        },
        header: &header,
        rows: &rows,
        notes: &notes,
        method: &method,
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let path = if s.smoke {
        root.join("target").join("bench-smoke.md")
    } else {
        root.join("BENCH.md")
    };
    std::fs::write(&path, doc.markdown()).with_context(|| format!("write {}", path.display()))?;
    say(&format!("wrote {}", path.display()));
    if f.patch_rtm.is_empty() || f.burst_rtm.is_empty() || f.one_at_a_time.is_empty() {
        bail!("a measure has no samples");
    }
    Ok(())
}

async fn pg_version() -> Option<String> {
    use sqlx::{ConnectOptions as _, Connection as _};
    let mut conn = rig::admin_options().ok()?.connect().await.ok()?;
    let v: String = sqlx::query_scalar("show server_version")
        .fetch_one(&mut conn)
        .await
        .ok()?;
    conn.close().await.ok();
    Some(v)
}

fn method_notes(s: &Settings) -> Vec<String> {
    vec![
        "Everything runs from outside the service: the bench publishes commands as the lobby does (JSON per SPEC §6, routing key `runtime.<op>`, persistent, publisher confirms) to a private command exchange, and reads outcome events from its own queue bound to the private event exchange with `#`, matching each outer event to its command by `command_id`. The worker is `target/release/rtmanager serve`, configured only by environment variables (SPEC §9) on private names: its own database (dropped at the end), exchanges and queues, Redis prefix, container prefix and state root (a temporary directory). Containers, queues, exchanges, databases and Redis keys are removed at the end, also after an error or Ctrl-C.".into(),
        format!("Patch: one game patched {} times in turn three ways — rtmanager (publish → the `runtime.patch.success` outer event), the raw Docker API (bollard: stop with t=10, remove force, create, start — the body of `DockerEngine::create_body`: both labels, the state directory bound rw, bridge network, restart `no`, init, 1 CPU, 1g memory and memory-swap, 512 pids, json-file 10m × 3, cap-drop ALL, no-new-privileges), and the docker CLI (`docker stop -t 10; docker rm; docker run -d` with the same flags, three processes). The order rotates every round; the first round is a warm-up and not counted. Tags alternate 1.4.2 ↔ 1.4.3 (same major.minor; downgrades are allowed).", s.patch_iters),
        "Downtime: the bench watches Docker's event stream (type container, events kill/die/start, label `rtmanager.managed=true`, kept when the game label is the bench's) and takes, per patch, the old container's first `kill` or `die` to the new container's `start`, both by the daemon's `timeNano`; the old and new container ids come from the events (rtmanager) or from the calls (floors).".into(),
        format!("Burst: {} games started by rtmanager and as many floor containers created through the API; then all patched at once — rtmanager: every command published at once, makespan from the first publish to the last outer event; API: the four calls for every container concurrently over one bollard client — in ABBA order over {} round(s) each, median reported.", s.games, s.burst_rounds),
        format!("Rejected patches: patches to `{REJECTED_IMAGE}` of games running 1.4.x, refused `semver_patch_only` after the inbox claim, the lease and the fence, before any Docker work. {} published at once round-robin over {} games, then {} on one game; the rate is commands / (last outer event − first publish), so the relay's publishing is included. The floor: a private database migrated from `migrations/`, and per command exactly the writes that must be durable — the inbox claim (insert … on conflict do nothing), the fence advance (upsert … returning fence), and one statement that inserts the fenced operation-log entry (checked against the fence row `for share`), its outbox row (the event's JSON, operation_id set) and marks the inbox row finished — three commits, through sqlx with a pool of {} connections, one task per game ({} tasks for the spread, one for the single game: a game's commands run one after another in the worker too). The worker's own pool is up to 24 connections, and it makes the same durable writes in two commits: the claim (admitting the command), and the entry with its outbox row and inbox outcome, which takes the game's next fence as it is written (`rtm_append` with `p_take_fence`, migration 0014), after a read of the game (`rtm_peek`, no commit) made alongside the lease request; the fence is the same one the floor advances, taken in the entry's commit instead of one of its own.", s.rejected_spread, s.games, s.rejected_one, floor::FLOOR_POOL, s.games),
        "Events commit → published: two worker processes (A and B) on the same queue, database and Redis prefix, so both take commands and only one of them leads the relay. Per event: (the instant the bench's consumer receives it) − (the event's `finished_at`, set by the worker just before the commit of its entry). Both instants are read from the same machine clock (no cross-host skew), but the figure includes the broker hop to the bench's consumer, and `finished_at` precedes the commit by the commit itself. Paced load so that it measures the path, not a backlog.".into(),
        format!("One at a time: {} rejected patches with both workers running, each published only after the previous outcome arrived.", s.one_at_a_time),
        format!("Memory: `VmHWM` (the peak) of worker A from `/proc/<pid>/status` after a burst patching all {} games at once (so 128 operations in flight, with Docker work, at `RTM_PREFETCH=128`), having also run everything before it. Soak: VmRSS every second while rejected patches arrive at a steady rate and a real patch every 2 s, with nothing scraping `/metrics`; the slope is a least-squares fit over the samples after the first fifth of the soak. `BENCH_SOAK=600 make bench` (or `make soak`) runs the 10-minute soak.", s.rss_games),
        "Ratios are rtmanager ÷ floor from this one run: for times lower is better, for rates (rejected patches) the ratio is the share of the database's own floor reached. The machine is small and shared, so figures move by ±5–10 % between runs; compare ratios within one run.".into(),
    ]
}
