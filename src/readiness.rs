//! What `/readyz` reports: the last known state of each dependency. Its
//! own module because its writers are on both sides — the probes in
//! `serve`, the consumer (inbound) and the relay (outbound) — and its reader
//! is HTTP. Here, outbound need not depend on inbound to report.

use std::sync::atomic::{AtomicBool, Ordering};

/// The last known state of each dependency, written by the probes, the
/// consumer and the relay, read by `/readyz`.
#[derive(Debug, Default)]
pub struct Readiness {
    pub broker: AtomicBool,
    pub database: AtomicBool,
    pub redis: AtomicBool,
    pub docker: AtomicBool,
}

impl Readiness {
    pub fn set(flag: &AtomicBool, up: bool) {
        flag.store(up, Ordering::Relaxed);
    }

    /// `(name, up)` for every dependency, in a stable order.
    pub fn states(&self) -> [(&'static str, bool); 4] {
        [
            ("broker", self.broker.load(Ordering::Relaxed)),
            ("database", self.database.load(Ordering::Relaxed)),
            ("redis", self.redis.load(Ordering::Relaxed)),
            ("docker", self.docker.load(Ordering::Relaxed)),
        ]
    }

    pub fn ready(&self) -> bool {
        self.states().iter().all(|(_, up)| *up)
    }
}
