//! The checks every scenario ends with (SPEC §10), measured against the
//! database, the events the observer received, and what Docker reports.
//! Nothing here is tuned to what the code happens to do: a violation is
//! reported as found.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::Row as _;

use crate::report::Row;
use crate::rig::{Cmd, Rig, Seen, Sent};
use crate::schema::{event_schema_validator, validation_errors};

/// What a scenario accepts as a legitimate failure outcome.
#[derive(Debug, Clone, Default)]
pub struct Expect {
    /// Error codes that are correct answers in this scenario (lease
    /// contention between workers: `conflict`; a reordered stream:
    /// `not_found`). Any other failure is a violation.
    pub allowed_failures: &'static [&'static str],
    /// A failed patch that restored the previous image (`rolled_back`) is
    /// accepted. Only where the scenario makes the new image fail: with a
    /// healthy new image a rollback means a step went wrong.
    pub allow_rolled_back: bool,
    /// Why a worker may interrupt a command and retry it here ("command
    /// interrupted; it will be retried"), as `Interruption` reasons. Without
    /// an injected fault that explains it, an interruption is a violation.
    pub allowed_interruptions: &'static [Interruption],
    /// Engine boots beyond what the outcomes call for that the scenario's
    /// fault explains. Each explained boot is noted; any boot beyond them
    /// is still a violation.
    pub reboots: Reboots,
}

/// Extra engine boots a scenario explains, by game, and why: each is an
/// engine that booted and then stopped running through the injected fault
/// (not a command's doing), so the command that was to leave the game
/// running booted it again.
#[derive(Debug, Clone, Default)]
pub struct Reboots {
    pub by_game: BTreeMap<String, i64>,
    /// Completes "…beyond what the outcomes call for, each …".
    pub why: &'static str,
}

/// The reasons a worker gives for interrupting a command (the `reason` of
/// its "command interrupted" log line; `rtmanager::lifecycle::Interrupted`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interruption {
    /// The outcome could not be written (the database is away).
    Unrecorded,
    /// The worker's lease expired or was taken over (a pause, Redis lost).
    LeaseLost,
    /// A newer operation took the game's fence.
    FenceLost,
    /// An earlier attempt of the same command (a killed worker's) still
    /// holds the lease: waited out.
    StillRunning,
    /// Refused its lease after an attempt already touched the game.
    Blocked,
}

impl Interruption {
    /// Recognises a reason by the words of its `Display` text.
    fn of(reason: &str) -> Option<Self> {
        [
            ("could not be recorded", Self::Unrecorded),
            ("was lost; stopping", Self::LeaseLost),
            ("took the fence", Self::FenceLost),
            ("still holds the lease", Self::StillRunning),
            ("cannot go on yet", Self::Blocked),
        ]
        .into_iter()
        .find_map(|(words, kind)| reason.contains(words).then_some(kind))
    }
}

impl Expect {
    pub fn all_success() -> Self {
        Self::default()
    }

    /// After a worker was SIGKILLed mid-command: every command succeeds;
    /// the redelivery may wait out the dead attempt's lease.
    pub fn after_kill() -> Self {
        Self {
            allowed_interruptions: &[Interruption::StillRunning],
            ..Self::default()
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    operation_id: i64,
    game_id: String,
    op: String,
    outer_op: Option<String>,
    command_id: String,
    outcome: String,
    error_code: Option<String>,
    error_message: Option<String>,
    noop: bool,
    rolled_back: bool,
    started_at: DateTime<Utc>,
    finished_at: DateTime<Utc>,
    fence: Option<i64>,
    image_ref: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Record {
    pub status: String,
    pub image: String,
    pub container_id: Option<String>,
}

async fn entries(rig: &Rig) -> Result<Vec<Entry>, String> {
    let rows = sqlx::query(
        "select operation_id, game_id, op, outer_op, command_id, outcome, error_code,
                error_message, noop, rolled_back, started_at, finished_at, fence, image_ref
           from operation_log order by operation_id",
    )
    .fetch_all(&rig.db)
    .await
    .map_err(|e| format!("read operation_log: {e}"))?;
    Ok(rows
        .iter()
        .map(|r| Entry {
            operation_id: r.get("operation_id"),
            game_id: r.get("game_id"),
            op: r.get("op"),
            outer_op: r.get("outer_op"),
            command_id: r.get("command_id"),
            outcome: r.get("outcome"),
            error_code: r.get("error_code"),
            error_message: r.get("error_message"),
            noop: r.get("noop"),
            rolled_back: r.get("rolled_back"),
            started_at: r.get("started_at"),
            finished_at: r.get("finished_at"),
            fence: r.get("fence"),
            image_ref: r.get("image_ref"),
        })
        .collect())
}

pub async fn records(rig: &Rig) -> Result<HashMap<String, Record>, String> {
    let rows = sqlx::query(
        "select game_id, status, current_image_ref, current_container_id from runtime_records",
    )
    .fetch_all(&rig.db)
    .await
    .map_err(|e| format!("read runtime_records: {e}"))?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get::<String, _>("game_id"),
                Record {
                    status: r.get("status"),
                    image: r.get("current_image_ref"),
                    container_id: r.get("current_container_id"),
                },
            )
        })
        .collect())
}

