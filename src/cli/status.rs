//! `rtmanager status <game_id>`: the runtime record beside what Docker
//! reports for the game's container, with every disagreement flagged.

use std::io::Write;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use clap::Args;
use serde::Serialize;

use super::Exit;
use super::output::{BOLD, DIM, GREEN, RED, Style, ago, pad, short_id};
use crate::config::Config;
use crate::domain::{GameId, OutcomeEvent, RuntimeRecord, RuntimeStatus};
use crate::outbound::docker::DockerEngine;
use crate::outbound::postgres::PgStore;
use crate::ports::{ContainerEngine as _, ContainerInfo, Health, RuntimeStore as _};

#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct StatusArgs {
    /// The game, e.g. g-1042
    #[arg(value_parser = parse_game_id)]
    pub game_id: GameId,
    /// Print one JSON object: {"game_id", "record", "docker", "consistent", "mismatches"}.
    #[arg(long)]
    pub json: bool,
}

pub(crate) fn parse_game_id(raw: &str) -> Result<GameId, String> {
    GameId::parse(raw).map_err(|e| e.to_string())
}

/// Reads the record and inspects the container, then prints them side by
/// side. Exit 1 when the game has no record (an unknown game).
pub async fn status(
    config: &Config,
    args: StatusArgs,
    style: Style,
    out: &mut impl Write,
) -> anyhow::Result<Exit> {
    let store = PgStore::connect(&config.database_url).await?;
    let record = store
        .load(&args.game_id)
        .await
        .with_context(|| format!("read the runtime record of {}", args.game_id))?;
    // An exited record is shown with its exit (SPEC §11): the code, the OOM
    // flag and when, as the reconciler's exit entry recorded them.
    let last_exit = match &record {
        Some(r) if r.status() == RuntimeStatus::Exited => store
            .last_exit(args.game_id.as_str())
            .await
            .with_context(|| format!("read the last exit of {}", args.game_id))?,
        _ => None,
    };
    let engine = DockerEngine::connect(config.docker.clone()).await?;
    let docker = engine
        .inspect(&args.game_id)
        .await
        .with_context(|| format!("inspect the container of {}", args.game_id))?;
    let report = Report {
        container_name: engine.container_name(&args.game_id),
        game_id: args.game_id,
        record,
        docker,
        last_exit,
    };
    let unknown = report.record.is_none();
    if args.json {
        writeln!(out, "{}", report.to_json())?;
    } else if unknown && report.docker.is_none() {
        writeln!(
            out,
            "game {} is unknown: no runtime record, and Docker has no container {}",
            report.game_id, report.container_name
        )?;
    } else {
        write!(out, "{}", report.render(&style, Utc::now()))?;
    }
    out.flush()?;
    if unknown {
        if args.json || report.docker.is_some() {
            eprintln!(
                "rtmanager: game {} is unknown: it has no runtime record",
                report.game_id
            );
        }
        return Ok(Exit::Failure);
    }
    Ok(Exit::Success)
}

/// What is known about one game.
#[derive(Debug, Clone)]
pub struct Report {
    pub game_id: GameId,
    /// `<RTM_CONTAINER_PREFIX><game_id>`.
    pub container_name: String,
    pub record: Option<RuntimeRecord>,
    pub docker: Option<ContainerInfo>,
    /// The latest `exit` entry, read for an `exited` record only.
    pub last_exit: Option<OutcomeEvent>,
}

impl Report {
    fn container(&self) -> &str {
        &self.container_name
    }

