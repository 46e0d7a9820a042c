//! The per-game lease in Redis (SPEC §10), behind the [`LeaseStore`] port.
//!
//! Key `<prefix>lease:<game_id>`, value `<command_id>:<token>`
//! ([`LeaseHolder::value`]), TTL in milliseconds. Acquire, renew and release
//! are Lua scripts in `lua/` (each with a KEYS/ARGV/returns header), so the
//! compare-and-set steps are atomic and only the holder renews or releases.
//!
//! The connection is a [`ConnectionManager`]: one multiplexed connection
//! shared by every clone, re-established on its own after Redis goes away.
//! Timeouts are short so an outage is an error within a few seconds, never a
//! hang; retrying for longer is the caller's business (`RTM_RETRY_FOR`).

use std::fmt;
use std::sync::LazyLock;
use std::time::Duration;

use anyhow::Context as _;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, RedisError, Script, Value};

use crate::config::SecretUrl;
use crate::domain::GameId;
use crate::ports::{Acquired, LeaseError, LeaseHolder, LeaseStore};

static ACQUIRE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/acquire.lua")));
static RENEW: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/renew.lua")));
static RELEASE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/release.lua")));

/// Each TCP connect (and handshake) attempt gives up after this long.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(2);
/// Each command gives up waiting for its reply after this long.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Connect attempts after the first, per (re)connection; with the delays
/// below an unreachable Redis fails a call within about 4.5 s.
const CONNECT_RETRIES: usize = 1;
const RETRY_MIN_DELAY: Duration = Duration::from_millis(100);
const RETRY_MAX_DELAY: Duration = Duration::from_millis(500);

/// Leases in Redis. Cheap to clone: clones share one connection.
#[derive(Clone)]
pub struct RedisLeases {
    conn: ConnectionManager,
    prefix: String,
}

impl fmt::Debug for RedisLeases {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLeases")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisLeases {
    /// Connects now; fails (within a few seconds) when Redis cannot be
    /// reached. Errors name the URL redacted, never its password.
    pub async fn connect(url: &SecretUrl, prefix: &str) -> anyhow::Result<Self> {
        let client = client(url)?;
        let conn = ConnectionManager::new_with_config(client, manager_config())
            .await
            .with_context(|| format!("cannot connect to Redis at {}", url.redacted()))?;
        Ok(Self::with(conn, prefix))
    }

    /// Connects on first use: succeeds while Redis is down (only a malformed
    /// URL fails), and each call errors until Redis can be reached.
    pub fn connect_lazy(url: &SecretUrl, prefix: &str) -> anyhow::Result<Self> {
        let client = client(url)?;
        let conn = ConnectionManager::new_lazy_with_config(client, manager_config())
            .with_context(|| format!("invalid Redis connection to {}", url.redacted()))?;
        Ok(Self::with(conn, prefix))
    }

    fn with(conn: ConnectionManager, prefix: &str) -> Self {
        Self {
            conn,
            prefix: prefix.to_owned(),
        }
    }

    /// `PING`, for readiness checks.
    pub async fn ping(&self) -> Result<(), LeaseError> {
        let mut conn = self.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map(drop)
            .map_err(|e| failed("ping", e))
    }

    /// The stored value of the game's lease (`<command_id>:<token>`), if
    /// any. For tests and the CLI.
    pub async fn holder_of(&self, game_id: &GameId) -> Result<Option<String>, LeaseError> {
        let mut conn = self.conn.clone();
        redis::cmd("GET")
            .arg(self.key(game_id))
            .query_async::<Option<String>>(&mut conn)
            .await
            .map_err(|e| failed(format_args!("read the lease of {game_id}"), e))
    }

    /// The lease key of a game: `<prefix>lease:<game_id>`.
    pub fn key(&self, game_id: &GameId) -> String {
        format!("{}lease:{}", self.prefix, game_id.as_str())
    }
}

impl LeaseStore for RedisLeases {
    async fn acquire(
        &self,
        game_id: &GameId,
        holder: &LeaseHolder,
        ttl: Duration,
    ) -> Result<Acquired, LeaseError> {
        let mut conn = self.conn.clone();
        let reply: Value = ACQUIRE
            .key(self.key(game_id))
            .arg(holder.value())
            .arg(millis(ttl))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| failed(format_args!("acquire the lease of {game_id}"), e))?;
        match reply {
            Value::Int(1) => Ok(Acquired::Yes),
            Value::BulkString(bytes) => Ok(Acquired::HeldBy(
                String::from_utf8_lossy(&bytes).into_owned(),
            )),
            Value::SimpleString(text) | Value::VerbatimString { text, .. } => {
                Ok(Acquired::HeldBy(text))
            }
            other => Err(LeaseError(format!(
                "acquire the lease of {game_id}: unexpected reply {other:?}"
            ))),
        }
    }

    async fn renew(
        &self,
        game_id: &GameId,
        holder: &LeaseHolder,
        ttl: Duration,
    ) -> Result<bool, LeaseError> {
        let mut conn = self.conn.clone();
        RENEW
            .key(self.key(game_id))
            .arg(holder.value())
            .arg(millis(ttl))
            .invoke_async::<bool>(&mut conn)
            .await
            .map_err(|e| failed(format_args!("renew the lease of {game_id}"), e))
    }

    async fn release(&self, game_id: &GameId, holder: &LeaseHolder) -> Result<bool, LeaseError> {
        let mut conn = self.conn.clone();
        RELEASE
            .key(self.key(game_id))
            .arg(holder.value())
            .invoke_async::<bool>(&mut conn)
            .await
            .map_err(|e| failed(format_args!("release the lease of {game_id}"), e))
    }
}

fn client(url: &SecretUrl) -> anyhow::Result<Client> {
    // The URL is exposed only to the client; redis' own messages for a bad
    // URL do not repeat it, and ours name it redacted.
    Client::open(url.expose()).with_context(|| format!("invalid Redis URL {}", url.redacted()))
}

fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECTION_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_number_of_retries(CONNECT_RETRIES)
        .set_min_delay(RETRY_MIN_DELAY)
        .set_max_delay(RETRY_MAX_DELAY)
}

/// The TTL for `PX`: whole milliseconds, at least 1 (`PX 0` is an error).
fn millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn failed(what: impl fmt::Display, error: RedisError) -> LeaseError {
    LeaseError(format!("{what}: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_is_whole_positive_milliseconds() {
        assert_eq!(millis(Duration::from_secs(30)), 30_000);
        assert_eq!(millis(Duration::from_micros(1500)), 1);
        assert_eq!(millis(Duration::ZERO), 1);
        assert_eq!(millis(Duration::MAX), u64::MAX);
    }

    #[test]
    fn every_script_opens_with_its_header() {
        for (name, code) in [
            ("acquire", include_str!("lua/acquire.lua")),
            ("renew", include_str!("lua/renew.lua")),
            ("release", include_str!("lua/release.lua")),
        ] {
            let header: String = code
                .lines()
                .take_while(|line| line.starts_with("--"))
                .collect();
            for word in ["KEYS[1]", "ARGV[1]", "Returns"] {
                assert!(header.contains(word), "{name}.lua header lacks {word}");
            }
        }
    }
}