async fn unsent(rig: &Rig) -> Result<i64, String> {
    rtmanager::outbound::postgres::PgStore::new(rig.db.clone())
        .outbox_backlog()
        .await
        .map_err(|e| format!("count unsent outbox rows: {e}"))
}

/// `rtmanager_operations_in_flight` summed over the running workers. A
/// worker whose `/metrics` does not answer is unknown, not idle.
pub async fn in_flight(rig: &Rig) -> Result<f64, String> {
    let mut total = 0.0;
    for w in rig.workers.iter().filter(|w| w.pid().is_some()) {
        total += w.in_flight().await?;
    }
    Ok(total)
}

/// Whether `command_id` has its outer outcome in the operation log (the
/// database decides "finished", not whether the event arrived yet).
pub async fn outer_recorded(rig: &Rig, command_id: &str) -> Result<bool, String> {
    sqlx::query_scalar::<_, bool>(
        "select exists(select 1 from operation_log where command_id = $1 and outer_op is null)",
    )
    .bind(command_id)
    .fetch_one(&rig.db)
    .await
    .map_err(|e| format!("read operation_log: {e}"))
}

/// The engine boots recorded in `<state_root>/<game>/boots` (one line per
/// boot); `None` when the file does not exist.
pub fn boots(rig: &Rig, game: &str) -> Option<i64> {
    std::fs::read_to_string(rig.state_root.join(game).join("boots"))
        .ok()
        .map(|t| t.lines().count() as i64)
}

/// Whether a failed start entry's engine booted: the container ran and
/// exited, or never became healthy. A refused create or `docker start`, a
/// pull failure or a lost lease boot nothing.
fn failed_start_booted(e: &Entry) -> bool {
    let message = e.error_message.as_deref().unwrap_or("");
    e.error_code.as_deref() == Some("container_start_failed")
        && [
            "during start-up",
            "not running after start",
            "reported unhealthy",
            "did not become healthy",
        ]
        .iter()
        .any(|m| message.contains(m))
}

