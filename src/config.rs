//! Configuration: one typed struct loaded once from the environment (SPEC
//! §9). Every variable is validated at start-up; an error names the
//! variable. URLs that may carry passwords are wrapped in [`SecretUrl`],
//! whose `Debug` and `Display` never show the password.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::domain::{AllowedImages, NodeName};

#[derive(Debug, Clone)]
pub struct Config {
    pub amqp_url: SecretUrl,
    pub database_url: SecretUrl,
    pub redis_url: SecretUrl,
    pub redis_prefix: String,
    pub docker: DockerConfig,
    pub amqp: AmqpConfig,
    pub lifecycle: LifecycleConfig,
    pub reconciler: ReconcilerConfig,
    pub node: NodeConfig,
    pub shutdown_timeout: Duration,
    /// `RTM_RETENTION`: how long finished inbox rows and published outbox
    /// rows are kept.
    pub retention: Duration,
    pub http_addr: SocketAddr,
    pub log_format: LogFormat,
}

/// This worker's node (SPEC §12).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// `RTM_NODE`: the Docker host this worker manages.
    pub name: NodeName,
    /// `RTM_MAX_GAMES`: how many games placement may put on it.
    pub max_games: u32,
}

/// How containers are created and where their state lives (SPEC §4).
#[derive(Debug, Clone)]
pub struct DockerConfig {
    /// `DOCKER_HOST`; `None` means the local socket.
    pub host: Option<String>,
    pub state_root: PathBuf,
    pub state_mount: String,
    pub container_prefix: String,
    pub network: String,
    /// `RTM_CPUS` in units of 10^-9 CPUs, as Docker's `NanoCpus`.
    pub nano_cpus: i64,
    /// `RTM_MEMORY` in bytes.
    pub memory_bytes: i64,
    pub pids_limit: i64,
    /// Linux capability names (without `CAP_`), checked at load.
    pub cap_add: Vec<String>,
    /// `RTM_ENGINE_USER`: who the engines run as and who owns their state
    /// directories; `None` leaves the image's user.
    pub engine_user: Option<EngineUser>,
    /// `RTM_LOG_MAX_SIZE` in bytes and `RTM_LOG_MAX_FILES`: the json-file
    /// log rotation of every engine, so no engine can fill the disk.
    pub log_max_bytes: i64,
    pub log_max_files: u32,
}

/// A numeric `uid[:gid]` (the gid defaults to the uid).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineUser {
    pub uid: u32,
    pub gid: u32,
}

impl EngineUser {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let err = || format!("must be a numeric uid or uid:gid, not {raw:?}");
        let (uid, gid) = match raw.split_once(':') {
            Some((uid, gid)) => (uid, gid),
            None => (raw, raw),
        };
        Ok(Self {
            uid: uid.parse().map_err(|_| err())?,
            gid: gid.parse().map_err(|_| err())?,
        })
    }

    /// As Docker's `User` wants it.
    pub fn docker_user(self) -> String {
        format!("{}:{}", self.uid, self.gid)
    }
}

/// The Linux capabilities `RTM_CAP_ADD` may name.
const CAPABILITIES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// `RTM_CAP_ADD`: comma-separated capability names, `CAP_` optional, any
/// case; `ALL` is refused (it would undo the drop of all the others).
fn parse_caps(raw: &str) -> Result<Vec<String>, String> {
    raw.split(',')
        .map(|c| c.trim().to_ascii_uppercase())
        .filter(|c| !c.is_empty())
        .map(|c| {
            let name = c.strip_prefix("CAP_").unwrap_or(&c).to_owned();
            if CAPABILITIES.contains(&name.as_str()) {
                Ok(name)
            } else if name == "ALL" {
                Err("ALL is refused: name the capabilities the engines need".to_owned())
            } else {
                Err(format!("{c:?} is not a Linux capability"))
            }
        })
        .collect()
}

#[derive(Debug, Clone)]
pub struct AmqpConfig {
    pub command_exchange: String,
    pub command_queue: String,
    pub event_exchange: String,
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
    pub delivery_limit: u32,
    pub prefetch: u16,
}

