//! `rtmanager status <game_id>`: the runtime record beside what Docker
//! reports for the game's container, with every disagreement flagged, and
//! the node the game lives on (SPEC §12).
//!
//! Docker is asked only when this host's engine is the game's: the game
//! lives on this command's node (`RTM_NODE`), on no node yet, or only one
//! node is registered (then every game is on it, whatever this host is
//! called). A game on another node is shown with its record alone: this
//! engine not having its container says nothing.

use std::io::Write;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use clap::Args;
use serde::Serialize;

use super::Exit;
use super::output::{BOLD, DIM, GREEN, RED, Style, YELLOW, ago, pad, short_id};
use crate::config::Config;
use crate::domain::{GameId, NodeName, OutcomeEvent, RuntimeRecord, RuntimeStatus};
use crate::outbound::docker::DockerEngine;
use crate::outbound::postgres::PgStore;
use crate::ports::{ContainerEngine as _, ContainerInfo, Health, RuntimeStore as _};

#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct StatusArgs {
    /// The game, e.g. g-1042
    #[arg(value_parser = parse_game_id)]
    pub game_id: GameId,
    /// Print one JSON object: {"game_id", "record", "docker", "consistent", "mismatches",
    /// "node", "placement", "docker_node"}.
    #[arg(long)]
    pub json: bool,
}

pub(crate) fn parse_game_id(raw: &str) -> Result<GameId, String> {
    GameId::parse(raw).map_err(|e| e.to_string())
}

/// Reads the record and inspects the container, then prints them side by
/// side. Exit 1 when the game has no record (an unknown game, or one
/// placed whose start has not run).
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
    let placed = store
        .game_placement(args.game_id.as_str())
        .await
        .with_context(|| format!("read the node of {}", args.game_id))?;
    let placement = match (placed.placed_node, placed.placed_at) {
        (Some(node), Some(at)) => Some(Placement {
            node,
            at,
            command_id: placed.placed_by.unwrap_or_default(),
        }),
        _ => None,
    };
    let registered = store.nodes().await.context("list the nodes")?.len();
    let here = config.node.name.clone();
    let lives_on = placement
        .as_ref()
        .map(|p| p.node.as_str())
        .or(placed.record_node.as_deref());
    let compared = docker_is_the_games(lives_on, &here, registered);
    let docker = if compared {
        let engine = DockerEngine::connect(config.docker.clone()).await?;
        engine
            .inspect(&args.game_id)
            .await
            .with_context(|| format!("inspect the container of {}", args.game_id))?
    } else {
        None
    };
    let report = Report {
        container_name: format!("{}{}", config.docker.container_prefix, args.game_id),
        game_id: args.game_id,
        record,
        docker,
        last_exit,
        record_node: placed.record_node,
        placement,
        here,
        compared,
    };
    let unknown = report.record.is_none();
    if args.json {
        writeln!(out, "{}", report.to_json())?;
    } else if unknown && report.docker.is_none() && report.placement.is_none() && compared {
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
        match &report.placement {
            Some(p) => eprintln!(
                "rtmanager: game {} has no runtime record yet: it is placed on node {}, \
                 where its start has not run (or failed)",
                report.game_id, p.node
            ),
            None if args.json || report.docker.is_some() || !compared => eprintln!(
                "rtmanager: game {} is unknown: it has no runtime record",
                report.game_id
            ),
            None => {}
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
    /// `runtime_records.node`: where the record's last operation ran
    /// (`None`: no record, or one from before nodes).
    pub record_node: Option<String>,
    /// The game's placement, unless it belongs to an earlier life (made
    /// before its removal).
    pub placement: Option<Placement>,
    /// This command's node (`RTM_NODE`): whose Docker engine it can ask.
    pub here: NodeName,
    /// Whether Docker was asked (see the module comment): `docker` is what
    /// the game's own engine reports. Without it, `docker` is `None` and
    /// nothing is compared.
    pub compared: bool,
}

/// Where a start placed the game (table `placements`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub node: String,
    pub at: DateTime<Utc>,
    /// The start that placed it.
    pub command_id: String,
}

/// Whether this host's Docker engine is the game's: unless the game lives
/// on another node and there are several nodes. With one registered (or
/// none), every game is on it whatever this host is called, as before
/// nodes existed.
pub fn docker_is_the_games(lives_on: Option<&str>, here: &NodeName, registered: usize) -> bool {
    registered <= 1 || lives_on.is_none_or(|node| node == here.as_str())
}

impl Report {
    fn container(&self) -> &str {
        &self.container_name
    }