    /// Every way the record and Docker disagree, as sentences.
    pub fn mismatches(&self) -> Vec<String> {
        let mut found = Vec::new();
        let Some(record) = &self.record else {
            if let Some(c) = &self.docker {
                found.push(format!(
                    "no runtime record, but Docker has container {} ({})",
                    self.container(),
                    docker_state(c)
                ));
            }
            return found;
        };
        let status = record.status();
        let recorded_id = record.state.container_id().map(|c| c.as_str());
        match (status, &self.docker) {
            (RuntimeStatus::Removed, Some(c)) => found.push(format!(
                "record says removed, Docker still has container {} ({})",
                short_id(c.id.as_str()),
                docker_state(c)
            )),
            (RuntimeStatus::Removed, None) => {}
            (RuntimeStatus::Running, None) => {
                found.push("record says running, Docker has no container".into());
            }
            (RuntimeStatus::Stopped | RuntimeStatus::Exited, None) => {
                if let Some(id) = recorded_id {
                    found.push(format!(
                        "record names container {}, Docker has none",
                        short_id(id)
                    ));
                }
            }
            (RuntimeStatus::Running | RuntimeStatus::Stopped | RuntimeStatus::Exited, Some(c)) => {
                if status == RuntimeStatus::Running && !c.running {
                    found.push(format!(
                        "record says running, Docker says {}",
                        docker_state(c)
                    ));
                }
                if matches!(status, RuntimeStatus::Stopped | RuntimeStatus::Exited) && c.running {
                    found.push(format!("record says {status}, Docker says running"));
                }
                match recorded_id {
                    Some(id) if id != c.id.as_str() => found.push(format!(
                        "record names container {}, Docker's is {}",
                        short_id(id),
                        short_id(c.id.as_str())
                    )),
                    Some(_) => {}
                    None => found.push(format!(
                        "record names no container, Docker has {}",
                        short_id(c.id.as_str())
                    )),
                }
                if record.image_ref.as_str() != c.image_ref {
                    found.push(format!(
                        "record says image {}, the container runs {}",
                        record.image_ref, c.image_ref
                    ));
                }
                if let (Some(recorded), Some(actual)) = (record.state.address(), &c.address)
                    && status == RuntimeStatus::Running
                    && recorded != actual
                {
                    found.push(format!(
                        "record says address {recorded}, Docker says {actual}"
                    ));
                }
            }
        }
        found
    }

    /// One line of JSON, keys in this order: `{"game_id", "record": {…}|null,
    /// "docker": {…}|null, "consistent", "mismatches": […]}`.
    pub fn to_json(&self) -> String {
        let record = self.record.as_ref().map(|r| RecordJson {
            status: r.status().as_str(),
            image_ref: r.image_ref.as_str(),
            container_id: r.state.container_id().map(|c| c.as_str()),
            address: r.state.address(),
            state_dir: r.state_dir.display().to_string(),
            fence: r.fence,
            created_at: r.created_at,
            updated_at: r.updated_at,
            exit: self.last_exit.as_ref().map(|e| ExitJson {
                operation_id: e.operation_id,
                at: e.finished_at,
                message: e.error_message.as_deref().unwrap_or_default(),
            }),
        });
        let docker = self.docker.as_ref().map(|c| DockerJson {
            container_name: &self.container_name,
            container_id: c.id.as_str(),
            running: c.running,
            exit_code: c.exit_code,
            image_ref: &c.image_ref,
            health: c.health.map(health_str),
            address: c.address.as_deref(),
        });
        let mismatches = self.mismatches();
        let json = StatusJson {
            game_id: self.game_id.as_str(),
            record,
            docker,
            consistent: mismatches.is_empty(),
            mismatches,
        };
        serde_json::to_string(&json).expect("plain data serializes")
    }