/// The lifecycle services' settings.
#[derive(Debug, Clone)]
pub struct LifecycleConfig {
    pub lease_ttl: Duration,
    pub stop_timeout: Duration,
    pub start_settle: Duration,
    pub health_timeout: Duration,
    pub rollback: bool,
    pub allowed_images: AllowedImages,
    pub retry_for: Duration,
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        Self {
            lease_ttl: Duration::from_secs(30),
            stop_timeout: Duration::from_secs(10),
            start_settle: Duration::from_secs(1),
            health_timeout: Duration::from_secs(60),
            rollback: true,
            allowed_images: AllowedImages::any(),
            retry_for: Duration::from_secs(60),
        }
    }
}

/// The reconciler's settings (SPEC §11).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconcilerConfig {
    /// `RTM_RECONCILE_INTERVAL`: how often every `running` record is
    /// compared with Docker.
    pub interval: Duration,
    /// `RTM_RESTART_ON_EXIT`.
    pub restart_on_exit: RestartPolicy,
}

impl Default for ReconcilerConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(30),
            restart_on_exit: RestartPolicy {
                max: 3,
                window: Duration::from_secs(600),
            },
        }
    }
}

/// `RTM_RESTART_ON_EXIT`: at most `max` automatic restarts of a game within
/// `window`; `max` 0 never restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    pub max: u32,
    pub window: Duration,
}

impl RestartPolicy {
    pub const NEVER: RestartPolicy = RestartPolicy {
        max: 0,
        window: Duration::ZERO,
    };

    /// `N/window` (`3/10m`), or `0`.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let err = || "must be N/window (such as 3/10m) or 0".to_string();
        let raw = raw.trim();
        if raw == "0" {
            return Ok(Self::NEVER);
        }
        let (n, window) = raw.split_once('/').ok_or_else(err)?;
        let max: u32 = n.trim().parse().map_err(|_| err())?;
        let window = parse_duration(window.trim()).map_err(|_| err())?;
        if max == 0 {
            return Ok(Self::NEVER);
        }
        if window.is_zero() {
            return Err(err());
        }
        Ok(Self { max, window })
    }
}

impl std::fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.max == 0 {
            return f.write_str("0");
        }
        write!(f, "{}/{}", self.max, humantime_ish(self.window))
    }
}

