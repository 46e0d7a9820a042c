//! `rtmanager nodes`, `drain <node>` and `undrain <node>` (SPEC §12): the
//! Docker hosts the workers registered, and whether placement may put new
//! games on each.
//!
//! A node registers itself: its workers upsert its row of `nodes` at
//! start-up and every heartbeat. These commands only read the table and
//! flip `draining`, which the heartbeat never touches; a drained node keeps
//! serving the games it holds, it only stops receiving new ones.

use std::io::Write;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use clap::Args;
use serde::Serialize;

use super::Exit;
use super::output::{DIM, GREEN, RED, Style, YELLOW, ago, pad};
use crate::config::Config;
use crate::domain::NodeName;
use crate::outbound::postgres::{NodeRow, PgStore};

#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct NodesArgs {
    /// Print one JSON object per node, one per line:
    /// {"name", "live", "draining", "games", "max_games", "last_seen"}.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct DrainArgs {
    /// The node, as its workers' RTM_NODE names it (see `rtmanager nodes`)
    #[arg(value_parser = parse_node)]
    pub node: NodeName,
}

pub(crate) fn parse_node(raw: &str) -> Result<NodeName, String> {
    NodeName::parse(raw)
}

/// Lists every registered node.
pub async fn nodes(
    config: &Config,
    args: NodesArgs,
    style: Style,
    out: &mut impl Write,
) -> anyhow::Result<Exit> {
    let store = PgStore::connect(&config.database_url).await?;
    let nodes = store.nodes().await.context("list the nodes")?;
    if args.json {
        for node in &nodes {
            writeln!(out, "{}", to_json(node))?;
        }
        if nodes.is_empty() {
            eprintln!("rtmanager: {NO_NODES}");
        }
    } else {
        write!(out, "{}", render(&nodes, &style, Utc::now()))?;
    }
    out.flush()?;
    Ok(Exit::Success)
}

const NO_NODES: &str = "no nodes registered: a worker registers its node (RTM_NODE) when it starts";

/// `rtmanager drain <node>` (`draining: true`) and `undrain <node>`
/// (`false`). Exit 1 for a node no worker ever registered, like an unknown
/// game for `status`.
pub async fn set_draining(
    config: &Config,
    args: DrainArgs,
    draining: bool,
    out: &mut impl Write,
) -> anyhow::Result<Exit> {
    let store = PgStore::connect(&config.database_url).await?;
    let before = store.nodes().await.context("list the nodes")?;
    let Some(node) = before.iter().find(|n| n.name == args.node.as_str()) else {
        eprintln!("rtmanager: {}", unknown_node(&args.node, &before));
        return Ok(Exit::Failure);
    };
    let was = node.draining;
    if !store
        .set_draining(&args.node, draining)
        .await
        .with_context(|| format!("set draining on node {}", args.node))?
    {
        // Deleted between the two statements (by hand: nothing deletes
        // nodes).
        eprintln!("rtmanager: {}", unknown_node(&args.node, &[]));
        return Ok(Exit::Failure);
    }
    writeln!(out, "{}", drained_line(node, was, draining))?;
    out.flush()?;
    if draining && !before.iter().any(|n| n.name != node.name && takes_games(n)) {
        eprintln!(
            "rtmanager: warning: no other live node takes new games: every start of a new game \
             is answered service_unavailable until a node is undrained or another one registers"
        );
    }
    Ok(Exit::Success)
}

/// A live, non-draining node below its limit: one placement may choose.
fn takes_games(n: &NodeRow) -> bool {
    n.live && !n.draining && n.games < i64::from(n.max_games)
}

/// `node "x" is unknown: …`, naming the registered ones.
fn unknown_node(node: &NodeName, known: &[NodeRow]) -> String {
    let names: Vec<&str> = known.iter().map(|n| n.name.as_str()).collect();
    let known = if names.is_empty() {
        "no node is registered".to_owned()
    } else {
        format!("the registered nodes are {}", names.join(", "))
    };
    format!(
        "node {:?} is unknown: no worker of it ever registered ({known}; see `rtmanager nodes`)",
        node.as_str()
    )
}

/// What `drain`/`undrain` did, in one line.
fn drained_line(node: &NodeRow, was: bool, draining: bool) -> String {
    let games = match node.games {
        1 => "its 1 running game stays there and is still served".to_owned(),
        n => format!("its {n} running games stay there and are still served"),
    };
    match (was, draining) {
        (false, true) => format!(
            "node {} is draining: no new games are placed there; {games}",
            node.name
        ),
        (true, true) => format!("node {} was already draining; {games}", node.name),
        (true, false) => format!("node {} takes new games again", node.name),
        (false, false) => format!("node {} was not draining: it takes new games", node.name),
    }
}

#[derive(Serialize)]
struct NodeJson<'a> {
    name: &'a str,
    live: bool,
    draining: bool,
    /// Its `running` games.
    games: i64,
    max_games: i32,
    last_seen: DateTime<Utc>,
}

/// One line of JSON per node, keys in this order: `{"name", "live",
/// "draining", "games", "max_games", "last_seen"}`.
pub fn to_json(node: &NodeRow) -> String {
    serde_json::to_string(&NodeJson {
        name: &node.name,
        live: node.live,
        draining: node.draining,
        games: node.games,
        max_games: node.max_games,
        last_seen: node.last_seen,
    })
    .expect("plain data serializes")
}

const HEADER: [&str; 4] = ["NODE", "STATE", "GAMES", "LAST SEEN"];

