//! Private dependency instances on spare ports, one set per scenario, so a
//! scenario may stop and restart them without touching the shared services
//! other engineers' tests use: Redis, a PostgreSQL cluster, a RabbitMQ node
//! and (for the Docker restart scenario) a second Docker engine.
//!
//! Each records its pids in the scenario's teardown manifest as it starts,
//! so `ScenarioDir`'s teardown stops it even after a panic.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use crate::procs::{
    Manifest, ScenarioDir, docker_cli, free_port, pid_alive, poll_until, read_pid, run, run_async,
    signal, tcp_open,
};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// Every service process gets this variable, so the teardown's marker check
/// finds the scenario directory in its environment.
const MARK_VAR: &str = "RTM_FAULTS_DIR";

/// Which dependency a scenario takes away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dep {
    RabbitMq,
    Redis,
    Postgres,
    Docker,
}

impl Dep {
    /// Its name in `/readyz`.
    pub fn readyz_name(self) -> &'static str {
        match self {
            Dep::RabbitMq => "broker",
            Dep::Redis => "redis",
            Dep::Postgres => "database",
            Dep::Docker => "docker",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dep::RabbitMq => "RabbitMQ",
            Dep::Redis => "Redis",
            Dep::Postgres => "PostgreSQL",
            Dep::Docker => "dockerd",
        }
    }
}

// ------------------------------------------------------------------ Redis

pub struct Redis {
    pub port: u16,
    dir: PathBuf,
    manifest: Manifest,
}

impl Redis {
    pub async fn launch(sd: &ScenarioDir) -> Result<Self, String> {
        let redis = Self {
            port: free_port(),
            dir: sd.subdir("redis", None),
            manifest: sd.manifest(),
        };
        redis.start().await?;
        Ok(redis)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn pidfile(&self) -> PathBuf {
        self.dir.join("redis.pid")
    }

    pub async fn start(&self) -> Result<(), String> {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "yes"])
            .arg("--pidfile")
            .arg(self.pidfile())
            .arg("--logfile")
            .arg(self.dir.join("redis.log"))
            .arg("--dir")
            .arg(&self.dir)
            .env(MARK_VAR, self.manifest.marker());
        run_async(cmd).await?;
        let port = self.port;
        if !poll_until(Duration::from_secs(20), || tcp_open(port)).await {
            return Err(format!("redis on port {port} did not come up"));
        }
        let pidfile = self.pidfile();
        poll_until(Duration::from_secs(5), || read_pid(&pidfile).is_some()).await;
        let pid = read_pid(&pidfile).ok_or("redis wrote no pid file")?;
        self.manifest
            .record_pid(pid, "TERM", &self.manifest.marker());
        Ok(())
    }

    /// Stops the server; its data (the leases) is gone, as after a crash
    /// of a Redis without persistence.
    pub async fn stop(&self) -> Result<(), String> {
        let pid = read_pid(&self.pidfile()).ok_or("no redis pid file")?;
        signal(pid, "KILL");
        if !poll_until(Duration::from_secs(15), || !pid_alive(pid)).await {
            return Err(format!("redis {pid} did not exit"));
        }
        let _ = std::fs::remove_file(self.pidfile());
        Ok(())
    }
}

// ------------------------------------------------------------- PostgreSQL

pub struct Postgres {
    pub port: u16,
    data: PathBuf,
    sock: PathBuf,
    manifest: Manifest,
}

impl Postgres {
    pub async fn launch(sd: &ScenarioDir) -> Result<Self, String> {
        let root = sd.subdir("pg", Some("postgres"));
        let pg = Self {
            port: free_port(),
            data: root.join("data"),
            sock: root.clone(),
            manifest: sd.manifest(),
        };
        let mut initdb = Command::new("runuser");
        initdb
            .args(["-u", "postgres", "--"])
            .arg(format!("{PG_BIN}/initdb"))
            .arg("-D")
            .arg(&pg.data)
            .args(["--auth=trust", "-U", "postgres", "--no-sync"])
            .current_dir("/tmp");
        run_async(initdb).await?;
        pg.start().await?;
        Ok(pg)
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    fn pg_ctl(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"])
            .arg(format!("{PG_BIN}/pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(args)
            .env(MARK_VAR, self.manifest.marker())
            .current_dir("/tmp");
        cmd
    }

    pub async fn start(&self) -> Result<(), String> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
            self.sock.display()
        );
        let log = self.sock.join("postgres.log").display().to_string();
        run_async(self.pg_ctl(&["-o", &options, "-l", &log, "-w", "-t", "60", "start"])).await?;
        let pid = read_pid(&self.data.join("postmaster.pid")).ok_or("no postmaster.pid")?;
        self.manifest
            .record_pid(pid, "QUIT", &self.data.display().to_string());
        Ok(())
    }

    /// An immediate shutdown: every backend dies at once, as in a crash;
    /// the next start replays the WAL.
    pub async fn stop(&self) -> Result<(), String> {
        run_async(self.pg_ctl(&["-m", "immediate", "-w", "-t", "60", "stop"])).await?;
        Ok(())
    }
}

// --------------------------------------------------------------- RabbitMQ

pub struct Rabbit {
    pub port: u16,
    dist_port: u16,
    node: String,
    dir: PathBuf,
    manifest: Manifest,
}

impl Rabbit {
    pub async fn launch(sd: &ScenarioDir, id: &str) -> Result<Self, String> {
        let dir = sd.path.join("rmq");
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let port = free_port();
        let mut dist_port = free_port();
        while dist_port == port {
            dist_port = free_port();
        }
        // The shared node's /etc/rabbitmq/rabbitmq.conf pins 5672: ours
        // names its own listener. No plugins (no management listener).
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.local = 127.0.0.1:{port}\nloopback_users = none\n"),
        )
        .map_err(|e| e.to_string())?;
        std::fs::write(dir.join("enabled_plugins"), "[].\n").map_err(|e| e.to_string())?;
        let dir = sd.subdir("rmq", Some("rabbitmq"));
        let rabbit = Self {
            port,
            dist_port,
            node: format!("rtmfault{id}@localhost"),
            dir,
            manifest: sd.manifest(),
        };
        rabbit.start().await?;
        Ok(rabbit)
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn pidfile(&self) -> PathBuf {
        self.dir.join("node.pid")
    }

