//! `rtmanager migrate`: creates the database if it is missing and applies
//! the migrations not yet applied, saying which.

use std::collections::BTreeSet;
use std::io::Write;

use super::Exit;
use crate::config::Config;
use crate::outbound::postgres::PgStore;

pub async fn migrate(config: &Config, out: &mut impl Write) -> anyhow::Result<Exit> {
    let store = PgStore::connect(&config.database_url).await?;
    let before: BTreeSet<i64> = applied(&store)
        .await?
        .into_iter()
        .map(|(version, _)| version)
        .collect();
    store.migrate().await?;
    let after = applied(&store).await?;

    let new: Vec<_> = after
        .iter()
        .filter(|(version, _)| !before.contains(version))
        .collect();
    writeln!(out, "database {}", config.database_url)?;
    if new.is_empty() {
        writeln!(
            out,
            "up to date: {} migration(s) already applied",
            after.len()
        )?;
    }
    for (version, description) in &new {
        writeln!(out, "applied {version:04} {description}")?;
    }
    out.flush()?;
    Ok(Exit::Success)
}

/// The migrations applied so far.
async fn applied(store: &PgStore) -> anyhow::Result<Vec<(i64, String)>> {
    store.applied_migrations().await
}
