//! The command line (SPEC §8): the argument grammar, and the operator
//! commands other than `serve`.
//!
//! - [`send`]: publish a lifecycle command, optionally waiting for its
//!   outcome events;
//! - [`status`]: a game's runtime record and node beside what Docker
//!   reports;
//! - [`log`]: a game's operation history;
//! - [`nodes`]: the nodes (Docker hosts) and their draining (SPEC §12);
//! - [`migrate`]: apply the database migrations;
//! - [`output`]: colours, times, durations and event lines.
//!
//! Every command returns an [`Exit`]; `main` turns it (or an error) into the
//! process exit status with [`report`]. Anything meant for a program goes to
//! stdout (the writer each command is given); diagnostics go to stderr.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod log;
pub mod migrate;
pub mod nodes;
pub mod output;
pub mod send;
pub mod status;

pub use log::LogArgs;
pub use nodes::{DrainArgs, NodesArgs};
pub use send::{SendArgs, SendOp};
pub use status::StatusArgs;

/// The command line of `rtmanager`.
#[derive(Debug, Parser)]
#[command(name = "rtmanager", version, about, after_help = AFTER_HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

const AFTER_HELP: &str = "\
Configuration comes from the environment: RTM_AMQP_URL, DATABASE_URL, RTM_REDIS_URL, DOCKER_HOST, \
RTM_COMMAND_EXCHANGE, RTM_EVENT_EXCHANGE, … (see the specification, section 9).
Exit status: 0 success; 1 a failure outcome, or an unknown game or node; 2 an error or a timeout.";

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the worker: consume commands, publish outcome events, serve
    /// /healthz, /readyz and /metrics.
    Serve,
    /// Create the database if missing and apply the migrations.
    Migrate,
    /// Publish a lifecycle command (and, with --wait, watch its outcome).
    Send(SendArgs),
    /// Show a game's runtime record and node beside what Docker reports.
    Status(StatusArgs),
    /// Show a game's operation history, newest first.
    Log(LogArgs),
    /// List the nodes (Docker hosts): live or down, draining, running
    /// games of their RTM_MAX_GAMES, last heartbeat.
    Nodes(NodesArgs),
    /// Stop placing new games on a node; the games it holds stay and are
    /// still served.
    Drain(DrainArgs),
    /// Place new games on a drained node again.
    Undrain(DrainArgs),
}

/// How a command ended, as the process exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 0: done; the awaited operation succeeded.
    Success,
    /// 1: the awaited operation failed, or the game (or node) is unknown.
    Failure,
    /// 2: the command could not do its job (an error, a timeout, bad
    /// configuration or arguments).
    Error,
}

impl Exit {
    pub const fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::Failure => 1,
            Exit::Error => 2,
        }
    }

    /// The exit status of a command's result: an error is always 2.
    pub fn of(result: &anyhow::Result<Exit>) -> Exit {
        match result {
            Ok(exit) => *exit,
            Err(_) => Exit::Error,
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        ExitCode::from(exit.code())
    }
}

