//! Process plumbing for the fault suite: spare ports, polling, signals by
//! pid, and a per-scenario directory whose `teardown` manifest lists
//! everything the scenario started, so it is removed at the end — also when
//! the scenario panics (on `Drop`), and also after the test process itself
//! was killed (the next run sweeps directories whose owner is gone).
//!
//! Nothing here signals a process by name: only pids this suite recorded,
//! each checked against a marker in its command line or environment first
//! (a recycled pid is left alone).

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Where every scenario directory lives. World-traversable, so the
/// `postgres` and `rabbitmq` users reach their own subdirectories.
pub const BASE: &str = "/tmp/rtm-faults";

/// Debian's client matches the engine (API 1.41); fall back to PATH.
pub fn docker_cli() -> &'static str {
    if Path::new("/usr/bin/docker").exists() {
        "/usr/bin/docker"
    } else {
        "docker"
    }
}

/// A port nobody listens on right now (bound then released; the window for
/// a race is tiny and a clash shows as a start-up failure, not silence).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("local addr")
        .port()
}

pub fn tcp_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(300),
    )
    .is_ok()
}

/// Polls `ready` every 100 ms until it holds or `timeout` passes.
pub async fn poll_until(timeout: Duration, mut ready: impl FnMut() -> bool) -> bool {
    poll_for(timeout, Duration::from_millis(100), || {
        std::future::ready(ready().then_some(()))
    })
    .await
    .is_some()
}

/// Runs `probe` every `every` until it yields a value or `timeout` passes
/// (the probe always runs at least once). A plain closure returning a
/// future rather than an async closure: the futures of the latter are not
/// provably `Send` yet, which the scenarios' spawned tasks need.
pub async fn poll_for<T, F: Future<Output = Option<T>>>(
    timeout: Duration,
    every: Duration,
    mut probe: impl FnMut() -> F,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(found) = probe().await {
            return Some(found);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(every).await;
    }
}

/// Runs a command to completion (blocking); `Err` carries its output.
pub fn run(cmd: &mut Command) -> Result<String, String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{shown}: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{shown} exited {}: {}", out.status, text.trim()))
    }
}

/// Like [`run`], off the async runtime's threads.
pub async fn run_async(mut cmd: Command) -> Result<String, String> {
    tokio::task::spawn_blocking(move || run(&mut cmd))
        .await
        .map_err(|e| e.to_string())?
}

/// The pid runs and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// The pid's command line and environment contain `marker`.
fn pid_matches(pid: u32, marker: &str) -> bool {
    ["cmdline", "environ"].iter().any(|f| {
        fs::read(format!("/proc/{pid}/{f}"))
            .map(|b| String::from_utf8_lossy(&b).contains(marker))
            .unwrap_or(false)
    })
}

