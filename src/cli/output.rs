//! How the command line shows things to a person: colours (plain ANSI
//! escapes, only on a terminal and without `NO_COLOR`), times, durations,
//! short container ids, and the one-line form of an outcome event.
//!
//! Everything here is a pure function of its inputs (the clock and the
//! terminal are decided by the caller through [`Style`]), so the tests pin
//! the exact text.

use std::io::IsTerminal as _;
use std::time::Duration;

use chrono::{DateTime, Local, Utc};

use crate::domain::{Outcome, OutcomeEvent};

const RESET: &str = "\x1b[0m";
pub(crate) const BOLD: &str = "\x1b[1m";
pub(crate) const DIM: &str = "\x1b[2m";
pub(crate) const RED: &str = "\x1b[31m";
pub(crate) const GREEN: &str = "\x1b[32m";
pub(crate) const YELLOW: &str = "\x1b[33m";

/// How output is decorated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Style {
    /// ANSI colours and bold.
    pub color: bool,
    /// Times in the local time zone (else UTC).
    pub local_time: bool,
}

impl Style {
    /// No colours, times in UTC: what tests and library callers get.
    pub const fn plain() -> Self {
        Self {
            color: false,
            local_time: false,
        }
    }

    /// What a person at this terminal should see: colours only when stdout
    /// is a terminal and `NO_COLOR` is not set; local times.
    pub fn detect() -> Self {
        Self {
            color: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
            local_time: true,
        }
    }

    /// `text` wrapped in `codes` (e.g. `BOLD` + `RED`), or as is without
    /// colours.
    pub fn paint(&self, codes: &[&str], text: &str) -> String {
        if !self.color || codes.is_empty() || text.is_empty() {
            return text.to_owned();
        }
        format!("{}{text}{RESET}", codes.concat())
    }

    /// `12:00:01.234`
    pub fn time_of_day(&self, t: DateTime<Utc>) -> String {
        self.format_time(t, "%H:%M:%S%.3f")
    }

    /// `2026-11-26 07:00:01`
    pub fn date_time(&self, t: DateTime<Utc>) -> String {
        self.format_time(t, "%Y-%m-%d %H:%M:%S")
    }

    fn format_time(&self, t: DateTime<Utc>, fmt: &str) -> String {
        if self.local_time {
            t.with_timezone(&Local).format(fmt).to_string()
        } else {
            t.format(fmt).to_string()
        }
    }
}

/// `350ms`, `1.2s`, `2m03s`, `1h05m`: precise for short operations, compact
/// for long ones. Tenths are truncated, so a value never rounds up into the
/// next unit (`59.99s` is `59.9s`, not `60.0s`).
pub fn human_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1_000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{}.{}s", ms / 1_000, (ms % 1_000) / 100)
    } else if ms < 3_600_000 {
        let s = ms / 1_000;
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        let m = ms / 60_000;
        format!("{}h{:02}m", m / 60, m % 60)
    }
}

/// How long ago `then` was, seen from `now`: `just now`, `42s ago`,
/// `5m ago`, `3h ago`, `2d ago` (`in the future` if the clocks disagree).
pub fn ago(now: DateTime<Utc>, then: DateTime<Utc>) -> String {
    let secs = (now - then).num_seconds();
    match secs {
        s if s < 0 => "in the future".to_owned(),
        0 => "just now".to_owned(),
        s if s < 60 => format!("{s}s ago"),
        s if s < 3_600 => format!("{}m ago", s / 60),
        s if s < 86_400 => format!("{}h ago", s / 3_600),
        s => format!("{}d ago", s / 86_400),
    }
}

/// The time between two instants, zero if they are out of order.
pub fn elapsed(from: DateTime<Utc>, to: DateTime<Utc>) -> Duration {
    (to - from).to_std().unwrap_or_default()
}

/// How long the operation of an event took.
pub fn event_duration(event: &OutcomeEvent) -> Duration {
    elapsed(event.started_at, event.finished_at)
}