/// A duration as the variables write it (`10m`, `90s`, `500ms`).
fn humantime_ish(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let s = d.as_secs();
    match s {
        s if s.is_multiple_of(86_400) => format!("{}d", s / 86_400),
        s if s.is_multiple_of(3600) => format!("{}h", s / 3600),
        s if s.is_multiple_of(60) => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {variable}: {reason}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub reason: String,
}

impl Config {
    /// Loads and validates every variable from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Loads from any lookup (tests pass a map).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let env = Env(&lookup);
        let lifecycle = LifecycleConfig {
            lease_ttl: env.duration("RTM_LEASE_TTL", "30s")?,
            stop_timeout: env.duration("RTM_STOP_TIMEOUT", "10s")?,
            start_settle: env.duration("RTM_START_SETTLE", "1s")?,
            health_timeout: env.duration("RTM_HEALTH_TIMEOUT", "60s")?,
            rollback: env.parse("RTM_ROLLBACK", "true", parse_bool)?,
            allowed_images: AllowedImages::parse(&env.string("RTM_ALLOWED_IMAGES", "")),
            retry_for: env.duration("RTM_RETRY_FOR", "60s")?,
        };
        if lifecycle.lease_ttl < Duration::from_secs(1) {
            return Err(ConfigError {
                variable: "RTM_LEASE_TTL",
                reason: "must be at least 1s (it is renewed at a third of its lifetime)".into(),
            });
        }
        let docker = DockerConfig {
            host: lookup("DOCKER_HOST").filter(|h| !h.is_empty()),
            state_root: PathBuf::from(env.string("RTM_STATE_ROOT", "/var/lib/rtmanager/games")),
            state_mount: env.parse("RTM_STATE_MOUNT", "/state", |s| {
                if s.starts_with('/') && s.len() > 1 {
                    Ok(s.to_owned())
                } else {
                    Err("must be an absolute path inside the container, not /".into())
                }
            })?,
            container_prefix: env.parse("RTM_CONTAINER_PREFIX", "rtm-", |s| {
                let ok = s
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
                    && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
                if ok {
                    Ok(s.to_owned())
                } else {
                    Err("must start with a letter or digit and contain only [A-Za-z0-9_.-]".into())
                }
            })?,
            network: env.non_empty("RTM_DOCKER_NETWORK", "bridge")?,
            nano_cpus: env.parse("RTM_CPUS", "1", parse_cpus)?,
            memory_bytes: env.parse("RTM_MEMORY", "1g", parse_bytes)?,
            pids_limit: env.parse("RTM_PIDS_LIMIT", "512", |s| {
                s.parse::<i64>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| "must be a positive whole number".into())
            })?,
            cap_add: env.parse("RTM_CAP_ADD", "", parse_caps)?,
            engine_user: env.parse("RTM_ENGINE_USER", "", |s| {
                if s.is_empty() {
                    Ok(None)
                } else {
                    EngineUser::parse(s).map(Some)
                }
            })?,
            log_max_bytes: env.parse("RTM_LOG_MAX_SIZE", "10m", |s| {
                parse_size(s).and_then(|n| {
                    if n >= 1 << 10 {
                        Ok(n)
                    } else {
                        Err("must be at least 1k".into())
                    }
                })
            })?,
            log_max_files: env.parse("RTM_LOG_MAX_FILES", "3", |s| {
                s.parse::<u32>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| "must be a positive whole number".into())
            })?,
        };
        let amqp = AmqpConfig {
            command_exchange: env.non_empty("RTM_COMMAND_EXCHANGE", "rtmanager.commands")?,
            command_queue: env.non_empty("RTM_COMMAND_QUEUE", "rtmanager.commands")?,
            event_exchange: env.non_empty("RTM_EVENT_EXCHANGE", "rtmanager.events")?,
            dead_letter_exchange: env.non_empty("RTM_DEAD_LETTER_EXCHANGE", "rtmanager.dlx")?,
            dead_letter_queue: env.non_empty("RTM_DEAD_LETTER_QUEUE", "rtmanager.dead-letters")?,
            delivery_limit: env.parse("RTM_DELIVERY_LIMIT", "5", |s| {
                s.parse::<u32>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| "must be a positive whole number".into())
            })?,
            prefetch: env.parse("RTM_PREFETCH", "16", |s| {
                s.parse::<u16>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| "must be a whole number from 1 to 65535".into())
            })?,
        };
        Ok(Config {
            amqp_url: env.url(
                "RTM_AMQP_URL",
                "amqp://guest:guest@127.0.0.1:5672/%2f",
                &["amqp", "amqps"],
                parse_amqp,
            )?,
            database_url: env.url(
                "DATABASE_URL",
                "postgres://postgres@127.0.0.1:5432/rtmanager",
                &["postgres", "postgresql"],
                parse_postgres,
            )?,
            redis_url: env.url(
                "RTM_REDIS_URL",
                "redis://127.0.0.1:6379",
                &["redis", "rediss"],
                parse_redis,
            )?,
            redis_prefix: env.string("RTM_REDIS_PREFIX", "rtmanager:"),
            docker,
            amqp,
            lifecycle,
            reconciler: ReconcilerConfig {
                interval: env.parse("RTM_RECONCILE_INTERVAL", "30s", |s| {
                    parse_duration(s).and_then(|d| {
                        if d >= Duration::from_millis(100) {
                            Ok(d)
                        } else {
                            Err("must be at least 100ms".into())
                        }
                    })
                })?,
                restart_on_exit: env.parse("RTM_RESTART_ON_EXIT", "3/10m", RestartPolicy::parse)?,
            },
            node: NodeConfig {
                name: match lookup("RTM_NODE").filter(|n| !n.is_empty()) {
                    Some(raw) => NodeName::parse(&raw),
                    None => NodeName::host(),
                }
                .map_err(|reason| ConfigError {
                    variable: "RTM_NODE",
                    reason,
                })?,
                max_games: env.parse("RTM_MAX_GAMES", "200", |s| {
                    s.parse::<u32>()
                        .ok()
                        .filter(|n| i32::try_from(*n).is_ok())
                        .ok_or_else(|| "must be a whole number from 0 to 2147483647".into())
                })?,
            },
            shutdown_timeout: env.duration("RTM_SHUTDOWN_TIMEOUT", "60s")?,
            retention: env.parse("RTM_RETENTION", "7d", |s| {
                parse_duration(s).and_then(|d| {
                    // A duplicate is recognised only while its command's
                    // inbox row is kept: far less than a redelivery can take.
                    if d >= Duration::from_secs(3600) {
                        Ok(d)
                    } else {
                        Err("must be at least 1h (duplicates are recognised only within it)".into())
                    }
                })
            })?,
            http_addr: env.parse("RTM_HTTP_ADDR", "127.0.0.1:9090", |s| {
                s.parse::<SocketAddr>()
                    .map_err(|e| format!("must be host:port ({e})"))
            })?,
            log_format: env.parse("RTM_LOG_FORMAT", "json", |s| match s {
                "json" => Ok(LogFormat::Json),
                "pretty" => Ok(LogFormat::Pretty),
                _ => Err("must be json or pretty".into()),
            })?,
        })
    }
}

