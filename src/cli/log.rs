//! `rtmanager log <game_id>`: a game's operation history, newest first,
//! each outer operation followed by its inner steps in the order they ran.

use std::collections::HashMap;
use std::io::Write;

use anyhow::Context as _;
use clap::Args;

use super::Exit;
use super::output::{
    BOLD, DIM, GREEN, RED, Style, YELLOW, event_duration, first_line, human_duration, image_text,
    pad,
};
use super::status::parse_game_id;
use crate::config::Config;
use crate::domain::{GameId, Outcome, OutcomeEvent};
use crate::outbound::postgres::PgStore;

#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct LogArgs {
    /// The game, e.g. g-1042
    #[arg(value_parser = parse_game_id)]
    pub game_id: GameId,
    /// Only the entries of this correlation id (a source_ref or command id).
    #[arg(long, value_name = "ID")]
    pub correlation: Option<String>,
    /// How many entries (inner ones included) to read.
    #[arg(long, default_value_t = 20, value_name = "N", value_parser = clap::value_parser!(i64).range(1..=100_000))]
    pub limit: i64,
    /// Print each entry's event as JSON, one per line, newest first.
    #[arg(long)]
    pub json: bool,
}

pub async fn log(
    config: &Config,
    args: LogArgs,
    style: Style,
    out: &mut impl Write,
) -> anyhow::Result<Exit> {
    let store = PgStore::connect(&config.database_url).await?;
    let events = store
        .history(
            args.game_id.as_str(),
            args.correlation.as_deref(),
            args.limit,
        )
        .await
        .with_context(|| format!("read the history of {}", args.game_id))?;
    if events.is_empty() {
        let what = match &args.correlation {
            Some(c) => format!(
                "no operations recorded for game {} with correlation {c}",
                args.game_id
            ),
            None => format!("no operations recorded for game {}", args.game_id),
        };
        if args.json {
            eprintln!("rtmanager: {what}");
        } else {
            writeln!(out, "{what}")?;
        }
        return Ok(Exit::Success);
    }
    if args.json {
        for event in &events {
            writeln!(out, "{}", serde_json::to_string(event)?)?;
        }
    } else {
        write!(out, "{}", render(&group(events), &style))?;
    }
    out.flush()?;
    Ok(Exit::Success)
}

/// An outer entry with its inner steps (oldest first). `outer` is `None`
/// when the steps' outer entry is not in view: the operation is still
/// running, or its entry is beyond `--limit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub outer: Option<OutcomeEvent>,
    pub inner: Vec<OutcomeEvent>,
}

/// Groups a newest-first history: every inner entry goes under the outer
/// entry with the same correlation id and command id. An outer entry is
/// written after its steps, so newest first it comes before them.
pub fn group(newest_first: Vec<OutcomeEvent>) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    let mut open: HashMap<(String, String), usize> = HashMap::new();
    for event in newest_first {
        let key = (event.correlation_id.clone(), event.command_id.clone());
        if event.outer_op.is_none() {
            open.insert(key, groups.len());
            groups.push(Group {
                outer: Some(event),
                inner: Vec::new(),
            });
        } else if let Some(&i) = open.get(&key) {
            groups[i].inner.push(event);
        } else {
            open.insert(key, groups.len());
            groups.push(Group {
                outer: None,
                inner: vec![event],
            });
        }
    }
    for g in &mut groups {
        g.inner.reverse();
    }
    groups
}

const HEADER: [&str; 8] = [
    "TIME", "OP", "OUTCOME", "CODE", "IMAGE", "DURATION", "NODE", "MESSAGE",
];

/// The NODE column: left out when no entry in view names a node (a
/// history from before nodes, or kept only in the operation log after
/// `RTM_RETENTION` swept its events).
const NODE_COLUMN: usize = 6;

/// One table row: the plain cells, and whether it is an outer line and a
/// failure (for colours).
struct Row {
    cells: [String; 8],
    /// The further lines of a multi-line message, shown under it.
    more: Vec<String>,
    outer: bool,
    failed: bool,
}