    /// The record and Docker side by side, then the mismatches:
    ///
    /// ```text
    /// game g-1042
    ///               record                     docker
    ///   status      running                    running
    ///   …
    /// ! record says running, Docker says exited (code 3)
    /// ```
    pub fn render(&self, style: &Style, now: DateTime<Utc>) -> String {
        let dash = || "-".to_owned();
        let r = self.record.as_ref();
        let d = self.docker.as_ref();
        let mut rows: Vec<(&str, String, String)> = vec![
            (
                "status",
                r.map_or_else(|| "no record".into(), |r| r.status().to_string()),
                d.map_or_else(|| "no container".into(), docker_state),
            ),
            (
                "image",
                r.map_or_else(dash, |r| r.image_ref.to_string()),
                d.map_or_else(dash, |c| c.image_ref.clone()),
            ),
            (
                "container",
                r.and_then(|r| r.state.container_id())
                    .map_or_else(dash, |c| short_id(c.as_str()).to_owned()),
                d.map_or_else(dash, |c| {
                    format!("{} ({})", short_id(c.id.as_str()), self.container())
                }),
            ),
            (
                "address",
                r.and_then(|r| r.state.address())
                    .map_or_else(dash, str::to_owned),
                d.and_then(|c| c.address.clone()).unwrap_or_else(dash),
            ),
            (
                "health",
                String::new(),
                d.map_or_else(dash, |c| {
                    c.health
                        .map_or_else(|| "no healthcheck".into(), |h| health_str(h).to_owned())
                }),
            ),
        ];
        if let Some(r) = r {
            rows.push((
                "state dir",
                r.state_dir.display().to_string(),
                String::new(),
            ));
            rows.push(("fence", r.fence.to_string(), String::new()));
            if let Some(exit) = &self.last_exit {
                let message = exit.error_message.as_deref().unwrap_or_default();
                let first = message.lines().next().unwrap_or_default();
                rows.push((
                    "exit",
                    format!(
                        "#{} recorded {} ({}): {first}",
                        exit.operation_id.unwrap_or_default(),
                        style.date_time(exit.finished_at),
                        ago(now, exit.finished_at)
                    ),
                    String::new(),
                ));
            }
            let when = |t: DateTime<Utc>| format!("{} ({})", style.date_time(t), ago(now, t));
            rows.push(("created", when(r.created_at), String::new()));
            rows.push(("updated", when(r.updated_at), String::new()));
        }

        let label_width = rows.iter().map(|(l, _, _)| l.len()).max().unwrap_or(0);
        let record_width = rows
            .iter()
            .filter(|(_, _, docker)| !docker.is_empty())
            .map(|(_, record, _)| record.chars().count())
            .chain(["record".len()])
            .max()
            .unwrap_or(0);
        let mut text = format!("game {}\n", style.paint(&[BOLD], self.game_id.as_str()));
        text.push_str(&style.paint(
            &[DIM],
            &format!(
                "  {}  {}  docker",
                pad("", label_width),
                pad("record", record_width)
            ),
        ));
        text.push('\n');
        for (label, record, docker) in &rows {
            let line = if docker.is_empty() {
                format!("  {}  {record}", pad(label, label_width))
            } else {
                format!(
                    "  {}  {}  {docker}",
                    pad(label, label_width),
                    pad(record, record_width)
                )
            };
            text.push_str(line.trim_end());
            text.push('\n');
        }
        let mismatches = self.mismatches();
        if mismatches.is_empty() && self.record.is_some() {
            text.push_str(&style.paint(&[GREEN], "record and Docker agree"));
            text.push('\n');
        }
        for m in mismatches {
            text.push_str(&style.paint(&[RED], &format!("! {m}")));
            text.push('\n');
        }
        text
    }
}

#[derive(Serialize)]
struct StatusJson<'a> {
    game_id: &'a str,
    record: Option<RecordJson<'a>>,
    docker: Option<DockerJson<'a>>,
    consistent: bool,
    mismatches: Vec<String>,
}

#[derive(Serialize)]
struct RecordJson<'a> {
    status: &'static str,
    image_ref: &'a str,
    container_id: Option<&'a str>,
    address: Option<&'a str>,
    state_dir: String,
    fence: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    /// An `exited` record's exit entry (absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    exit: Option<ExitJson<'a>>,
}

#[derive(Serialize)]
struct ExitJson<'a> {
    operation_id: Option<i64>,
    /// When the reconciler recorded it (the message says when the engine
    /// stopped).
    at: DateTime<Utc>,
    message: &'a str,
}

#[derive(Serialize)]
struct DockerJson<'a> {
    container_name: &'a str,
    container_id: &'a str,
    running: bool,
    exit_code: Option<i64>,
    image_ref: &'a str,
    health: Option<&'static str>,
    address: Option<&'a str>,
}