struct Env<'a, F: Fn(&str) -> Option<String>>(&'a F);

impl<F: Fn(&str) -> Option<String>> Env<'_, F> {
    fn string(&self, name: &str, default: &str) -> String {
        (self.0)(name).unwrap_or_else(|| default.to_owned())
    }

    fn parse<T>(
        &self,
        name: &'static str,
        default: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        let raw = self.string(name, default);
        parse(raw.trim()).map_err(|reason| ConfigError {
            variable: name,
            reason: format!("{reason} (got {raw:?})"),
        })
    }

    fn non_empty(&self, name: &'static str, default: &str) -> Result<String, ConfigError> {
        self.parse(name, default, |s| {
            if s.is_empty() {
                Err("must not be empty".into())
            } else {
                Ok(s.to_owned())
            }
        })
    }

    fn duration(&self, name: &'static str, default: &str) -> Result<Duration, ConfigError> {
        self.parse(name, default, parse_duration)
    }

    /// A connection URL: the scheme must be one of `schemes` and the
    /// driver's own parser (`driver`) must accept it, so a URL that can
    /// never work stops start-up here instead of being retried as if its
    /// server were down. Neither the value nor the parser's words reach the
    /// error with the password in them.
    fn url(
        &self,
        name: &'static str,
        default: &str,
        schemes: &[&str],
        driver: impl FnOnce(&str) -> Result<(), String>,
    ) -> Result<SecretUrl, ConfigError> {
        let raw = self.string(name, default);
        let url = SecretUrl(raw.trim().to_owned());
        let scheme_ok = url
            .0
            .split_once("://")
            .is_some_and(|(scheme, rest)| schemes.contains(&scheme) && !rest.is_empty());
        if !scheme_ok {
            return Err(ConfigError {
                variable: name,
                reason: format!(
                    "must be a URL starting with {} (got {url})",
                    schemes
                        .iter()
                        .map(|s| format!("{s}://"))
                        .collect::<Vec<_>>()
                        .join(" or ")
                ),
            });
        }
        driver(url.expose()).map_err(|why| ConfigError {
            variable: name,
            reason: format!(
                "cannot be parsed: {} (got {url}; a password holding / ? # @ or % must be percent-encoded)",
                url.scrub(&why)
            ),
        })?;
        Ok(url)
    }
}

