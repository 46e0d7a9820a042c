//! Where the time goes: CPU seconds per component over a phase (the worker
//! by pid; PostgreSQL, RabbitMQ, Redis and Docker by process name, every
//! process of that name summed), read from `/proc`, and the machine's busy
//! share over the same window. What a missed target's note is made of.

use std::collections::BTreeMap;
use std::time::Instant;

/// The components, by `/proc/<pid>/comm`.
const COMPONENTS: [(&str, &str); 5] = [
    ("PostgreSQL", "postgres"),
    ("RabbitMQ", "beam.smp"),
    ("Redis", "redis-server"),
    ("dockerd", "dockerd"),
    ("containerd", "containerd"),
];

/// The worker's name among the components.
const WORKER: &str = "rtmanager worker";

/// CPU seconds so far, per component, and the machine's busy and total
/// jiffies.
pub struct Cpu {
    at: Instant,
    per: BTreeMap<String, f64>,
    machine: (u64, u64),
}

/// Clock ticks per second of `/proc/*/stat` times (USER_HZ: 100 on every
/// Linux this runs on).
const TICKS: f64 = 100.0;

impl Cpu {
    /// A sample now; `worker` is the rtmanager worker's pid.
    pub fn sample(worker: u32) -> Self {
        let mut per = BTreeMap::new();
        per.insert(WORKER.to_owned(), process_seconds(worker));
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if let Some((name, _)) = COMPONENTS.iter().find(|(_, c)| comm.trim() == *c) {
                *per.entry((*name).to_owned()).or_default() += process_seconds(pid);
            }
        }
        Self {
            at: Instant::now(),
            per,
            machine: machine_jiffies(),
        }
    }

    /// From `before` to this sample, for `commands` commands: one line per
    /// component (CPU ms per command and share of one core), the machine's
    /// busy share, and what no listed component used (the bench itself,
    /// other processes on the machine).
    pub fn since(&self, before: &Cpu, commands: usize) -> String {
        let wall = self.at.duration_since(before.at).as_secs_f64().max(1e-9);
        let n = commands.max(1) as f64;
        let mut parts = Vec::new();
        let mut listed = 0.0;
        for (name, now) in &self.per {
            let used = (now - before.per.get(name).copied().unwrap_or(0.0)).max(0.0);
            listed += used;
            if used > 0.0 {
                parts.push(format!(
                    "{name} {:.2} ms/command ({:.0} % of a core)",
                    used * 1000.0 / n,
                    used / wall * 100.0
                ));
            }
        }
        let machine_busy = self.busy_since(before);
        let other = (machine_busy * cores() * wall - listed).max(0.0);
        format!(
            "{}; everything else (the bench, other processes) {:.2} ms/command; the machine {:.0} % busy over {:.1} s",
            parts.join(", "),
            other * 1000.0 / n,
            machine_busy * 100.0,
            wall
        )
    }

    /// CPU ms per command that `components` spent together from `before`.
    pub fn ms_per_command(&self, before: &Cpu, commands: usize, components: &[&str]) -> f64 {
        let used: f64 = components
            .iter()
            .map(|c| {
                let at = |s: &Cpu| s.per.get(*c).copied().unwrap_or(0.0);
                (at(self) - at(before)).max(0.0)
            })
            .sum();
        used * 1000.0 / commands.max(1) as f64
    }

    /// The machine's busy share from `before` (0 to 1).
    pub fn busy_since(&self, before: &Cpu) -> f64 {
        let busy = self.machine.0.saturating_sub(before.machine.0) as f64;
        let total = self.machine.1.saturating_sub(before.machine.1) as f64;
        if total > 0.0 { busy / total } else { 0.0 }
    }

    /// The rate no worker could pass in the window from `before`, however
    /// cheap: the cores over the CPU per command that everything but the
    /// worker spent (the services, the bench publishing and consuming,
    /// other processes), with the ms per command it is made of. `None`
    /// without a busy machine to measure.
    pub fn ceiling_without_worker(&self, before: &Cpu, commands: usize) -> Option<(f64, f64)> {
        let wall = self.at.duration_since(before.at).as_secs_f64();
        let worker = self.ms_per_command(before, 1, &[WORKER]) / 1000.0;
        let rest = self.busy_since(before) * cores() * wall - worker;
        (rest > 0.0 && commands > 0).then(|| {
            let per_command = rest / commands as f64;
            (cores() / per_command, per_command * 1000.0)
        })
    }
}

/// The cores the machine has.
fn cores() -> f64 {
    std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64)
}

/// utime + stime of `pid`, in seconds (0 once it is gone).
fn process_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The command name (field 2) may hold spaces: count from its ')'.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of the line are 12 and 13 after the name.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / TICKS
}

/// (busy, total) jiffies of the whole machine, from `/proc/stat`.
fn machine_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().next() else {
        return (0, 0);
    };
    let values: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = values.iter().sum();
    // idle and iowait.
    let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
    (total - idle, total)
}
