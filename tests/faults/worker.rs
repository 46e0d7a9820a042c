//! A worker as a real process: the debug binary running `serve`, configured
//! only by environment variables (SPEC §9), logging JSON to a file of its
//! own. Killed with SIGKILL (`Child::kill`), stopped with SIGTERM, paused
//! with SIGSTOP, and started again on the same log and settings.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::procs::{Manifest, signal};
use crate::services::tail_file;

pub struct Worker {
    pub name: String,
    pub log: PathBuf,
    pub http_port: u16,
    env: Vec<(String, String)>,
    child: Mutex<Option<Child>>,
    manifest: Manifest,
    /// How many times this worker was started.
    starts: AtomicU32,
}

impl Worker {
    pub fn new(
        name: &str,
        log: PathBuf,
        http_port: u16,
        env: Vec<(String, String)>,
        manifest: Manifest,
    ) -> Self {
        Self {
            name: name.to_owned(),
            log,
            http_port,
            env,
            child: Mutex::new(None),
            manifest,
            starts: AtomicU32::new(0),
        }
    }

    pub fn starts(&self) -> u32 {
        self.starts.load(Ordering::Relaxed)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.lock().unwrap().as_ref().map(Child::id)
    }

    pub fn spawn(&self) {
        let mut slot = self.child.lock().unwrap();
        assert!(slot.is_none(), "{} is already running", self.name);
        let starts = self.starts.fetch_add(1, Ordering::Relaxed) + 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the worker log");
        writeln!(
            log,
            "=== faults: start #{} of {} at {}",
            starts,
            self.name,
            chrono::Utc::now().to_rfc3339()
        )
        .ok();
        let child = {
            use std::os::unix::process::CommandExt as _;
            Command::new(env!("CARGO_BIN_EXE_rtmanager"))
                .arg("serve")
                .env_clear()
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("clone the log handle"))
                .stderr(log)
                // Its own process group: a terminal's Ctrl-C reaches the
                // test process only, whose teardown then stops the worker.
                .process_group(0)
                .spawn()
                .expect("spawn rtmanager serve")
        };
        self.manifest
            .record_pid(child.id(), "KILL", &self.manifest.marker());
        *slot = Some(child);
    }

    /// SIGKILL (`Child::kill`), reaped at once.
    pub fn kill(&self) {
        let taken = self.child.lock().unwrap().take();
        if let Some(mut child) = taken {
            let _ = child.kill();
            let _ = child.wait();
            self.note("SIGKILL");
        }
    }

    pub fn pause(&self) {
        if let Some(pid) = self.pid() {
            signal(pid, "STOP");
            self.note("SIGSTOP");
        }
    }

    pub fn resume(&self) {
        if let Some(pid) = self.pid() {
            signal(pid, "CONT");
            self.note("SIGCONT");
        }
    }

    /// SIGTERM, then waits up to `timeout` for the exit.
    pub async fn terminate(&self, timeout: Duration) -> Result<ExitStatus, String> {
        let taken = self.child.lock().unwrap().take();
        let Some(mut child) = taken else {
            return Err(format!("{} is not running", self.name));
        };
        self.note("SIGTERM");
        signal(child.id(), "TERM");
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "{} did not exit within {timeout:?} of SIGTERM (SIGKILLed)",
                        self.name
                    ));
                }
                Err(e) => return Err(format!("wait for {}: {e}", self.name)),
            }
        }
    }

    /// Exited by itself (a crash): its status.
    pub fn exited(&self) -> Option<ExitStatus> {
        self.child
            .lock()
            .unwrap()
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits until `/readyz` answers 200 (every dependency up).
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Err(format!(
                    "{} exited ({status}) before it was ready:\n{}",
                    self.name,
                    self.tail(30)
                ));
            }
            if let Ok((200, _)) = self.http_get("/readyz").await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let last = self.http_get("/readyz").await;
                return Err(format!(
                    "{} not ready within {timeout:?} (last /readyz: {last:?}):\n{}",
                    self.name,
                    self.tail(30)
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn http_get(&self, path: &str) -> Result<(u16, String), String> {
        let io = async {
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.http_port)).await?;
            let request =
                format!("GET {path} HTTP/1.1\r\nHost: faults\r\nConnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).await?;
            let mut response = String::new();
            stream.read_to_string(&mut response).await?;
            Ok::<_, std::io::Error>(response)
        };
        let response = tokio::time::timeout(Duration::from_secs(3), io)
            .await
            .map_err(|_| "timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        let status = response
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .ok_or("no HTTP status")?;
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((status, body))
    }

    pub fn tail(&self, lines: usize) -> String {
        tail_file(&self.log, lines)
    }

    /// `rtmanager_operations_in_flight` as this worker's `/metrics` reports
    /// it; an error when it does not answer (unknown is not idle).
    pub async fn in_flight(&self) -> Result<f64, String> {
        match self.http_get("/metrics").await {
            Ok((200, body)) => Ok(body
                .lines()
                .filter(|l| l.starts_with(rtmanager::telemetry::OPERATIONS_IN_FLIGHT))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()),
            Ok((status, _)) => Err(format!("{}: /metrics answered {status}", self.name)),
            Err(e) => Err(format!("{}: /metrics did not answer: {e}", self.name)),
        }
    }

    /// The `reason` of every "command interrupted" line in the log, in
    /// order.
    pub fn interruptions(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("command interrupted"))
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| {
                        let fields = v.get("fields").unwrap_or(&v);
                        fields.get("reason")?.as_str().map(str::to_owned)
                    })
                    .unwrap_or_else(|| l.chars().take(300).collect())
            })
            .collect()
    }

    /// The game (its span's `game_id`) of every log line whose message is
    /// `message`, in order, once per line.
    pub fn games_logging(&self, message: &str) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v.get("message").and_then(|m| m.as_str()) == Some(message))
            .filter_map(|v| Some(v.get("span")?.get("game_id")?.as_str()?.to_owned()))
            .collect()
    }

    /// A line in the worker's log marking what the suite did to it.
    fn note(&self, what: &str) {
        if let Ok(mut log) = OpenOptions::new().append(true).open(&self.log) {
            writeln!(
                log,
                "=== faults: {what} to {} at {}",
                self.name,
                chrono::Utc::now().to_rfc3339()
            )
            .ok();
        }
    }
}

impl Worker {
    /// Sets one variable of its environment (`None`: removes it), for its
    /// next start: a worker of another node (SPEC §12) differs from the
    /// others in `RTM_NODE` and `DOCKER_HOST`.
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.env.retain(|(k, _)| k != key);
        if let Some(value) = value {
            self.env.push((key.to_owned(), value.to_owned()));
        }
    }

    /// `rtmanager_commands_forwarded_total` (every node) as this worker's
    /// `/metrics` reports it: commands it forwarded to another node's
    /// queue since it started.
    pub async fn forwarded(&self) -> Result<f64, String> {
        match self.http_get("/metrics").await {
            Ok((200, body)) => Ok(body
                .lines()
                .filter(|l| l.starts_with(rtmanager::telemetry::COMMANDS_FORWARDED))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                // Not `sum`: an empty one is -0.
                .fold(0.0, |total, n| total + n)),
            Ok((status, _)) => Err(format!("{}: /metrics answered {status}", self.name)),
            Err(e) => Err(format!("{}: /metrics did not answer: {e}", self.name)),
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            // A paused worker must be able to die.
            signal(pid, "CONT");
        }
        self.kill();
    }
}