/// The URL checks of the three drivers, each the parser the driver itself
/// connects with.
fn parse_amqp(url: &str) -> Result<(), String> {
    url.parse::<lapin::uri::AMQPUri>().map(drop)
}

fn parse_postgres(url: &str) -> Result<(), String> {
    url.parse::<sqlx::postgres::PgConnectOptions>()
        .map(drop)
        .map_err(|e| e.to_string())
}

fn parse_redis(url: &str) -> Result<(), String> {
    redis::Client::open(url)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// The longest duration any variable takes. Bounded so that arithmetic on
/// a configured duration (`ttl * 2`, a deadline from now) can never
/// overflow, whatever an operator writes.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 86_400);

/// `30s`, `500ms`, `2m`, `1h`, `7d`, or a combination such as `1m30s`; at
/// most [`MAX_DURATION`].
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let err = || "must be a duration such as 30s, 500ms, 2m, 1h or 7d".to_string();
    let mut rest = raw.trim();
    if rest.is_empty() {
        return Err(err());
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
        if digits == 0 {
            return Err(err());
        }
        let value: u64 = rest[..digits].parse().map_err(|_| err())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let part = match &rest[..unit_len] {
            "ms" => Duration::from_millis(value),
            "s" => Duration::from_secs(value),
            "m" => Duration::from_secs(value.saturating_mul(60)),
            "h" => Duration::from_secs(value.saturating_mul(3600)),
            "d" => Duration::from_secs(value.saturating_mul(86_400)),
            _ => return Err(err()),
        };
        total = total.saturating_add(part);
        rest = &rest[unit_len..];
    }
    if total > MAX_DURATION {
        return Err("must be at most 366d".into());
    }
    Ok(total)
}

fn parse_bool(raw: &str) -> Result<bool, String> {
    match raw.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err("must be true or false".into()),
    }
}

fn parse_cpus(raw: &str) -> Result<i64, String> {
    let cpus: f64 = raw
        .parse()
        .map_err(|_| "must be a number of CPUs such as 1 or 0.5".to_string())?;
    if !(cpus > 0.0 && cpus <= 1024.0) {
        return Err("must be more than 0 and at most 1024".into());
    }
    Ok((cpus * 1e9).round() as i64)
}

/// `512m`, `1g`, `1024k`, or a plain number of bytes (Docker's units).
fn parse_bytes(raw: &str) -> Result<i64, String> {
    let bytes = parse_size(raw)?;
    // Docker refuses less than 6 MiB.
    if bytes < 6 << 20 {
        return Err("must be at least 6m (Docker's minimum)".into());
    }
    Ok(bytes)
}

/// A size in bytes: `4096`, `10k`, `512m`, `1g` (a trailing `b` allowed).
fn parse_size(raw: &str) -> Result<i64, String> {
    let err = || "must be a size such as 512m or 1g".to_string();
    let lower = raw.to_ascii_lowercase();
    let trimmed = lower.strip_suffix('b').unwrap_or(&lower);
    let (digits, multiplier) = match trimmed.chars().last() {
        Some('k') => (&trimmed[..trimmed.len() - 1], 1i64 << 10),
        Some('m') => (&trimmed[..trimmed.len() - 1], 1 << 20),
        Some('g') => (&trimmed[..trimmed.len() - 1], 1 << 30),
        Some(c) if c.is_ascii_digit() => (trimmed, 1),
        _ => return Err(err()),
    };
    let n: i64 = digits.parse().map_err(|_| err())?;
    n.checked_mul(multiplier).ok_or_else(err)
}