/// `running`, `exited (code 3)`, or `not running` (created, never started).
fn docker_state(c: &ContainerInfo) -> String {
    match (c.running, c.exit_code) {
        (true, _) => "running".into(),
        (false, Some(code)) => format!("exited (code {code})"),
        (false, None) => "not running".into(),
    }
}

fn health_str(h: Health) -> &'static str {
    match h {
        Health::Starting => "starting",
        Health::Healthy => "healthy",
        Health::Unhealthy => "unhealthy",
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use chrono::TimeZone as _;
    use serde_json::Value;

    use super::*;
    use crate::domain::{ContainerId, ImageRef, RuntimeState};

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 26, 12, 0, 0).unwrap()
    }

    fn running_record() -> RuntimeRecord {
        RuntimeRecord {
            game_id: GameId::parse("g-1042").unwrap(),
            image_ref: ImageRef::parse("rtm-test/engine:1.4.2").unwrap(),
            state: RuntimeState::Running {
                container_id: ContainerId("3f2a9c1d0e4b5a69".into()),
                address: Some("172.18.0.5".into()),
            },
            state_dir: PathBuf::from("/var/lib/rtmanager/games/g-1042"),
            fence: 7,
            created_at: now() - chrono::Duration::hours(3),
            updated_at: now() - chrono::Duration::minutes(4),
        }
    }

    fn running_container() -> ContainerInfo {
        ContainerInfo {
            id: ContainerId("3f2a9c1d0e4b5a69".into()),
            image_ref: "rtm-test/engine:1.4.2".into(),
            running: true,
            exit_code: None,
            health: Some(Health::Healthy),
            address: Some("172.18.0.5".into()),
            oom_killed: false,
            finished_at: None,
            removing: false,
        }
    }

    fn report(record: Option<RuntimeRecord>, docker: Option<ContainerInfo>) -> Report {
        Report {
            last_exit: None,
            game_id: GameId::parse("g-1042").unwrap(),
            container_name: "rtm-g-1042".into(),
            record,
            docker,
        }
    }

    #[test]
    fn agreeing_record_and_container() {
        let r = report(Some(running_record()), Some(running_container()));
        assert!(r.mismatches().is_empty());
        let text = r.render(&Style::plain(), now());
        assert_eq!(
            text,
            "game g-1042\n\
             \x20            record                 docker\n\
             \x20 status     running                running\n\
             \x20 image      rtm-test/engine:1.4.2  rtm-test/engine:1.4.2\n\
             \x20 container  3f2a9c1d0e4b           3f2a9c1d0e4b (rtm-g-1042)\n\
             \x20 address    172.18.0.5             172.18.0.5\n\
             \x20 health                            healthy\n\
             \x20 state dir  /var/lib/rtmanager/games/g-1042\n\
             \x20 fence      7\n\
             \x20 created    2026-11-26 09:00:00 (3h ago)\n\
             \x20 updated    2026-11-26 11:56:00 (4m ago)\n\
             record and Docker agree\n"
        );
        let text = r.to_json();
        assert!(
            text.starts_with(r#"{"game_id":"g-1042","record":{"status":"running""#),
            "{text}"
        );
        let json: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["consistent"], true);
        assert_eq!(json["record"]["status"], "running");
        assert_eq!(json["record"]["fence"], 7);
        assert_eq!(json["docker"]["health"], "healthy");
        assert_eq!(json["docker"]["container_name"], "rtm-g-1042");
    }

    #[test]
    fn an_exited_game_shows_its_exit() {
        let mut record = running_record();
        record.state = RuntimeState::Exited {
            container_id: Some(ContainerId("3f2a9c1d0e4b5a69".into())),
        };
        let mut container = running_container();
        container.running = false;
        container.exit_code = Some(7);
        let mut r = report(Some(record), Some(container));
        let exit: OutcomeEvent = serde_json::from_str(include_str!(
            "../../tests/fixtures/events/runtime.exit.failure.json"
        ))
        .unwrap();
        r.last_exit = Some(exit);
        assert!(r.mismatches().is_empty(), "{:?}", r.mismatches());
        let text = r.render(&Style::plain(), now());
        assert!(text.contains("  status     exited"), "{text}");
        assert!(
            text.contains(
                "  exit       #1040 recorded 2026-11-26 09:12:04 (2h ago): engine exited \
                 without a command: exit code 7, OOM killed: no, stopped at 2026-11-26T09:12:04.021Z"
            ),
            "{text}"
        );
        let json: Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(json["record"]["status"], "exited");
        assert_eq!(json["record"]["exit"]["operation_id"], 1040);
        assert!(
            json["record"]["exit"]["message"]
                .as_str()
                .unwrap()
                .contains("exit code 7")
        );
        // Not exited: no `exit` key at all.
        let json: Value =
            serde_json::from_str(&report(Some(running_record()), None).to_json()).unwrap();
        assert!(json["record"].get("exit").is_none());
    }

    #[test]
    fn disagreements_are_flagged() {
        let mut exited = running_container();
        exited.running = false;
        exited.exit_code = Some(3);
        let r = report(Some(running_record()), Some(exited));
        assert_eq!(
            r.mismatches(),
            ["record says running, Docker says exited (code 3)"]
        );
        assert!(
            r.render(&Style::plain(), now())
                .ends_with("! record says running, Docker says exited (code 3)\n")
        );
        let json: Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(json["consistent"], false);
        assert_eq!(
            json["mismatches"][0],
            "record says running, Docker says exited (code 3)"
        );

        let r = report(Some(running_record()), None);
        assert_eq!(
            r.mismatches(),
            ["record says running, Docker has no container"]
        );

        let mut other = running_container();
        other.id = ContainerId("ffffffffffff0000".into());
        other.image_ref = "rtm-test/engine:1.4.3".into();
        let r = report(Some(running_record()), Some(other));
        assert_eq!(
            r.mismatches(),
            [
                "record names container 3f2a9c1d0e4b, Docker's is ffffffffffff",
                "record says image rtm-test/engine:1.4.2, the container runs rtm-test/engine:1.4.3",
            ]
        );

        let mut removed = running_record();
        removed.state = RuntimeState::Removed;
        let r = report(Some(removed.clone()), Some(running_container()));
        assert_eq!(
            r.mismatches(),
            ["record says removed, Docker still has container 3f2a9c1d0e4b (running)"]
        );
        assert!(report(Some(removed), None).mismatches().is_empty());

        let mut stopped = running_record();
        stopped.state = RuntimeState::Stopped {
            container_id: Some(ContainerId("3f2a9c1d0e4b5a69".into())),
        };
        let r = report(Some(stopped.clone()), Some(running_container()));
        assert_eq!(r.mismatches(), ["record says stopped, Docker says running"]);
        let mut exited = running_container();
        exited.running = false;
        exited.exit_code = Some(0);
        assert!(report(Some(stopped), Some(exited)).mismatches().is_empty());
    }

    #[test]
    fn an_unknown_game() {
        let r = report(None, None);
        assert!(r.mismatches().is_empty());
        assert_eq!(
            r.to_json(),
            r#"{"game_id":"g-1042","record":null,"docker":null,"consistent":true,"mismatches":[]}"#
        );
        let json: Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(json["record"], Value::Null);
        assert_eq!(json["docker"], Value::Null);
        assert_eq!(
            r.render(&Style::plain(), now()),
            "game g-1042\n\
             \x20            record     docker\n\
             \x20 status     no record  no container\n\
             \x20 image      -          -\n\
             \x20 container  -          -\n\
             \x20 address    -          -\n\
             \x20 health                -\n"
        );

        let orphan = report(None, Some(running_container()));
        assert_eq!(
            orphan.mismatches(),
            ["no runtime record, but Docker has container rtm-g-1042 (running)"]
        );
    }
}
