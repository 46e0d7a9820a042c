//! The `rtmanager` binary: parses the command line, loads the configuration
//! and hands over to the library (`rtmanager::serve`, `rtmanager::cli`).

use std::process::ExitCode;

use clap::Parser as _;
use rtmanager::cli::output::Style;
use rtmanager::cli::{self, Cli, Command, Exit};
use rtmanager::config::Config;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("rtmanager: {e}");
            return Exit::Error.into();
        }
    };
    let style = Style::detect();
    // Not `stdout().lock()`: holding the lock for the whole run would block
    // every other thread that writes to stdout (the worker's log lines).
    let mut out = std::io::stdout();
    let result = match cli.command {
        Command::Serve => serve(config).await,
        Command::Migrate => cli::migrate::migrate(&config, &mut out).await,
        Command::Send(args) => cli::send::send_styled(&config, args, style, &mut out).await,
        Command::Status(args) => cli::status::status(&config, args, style, &mut out).await,
        Command::Log(args) => cli::log::log(&config, args, style, &mut out).await,
        Command::Nodes(args) => cli::nodes::nodes(&config, args, style, &mut out).await,
        Command::Drain(args) => cli::nodes::set_draining(&config, args, true, &mut out).await,
        Command::Undrain(args) => cli::nodes::set_draining(&config, args, false, &mut out).await,
    };
    cli::report(result)
}

async fn serve(config: Config) -> anyhow::Result<Exit> {
    // Keep the metrics handle alive for the whole run.
    let _metrics = rtmanager::telemetry::init(&config)?;
    rtmanager::serve::run(config, rtmanager::serve::shutdown_signal()).await?;
    Ok(Exit::Success)
}