impl Rig {
    /// Waits until every sent command has its outer outcome recorded and
    /// observed, the outbox is drained, the command queue is empty and no
    /// worker has an operation in flight; then lets late duplicates land.
    pub async fn wait_quiet(&self, timeout: Duration) -> Result<Duration, String> {
        let since = Instant::now();
        let deadline = since + timeout;
        let mut settled_once = false;
        loop {
            let pending = self.pending().await;
            match pending {
                Ok(()) if settled_once => return Ok(since.elapsed()),
                Ok(()) => {
                    settled_once = true;
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    continue;
                }
                Err(why) if Instant::now() >= deadline => {
                    return Err(format!("not quiet after {timeout:?}: {why}"));
                }
                Err(_) => settled_once = false,
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn pending(&self) -> Result<(), String> {
        let ids: Vec<String> = self
            .ledger
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.command_id.clone())
            .collect();
        let recorded: BTreeSet<String> = sqlx::query_scalar::<_, String>(
            "select distinct command_id from operation_log where outer_op is null",
        )
        .fetch_all(&self.db)
        .await
        .map_err(|e| format!("database: {e}"))?
        .into_iter()
        .collect();
        let missing = ids.iter().filter(|id| !recorded.contains(*id)).count();
        if missing > 0 {
            return Err(format!("{missing} command(s) without a recorded outcome"));
        }
        let unsent = unsent(self).await?;
        if unsent > 0 {
            return Err(format!("{unsent} unsent outbox row(s)"));
        }
        let seen: BTreeSet<String> = self
            .observer
            .snapshot()
            .iter()
            .filter(|s| s.is_outer())
            .filter_map(|s| s.str("command_id").map(str::to_owned))
            .collect();
        let unseen = ids.iter().filter(|id| !seen.contains(*id)).count();
        if unseen > 0 {
            return Err(format!(
                "{unseen} command(s) without an observed outer event"
            ));
        }
        match self.queue_ready().await {
            Some(0) => {}
            Some(n) => return Err(format!("{n} message(s) ready in the command queue")),
            None => return Err("command queue depth unknown".into()),
        }
        let busy = in_flight(self).await?;
        if busy > 0.0 {
            return Err(format!("{busy} operation(s) in flight"));
        }
        Ok(())
    }

    /// Ends a scenario: waits for quiet, checks every guarantee, stops the
    /// workers with SIGTERM (each must exit 0), and returns the row.
    pub async fn finish(&self, title: &str, expect: Expect) -> Row {
        let mut row = Row::new(&self.key, title);
        if let Err(e) = self.wait_quiet(Duration::from_secs(150)).await {
            row.violations.push(e);
        }
        if let Err(e) = self.verify(&expect, &mut row).await {
            row.violations.push(format!("could not verify: {e}"));
        }
        for w in &self.workers {
            if w.pid().is_none() {
                continue;
            }
            match w.terminate(Duration::from_secs(75)).await {
                Ok(status) if status.success() => {}
                Ok(status) => row
                    .violations
                    .push(format!("{} exited with {status} after SIGTERM", w.name)),
                Err(e) => row.violations.push(e),
            }
        }
        // Log health: panics and errors the workers logged.
        for w in &self.workers {
            let text = std::fs::read_to_string(&w.log).unwrap_or_default();
            let panics = text.lines().filter(|l| l.contains("panicked")).count();
            let errors = text
                .lines()
                .filter(|l| l.contains("\"level\":\"ERROR\""))
                .count();
            let warns = text
                .lines()
                .filter(|l| l.contains("\"level\":\"WARN\""))
                .count();
            if panics > 0 {
                row.violations
                    .push(format!("{}: {panics} panic line(s) in its log", w.name));
            }
            row.notes.push(format!(
                "{}: started {} time(s); log: {errors} ERROR, {warns} WARN line(s)",
                w.name,
                w.starts()
            ));
        }
        row.notes.extend(self.notes.lock().unwrap().iter().cloned());
        row.wall = self.started.elapsed();
        if !row.violations.is_empty() {
            eprintln!(
                "\n[{}] violations:\n  {}",
                self.key,
                row.violations.join("\n  ")
            );
            for w in &self.workers {
                eprintln!("\n[{}] last lines of {}:\n{}", self.key, w.name, w.tail(40));
            }
            eprintln!(
                "[{}] full logs: {}",
                self.key,
                self.kept_logs_dir().display()
            );
        }
        row
    }

    async fn verify(&self, expect: &Expect, row: &mut Row) -> Result<(), String> {
        let ledger: Vec<Sent> = self.ledger.lock().unwrap().clone();
        let log = entries(self).await?;
        let records = records(self).await?;
        let seen = self.observer.snapshot();
        let inbox: HashMap<String, Option<uuid::Uuid>> =
            sqlx::query("select command_id, outcome_event_id from inbox")
                .fetch_all(&self.db)
                .await
                .map_err(|e| format!("read inbox: {e}"))?
                .iter()
                .map(|r| (r.get("command_id"), r.get("outcome_event_id")))
                .collect();

        row.commands = ledger.len();
        row.copies = ledger.iter().map(|s| s.copies as usize).sum();

        // Events are schema-valid.
        let validator = event_schema_validator();
        let invalid: Vec<String> = seen
            .iter()
            .filter_map(|s| {
                let errors = validation_errors(&validator, &s.body);
                (!errors.is_empty()).then(|| format!("{}: {}", s.routing_key, errors.join("; ")))
            })
            .collect();
        if !invalid.is_empty() {
            row.violations.push(format!(
                "{} event(s) do not match the schema, e.g. {}",
                invalid.len(),
                invalid[0]
            ));
        }

        let mut outer_of: HashMap<&str, Vec<&Entry>> = HashMap::new();
        for e in log.iter().filter(|e| e.outer_op.is_none()) {
            outer_of.entry(e.command_id.as_str()).or_default().push(e);
        }
        for sent in &ledger {
            let id = sent.command_id.as_str();
            let what = format!("{} {} {}", sent.cmd.op(), sent.game, short(id));
            let outer = outer_of.get(id).cloned().unwrap_or_default();

            // Exactly one outer outcome.
            match outer.len() {
                1 => {
                    let e = outer[0];
                    if e.outcome == "success" {
                        row.success += 1;
                    } else {
                        row.failure += 1;
                        let code = e.error_code.clone().unwrap_or_default();
                        *row.failure_codes.entry(code.clone()).or_default() += 1;
                        // A rollback answers a new container that did not
                        // come up, nothing else (SPEC §3).
                        let accepted = expect.allowed_failures.contains(&code.as_str())
                            || (expect.allow_rolled_back
                                && e.rolled_back
                                && code == "container_start_failed");
                        if !accepted {
                            row.violations.push(format!(
                                "{what}: unexpected failure {code}: {}",
                                e.error_message.as_deref().unwrap_or("")
                            ));
                        }
                    }
                }
                0 => row
                    .violations
                    .push(format!("{what}: no outer outcome recorded")),
                n => row
                    .violations
                    .push(format!("{what}: {n} outer outcomes recorded")),
            }

            // Observed outer events: at least one, all with one event_id,
            // the one the inbox holds; one delivery per copy at least.
            let outer_seen: Vec<_> = seen
                .iter()
                .filter(|s| s.is_outer() && s.str("command_id") == Some(id))
                .collect();
            let ids: BTreeSet<&str> = outer_seen
                .iter()
                .filter_map(|s| s.str("event_id"))
                .collect();
            if outer_seen.is_empty() {
                // Counted in "events lost" with every other event below.
                row.violations
                    .push(format!("{what}: no outer event observed"));
            } else if ids.len() > 1 {
                row.violations.push(format!(
                    "{what}: outer events with {} different event_ids: {ids:?}",
                    ids.len()
                ));
            } else {
                let event_id = ids.iter().next().copied().unwrap_or_default();
                match inbox.get(id) {
                    Some(Some(stored)) if stored.to_string() == event_id => {}
                    Some(stored) => row.violations.push(format!(
                        "{what}: observed event_id {event_id}, inbox holds {stored:?}"
                    )),
                    None => row.violations.push(format!("{what}: no inbox row")),
                }
                if outer_seen
                    .iter()
                    .any(|s| s.message_id.as_deref() != Some(event_id))
                {
                    row.violations.push(format!(
                        "{what}: an outer event's message_id is not its event_id"
                    ));
                }
            }
            if (outer_seen.len() as u32) < sent.copies {
                row.violations.push(format!(
                    "{what}: sent {} time(s) but its outcome was published {} time(s) \
                     (a duplicate must get the stored outcome again)",
                    sent.copies,
                    outer_seen.len()
                ));
            }

            // Duplicates executed: more than one effective start, or more
            // than one outer entry.
            let starts = log
                .iter()
                .filter(|e| {
                    e.command_id == id
                        && e.op == "start"
                        && e.outcome == "success"
                        && !e.noop
                        && !e.rolled_back
                })
                .count();
            if starts > 1 || outer.len() > 1 {
                row.duplicates_executed += 1;
                row.violations.push(format!(
                    "{what}: executed more than once ({starts} successful starts, {} outer entries)",
                    outer.len()
                ));
            }
        }

        // A `conflict` is only a correct answer while another command held
        // the game's lease: each one must overlap, in time, another
        // command's outer entry on the same game that was not refused. The
        // holder takes its lease just before its `started_at` and releases
        // it just after its `finished_at`, hence the slack.
        const LEASE_SLACK: chrono::TimeDelta = chrono::TimeDelta::milliseconds(250);
        let mut widest = chrono::TimeDelta::zero();
        for refused in log
            .iter()
            .filter(|e| e.outer_op.is_none() && e.error_code.as_deref() == Some("conflict"))
        {
            // How far the refusal lies outside the nearest holder's run.
            let gap = log
                .iter()
                .filter(|h| {
                    h.outer_op.is_none()
                        && h.game_id == refused.game_id
                        && h.command_id != refused.command_id
                        && h.error_code.as_deref() != Some("conflict")
                })
                .map(|h| {
                    (h.started_at - refused.finished_at)
                        .max(refused.started_at - h.finished_at)
                        .max(chrono::TimeDelta::zero())
                })
                .min();
            match gap {
                Some(gap) if gap <= LEASE_SLACK => widest = widest.max(gap),
                _ => row.violations.push(format!(
                    "{}: {} {} answered conflict ({}..{}) while no other command of the game ran{}",
                    refused.game_id,
                    refused.op,
                    short(&refused.command_id),
                    refused.started_at.format("%T%.3f"),
                    refused.finished_at.format("%T%.3f"),
                    gap.map(|g| format!(" (the nearest ran {} ms away)", g.num_milliseconds()))
                        .unwrap_or_default(),
                )),
            }
        }
        if row.failure_codes.contains_key("conflict") {
            row.notes.push(format!(
                "every conflict overlapped another command's run on its game (the widest gap, within the {} ms slack: {} ms)",
                LEASE_SLACK.num_milliseconds(),
                widest.num_milliseconds()
            ));
        }

        // No two operations on one game overlapped (outer entries that
        // held the lease, i.e. carry a fence).
        let mut by_game: BTreeMap<&str, Vec<&Entry>> = BTreeMap::new();
        for e in log
            .iter()
            .filter(|e| e.outer_op.is_none() && e.fence.is_some())
        {
            by_game.entry(e.game_id.as_str()).or_default().push(e);
        }
        for (game, mut ops) in by_game {
            ops.sort_by_key(|e| e.started_at);
            let mut latest: Option<&Entry> = None;
            for e in ops {
                if let Some(prev) = latest {
                    if e.started_at < prev.finished_at && e.command_id != prev.command_id {
                        row.violations.push(format!(
                            "{game}: {} {} ({}..{}) overlapped {} {} ({}..{})",
                            e.op,
                            short(&e.command_id),
                            e.started_at.format("%T%.3f"),
                            e.finished_at.format("%T%.3f"),
                            prev.op,
                            short(&prev.command_id),
                            prev.started_at.format("%T%.3f"),
                            prev.finished_at.format("%T%.3f"),
                        ));
                    }
                    if e.finished_at > prev.finished_at {
                        latest = Some(e);
                    }
                } else {
                    latest = Some(e);
                }
            }
        }

        // Every record matches Docker, and Docker runs nothing unrecorded.
        let games: BTreeSet<String> = ledger.iter().map(|s| s.game.clone()).collect();
        for game in &games {
            let observed = self.inspect(game).await?;
            let record = records.get(game);
            let mismatch = match (record, &observed) {
                (None, None) => None,
                (None, Some(c)) => Some(format!(
                    "no record, but container {} exists (running={})",
                    short(&c.id),
                    c.running
                )),
                (Some(r), obs) => match (r.status.as_str(), obs) {
                    ("running", Some(c))
                        if c.running
                            && c.image == r.image
                            && r.container_id.as_deref() == Some(c.id.as_str()) =>
                    {
                        None
                    }
                    ("running", Some(c)) => Some(format!(
                        "record running {} in {}, Docker: {} running={} image {}",
                        r.image,
                        r.container_id.as_deref().map(short).unwrap_or("-"),
                        short(&c.id),
                        c.running,
                        c.image
                    )),
                    ("running", None) => Some(format!(
                        "record running {} in {}, Docker: no container",
                        r.image,
                        r.container_id.as_deref().map(short).unwrap_or("-")
                    )),
                    ("stopped", Some(c)) if c.running => Some(format!(
                        "record stopped, Docker: {} running {}",
                        short(&c.id),
                        c.image
                    )),
                    ("stopped", _) => None,
                    // The reconciler's (SPEC §11): the engine stopped on its own.
                    ("exited", Some(c)) if c.running => Some(format!(
                        "record exited, Docker: {} running {}",
                        short(&c.id),
                        c.image
                    )),
                    ("exited", _) => None,
                    ("removed", None) => None,
                    ("removed", Some(c)) => Some(format!(
                        "record removed, Docker: container {} (running={})",
                        short(&c.id),
                        c.running
                    )),
                    (other, _) => Some(format!("unknown status {other}")),
                },
            };
            if let Some(m) = mismatch {
                row.records_mismatched += 1;
                row.violations.push(format!("{game}: {m}"));
            }
        }

        // The outbox is drained.
        let unsent = unsent(self).await?;
        if unsent > 0 {
            row.violations
                .push(format!("{unsent} outbox row(s) never marked sent"));
        }

        self.verify_events(&log, &seen, row).await?;

        // Boots: what the engines recorded versus what the final outcomes
        // call for. Any difference fails the row: an extra boot is a start
        // redone (recorded or not), a missing one a start claimed but not
        // done.
        let mut expected: BTreeMap<&str, i64> = BTreeMap::new();
        for sent in &ledger {
            let Some(e) = outer_of
                .get(sent.command_id.as_str())
                .and_then(|o| o.first())
            else {
                continue;
            };
            let boots = if e.outcome == "success" {
                // One engine boot per successful start, restart or patch
                // that did something.
                match sent.cmd {
                    Cmd::Start(_) | Cmd::Restart | Cmd::Patch(_) if !e.noop => 1,
                    _ => 0,
                }
            } else {
                // A failed command booted what its start entries say: a
                // failed start whose engine ran (a crash at boot, never
                // healthy), and a successful one (a patch's rollback).
                log.iter()
                    .filter(|i| i.command_id == sent.command_id && i.op == "start")
                    .filter(|i| {
                        (i.outcome == "success" && !i.noop)
                            || (i.outcome != "success" && failed_start_booted(i))
                    })
                    .count() as i64
            };
            *expected.entry(sent.game.as_str()).or_default() += boots;
        }
        for game in &games {
            let want = expected.get(game.as_str()).copied().unwrap_or(0);
            let actual = match boots(self, game) {
                Some(n) => n,
                None if want > 0 => {
                    row.violations.push(format!(
                        "{game}: no boots file, but the outcomes call for {want} boot(s)"
                    ));
                    0
                }
                None => 0,
            };
            let allowed = expect.reboots.by_game.get(game).copied().unwrap_or(0);
            let explained = (actual - want).clamp(0, allowed);
            if explained > 0 {
                row.notes.push(format!(
                    "{game}: {explained} engine boot(s) beyond what the outcomes call for, each {}",
                    expect.reboots.why
                ));
            }
            let want = want + explained;
            row.boots_actual += actual;
            row.boots_expected += want;
            if actual > want {
                // A start done again, whether or not an entry records it.
                row.duplicates_executed += (actual - want) as usize;
                row.violations.push(format!(
                    "{game}: {actual} engine boots, the outcomes call for {want}: \
                     {} start(s) redone",
                    actual - want
                ));
            } else if actual < want {
                row.violations.push(format!(
                    "{game}: {actual} engine boots, the outcomes call for {want}: \
                     a recorded start never booted its engine"
                ));
            }
        }

        // Interruptions (a command handed back for a retry) only where the
        // scenario injects a fault that explains them.
        for w in &self.workers {
            for reason in w.interruptions() {
                let allowed = Interruption::of(&reason)
                    .is_some_and(|kind| expect.allowed_interruptions.contains(&kind));
                if !allowed {
                    row.violations.push(format!(
                        "{}: a command was interrupted and retried without a fault that \
                         explains it: {reason}",
                        w.name
                    ));
                } else {
                    row.notes
                        .push(format!("{}: command interrupted ({reason})", w.name));
                }
            }
        }

        // The journal, for failed or repeated commands (evidence).
        for sent in &ledger {
            let outer = outer_of.get(sent.command_id.as_str());
            let failed = outer.is_none_or(|o| o.len() != 1 || o[0].outcome != "success");
            if failed {
                let trail: Vec<String> = log
                    .iter()
                    .filter(|e| e.command_id == sent.command_id)
                    .map(|e| {
                        format!(
                            "#{} {}{} {}{}{}",
                            e.operation_id,
                            e.outer_op
                                .as_deref()
                                .map(|o| format!("{o}."))
                                .unwrap_or_default(),
                            e.op,
                            e.outcome,
                            e.error_code
                                .as_deref()
                                .map(|c| format!(" {c}"))
                                .unwrap_or_default(),
                            e.image_ref
                                .as_deref()
                                .map(|i| format!(" {i}"))
                                .unwrap_or_default()
                        )
                    })
                    .collect();
                row.notes.push(format!(
                    "{} {} {}: log entries [{}]",
                    sent.cmd.op(),
                    sent.game,
                    short(&sent.command_id),
                    trail.join(", ")
                ));
            }
        }
        Ok(())
    }

    /// Event guarantees over every event written (outer, inner and
    /// `runtime.rejected`): each outbox row was received by the observer,
    /// each log entry has its outbox row, nothing was received that the
    /// outbox does not hold, and each game's events arrived in the order
    /// they were written (SPEC §6, §10).
    async fn verify_events(
        &self,
        log: &[Entry],
        seen: &[Seen],
        row: &mut Row,
    ) -> Result<(), String> {
        let outbox = sqlx::query(
            "select event_id, seq, operation_id, game_id, routing_key from outbox order by seq",
        )
        .fetch_all(&self.db)
        .await
        .map_err(|e| format!("read outbox: {e}"))?;
        struct Written {
            seq: i64,
            operation_id: Option<i64>,
            game: String,
            routing_key: String,
        }
        let written: HashMap<String, Written> = outbox
            .iter()
            .map(|r| {
                (
                    r.get::<uuid::Uuid, _>("event_id").to_string(),
                    Written {
                        seq: r.get("seq"),
                        operation_id: r.get("operation_id"),
                        game: r.get("game_id"),
                        routing_key: r.get("routing_key"),
                    },
                )
            })
            .collect();
        row.events_written = written.len();

        // Every entry has its event.
        let with_event: BTreeSet<i64> = written.values().filter_map(|w| w.operation_id).collect();
        for e in log.iter().filter(|e| !with_event.contains(&e.operation_id)) {
            row.events_lost += 1;
            row.violations.push(format!(
                "{}: entry #{} ({}{}) has no outbox row: its event was never written",
                e.game_id,
                e.operation_id,
                e.outer_op
                    .as_deref()
                    .map(|o| format!("{o}."))
                    .unwrap_or_default(),
                e.op
            ));
        }

        // Every written event was received; nothing else was.
        let received: BTreeSet<&str> = seen.iter().filter_map(|s| s.str("event_id")).collect();
        let mut lost: Vec<(&String, &Written)> = written
            .iter()
            .filter(|(id, _)| !received.contains(id.as_str()))
            .collect();
        lost.sort_by_key(|(_, w)| w.seq);
        row.events_lost += lost.len();
        for (id, w) in &lost {
            row.violations.push(format!(
                "{}: event {} ({}, seq {}) was written but never received",
                w.game,
                short(id),
                w.routing_key,
                w.seq
            ));
        }
        let strays: Vec<&Seen> = seen
            .iter()
            .filter(|s| s.str("event_id").is_none_or(|id| !written.contains_key(id)))
            .collect();
        if let Some(first) = strays.first() {
            row.violations.push(format!(
                "{} received event(s) the outbox does not hold, e.g. {} {}",
                strays.len(),
                first.routing_key,
                first.body
            ));
        }

        // Per-game order: the first arrival of each event, in the order the
        // observer received them, follows the outbox order (`seq`, taken
        // when the entry was written). A second arrival of an event already
        // seen (a duplicate command's replay, a relay retry after a lost
        // confirm) is no reordering.
        let mut first_seen: BTreeSet<&str> = BTreeSet::new();
        let mut last_of_game: HashMap<&str, (&str, &Written)> = HashMap::new();
        for s in seen {
            let Some(id) = s.str("event_id") else {
                continue;
            };
            let Some(w) = written.get(id) else { continue };
            if !first_seen.insert(id) {
                continue;
            }
            if let Some((prev_id, prev)) = last_of_game.get(w.game.as_str())
                && prev.seq > w.seq
            {
                row.out_of_order += 1;
                row.violations.push(format!(
                    "{}: event {} ({}, seq {}) was received after {} ({}, seq {}), written later",
                    w.game,
                    short(id),
                    w.routing_key,
                    w.seq,
                    short(prev_id),
                    prev.routing_key,
                    prev.seq
                ));
                continue;
            }
            last_of_game.insert(w.game.as_str(), (id, w));
        }
        Ok(())
    }

    /// The journal steps recorded for a command, if the table exists.
    pub async fn journal(&self, command_id: &str) -> Vec<String> {
        sqlx::query_scalar::<_, String>(
            "select step from operation_journal where command_id = $1 order by done_at",
        )
        .bind(command_id)
        .fetch_all(&self.db)
        .await
        .unwrap_or_default()
    }
}

/// The tail of an id, enough to tell commands apart in a message.
pub fn short(id: &str) -> &str {
    &id[id.len().saturating_sub(8)..]
}

/// The checks of a rig of two nodes (SPEC §12), after the common ones:
/// every game lives on the node it was placed on — its placement, its
/// record and every event of its commands name that node, and no other
/// engine has a container of it — and nothing is left in a node's queue
/// or dead-lettered.
pub async fn verify_nodes(
    rig: &Rig,
    node_of: &BTreeMap<String, &'static str>,
    row: &mut Row,
) -> Result<(), String> {
    let pairs = |sql: &'static str| async move {
        sqlx::query(sql)
            .fetch_all(&rig.db)
            .await
            .map_err(|e| format!("{sql}: {e}"))
            .map(|rows| {
                rows.iter()
                    .map(|r| (r.get::<String, _>(0), r.get::<Option<String>, _>(1)))
                    .collect::<HashMap<String, Option<String>>>()
            })
    };
    let placed = pairs("select game_id, node from placements").await?;
    let recorded = pairs("select game_id, node from runtime_records").await?;
    for (game, node) in node_of {
        let want = Some(Some((*node).to_owned()));
        if placed.get(game) != want.as_ref() {
            row.violations.push(format!(
                "{game}: placed on {:?}, sent to {node}",
                placed.get(game)
            ));
        }
        if recorded.get(game) != want.as_ref() {
            row.violations.push(format!(
                "{game}: its record names node {:?}, the game is {node}'s",
                recorded.get(game)
            ));
        }
        for (on, c) in rig.inspect_nodes(game).await? {
            if on != *node {
                row.records_mismatched += 1;
                row.violations.push(format!(
                    "{game}: container {} (running={}) on {on}'s engine, the game is {node}'s",
                    short(&c.id),
                    c.running
                ));
            }
        }
    }

    let mut by_node: BTreeMap<String, usize> = BTreeMap::new();
    let mut strays = Vec::new();
    for s in rig.observer.snapshot() {
        let Some(want) = s.str("game_id").and_then(|g| node_of.get(g)) else {
            continue;
        };
        let got = s.str("node").unwrap_or("(none)");
        *by_node.entry(got.to_owned()).or_default() += 1;
        if got != *want {
            strays.push(format!(
                "{} of {} ({}) written by node {got}, the game is {want}'s",
                s.routing_key,
                s.str("game_id").unwrap_or_default(),
                short(s.str("command_id").unwrap_or_default()),
            ));
        }
    }
    if let Some(first) = strays.first() {
        row.violations.push(format!(
            "{} event(s) written on the wrong node, e.g. {first}",
            strays.len()
        ));
    }
    row.notes.push(format!(
        "events received, by the node that wrote them: {by_node:?}"
    ));

    for queue in crate::rig::NODES
        .iter()
        .map(|n| rig.node_queue(n))
        .chain([rig.amqp.dead_letter_queue.clone()])
    {
        match rig.ready_in(&queue).await {
            Some(0) => {}
            Some(n) => row
                .violations
                .push(format!("{n} message(s) left in {queue}")),
            None => row
                .violations
                .push(format!("{queue}: depth unknown (does it exist?)")),
        }
    }
    Ok(())
}
