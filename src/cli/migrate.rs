//! `rtmanager migrate`: creates the database if it is missing and applies
//! the migrations not yet applied, saying which.

use std::collections::BTreeSet;
use std::io::Write;

use anyhow::Context as _;

use super::Exit;
use crate::config::Config;
use crate::outbound::postgres::PgStore;

/// sqlx's bookkeeping table.
const MIGRATIONS_TABLE: &str = "_sqlx_migrations";

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

/// The migrations applied so far (none when the table does not exist yet).
async fn applied(store: &PgStore) -> anyhow::Result<Vec<(i64, String)>> {
    let exists: bool = sqlx::query_scalar("select to_regclass($1) is not null")
        .bind(MIGRATIONS_TABLE)
        .fetch_one(store.pool())
        .await
        .context("look for the migrations table")?;
    if !exists {
        return Ok(Vec::new());
    }
    sqlx::query_as(
        "select version, description from _sqlx_migrations where success order by version",
    )
    .fetch_all(store.pool())
    .await
    .context("list the applied migrations")
}