fn row(event: &OutcomeEvent, style: &Style) -> Row {
    let outer = event.outer_op.is_none();
    let op = event.op.clone().unwrap_or_else(|| "rejected".into());
    let failed = event.outcome == Outcome::Failure;
    // The reconciler's restart names the exit it follows (its correlation
    // id is that exit entry's operation id).
    let after_exit;
    let message = match &event.error_message {
        Some(m) if failed => m.as_str(),
        _ if outer && op == "restart" && event.op_source.as_deref() == Some("reconciler") => {
            after_exit = format!("automatic restart after exit #{}", event.correlation_id);
            after_exit.as_str()
        }
        _ => "",
    };
    let (first, rest) = first_line(message);
    let mut outcome = event.outcome.as_str().to_owned();
    if event.noop {
        outcome.push_str(" (no-op)");
    }
    if event.rolled_back {
        outcome.push_str(" (rolled back)");
    }
    Row {
        cells: [
            style.date_time(event.occurred_at),
            if outer { op } else { format!("  └ {op}") },
            outcome,
            event.error_code.map(|c| c.to_string()).unwrap_or_default(),
            image_text(event).unwrap_or_default(),
            human_duration(event_duration(event)),
            event.node.clone().unwrap_or_default(),
            first.to_owned(),
        ],
        more: rest.into_iter().map(str::to_owned).collect(),
        outer,
        failed,
    }
}