/// Prints an error as `rtmanager: <error: its causes>` on stderr and turns
/// the result into the process exit status.
pub fn report(result: anyhow::Result<Exit>) -> ExitCode {
    let exit = Exit::of(&result);
    if let Err(e) = result {
        eprintln!("rtmanager: {e:#}");
    }
    exit.into()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::domain::OpKind;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("rtmanager").chain(args.iter().copied()))
    }

    #[test]
    fn identifiers_that_cannot_travel_as_amqp_short_strings_are_refused() {
        let long = "x".repeat(256);
        assert!(parse(&["send", "restart", "g", "--command-id", &long]).is_err());
        assert!(parse(&["send", "restart", "g", "--source-ref", &long]).is_err());
        assert!(parse(&["send", "restart", "g", "--source-ref", &"x".repeat(255)]).is_ok());
    }

    fn send(args: &[&str]) -> SendArgs {
        match parse(&[&["send"], args].concat()).unwrap().command {
            Command::Send(send) => send,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_grammar_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_and_migrate() {
        assert!(matches!(parse(&["serve"]).unwrap().command, Command::Serve));
        assert!(matches!(
            parse(&["migrate"]).unwrap().command,
            Command::Migrate
        ));
        assert!(parse(&[]).is_err());
        assert!(parse(&["serve", "extra"]).is_err());
    }

    #[test]
    fn send_every_op_with_defaults() {
        let s = send(&["start", "g-1", "rtm-test/engine:1.0.0"]);
        assert_eq!(
            s.op,
            SendOp::Start {
                game_id: "g-1".into(),
                image_ref: "rtm-test/engine:1.0.0".into(),
                node: None,
            }
        );
        let s = send(&["start", "g-1", "rtm-test/engine:1.0.0", "--node", "node-b"]);
        assert!(matches!(&s.op, SendOp::Start { node: Some(n), .. } if n == "node-b"));
        assert_eq!(s.message("c").node.as_deref(), Some("node-b"));
        assert_eq!(s.op_source, "admin");
        assert_eq!(s.source_ref, None);
        assert_eq!(s.command_id, None);
        assert!(!s.wait);
        assert!(!s.json);
        assert_eq!(s.timeout, Duration::from_secs(120));

        let s = send(&["stop", "g-1"]);
        assert_eq!(
            s.op,
            SendOp::Stop {
                game_id: "g-1".into(),
                reason: None
            }
        );
        let s = send(&["stop", "g-1", "--reason", "idle"]);
        assert_eq!(
            s.op,
            SendOp::Stop {
                game_id: "g-1".into(),
                reason: Some("idle".into())
            }
        );
        assert_eq!(send(&["restart", "g-1"]).op.kind(), OpKind::Restart);
        assert_eq!(
            send(&["patch", "g-1", "rtm-test/engine:1.0.1"]).op,
            SendOp::Patch {
                game_id: "g-1".into(),
                new_image_ref: "rtm-test/engine:1.0.1".into()
            }
        );
        assert_eq!(send(&["remove", "g-1"]).op.kind(), OpKind::Remove);
    }

    #[test]
    fn send_common_flags_before_or_after_the_op() {
        let after = send(&[
            "patch",
            "g-1042",
            "engine:1.4.3",
            "--source-ref",
            "lobby-req-77",
            "--op-source",
            "lobby",
            "--command-id",
            "c-9",
            "--wait",
            "--timeout",
            "1m30s",
            "--json",
        ]);
        assert_eq!(after.source_ref.as_deref(), Some("lobby-req-77"));
        assert_eq!(after.op_source, "lobby");
        assert_eq!(after.command_id.as_deref(), Some("c-9"));
        assert!(after.wait && after.json);
        assert_eq!(after.timeout, Duration::from_secs(90));

        let before = send(&["--wait", "--timeout", "500ms", "remove", "g-1"]);
        assert!(before.wait);
        assert_eq!(before.timeout, Duration::from_millis(500));
    }

    #[test]
    fn send_rejects_bad_input_before_publishing() {
        let bad: &[&[&str]] = &[
            &["start", "g-1"],                          // no image
            &["start", "-bad", "engine:1"],             // game id pattern
            &["start", "g/1", "engine:1"],              // game id pattern
            &["patch", "g-1", ""],                      // empty image
            &["stop", "g-1", "--reason", "bored"],      // unknown reason
            &["restart", "g-1", "--op-source", "cron"], // unknown source
            &["remove", "g-1", "--timeout", "soon"],    // bad duration
            &["remove", "g-1", "--command-id", ""],     // empty id
            &["restart", "g-1", "--reason", "idle"],    // reason is stop-only
            &["explode", "g-1"],                        // unknown op
        ];
        for args in bad {
            assert!(parse(&[&["send"], *args].concat()).is_err(), "{args:?}");
        }
    }

    #[test]
    fn status_and_log() {
        match parse(&["status", "g-1", "--json"]).unwrap().command {
            Command::Status(s) => {
                assert_eq!(s.game_id.as_str(), "g-1");
                assert!(s.json);
            }
            other => panic!("{other:?}"),
        }
        match parse(&["log", "g-1"]).unwrap().command {
            Command::Log(l) => {
                assert_eq!(l.game_id.as_str(), "g-1");
                assert_eq!(l.correlation, None);
                assert_eq!(l.limit, 20);
                assert!(!l.json);
            }
            other => panic!("{other:?}"),
        }
        match parse(&[
            "log",
            "g-1",
            "--correlation",
            "req-7",
            "--limit",
            "5",
            "--json",
        ])
        .unwrap()
        .command
        {
            Command::Log(l) => {
                assert_eq!(l.correlation.as_deref(), Some("req-7"));
                assert_eq!(l.limit, 5);
                assert!(l.json);
            }
            other => panic!("{other:?}"),
        }
        assert!(parse(&["status"]).is_err());
        assert!(parse(&["status", "../etc"]).is_err());
        assert!(parse(&["log", "g-1", "--limit", "0"]).is_err());
        assert!(parse(&["log", "g-1", "--limit", "many"]).is_err());
    }

    #[test]
    fn nodes_drain_and_undrain() {
        match parse(&["nodes"]).unwrap().command {
            Command::Nodes(n) => assert!(!n.json),
            other => panic!("{other:?}"),
        }
        match parse(&["nodes", "--json"]).unwrap().command {
            Command::Nodes(n) => assert!(n.json),
            other => panic!("{other:?}"),
        }
        match parse(&["drain", "node-b"]).unwrap().command {
            Command::Drain(d) => assert_eq!(d.node.as_str(), "node-b"),
            other => panic!("{other:?}"),
        }
        match parse(&["undrain", "host.example"]).unwrap().command {
            Command::Undrain(d) => assert_eq!(d.node.as_str(), "host.example"),
            other => panic!("{other:?}"),
        }
        assert!(parse(&["nodes", "node-b"]).is_err());
        assert!(parse(&["drain"]).is_err());
        assert!(parse(&["drain", "a", "b"]).is_err());
        // A name that cannot be a node's is refused before anything is
        // asked, with an error that names it (clap's usage error: exit 2).
        for bad in ["a b", "-b", "b/c", "node#1"] {
            let e = parse(&["drain", "--", bad]).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad:?}");
            let text = e.to_string();
            assert!(text.contains(&format!("{bad:?}")), "{text}");
        }
    }

    #[test]
    fn exit_codes() {
        assert_eq!(Exit::of(&Ok(Exit::Success)).code(), 0);
        assert_eq!(Exit::of(&Ok(Exit::Failure)).code(), 1);
        let timeout = send::WaitTimeout {
            waited: Duration::from_secs(120),
            op: OpKind::Patch,
            game_id: "g-1042".into(),
            command_id: "c-1".into(),
            correlation_id: "lobby-req-77".into(),
            events_seen: 2,
        };
        let message = timeout.to_string();
        assert!(message.contains("2m00s"), "{message}");
        assert!(message.contains("outer patch event"), "{message}");
        assert!(message.contains("c-1"), "{message}");
        assert_eq!(Exit::of(&Err(timeout.into())).code(), 2);
        assert_eq!(Exit::of(&Err(anyhow::anyhow!("broker down"))).code(), 2);
        assert_eq!(ExitCode::from(Exit::Failure), ExitCode::from(1));
    }
}