/// A connection URL whose password never reaches a log line, an error or a
/// `Debug` dump. Use [`SecretUrl::expose`] only to connect.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any password replaced by `***`.
    pub fn redacted(&self) -> String {
        if !self.0.contains("://") {
            return "***".into();
        }
        let redacted = match self.password_span() {
            Some((start, end)) => format!("{}***{}", &self.0[..start], &self.0[end..]),
            None => self.0.clone(),
        };
        redact_query_password(&redacted)
    }

    /// Where the password sits in the URL, as a byte range. Operators do
    /// not always percent-encode it, so it may hold `/`, `?`, `#` or `@`:
    /// it runs from the first `:` of the authority to the *last* `@` of the
    /// whole URL. That may also cover a path or a query holding an `@`
    /// (masking more than the password is harmless; printing part of one is
    /// not).
    fn password_span(&self) -> Option<(usize, usize)> {
        let after_scheme = self.0.find("://")? + 3;
        let rest = &self.0[after_scheme..];
        let at = rest.rfind('@')?;
        let colon = rest[..at].find(':')?;
        Some((after_scheme + colon + 1, after_scheme + at))
    }

    /// `text` (a parser's message about this URL) with the password taken
    /// out, as written and percent-decoded.
    fn scrub(&self, text: &str) -> String {
        let Some((start, end)) = self.password_span() else {
            return text.to_owned();
        };
        let password = &self.0[start..end];
        if password.is_empty() {
            return text.to_owned();
        }
        let mut scrubbed = text.replace(password, "***");
        let decoded = percent_decode(password);
        if !decoded.is_empty() {
            scrubbed = scrubbed.replace(&decoded, "***");
        }
        scrubbed
    }
}

/// `?password=…` (which libpq-style URLs accept) masked too.
fn redact_query_password(url: &str) -> String {
    let Some((base, query)) = url.split_once('?') else {
        return url.to_owned();
    };
    let masked: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
            _ => pair.to_owned(),
        })
        .collect();
    format!("{base}?{}", masked.join("&"))
}