/// Sends `signal` (TERM, KILL, QUIT, STOP, CONT) to one pid.
pub fn signal(pid: u32, signal: &str) -> bool {
    Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Signals `pid` (if it still is ours), waits up to `grace`, then SIGKILLs.
pub fn stop_pid(pid: u32, first: &str, marker: &str, grace: Duration) {
    if !pid_alive(pid) || !pid_matches(pid, marker) {
        return;
    }
    signal(pid, first);
    let deadline = Instant::now() + grace;
    while pid_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if pid_alive(pid) {
        signal(pid, "KILL");
        let deadline = Instant::now() + Duration::from_secs(5);
        while pid_alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Reads the first line of a pid file.
pub fn read_pid(path: &Path) -> Option<u32> {
    fs::read_to_string(path)
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// One scenario's directory under [`BASE`], with its teardown manifest.
pub struct ScenarioDir {
    pub path: PathBuf,
    torn_down: bool,
}

impl ScenarioDir {
    pub fn new(scenario: &str) -> Self {
        // The sweep and the new directory's owner file under one lock: a
        // sweep by another test of this process must not find this
        // directory before its owner is written and take it for a dead
        // run's.
        static CREATING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _creating = CREATING.lock().unwrap_or_else(|p| p.into_inner());
        sweep_stale();
        fs::create_dir_all(BASE).expect("create the fault suite's base directory");
        fs::set_permissions(BASE, fs::Permissions::from_mode(0o755)).ok();
        let path = PathBuf::from(BASE).join(format!(
            "{scenario}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ));
        fs::create_dir_all(&path).expect("create the scenario directory");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).ok();
        fs::write(path.join("owner"), std::process::id().to_string()).expect("write owner");
        fs::write(path.join("teardown"), "").expect("write teardown manifest");
        Self {
            path,
            torn_down: false,
        }
    }

    /// A subdirectory, mode 0755, optionally handed to `owner`.
    pub fn subdir(&self, name: &str, owner: Option<&str>) -> PathBuf {
        let dir = self.path.join(name);
        fs::create_dir_all(&dir).expect("create a scenario subdirectory");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).ok();
        if let Some(user) = owner {
            run(Command::new("chown")
                .arg("-R")
                .arg(format!("{user}:{user}"))
                .arg(&dir))
            .expect("chown a scenario subdirectory");
        }
        dir
    }

    /// The handle services and workers use to list what they start.
    pub fn manifest(&self) -> Manifest {
        Manifest(self.path.join("teardown"))
    }

    pub fn teardown(&mut self) {
        if !self.torn_down {
            self.torn_down = true;
            teardown_dir(&self.path);
        }
    }
}

impl Drop for ScenarioDir {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// A scenario's teardown manifest.
#[derive(Clone, Debug)]
pub struct Manifest(PathBuf);

impl Manifest {
    /// Appends a line: `pid <pid> <signal> <marker>` (stopped last-in
    /// first-out, only if the process still mentions `<marker>`),
    /// `docker <host|-> <name-prefix|*>` (containers), or
    /// `image <host|-> <reference>` (removed after the containers).
    pub fn record(&self, line: &str) {
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(&self.0)
            .expect("open the teardown manifest");
        writeln!(f, "{line}").expect("append to the teardown manifest");
    }

    pub fn record_pid(&self, pid: u32, signal: &str, marker: &str) {
        self.record(&format!("pid {pid} {signal} {marker}"));
    }

    /// The scenario directory, which every process started for the
    /// scenario mentions (in its command line or environment).
    pub fn marker(&self) -> String {
        self.0
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    }
}

/// Removes whatever a scenario directory's manifest lists, then the
/// directory: containers first, then processes (newest first), then any
/// process still mentioning the directory (a shim of the private dockerd),
/// then mounts below it.
pub fn teardown_dir(dir: &Path) {
    let marker = dir.display().to_string();
    let manifest = fs::read_to_string(dir.join("teardown")).unwrap_or_default();
    let lines: Vec<Vec<&str>> = manifest
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    for parts in lines.iter().filter(|p| p.first() == Some(&"docker")) {
        let (host, prefix) = (parts.get(1).copied(), parts.get(2).copied());
        remove_containers(host.filter(|h| *h != "-"), prefix.unwrap_or("*"));
    }
    for parts in lines.iter().filter(|p| p.first() == Some(&"image")) {
        if let (Some(host), Some(image)) = (parts.get(1), parts.get(2)) {
            let mut rmi = Command::new(docker_cli());
            if *host != "-" {
                rmi.arg("-H").arg(host);
            }
            if let Err(e) = run(rmi.args(["rmi", "-f", image])) {
                eprintln!("faults: image cleanup: {e}");
            }
        }
    }
    for parts in lines.iter().rev().filter(|p| p.first() == Some(&"pid")) {
        if let (Some(pid), Some(sig), Some(needle)) = (
            parts.get(1).and_then(|p| p.parse::<u32>().ok()),
            parts.get(2),
            parts.get(3),
        ) {
            stop_pid(pid, sig, needle, Duration::from_secs(15));
        }
    }
    // Network links the scenario created (the private engine's bridge).
    for parts in lines.iter().filter(|p| p.first() == Some(&"link")) {
        if let Some(name) = parts.get(1)
            && name.starts_with("rtmf")
            && run(Command::new("ip").args(["link", "show", name])).is_ok()
        {
            let _ = run(Command::new("ip").args(["link", "del", name]));
        }
    }
    // Anything else still naming this directory (a containerd shim).
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            if let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
                && pid != std::process::id()
                && fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|b| String::from_utf8_lossy(&b).contains(&marker))
                    .unwrap_or(false)
            {
                stop_pid(pid, "KILL", &marker, Duration::from_secs(5));
            }
        }
    }
    let mut mounts: Vec<String> = fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
        .filter(|m| m.starts_with(&marker))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mounts {
        if run(Command::new("umount").arg(&m)).is_err() {
            let _ = run(Command::new("umount").arg("-l").arg(&m));
        }
    }
    if let Err(e) = fs::remove_dir_all(dir) {
        eprintln!("faults: could not remove {}: {e}", dir.display());
    }
    // The base goes too once no scenario directory is left in it.
    let _ = fs::remove_dir(BASE);
}

/// Force-removes the containers whose names start with `prefix` (`*`: all
/// containers of that engine — used for the suite's private engine only).
pub fn remove_containers(host: Option<&str>, prefix: &str) {
    let mut ps = Command::new(docker_cli());
    if let Some(h) = host {
        ps.arg("-H").arg(h);
    }
    ps.args(["ps", "-a", "--format", "{{.ID}} {{.Names}}"]);
    let Ok(listing) = run(&mut ps) else { return };
    let ids: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, name)| prefix == "*" || name.starts_with(prefix))
        .map(|(id, _)| id)
        .collect();
    if ids.is_empty() {
        return;
    }
    let mut rm = Command::new(docker_cli());
    if let Some(h) = host {
        rm.arg("-H").arg(h);
    }
    rm.args(["rm", "-f", "-v"]).args(&ids);
    if let Err(e) = run(&mut rm) {
        eprintln!("faults: container cleanup: {e}");
    }
}

/// Tears down scenario directories left by a test process that is gone
/// (killed before its `Drop`s ran).
fn sweep_stale() {
    let Ok(entries) = fs::read_dir(BASE) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let owner = read_pid(&dir.join("owner"));
        let orphaned = match owner {
            Some(pid) => pid != std::process::id() && !pid_alive(pid),
            // No owner yet: another process may be creating it right now.
            None => fs::metadata(&dir)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_none_or(|age| age > Duration::from_secs(60)),
        };
        if orphaned && dir.is_dir() {
            eprintln!(
                "faults: sweeping leftovers of a dead run: {}",
                dir.display()
            );
            teardown_dir(&dir);
        }
    }
}
