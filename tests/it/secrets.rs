//! SPEC §9 from outside, on the real binary: a password never reaches the
//! worker's output whatever characters it holds, and a URL its driver cannot
//! parse stops start-up with a message naming the variable instead of being
//! retried as if the server were down.

use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{TestDb, admin_database_url, test_amqp, unique, worker_env};

/// A password holding every character that ends a URL's authority, as
/// written percent-encoded (parseable) and as it decodes.
const ENCODED: &str = "s3%2Fcr%3Fe%23t%40x";
const DECODED: &str = "s3/cr?e#t@x";

/// Runs `rtmanager serve` with `env` for at most `limit`, then kills it;
/// returns its exit code (if it exited by itself) and everything it printed.
fn run_serve(env: &[(String, String)], limit: Duration) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rtmanager"))
        .arg("serve")
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start rtmanager serve");
    let deadline = Instant::now() + limit;
    let code = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status.code();
        }
        if Instant::now() >= deadline {
            child.kill().ok();
            child.wait().ok();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut out = String::new();
    child.stdout.take().map(|mut s| s.read_to_string(&mut out));
    child.stderr.take().map(|mut s| s.read_to_string(&mut out));
    (code, out)
}

fn closed_port() -> u16 {
    crate::procs::free_port()
}

fn base_env(database_url: String) -> Vec<(String, String)> {
    let state = tempfile::tempdir().expect("state dir").keep();
    let amqp = test_amqp(&unique("secrets"));
    let mut env: Vec<(String, String)> =
        worker_env(&database_url, &amqp, &format!("{}-", unique("sec")), &state)
            .into_iter()
            .collect();
    env.retain(|(k, _)| k != "RTM_RETRY_FOR");
    env.push(("RTM_RETRY_FOR".into(), "30s".into()));
    env
}

fn set(env: &mut Vec<(String, String)>, key: &str, value: String) {
    env.retain(|(k, _)| k != key);
    env.push((key.into(), value));
}

fn assert_no_password(out: &str) {
    for secret in [ENCODED, DECODED, "s3%2F", "s3/cr", "e#t@x"] {
        assert!(
            !out.contains(secret),
            "the password ({secret}) was printed:\n{out}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_never_reaches_the_worker_s_output_on_any_retry() {
    // Unencoded, yet parseable: `postgres:5432` reads as host and port, the
    // rest of the password as path, query and fragment. Start-up retries
    // the host that does not resolve, warning each time.
    let env = base_env(format!(
        "postgres://postgres:5432/pw?x#yz@127.0.0.1:{}/rtm",
        closed_port()
    ));
    let (code, out) = tokio::task::spawn_blocking(move || run_serve(&env, Duration::from_secs(14)))
        .await
        .unwrap();
    assert_eq!(code, None, "still retrying PostgreSQL:\n{out}");
    assert!(out.contains("PostgreSQL"), "no retry warning:\n{out}");
    for secret in ["pw?x", "x#yz", "/pw"] {
        assert!(!out.contains(secret), "the password was printed:\n{out}");
    }

    // PostgreSQL unreachable: start-up retries it, warning each time.
    let mut env = base_env(format!(
        "postgres://postgres:{ENCODED}@127.0.0.1:{}/rtm",
        closed_port()
    ));
    let (code, out) = tokio::task::spawn_blocking(move || run_serve(&env, Duration::from_secs(14)))
        .await
        .unwrap();
    assert_eq!(code, None, "still retrying PostgreSQL:\n{out}");
    assert!(out.contains("PostgreSQL"), "no retry warning:\n{out}");
    assert_no_password(&out);

    // PostgreSQL up (trust auth ignores the password); the broker and Redis
    // unreachable: the consumer, the relay and the probes warn.
    let db = TestDb::new().await;
    let database_url = db.url.replacen("@", &format!(":{ENCODED}@"), 1);
    assert_ne!(database_url, db.url, "{}", admin_database_url());
    env = base_env(database_url);
    set(
        &mut env,
        "RTM_AMQP_URL",
        format!("amqp://guest:{ENCODED}@127.0.0.1:{}/%2f", closed_port()),
    );
    set(
        &mut env,
        "RTM_REDIS_URL",
        format!("redis://:{ENCODED}@127.0.0.1:{}", closed_port()),
    );
    let (code, out) = tokio::task::spawn_blocking(move || run_serve(&env, Duration::from_secs(6)))
        .await
        .unwrap();
    assert_eq!(code, None, "still running:\n{out}");
    assert!(
        out.contains("RabbitMQ") || out.contains("broker"),
        "no broker warning:\n{out}"
    );
    assert_no_password(&out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unparseable_url_stops_start_up_naming_the_variable() {
    for (var, url) in [
        (
            "DATABASE_URL",
            format!("postgres://postgres:{DECODED}@127.0.0.1:5432/rtm"),
        ),
        (
            "RTM_REDIS_URL",
            format!("redis://:{DECODED}@127.0.0.1:6379"),
        ),
        (
            "RTM_AMQP_URL",
            format!("amqp://guest:{DECODED}@127.0.0.1:5672/%2f"),
        ),
    ] {
        let mut env = base_env(admin_database_url());
        set(&mut env, var, url);
        let (code, out) =
            tokio::task::spawn_blocking(move || run_serve(&env, Duration::from_secs(10)))
                .await
                .unwrap();
        assert_eq!(
            code,
            Some(2),
            "{var}: start-up must stop at once (RTM_RETRY_FOR is 30s):\n{out}"
        );
        assert!(out.contains(var), "{var} is not named:\n{out}");
        assert!(out.contains("cannot be parsed"), "{out}");
        assert_no_password(&out);
    }
}