/// `%XX` escapes decoded (lossily: this only finds the text to mask).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretUrl({})", self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn load(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_match_the_spec() {
        let c = load(&[]).unwrap();
        assert_eq!(c.amqp_url.expose(), "amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(c.redis_prefix, "rtmanager:");
        assert_eq!(c.docker.container_prefix, "rtm-");
        assert_eq!(c.docker.nano_cpus, 1_000_000_000);
        assert_eq!(c.docker.memory_bytes, 1 << 30);
        assert_eq!(c.docker.pids_limit, 512);
        assert_eq!(c.amqp.delivery_limit, 5);
        assert_eq!(c.amqp.prefetch, 16);
        assert_eq!(c.lifecycle.lease_ttl, Duration::from_secs(30));
        assert_eq!(c.lifecycle.retry_for, Duration::from_secs(60));
        assert!(c.lifecycle.rollback);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.http_addr.to_string(), "127.0.0.1:9090");
    }

    #[test]
    fn errors_name_the_variable() {
        let cases = [
            ("RTM_LEASE_TTL", "soon"),
            ("RTM_STOP_TIMEOUT", "10"),
            ("RTM_ROLLBACK", "maybe"),
            ("RTM_CPUS", "0"),
            ("RTM_MEMORY", "lots"),
            ("RTM_PIDS_LIMIT", "-1"),
            ("RTM_PREFETCH", "0"),
            ("RTM_HTTP_ADDR", "nowhere"),
            ("RTM_LOG_FORMAT", "xml"),
            ("RTM_AMQP_URL", "http://x"),
            ("DATABASE_URL", "mysql://x"),
            ("RTM_CONTAINER_PREFIX", "bad/prefix"),
            ("RTM_STATE_MOUNT", "relative"),
        ];
        for (var, value) in cases {
            let err = load(&[(var, value)]).unwrap_err();
            assert_eq!(err.variable, var, "{value}");
            assert!(err.to_string().contains(var), "{err}");
        }
    }

    #[test]
    fn passwords_never_print() {
        let url = "amqp://lobby:hunter2@broker:5672/%2f";
        let c = load(&[
            ("RTM_AMQP_URL", url),
            (
                "DATABASE_URL",
                "postgres://rtm:hunter2@db/rtm?sslmode=require",
            ),
            ("RTM_REDIS_URL", "redis://:hunter2@cache:6379"),
        ])
        .unwrap();
        let dump = format!("{c:?} {} {} {}", c.amqp_url, c.database_url, c.redis_url);
        assert!(!dump.contains("hunter2"), "{dump}");
        assert!(dump.contains("amqp://lobby:***@broker:5672/%2f"), "{dump}");
        assert_eq!(c.amqp_url.expose(), url);

        let query = SecretUrl::new("postgres://rtm@db/rtm?sslmode=require&password=hunter2");
        assert_eq!(
            query.redacted(),
            "postgres://rtm@db/rtm?sslmode=require&password=***"
        );

        let err = load(&[("RTM_AMQP_URL", "http://lobby:hunter2@x")]).unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    /// Whatever a password holds, unencoded or percent-encoded, it shows in
    /// no Debug, Display or error; a URL its driver cannot parse is a
    /// start-up error naming the variable.
    #[test]
    fn passwords_never_print_whatever_they_hold() {
        let passwords = [
            "pa/ss",
            "pa?ss",
            "pa#ss",
            "p@ss",
            "p:ss",
            "x/?#@y",
            "pa%2Fss",
            "pa%3Fs%23",
        ];
        let vars = [
            ("RTM_AMQP_URL", "amqp", "/%2f"),
            ("DATABASE_URL", "postgres", "/rtm"),
            ("RTM_REDIS_URL", "redis", "/0"),
        ];
        for password in passwords {
            let decoded = percent_decode(password);
            for (var, scheme, path) in vars {
                let url = format!("{scheme}://lobby:{password}@db.example:5999{path}");
                let shown = match load(&[(var, &url)]) {
                    Ok(c) => {
                        let url = [&c.amqp_url, &c.database_url, &c.redis_url]
                            .into_iter()
                            .find(|u| u.expose() == url)
                            .expect("the URL as given")
                            .clone();
                        assert!(url.redacted().contains("lobby:***@"), "{url}");
                        format!("{c:?} {url} {}", url.redacted())
                    }
                    Err(e) => {
                        assert_eq!(e.variable, var);
                        assert!(e.to_string().contains(var), "{e}");
                        e.to_string()
                    }
                };
                assert!(!shown.contains(password), "{var} {password:?}: {shown}");
                assert!(!shown.contains(&decoded), "{var} {decoded:?}: {shown}");
            }
        }
    }

    #[test]
    fn a_url_its_driver_cannot_parse_stops_start_up() {
        for (var, url) in [
            ("DATABASE_URL", "postgres://rtm:pa/ss@db/rtm"),
            ("DATABASE_URL", "postgres://rtm@db:notaport/rtm"),
            ("RTM_REDIS_URL", "redis://:pa#ss@cache:6379"),
            ("RTM_AMQP_URL", "amqp://guest:gu?est@broker:5672/%2f"),
        ] {
            let err = load(&[(var, url)]).expect_err(url);
            assert_eq!(err.variable, var, "{url}");
            assert!(err.reason.contains("cannot be parsed"), "{err}");
            for secret in ["pa/ss", "pa#ss", "gu?est"] {
                assert!(!err.to_string().contains(secret), "{err}");
            }
        }
    }

    #[test]
    fn restart_policies() {
        assert_eq!(
            RestartPolicy::parse("3/10m"),
            Ok(RestartPolicy {
                max: 3,
                window: Duration::from_secs(600)
            })
        );
        assert_eq!(RestartPolicy::parse("0"), Ok(RestartPolicy::NEVER));
        assert_eq!(RestartPolicy::parse("3/10m").unwrap().to_string(), "3/10m");
        for bad in ["", "3", "x/10m", "3/", "3/0s", "-1/1m"] {
            assert!(RestartPolicy::parse(bad).is_err(), "{bad:?}");
        }
        let c = load(&[]).unwrap();
        assert_eq!(c.reconciler, ReconcilerConfig::default());
        let e = load(&[("RTM_RESTART_ON_EXIT", "often")]).unwrap_err();
        assert_eq!(e.variable, "RTM_RESTART_ON_EXIT");
        let e = load(&[("RTM_RECONCILE_INTERVAL", "1ms")]).unwrap_err();
        assert_eq!(e.variable, "RTM_RECONCILE_INTERVAL");
    }

    #[test]
    fn the_node_defaults_to_the_host_name_and_is_validated() {
        let c = load(&[]).unwrap();
        assert_eq!(c.node.name, NodeName::host().unwrap());
        assert_eq!(c.node.max_games, 200);
        let c = load(&[("RTM_NODE", "node-b"), ("RTM_MAX_GAMES", "0")]).unwrap();
        assert_eq!(c.node.name.as_str(), "node-b");
        assert_eq!(c.node.max_games, 0);
        for (var, bad) in [
            ("RTM_NODE", "a b"),
            ("RTM_NODE", "-x"),
            ("RTM_MAX_GAMES", "-1"),
            ("RTM_MAX_GAMES", "many"),
            ("RTM_MAX_GAMES", "4294967295"),
        ] {
            let e = load(&[(var, bad)]).unwrap_err();
            assert_eq!(e.variable, var, "{bad}");
        }
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("366d"), Ok(MAX_DURATION));
        for bad in [
            "",
            "s",
            "10",
            "1.5s",
            "-1s",
            "10 s",
            "5w",
            "367d",
            "18446744073709551615h",
            "99999999999999999999999s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_bytes("512m"), Ok(512 << 20));
        assert_eq!(parse_bytes("1G"), Ok(1 << 30));
        assert!(parse_bytes("1k").is_err());
        assert_eq!(parse_cpus("0.5"), Ok(500_000_000));
    }

    #[test]
    fn retention_is_a_week_by_default_and_at_least_an_hour() {
        assert_eq!(
            load(&[]).unwrap().retention,
            Duration::from_secs(7 * 24 * 3600)
        );
        assert_eq!(
            load(&[("RTM_RETENTION", "30d")]).unwrap().retention,
            Duration::from_secs(30 * 24 * 3600)
        );
        for short in ["59m", "0s", "soon"] {
            let err = load(&[("RTM_RETENTION", short)]).unwrap_err();
            assert_eq!(err.variable, "RTM_RETENTION", "{short}");
        }
    }

    #[test]
    fn engine_hygiene_settings() {
        let c = load(&[]).unwrap();
        assert_eq!(c.docker.engine_user, None);
        assert_eq!(c.docker.log_max_bytes, 10 << 20);
        assert_eq!(c.docker.log_max_files, 3);
        assert!(c.docker.cap_add.is_empty());

        let c = load(&[
            ("RTM_ENGINE_USER", "4242"),
            ("RTM_LOG_MAX_SIZE", "512k"),
            ("RTM_LOG_MAX_FILES", "1"),
            ("RTM_CAP_ADD", "net_bind_service, CAP_SYS_NICE"),
        ])
        .unwrap();
        assert_eq!(
            c.docker.engine_user,
            Some(EngineUser {
                uid: 4242,
                gid: 4242
            })
        );
        assert_eq!(c.docker.log_max_bytes, 512 << 10);
        assert_eq!(c.docker.log_max_files, 1);
        assert_eq!(c.docker.cap_add, ["NET_BIND_SERVICE", "SYS_NICE"]);
        assert_eq!(
            load(&[("RTM_ENGINE_USER", "1000:1001")])
                .unwrap()
                .docker
                .engine_user
                .map(EngineUser::docker_user)
                .as_deref(),
            Some("1000:1001")
        );

        let refused = [
            ("RTM_ENGINE_USER", "games"),
            ("RTM_ENGINE_USER", "1000:"),
            ("RTM_ENGINE_USER", "-1"),
            ("RTM_LOG_MAX_SIZE", "100"),
            ("RTM_LOG_MAX_SIZE", "huge"),
            ("RTM_LOG_MAX_FILES", "0"),
            ("RTM_CAP_ADD", "ALL"),
            ("RTM_CAP_ADD", "NET_BIND_SERVICE,FLY"),
        ];
        for (var, value) in refused {
            let err = load(&[(var, value)]).unwrap_err();
            assert_eq!(err.variable, var, "{value}");
        }
    }
}
