//! Bootstrap: connect (creating the database if it is missing), migrate,
//! and the readiness ping.

use anyhow::Context;
use sqlx::postgres::PgConnectOptions;
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, Executor};

use super::{PgStore, db_error};
use crate::config::SecretUrl;
use crate::ports::StoreError;

/// The database every PostgreSQL server has; used to create ours.
const MAINTENANCE_DATABASE: &str = "postgres";

/// sqlx's bookkeeping table.
const MIGRATIONS_TABLE: &str = "_sqlx_migrations";

impl PgStore {
    /// Connects to the database of `url`, creating the database first if it
    /// does not exist (SPEC §9). Errors name the URL without its password.
    pub async fn connect(url: &SecretUrl) -> anyhow::Result<PgStore> {
        let options: PgConnectOptions = url
            .expose()
            .parse()
            .with_context(|| format!("invalid database URL {url}"))?;
        match Self::pool_options().connect_with(options.clone()).await {
            Ok(pool) => return Ok(Self::new(pool)),
            // 3D000 invalid_catalog_name: the server is up, the database is not.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("3D000") => {}
            Err(e) => return Err(e).with_context(|| format!("connect to {url}")),
        }
        let name = options
            .get_database()
            .context("the database URL names no database")?
            .to_owned();
        create_database(&options, &name)
            .await
            .with_context(|| format!("create the database of {url}"))?;
        let pool = Self::pool_options()
            .connect_with(options)
            .await
            .with_context(|| format!("connect to {url}"))?;
        Ok(Self::new(pool))
    }

    /// Applies the migrations not yet applied (`migrations/`, embedded at
    /// build time). Safe to run from several workers at once: sqlx takes an
    /// advisory lock.
    pub async fn migrate(&self) -> anyhow::Result<()> {
        sqlx::migrate!("./migrations")
            .run(&self.pool)
            .await
            .context("apply the database migrations")
    }

    /// A round trip to the server (`/readyz`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("select 1")
            .execute(&self.pool)
            .await
            .map_err(|e| db_error("ping the database", e))?;
        Ok(())
    }

    /// The migrations applied so far, `(version, description)` in order
    /// (none when the table does not exist yet).
    pub async fn applied_migrations(&self) -> anyhow::Result<Vec<(i64, String)>> {
        let exists: bool = sqlx::query_scalar("select to_regclass($1) is not null")
            .bind(MIGRATIONS_TABLE)
            .fetch_one(&self.pool)
            .await
            .context("look for the migrations table")?;
        if !exists {
            return Ok(Vec::new());
        }
        sqlx::query_as(
            "select version, description from _sqlx_migrations where success order by version",
        )
        .fetch_all(&self.pool)
        .await
        .context("list the applied migrations")
    }
}

/// Creates `name` through the maintenance database of the same server. A
/// concurrent creator (another worker starting) is not an error.
async fn create_database(options: &PgConnectOptions, name: &str) -> anyhow::Result<()> {
    let mut conn = options
        .clone()
        .database(MAINTENANCE_DATABASE)
        .connect()
        .await
        .with_context(|| format!("connect to the {MAINTENANCE_DATABASE:?} database"))?;
    let exists: bool =
        sqlx::query_scalar("select exists (select 1 from pg_database where datname = $1)")
            .bind(name)
            .fetch_one(&mut conn)
            .await?;
    if !exists {
        // An identifier cannot be a bind parameter; quote it the SQL way
        // (double any `"`), which makes any name safe to splice in.
        let quoted = format!(r#""{}""#, name.replace('"', r#""""#));
        let created = conn
            .execute(AssertSqlSafe(format!("create database {quoted}")))
            .await;
        match created {
            Ok(_) => tracing::info!(database = name, "created the database"),
            // 42P04 duplicate_database; 23505 when two creators race inside
            // the catalog itself.
            Err(sqlx::Error::Database(e))
                if matches!(e.code().as_deref(), Some("42P04" | "23505")) => {}
            Err(e) => return Err(e.into()),
        }
    }
    conn.close().await.ok();
    Ok(())
}