/// The history as an aligned table (newest group first), with a NODE
/// column (before MESSAGE) when an entry in view names the node whose
/// worker wrote it.
///
/// ```text
/// TIME                 OP        OUTCOME  CODE  IMAGE                      DURATION  MESSAGE
/// 2026-11-26 12:00:01  patch     success        engine:1.4.2 → engine:1.4.3  1.1s
/// 2026-11-26 12:00:00    └ stop  success        engine:1.4.2               412ms
/// ```
pub fn render(groups: &[Group], style: &Style) -> String {
    let mut rows = Vec::new();
    for g in groups {
        match &g.outer {
            Some(outer) => rows.push(row(outer, style)),
            None => {
                let outer_op = g.inner[0].outer_op.clone().unwrap_or_default();
                rows.push(Row {
                    cells: [
                        String::new(),
                        outer_op,
                        "…".into(),
                        String::new(),
                        String::new(),
                        String::new(),
                        String::new(),
                        "no outer entry in view (still running, or beyond --limit)".into(),
                    ],
                    more: Vec::new(),
                    outer: true,
                    failed: false,
                });
            }
        }
        rows.extend(g.inner.iter().map(|e| row(e, style)));
    }

    let show_node = groups
        .iter()
        .flat_map(|g| g.outer.iter().chain(&g.inner))
        .any(|e| e.node.is_some());
    let mut widths = HEADER.map(str::len);
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(&r.cells) {
            *w = (*w).max(cell.chars().count());
        }
    }
    // Every cell padded to its column but the last; the NODE column only
    // when shown.
    let line = |cells: [String; 8]| -> Vec<String> {
        cells
            .iter()
            .enumerate()
            .filter(|(i, _)| show_node || *i != NODE_COLUMN)
            .map(|(i, c)| {
                if i + 1 == cells.len() {
                    c.clone()
                } else {
                    pad(c, widths[i])
                }
            })
            .collect()
    };

    let message_column = widths[..7]
        .iter()
        .enumerate()
        .filter(|(i, _)| show_node || *i != NODE_COLUMN)
        .map(|(_, w)| w + 2)
        .sum::<usize>();
    let mut text = String::new();
    let header = line(HEADER.map(str::to_owned)).join("  ");
    text.push_str(&style.paint(&[DIM], header.trim_end()));
    text.push('\n');
    for r in rows {
        let outcome_colour = match (r.failed, r.cells[2].as_str()) {
            (true, _) => RED,
            (false, "…") => YELLOW,
            (false, _) => GREEN,
        };
        let mut cells = line(r.cells);
        let message = cells.pop().expect("a message cell");
        let node = show_node.then(|| cells.pop().expect("a node cell"));
        let [time, op, outcome, code, image, duration]: [String; 6] =
            cells.try_into().expect("six cells before node and message");
        let op = if r.outer {
            style.paint(&[BOLD], &op)
        } else {
            op
        };
        let (code, message) = if r.failed {
            (style.paint(&[RED], &code), style.paint(&[RED], &message))
        } else {
            (code, message)
        };
        let mut cells = vec![
            style.paint(&[DIM], &time),
            op,
            style.paint(&[outcome_colour], &outcome),
            code,
            image,
            duration,
        ];
        cells.extend(node);
        cells.push(message);
        text.push_str(cells.join("  ").trim_end());
        text.push('\n');
        for extra in &r.more {
            let indented = format!("{}{extra}", " ".repeat(message_column));
            text.push_str(&style.paint(&[DIM], &indented));
            text.push('\n');
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::output::tests::{patch_event, stop_step};
    use crate::error::ErrorCode;

    fn start_step() -> OutcomeEvent {
        let mut e = stop_step();
        e.operation_id = Some(980);
        e.op = Some("start".into());
        e.image_ref = Some("rtm-test/engine:1.4.3".into());
        e.started_at = e.finished_at;
        e.finished_at = patch_event().finished_at;
        e.occurred_at = e.finished_at;
        e
    }

    /// An earlier, failed stop of another command.
    fn failed_stop() -> OutcomeEvent {
        let mut e = stop_step();
        e.operation_id = Some(900);
        e.command_id = "c-0".into();
        e.correlation_id = "c-0".into();
        e.outer_op = None;
        e.outcome = Outcome::Failure;
        e.error_code = Some(ErrorCode::ContainerStopFailed);
        e.error_message = Some("docker: timeout".into());
        e.started_at -= chrono::Duration::minutes(10);
        e.finished_at = e.started_at + chrono::Duration::seconds(123);
        e.occurred_at = e.finished_at;
        e
    }

    #[test]
    fn an_exit_and_the_restart_after_it() {
        let exit: OutcomeEvent = serde_json::from_str(include_str!(
            "../../tests/fixtures/events/runtime.exit.failure.json"
        ))
        .unwrap();
        let restart: OutcomeEvent = serde_json::from_str(include_str!(
            "../../tests/fixtures/events/runtime.restart.success--after-exit.json"
        ))
        .unwrap();
        let text = render(&group(vec![restart, exit]), &Style::plain());
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[1].contains("restart") && lines[1].contains("automatic restart after exit #1040"),
            "{text}"
        );
        assert!(
            lines[2].contains("exit") && lines[2].contains("engine_exited"),
            "{text}"
        );
        assert!(lines[2].contains("exit code 7, OOM killed: no"), "{text}");
        // The log tail goes under it.
        assert!(
            text.contains("engine 1.4.2: fatal: lost the world"),
            "{text}"
        );
    }

    #[test]
    fn inner_entries_go_under_their_outer_one() {
        // As the database returns them: newest first.
        let history = vec![patch_event(), start_step(), stop_step(), failed_stop()];
        let groups = group(history);
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].outer, Some(patch_event()));
        assert_eq!(
            groups[0].inner,
            vec![stop_step(), start_step()],
            "oldest step first"
        );
        assert_eq!(groups[1].outer, Some(failed_stop()));
        assert!(groups[1].inner.is_empty());
    }

    #[test]
    fn steps_without_their_outer_entry() {
        // A patch still running: its stop is written, the outer entry is not.
        let groups = group(vec![stop_step(), failed_stop()]);
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].outer, None);
        assert_eq!(groups[0].inner, vec![stop_step()]);

        // Same correlation, different command: not grouped together.
        let mut other = stop_step();
        other.command_id = "c-2".into();
        let groups = group(vec![patch_event(), other]);
        assert_eq!(groups.len(), 2);
        assert!(groups[0].inner.is_empty());
    }

    #[test]
    fn the_node_column_shows_where_each_entry_ran() {
        let on = |mut e: OutcomeEvent, node: &str| {
            e.node = Some(node.into());
            e
        };
        // The failed stop is from before nodes: its cell stays empty.
        let groups = group(vec![
            on(patch_event(), "node-b"),
            on(start_step(), "node-b"),
            on(stop_step(), "node-b"),
            failed_stop(),
        ]);
        let text = render(&groups, &Style::plain());
        let expected = [
            "TIME                 OP         OUTCOME  CODE                   IMAGE                                          DURATION  NODE    MESSAGE",
            "2026-11-26 12:00:01  patch      success                         rtm-test/engine:1.4.2 → rtm-test/engine:1.4.3  1.1s      node-b",
            "2026-11-26 12:00:01    └ stop   success                         rtm-test/engine:1.4.2                          412ms     node-b",
            "2026-11-26 12:00:01    └ start  success                         rtm-test/engine:1.4.3                          688ms     node-b",
            "2026-11-26 11:52:03  stop       failure  container_stop_failed  rtm-test/engine:1.4.2                          2m03s             docker: timeout",
        ];
        assert_eq!(text, expected.map(|l| format!("{l}\n")).concat());

        // A multi-line message's further lines start under MESSAGE.
        let mut tail = on(failed_stop(), "n1");
        tail.error_message = Some("unhealthy; log tail:\nengine starting".into());
        let text = render(&group(vec![tail]), &Style::plain());
        let lines: Vec<&str> = text.lines().collect();
        let column = lines[0].find("MESSAGE").unwrap();
        assert_eq!(lines[2].find("engine starting"), Some(column), "{text}");
    }

    #[test]
    fn the_table_is_aligned() {
        let groups = group(vec![
            patch_event(),
            start_step(),
            stop_step(),
            failed_stop(),
        ]);
        let text = render(&groups, &Style::plain());
        let expected = [
            "TIME                 OP         OUTCOME  CODE                   IMAGE                                          DURATION  MESSAGE",
            "2026-11-26 12:00:01  patch      success                         rtm-test/engine:1.4.2 → rtm-test/engine:1.4.3  1.1s",
            "2026-11-26 12:00:01    └ stop   success                         rtm-test/engine:1.4.2                          412ms",
            "2026-11-26 12:00:01    └ start  success                         rtm-test/engine:1.4.3                          688ms",
            "2026-11-26 11:52:03  stop       failure  container_stop_failed  rtm-test/engine:1.4.2                          2m03s     docker: timeout",
        ];
        assert_eq!(text, expected.map(|l| format!("{l}\n")).concat());

        let mut tail = failed_stop();
        tail.error_message =
            Some("container reported unhealthy; log tail:\nengine starting".into());
        let text = render(&group(vec![tail]), &Style::plain());
        let expected = [
            "TIME                 OP    OUTCOME  CODE                   IMAGE                  DURATION  MESSAGE",
            "2026-11-26 11:52:03  stop  failure  container_stop_failed  rtm-test/engine:1.4.2  2m03s     \
             container reported unhealthy; log tail:",
            "                                                                                            engine starting",
        ];
        assert_eq!(text, expected.map(|l| format!("{l}\n")).concat());

        let text = render(&group(vec![stop_step()]), &Style::plain());
        let expected = [
            "TIME                 OP        OUTCOME  CODE  IMAGE                  DURATION  MESSAGE",
            "                     patch     …                                               \
             no outer entry in view (still running, or beyond --limit)",
            "2026-11-26 12:00:01    └ stop  success        rtm-test/engine:1.4.2  412ms",
        ];
        assert_eq!(text, expected.map(|l| format!("{l}\n")).concat());
    }
}