/// A container id as `docker ps` shows it: its first 12 characters.
pub fn short_id(id: &str) -> &str {
    id.char_indices().nth(12).map_or(id, |(i, _)| &id[..i])
}

/// The image an event is about; `previous → new` when it changed it.
pub fn image_text(event: &OutcomeEvent) -> Option<String> {
    match (&event.previous_image_ref, &event.image_ref) {
        (Some(previous), Some(new)) if previous != new => Some(format!("{previous} → {new}")),
        (_, Some(image)) => Some(image.clone()),
        (Some(previous), None) => Some(previous.clone()),
        (None, None) => None,
    }
}

/// `error_code: message` of a failure (either part may be missing).
pub fn failure_text(event: &OutcomeEvent) -> Option<String> {
    if event.outcome != Outcome::Failure {
        return None;
    }
    let code = event.error_code.map(|c| c.as_str());
    let message = event.error_message.as_deref().filter(|m| !m.is_empty());
    Some(match (code, message) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.to_owned(),
        (None, Some(message)) => message.to_owned(),
        (None, None) => "failed without an error code".to_owned(),
    })
}

/// Left-aligns `text` in `width` characters (counted as chars, so `└` and
/// `→` take one column, as they do on a terminal).
pub fn pad(text: &str, width: usize) -> String {
    let len = text.chars().count();
    let mut padded = text.to_owned();
    padded.extend(std::iter::repeat_n(' ', width.saturating_sub(len)));
    padded
}

/// The width of the op column of [`event_line`]: `  restart.start`.
const EVENT_OP_WIDTH: usize = 15;

/// The op label of a live event: `patch` for an outer one, `  patch.stop`
/// (indented) for an inner step, `rejected` for a message that was not a
/// command.
pub fn event_op_label(event: &OutcomeEvent) -> String {
    match (&event.outer_op, &event.op) {
        (Some(outer), Some(op)) => format!("  {outer}.{op}"),
        (Some(outer), None) => format!("  {outer}.?"),
        (None, Some(op)) if event.operation_id.is_some() => op.clone(),
        (None, _) => "rejected".to_owned(),
    }
}

/// One line for an event as it arrives (`send --wait`):
///
/// ```text
///   12:00:01.234    patch.stop     success  engine:1.4.2  container 3f2a9c1d0e4b  (412ms)
///   12:00:01.802  patch            success  engine:1.4.2 → engine:1.4.3  container 9b1e…  172.18.0.5  (1.1s)
/// ```
///
/// The outer line is bold; a failure is red and ends with
/// `error_code: message`.
pub fn event_line(event: &OutcomeEvent, style: &Style) -> String {
    let outer = event.outer_op.is_none();
    let failed = event.outcome == Outcome::Failure;
    let emphasis: &[&str] = if outer { &[BOLD] } else { &[] };

    let time = style.paint(&[DIM], &style.time_of_day(event.occurred_at));
    let op = style.paint(emphasis, &pad(&event_op_label(event), EVENT_OP_WIDTH));
    let outcome_colour = if failed { RED } else { GREEN };
    let outcome = style.paint(
        &[emphasis, &[outcome_colour]].concat(),
        &pad(event.outcome.as_str(), 7),
    );

    let mut details = Vec::new();
    if let Some(image) = image_text(event) {
        details.push(image);
    }
    if let Some(id) = &event.container_id {
        details.push(format!("container {}", short_id(id)));
    }
    if let Some(address) = &event.address {
        details.push(address.clone());
    }
    if let Some(reason) = &event.reason {
        details.push(format!("reason {reason}"));
    }
    if event.noop {
        details.push("no-op".to_owned());
    }
    if event.rolled_back {
        details.push(style.paint(&[YELLOW], "rolled back"));
    }
    details.push(format!("({})", human_duration(event_duration(event))));
    let mut more = Vec::new();
    if let Some(failure) = failure_text(event) {
        let (first, rest) = first_line(&failure);
        details.push(style.paint(&[RED], first));
        more = rest.into_iter().map(str::to_owned).collect();
    }
    let mut line = format!("  {time}  {op}  {outcome}  {}", details.join("  "));
    for extra in more {
        line.push('\n');
        line.push_str(&style.paint(&[DIM], &format!("{CONTINUATION}{extra}")));
    }
    line
}