    pub async fn start(&self) -> Result<(), String> {
        let d = |f: &str| self.dir.join(f).display().to_string();
        let mut cmd = Command::new("/usr/sbin/rabbitmq-server");
        cmd.arg("-detached")
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", d("mnesia"))
            .env("RABBITMQ_LOG_BASE", d("log"))
            .env("RABBITMQ_PID_FILE", d("node.pid"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", d("rabbitmq.conf"))
            .env("RABBITMQ_CONF_ENV_FILE", "/dev/null")
            .env(MARK_VAR, self.manifest.marker())
            .current_dir("/tmp")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        run_async(cmd).await?;
        let port = self.port;
        if !poll_until(Duration::from_secs(90), || tcp_open(port)).await {
            return Err(format!(
                "rabbitmq node {} did not listen on {port} within 90 s; log: {}",
                self.node,
                tail_file(&self.dir.join("log").join(format!("{}.log", self.node)), 20)
            ));
        }
        let pidfile = self.pidfile();
        poll_until(Duration::from_secs(10), || read_pid(&pidfile).is_some()).await;
        let pid = read_pid(&pidfile).ok_or("rabbitmq wrote no pid file")?;
        self.manifest
            .record_pid(pid, "TERM", &self.dir.display().to_string());
        Ok(())
    }

    /// A clean stop of the node (`rabbitmqctl stop`); durable queues and
    /// persistent messages survive it.
    pub async fn stop(&self) -> Result<(), String> {
        let pid = read_pid(&self.pidfile());
        let mut cmd = Command::new("/usr/sbin/rabbitmqctl");
        cmd.args(["-n", &self.node, "stop"]).current_dir("/tmp");
        run_async(cmd).await?;
        let port = self.port;
        let gone = poll_until(Duration::from_secs(30), || {
            !tcp_open(port) && pid.is_none_or(|p| !pid_alive(p))
        })
        .await;
        if !gone {
            return Err(format!("rabbitmq node {} did not stop", self.node));
        }
        Ok(())
    }
}

impl Rabbit {
    /// Raises (or clears) the node's memory alarm: with the high watermark
    /// at 0 the broker blocks every connection that publishes, so a publish
    /// in flight is neither taken nor confirmed until it is cleared (the
    /// default watermark, 0.4, again).
    pub async fn block_publishers(&self, blocked: bool) -> Result<(), String> {
        let mut cmd = Command::new("/usr/sbin/rabbitmqctl");
        cmd.args(["-n", &self.node, "set_vm_memory_high_watermark"])
            .arg(if blocked { "0" } else { "0.4" })
            .current_dir("/tmp");
        run_async(cmd).await.map(|_| ())
    }
}

// ----------------------------------------------------- a private dockerd

/// A second Docker engine (own data root, exec root, socket, pid file,
/// containerd and default bridge; no iptables; live-restore) with the test
/// images copied in.
///
/// Never `--bridge=none`: on start-up dockerd then *deletes* the host's
/// `docker0`, the shared engine's bridge. The private engine gets a bridge
/// of its own (`-b`), created here and deleted at teardown, and the
/// shared `docker0` is checked after every start and stop of it.
pub struct PrivateDocker {
    pub host: String,
    bridge: String,
    shared_bridge: Option<String>,
    dir: PathBuf,
    child: Mutex<Option<Child>>,
    manifest: Manifest,
}

impl PrivateDocker {
    pub async fn launch(sd: &ScenarioDir, id: &str, images: &[&str]) -> Result<Self, String> {
        let dir = sd.subdir("dk", None);
        std::fs::write(dir.join("daemon.json"), "{}\n").map_err(|e| e.to_string())?;
        let docker = Self {
            host: format!("unix://{}", dir.join("docker.sock").display()),
            bridge: format!("rtmfb{id}"),
            shared_bridge: docker0_address(),
            dir,
            child: Mutex::new(None),
            manifest: sd.manifest(),
        };
        // A subnet of its own, clear of the shared engine's docker0.
        let subnet = format!("10.251.{}.1/24", 1 + rand_byte() % 250);
        docker.manifest.record(&format!("link {}", docker.bridge));
        for args in [
            vec!["link", "add", "name", &docker.bridge, "type", "bridge"],
            vec!["addr", "add", &subnet, "dev", &docker.bridge],
            vec!["link", "set", &docker.bridge, "up"],
        ] {
            run(Command::new("ip").args(&args))?;
        }
        docker.manifest.record(&format!("docker {} *", docker.host));
        docker.start().await?;
        // `docker save | docker -H … load`: the test images, no registry.
        let save = format!(
            "{cli} save {imgs} | {cli} -H {host} load",
            cli = docker_cli(),
            imgs = images.join(" "),
            host = docker.host
        );
        let mut load = Command::new("bash");
        load.args(["-o", "pipefail", "-c", &save]);
        run_async(load).await?;
        Ok(docker)
    }

    /// Errs (after putting it back) if the shared engine's docker0 is gone.
    fn check_shared_bridge(&self) -> Result<(), String> {
        let Some(address) = &self.shared_bridge else {
            return Ok(());
        };
        if docker0_address().is_some() {
            return Ok(());
        }
        for args in [
            vec!["link", "add", "name", "docker0", "type", "bridge"],
            vec!["addr", "add", address.as_str(), "dev", "docker0"],
            vec!["link", "set", "docker0", "up"],
        ] {
            let _ = run(Command::new("ip").args(&args));
        }
        Err(format!(
            "the private dockerd removed the shared engine's docker0 (restored it with {address})"
        ))
    }

    pub async fn start(&self) -> Result<(), String> {
        let d = |f: &str| self.dir.join(f).display().to_string();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("dockerd.log"))
            .map_err(|e| e.to_string())?;
        let child = {
            use std::os::unix::process::CommandExt as _;
            Command::new("dockerd")
                .args(["--data-root", &d("data"), "--exec-root", &d("exec")])
                .args(["-H", &self.host, "--pidfile", &d("docker.pid")])
                .args(["--iptables=false", "--ip-masq=false", "--ip-forward=false"])
                .args(["-b", &self.bridge, "--live-restore"])
                .args(["--config-file", &d("daemon.json")])
                .env(MARK_VAR, self.manifest.marker())
                .stdin(Stdio::null())
                .stdout(log.try_clone().map_err(|e| e.to_string())?)
                .stderr(log)
                .process_group(0)
                .spawn()
                .map_err(|e| format!("spawn dockerd: {e}"))?
        };
        self.manifest
            .record_pid(child.id(), "TERM", &self.dir.display().to_string());
        *self.child.lock().unwrap() = Some(child);
        let host = self.host.clone();
        let up = poll_until(Duration::from_secs(60), || {
            Command::new(docker_cli())
                .args(["-H", &host, "version"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .await;
        self.check_shared_bridge()?;
        if up {
            Ok(())
        } else {
            Err(format!(
                "private dockerd did not answer within 60 s: {}",
                tail_file(&self.dir.join("dockerd.log"), 20)
            ))
        }
    }

    /// SIGTERM; with live-restore the containers keep running meanwhile.
    pub async fn stop(&self) -> Result<(), String> {
        let child = self.child.lock().unwrap().take();
        let Some(mut child) = child else {
            return Err("the private dockerd is not running".into());
        };
        signal(child.id(), "TERM");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return self.check_shared_bridge();
            }
            if std::time::Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err("the private dockerd ignored SIGTERM for 30 s".into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for PrivateDocker {
    fn drop(&mut self) {
        // Reap our child if the teardown already stopped it (no zombie).
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.try_wait();
        }
    }
}

/// The shared engine's bridge address (`172.17.0.1/16`), if it exists.
fn docker0_address() -> Option<String> {
    let out = run(Command::new("ip").args(["-4", "-o", "addr", "show", "dev", "docker0"])).ok()?;
    out.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .map(str::to_owned)
}

fn rand_byte() -> u8 {
    uuid::Uuid::new_v4().as_bytes()[0]
}

/// The last `lines` lines of a file, for error messages.
pub fn tail_file(path: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Checks the tools the suite drives are installed.
pub fn preflight() -> Result<(), String> {
    for tool in [
        "redis-server",
        "runuser",
        "ip",
        "tar",
        "/usr/sbin/rabbitmq-server",
        "/usr/sbin/rabbitmqctl",
        &format!("{PG_BIN}/initdb"),
    ] {
        let found = if tool.starts_with('/') {
            std::path::Path::new(tool).exists()
        } else {
            run(Command::new("sh").args(["-c", &format!("command -v {tool}")])).is_ok()
        };
        if !found {
            return Err(format!("{tool} is missing: run `make deps`"));
        }
    }
    Ok(())
}