    /// The node the game's commands run on, as routing answers it: its
    /// placement, else its record's node; `None` for a game on no node
    /// (unknown, or from before nodes: it runs wherever its command lands).
    pub fn node(&self) -> Option<&str> {
        self.placement
            .as_ref()
            .map(|p| p.node.as_str())
            .or(self.record_node.as_deref())
    }

    /// A placement the record does not show yet: no record, a removed one,
    /// or one on another node (a start after a `remove`, placed afresh).
    fn pending_placement(&self) -> Option<&Placement> {
        let p = self.placement.as_ref()?;
        match &self.record {
            Some(r)
                if r.status() != RuntimeStatus::Removed
                    && self.record_node.as_deref() == Some(p.node.as_str()) =>
            {
                None
            }
            _ => Some(p),
        }
    }

    /// Why Docker was not asked, when it was not.
    fn not_compared(&self) -> Option<String> {
        if self.compared {
            return None;
        }
        Some(format!(
            "Docker not asked: the game lives on node {}, and this is node {} (RTM_NODE); \
             run status there, or here with RTM_NODE={} and DOCKER_HOST set to its engine",
            self.node().unwrap_or_default(),
            self.here,
            self.node().unwrap_or_default(),
        ))
    }

    /// Every way the record and Docker disagree, as sentences.
    pub fn mismatches(&self) -> Vec<String> {
        let mut found = Vec::new();
        if !self.compared {
            return found;
        }
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
    /// "docker": {…}|null, "consistent", "mismatches": […], "node",
    /// "placement": {…}|null, "docker_node"}`. `node` is where the game's
    /// commands run (its placement, else its record's node); `docker_node`
    /// the node whose engine `docker` describes, null (and `consistent`
    /// null) when Docker was not asked because the game lives on another
    /// node.
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
            node: self.record_node.as_deref(),
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
            consistent: self.compared.then_some(mismatches.is_empty()),
            mismatches,
            node: self.node(),
            placement: self.placement.as_ref().map(|p| PlacementJson {
                node: &p.node,
                placed_at: p.at,
                command_id: &p.command_id,
            }),
            docker_node: self.compared.then(|| self.here.as_str()),
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
        // The node the record names beside the node whose engine was asked.
        rows.insert(
            1,
            (
                "node",
                self.record_node.clone().unwrap_or_else(dash),
                self.here.to_string(),
            ),
        );
        if let Some(p) = self.pending_placement() {
            rows.insert(
                2,
                (
                    "placed",
                    format!(
                        "on {} {} ({}) by start {}",
                        p.node,
                        style.date_time(p.at),
                        ago(now, p.at),
                        p.command_id
                    ),
                    String::new(),
                ),
            );
        }
        if !self.compared {
            rows.retain(|(label, _, _)| *label != "health");
            for (label, _, docker) in &mut rows {
                *docker = if *label == "status" {
                    "not asked".into()
                } else {
                    String::new()
                };
            }
        }
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
        if let Some(p) = self.pending_placement()
            && self
                .record
                .as_ref()
                .is_none_or(|r| r.status() == RuntimeStatus::Removed)
        {
            text.push_str(&style.paint(
                &[YELLOW],
                &format!(
                    "placed on node {}: its start has not run there yet (or failed)",
                    p.node
                ),
            ));
            text.push('\n');
        }
        if let Some(note) = self.not_compared() {
            text.push_str(&style.paint(&[YELLOW], &note));
            text.push('\n');
        } else if mismatches.is_empty() && self.record.is_some() {
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
    /// Null when Docker was not asked.
    consistent: Option<bool>,
    mismatches: Vec<String>,
    node: Option<&'a str>,
    placement: Option<PlacementJson<'a>>,
    docker_node: Option<&'a str>,
}

#[derive(Serialize)]
struct PlacementJson<'a> {
    node: &'a str,
    placed_at: DateTime<Utc>,
    command_id: &'a str,
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
    /// `runtime_records.node` (null: written before nodes).
    node: Option<&'a str>,
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
            record_node: Some("node-a".into()),
            placement: None,
            here: NodeName::parse("node-a").unwrap(),
            compared: true,
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
             \x20 node       node-a                 node-a\n\
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
        assert_eq!(json["node"], "node-a");
        assert_eq!(json["record"]["node"], "node-a");
        assert_eq!(json["docker_node"], "node-a");
        assert_eq!(json["placement"], Value::Null);
    }