/// The indentation of the further lines of a multi-line error message (a
/// container's log tail), under the op column.
const CONTINUATION: &str = "                  │ ";

/// A message's first line, and its further lines (empty ones dropped), so a
/// multi-line error message keeps the one-line-per-event layout.
pub fn first_line(message: &str) -> (&str, Vec<&str>) {
    let mut lines = message.lines();
    let first = lines.next().unwrap_or_default().trim_end();
    (
        first,
        lines.map(str::trim_end).filter(|l| !l.is_empty()).collect(),
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use chrono::TimeZone as _;
    use uuid::Uuid;

    use super::*;
    use crate::error::ErrorCode;

    /// An outer `patch` success at 12:00:01.802 UTC that took 1.1 s.
    pub(crate) fn patch_event() -> OutcomeEvent {
        let finished = Utc.with_ymd_and_hms(2026, 11, 26, 12, 0, 1).unwrap()
            + chrono::Duration::milliseconds(802);
        OutcomeEvent {
            node: None,
            event_id: Uuid::nil(),
            schema_version: 1,
            occurred_at: finished,
            operation_id: Some(981),
            command_id: "c-1".into(),
            correlation_id: "lobby-req-77".into(),
            game_id: "g-1042".into(),
            op: Some("patch".into()),
            outer_op: None,
            op_source: Some("lobby".into()),
            reason: None,
            outcome: Outcome::Success,
            error_code: None,
            error_message: None,
            image_ref: Some("rtm-test/engine:1.4.3".into()),
            previous_image_ref: Some("rtm-test/engine:1.4.2".into()),
            container_id: Some("9b1e0c7d5a3f2e1d0c9b8a7f".into()),
            address: Some("172.18.0.5".into()),
            noop: false,
            rolled_back: false,
            started_at: finished - chrono::Duration::milliseconds(1_100),
            finished_at: finished,
        }
    }

    /// The inner stop of [`patch_event`].
    pub(crate) fn stop_step() -> OutcomeEvent {
        let mut e = patch_event();
        e.operation_id = Some(979);
        e.op = Some("stop".into());
        e.outer_op = Some("patch".into());
        e.image_ref = Some("rtm-test/engine:1.4.2".into());
        e.previous_image_ref = None;
        e.container_id = Some("3f2a9c1d0e4b5a6978".into());
        e.address = None;
        e.finished_at = e.started_at + chrono::Duration::milliseconds(412);
        e.occurred_at = e.finished_at;
        e
    }

    #[test]
    fn durations_read_like_a_person_writes_them() {
        let cases = [
            (0, "0ms"),
            (350, "350ms"),
            (999, "999ms"),
            (1_000, "1.0s"),
            (1_249, "1.2s"),
            (59_999, "59.9s"),
            (60_000, "1m00s"),
            (123_000, "2m03s"),
            (3_599_999, "59m59s"),
            (3_600_000, "1h00m"),
            (3_900_000, "1h05m"),
        ];
        for (ms, text) in cases {
            assert_eq!(human_duration(Duration::from_millis(ms)), text, "{ms}ms");
        }
    }

    #[test]
    fn ages_are_relative() {
        let now = Utc.with_ymd_and_hms(2026, 11, 26, 12, 0, 0).unwrap();
        let cases = [
            (0, "just now"),
            (42, "42s ago"),
            (300, "5m ago"),
            (3 * 3_600 + 59, "3h ago"),
            (2 * 86_400, "2d ago"),
            (-5, "in the future"),
        ];
        for (secs, text) in cases {
            assert_eq!(ago(now, now - chrono::Duration::seconds(secs)), text);
        }
    }

    #[test]
    fn short_ids_and_images() {
        assert_eq!(short_id("3f2a9c1d0e4b5a6978"), "3f2a9c1d0e4b");
        assert_eq!(short_id("3f2a"), "3f2a");
        assert_eq!(
            image_text(&patch_event()).unwrap(),
            "rtm-test/engine:1.4.2 → rtm-test/engine:1.4.3"
        );
        assert_eq!(image_text(&stop_step()).unwrap(), "rtm-test/engine:1.4.2");
    }

    #[test]
    fn event_lines_without_colours() {
        let style = Style::plain();
        assert_eq!(
            event_line(&stop_step(), &style),
            "  12:00:01.114    patch.stop     success  rtm-test/engine:1.4.2  container 3f2a9c1d0e4b  (412ms)"
        );
        assert_eq!(
            event_line(&patch_event(), &style),
            "  12:00:01.802  patch            success  rtm-test/engine:1.4.2 → rtm-test/engine:1.4.3  \
             container 9b1e0c7d5a3f  172.18.0.5  (1.1s)"
        );

        let mut failed = patch_event();
        failed.outcome = Outcome::Failure;
        failed.error_code = Some(ErrorCode::ContainerStartFailed);
        failed.error_message = Some("container exited with code 3".into());
        failed.rolled_back = true;
        failed.container_id = None;
        failed.address = None;
        assert_eq!(
            event_line(&failed, &style),
            "  12:00:01.802  patch            failure  rtm-test/engine:1.4.2 → rtm-test/engine:1.4.3  \
             rolled back  (1.1s)  container_start_failed: container exited with code 3"
        );

        let mut noop = stop_step();
        noop.outer_op = None;
        noop.reason = Some("idle".into());
        noop.noop = true;
        assert!(
            event_line(&noop, &style).contains(
                "  stop             success  rtm-test/engine:1.4.2  \
                 container 3f2a9c1d0e4b  reason idle  no-op  (412ms)"
            ),
            "{}",
            event_line(&noop, &style)
        );

        let mut rejected = patch_event();
        rejected.operation_id = None;
        rejected.op = None;
        rejected.outcome = Outcome::Failure;
        rejected.error_code = Some(ErrorCode::InvalidRequest);
        rejected.error_message = Some("op is missing".into());
        assert!(event_line(&rejected, &style).contains("  rejected         failure"));
        assert!(event_line(&rejected, &style).ends_with("invalid_request: op is missing"));

        // A container's log tail goes under the line, not across it.
        let mut tail = stop_step();
        tail.outer_op = None;
        tail.op = Some("start".into());
        tail.outcome = Outcome::Failure;
        tail.error_code = Some(ErrorCode::ContainerStartFailed);
        tail.error_message =
            Some("container reported unhealthy; log tail:\nengine starting\n\n".into());
        let text = event_line(&tail, &style);
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[0].ends_with("container_start_failed: container reported unhealthy; log tail:")
        );
        assert_eq!(lines[1], "                  │ engine starting");
    }

    #[test]
    fn colours_highlight_the_outer_line_and_failures() {
        let style = Style {
            color: true,
            local_time: false,
        };
        let outer = event_line(&patch_event(), &style);
        assert!(outer.contains(&format!("{BOLD}patch")), "{outer:?}");
        assert!(
            outer.contains(&format!("{BOLD}{GREEN}success")),
            "{outer:?}"
        );
        let inner = event_line(&stop_step(), &style);
        assert!(!inner.contains(BOLD), "{inner:?}");

        let mut failed = stop_step();
        failed.outcome = Outcome::Failure;
        failed.error_code = Some(ErrorCode::ContainerStopFailed);
        let line = event_line(&failed, &style);
        assert!(line.contains(&format!("{RED}failure")), "{line:?}");
        assert!(
            line.contains(&format!("{RED}container_stop_failed{RESET}")),
            "{line:?}"
        );
    }
}