/// The nodes as an aligned table, by name:
///
/// ```text
/// NODE    STATE           GAMES   LAST SEEN
/// node-a  live            12/200  2026-11-26 12:00:00 (3s ago)
/// node-b  live, draining  40/200  2026-11-26 11:59:58 (5s ago)
/// node-c  down            7/200   2026-11-26 11:40:00 (20m ago)
/// ```
///
/// `down`: not seen within three heartbeats (its worker is stopped or cut
/// off from the database); its games' commands wait in its queue.
pub fn render(nodes: &[NodeRow], style: &Style, now: DateTime<Utc>) -> String {
    if nodes.is_empty() {
        return format!("{NO_NODES}\n");
    }
    let rows: Vec<[String; 4]> = nodes
        .iter()
        .map(|n| {
            [
                n.name.clone(),
                state(n).to_owned(),
                format!("{}/{}", n.games, n.max_games),
                format!(
                    "{} ({})",
                    style.date_time(n.last_seen),
                    ago(now, n.last_seen)
                ),
            ]
        })
        .collect();
    let mut widths = HEADER.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 4]| -> String {
        let [name, state, games, seen] = cells;
        format!(
            "{}  {}  {}  {seen}",
            pad(name, widths[0]),
            pad(state, widths[1]),
            pad(games, widths[2])
        )
    };
    let mut text = style.paint(&[DIM], line(HEADER).trim_end());
    text.push('\n');
    for (node, [name, state, games, seen]) in nodes.iter().zip(&rows) {
        let colour = match (node.live, node.draining) {
            (false, _) => RED,
            (true, true) => YELLOW,
            (true, false) => GREEN,
        };
        let state = style.paint(&[colour], &pad(state, widths[1]));
        text.push_str(&format!(
            "{}  {state}  {}  {seen}",
            pad(name, widths[0]),
            pad(games, widths[2])
        ));
        text.push('\n');
    }
    text
}

fn state(n: &NodeRow) -> &'static str {
    match (n.live, n.draining) {
        (true, false) => "live",
        (true, true) => "live, draining",
        (false, false) => "down",
        (false, true) => "down, draining",
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone as _;
    use serde_json::Value;

    use super::*;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 26, 12, 0, 0).unwrap()
    }

    fn node(name: &str, live: bool, draining: bool, games: i64, seen_secs_ago: i64) -> NodeRow {
        NodeRow {
            name: name.into(),
            last_seen: now() - chrono::Duration::seconds(seen_secs_ago),
            max_games: 200,
            draining,
            live,
            games,
        }
    }

    fn three() -> Vec<NodeRow> {
        vec![
            node("node-a", true, false, 12, 3),
            node("node-b", true, true, 40, 5),
            node("node-c", false, false, 7, 1_200),
        ]
    }

    #[test]
    fn the_table_is_aligned() {
        let text = render(&three(), &Style::plain(), now());
        let expected = [
            "NODE    STATE           GAMES   LAST SEEN",
            "node-a  live            12/200  2026-11-26 11:59:57 (3s ago)",
            "node-b  live, draining  40/200  2026-11-26 11:59:55 (5s ago)",
            "node-c  down            7/200   2026-11-26 11:40:00 (20m ago)",
        ];
        assert_eq!(text, expected.map(|l| format!("{l}\n")).concat());
        assert_eq!(render(&[], &Style::plain(), now()), format!("{NO_NODES}\n"));
    }

    #[test]
    fn colours_say_live_draining_or_down() {
        let style = Style {
            color: true,
            local_time: false,
        };
        let text = render(&three(), &style, now());
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with(DIM), "{lines:?}");
        assert!(lines[1].contains(&format!("{GREEN}live ")), "{lines:?}");
        assert!(
            lines[2].contains(&format!("{YELLOW}live, draining")),
            "{lines:?}"
        );
        assert!(lines[3].contains(&format!("{RED}down")), "{lines:?}");
    }

    #[test]
    fn one_json_object_per_node() {
        let line = to_json(&three()[1]);
        assert_eq!(
            line,
            r#"{"name":"node-b","live":true,"draining":true,"games":40,"max_games":200,"last_seen":"2026-11-26T11:59:55Z"}"#
        );
        let json: Value = serde_json::from_str(&to_json(&three()[2])).unwrap();
        assert_eq!(json["live"], false);
        assert_eq!(json["games"], 7);
    }

    #[test]
    fn drain_and_undrain_say_what_changed() {
        let a = node("node-a", true, false, 12, 3);
        assert_eq!(
            drained_line(&a, false, true),
            "node node-a is draining: no new games are placed there; \
             its 12 running games stay there and are still served"
        );
        let one = node("node-a", true, true, 1, 3);
        assert_eq!(
            drained_line(&one, true, true),
            "node node-a was already draining; its 1 running game stays there and is still served"
        );
        assert_eq!(
            drained_line(&a, true, false),
            "node node-a takes new games again"
        );
        assert_eq!(
            drained_line(&a, false, false),
            "node node-a was not draining: it takes new games"
        );
    }

    #[test]
    fn an_unknown_node_names_the_registered_ones() {
        let x = NodeName::parse("node-x").unwrap();
        assert_eq!(
            unknown_node(&x, &three()),
            "node \"node-x\" is unknown: no worker of it ever registered \
             (the registered nodes are node-a, node-b, node-c; see `rtmanager nodes`)"
        );
        assert!(unknown_node(&x, &[]).contains("(no node is registered;"));
    }

    #[test]
    fn placement_may_choose_a_live_node_with_room_that_is_not_draining() {
        let [a, b, c] = three().try_into().unwrap();
        assert!(takes_games(&a));
        assert!(!takes_games(&b), "draining");
        assert!(!takes_games(&c), "down");
        let mut full = a.clone();
        full.games = 200;
        assert!(!takes_games(&full));
    }
}