    #[test]
    fn docker_is_asked_only_when_it_is_the_games_engine() {
        let a = NodeName::parse("node-a").unwrap();
        assert!(docker_is_the_games(Some("node-a"), &a, 2));
        assert!(!docker_is_the_games(Some("node-b"), &a, 2));
        // On no node yet (unknown, or from before nodes): wherever it is
        // asked from.
        assert!(docker_is_the_games(None, &a, 2));
        // One node: every game is on it, whatever this host calls itself.
        assert!(docker_is_the_games(Some("node-b"), &a, 1));
        assert!(docker_is_the_games(Some("node-b"), &a, 0));
    }

    #[test]
    fn a_game_on_another_node_is_shown_without_docker() {
        let mut r = report(Some(running_record()), None);
        r.record_node = Some("node-b".into());
        r.compared = false;
        assert!(r.mismatches().is_empty(), "nothing compared");
        let text = r.render(&Style::plain(), now());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[2], "  status     running  not asked", "{text}");
        assert_eq!(lines[3], "  node       node-b", "{text}");
        assert_eq!(lines[4], "  image      rtm-test/engine:1.4.2", "{text}");
        assert!(!text.contains("health"), "{text}");
        assert!(
            text.ends_with(
                "Docker not asked: the game lives on node node-b, and this is node node-a \
                 (RTM_NODE); run status there, or here with RTM_NODE=node-b and DOCKER_HOST \
                 set to its engine\n"
            ),
            "{text}"
        );
        assert!(!text.contains("agree"), "{text}");
        let json: Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(json["node"], "node-b");
        assert_eq!(json["docker"], Value::Null);
        assert_eq!(json["docker_node"], Value::Null);
        assert_eq!(json["consistent"], Value::Null);
        assert_eq!(json["mismatches"], serde_json::json!([]));
    }

    fn placed_on(node: &str) -> Placement {
        Placement {
            node: node.into(),
            at: now() - chrono::Duration::seconds(5),
            command_id: "c-7".into(),
        }
    }

    #[test]
    fn a_placed_game_whose_start_has_not_run() {
        let mut r = report(None, None);
        r.record_node = None;
        r.placement = Some(placed_on("node-a"));
        assert_eq!(r.node(), Some("node-a"));
        let text = r.render(&Style::plain(), now());
        assert_eq!(
            text,
            "game g-1042\n\
             \x20            record     docker\n\
             \x20 status     no record  no container\n\
             \x20 node       -          node-a\n\
             \x20 placed     on node-a 2026-11-26 11:59:55 (5s ago) by start c-7\n\
             \x20 image      -          -\n\
             \x20 container  -          -\n\
             \x20 address    -          -\n\
             \x20 health                -\n\
             placed on node node-a: its start has not run there yet (or failed)\n"
        );
        let json: Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(json["node"], "node-a");
        assert_eq!(json["record"], Value::Null);
        assert_eq!(json["placement"]["node"], "node-a");
        assert_eq!(json["placement"]["command_id"], "c-7");
        assert_eq!(json["placement"]["placed_at"], "2026-11-26T11:59:55Z");
    }

    #[test]
    fn a_removed_game_placed_afresh_lives_on_its_new_node() {
        let mut removed = running_record();
        removed.state = RuntimeState::Removed;
        let mut r = report(Some(removed), None);
        r.placement = Some(placed_on("node-b"));
        r.compared = false;
        assert_eq!(
            r.node(),
            Some("node-b"),
            "the placement wins, as in routing"
        );
        let text = r.render(&Style::plain(), now());
        assert!(text.contains("  node       node-a\n"), "{text}");
        assert!(
            text.contains("  placed     on node-b 2026-11-26 11:59:55 (5s ago) by start c-7\n"),
            "{text}"
        );
        assert!(
            text.contains("placed on node node-b: its start has not run there yet (or failed)\n"),
            "{text}"
        );
        let json: Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(json["record"]["node"], "node-a");
        assert_eq!(json["node"], "node-b");

        // A placement the record already shows is not repeated.
        let mut r = report(Some(running_record()), Some(running_container()));
        r.placement = Some(placed_on("node-a"));
        let text = r.render(&Style::plain(), now());
        assert!(!text.contains("placed"), "{text}");
        assert!(text.ends_with("record and Docker agree\n"), "{text}");
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
        let mut r = report(None, None);
        r.record_node = None;
        assert!(r.mismatches().is_empty());
        assert_eq!(
            r.to_json(),
            r#"{"game_id":"g-1042","record":null,"docker":null,"consistent":true,"mismatches":[],"node":null,"placement":null,"docker_node":"node-a"}"#
        );
        let json: Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(json["record"], Value::Null);
        assert_eq!(json["docker"], Value::Null);
        assert_eq!(
            r.render(&Style::plain(), now()),
            "game g-1042\n\
             \x20            record     docker\n\
             \x20 status     no record  no container\n\
             \x20 node       -          node-a\n\
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
