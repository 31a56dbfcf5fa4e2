//! Shared helpers for the end-to-end tests: start the built `sidemesh` binary, wait for its
//! ready line, and kill it when the test is done (also when it fails).
//!
//! Every `sidemesh` subcommand that serves prints exactly one machine-readable ready line on
//! stdout once it listens: a JSON object with `"ready": "<component>"` and its bound
//! addresses, e.g. `{"ready":"discover","listen":"127.0.0.1:40123"}`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// A running `sidemesh` process, killed on drop.
pub struct Sidemesh {
    child: Child,
    /// The ready line, parsed.
    pub ready: serde_json::Value,
    /// Further stdout lines, as they come.
    pub stdout: mpsc::Receiver<String>,
}

impl Sidemesh {
    /// Starts `sidemesh <args>` with extra environment and waits (at most 30 s) for its
    /// ready line. Panics with the process's stderr if it exits or never gets ready.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Sidemesh {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sidemesh"));
        cmd.args(args)
            .envs(env.iter().copied())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("spawn sidemesh");
        let stdout = child.stdout.take().expect("stdout is piped");
        let rx = pump(stdout);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                        if v.get("ready").is_some() {
                            return Sidemesh {
                                child,
                                ready: v,
                                stdout: rx,
                            };
                        }
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait().ok();
                    panic!(
                        "sidemesh {args:?} printed no ready line within 30 s (exit: {status:?})"
                    );
                }
            }
        }
    }

    /// A string field of the ready line, e.g. `addr("listen")`.
    pub fn addr(&self, key: &str) -> String {
        self.ready[key]
            .as_str()
            .unwrap_or_else(|| panic!("ready line {} has no {key:?}", self.ready))
            .to_owned()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits (at most `within`) for the exit status.
    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Sidemesh {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pump(stdout: ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Polls `f` every 20 ms until it returns `Some`, for at most `within`.
pub fn eventually<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// One HTTP/1.1 GET on a fresh connection (10 s read timeout): the status and the whole
/// answer, head included; `(0, "")` when the peer closed without answering.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return (0, String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, out)
}

/// The value of the first `/metrics` line at `addr` that starts with `line_start` (the
/// metric name with its labels and the space before the value).
pub fn metric(addr: &str, line_start: &str) -> Option<f64> {
    http_get(addr, "/metrics")
        .1
        .lines()
        .find_map(|l| l.strip_prefix(line_start))
        .and_then(|v| v.trim().parse().ok())
}

/// Starts `sidemesh discover` on `127.0.0.1:0` with the state file `state`, the data
/// directory `data`, extra flags and environment.
pub fn start_discover(
    state: &std::path::Path,
    data: &std::path::Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Sidemesh {
    let mut args = vec![
        "discover",
        "--state",
        state.to_str().expect("a UTF-8 path"),
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().expect("a UTF-8 path"),
    ];
    args.extend_from_slice(extra);
    Sidemesh::start(&args, env)
}

/// Waits (at most `within`) until the sidecar whose admin address is `admin` answers
/// `/ready` 200 and holds a certificate; panics otherwise.
pub fn wait_ready_with_certificate(admin: &str, within: Duration) {
    eventually(within, || {
        let cert = metric(
            admin,
            "sidemesh_proxy_tls_certificate_expiry_timestamp_seconds ",
        )?;
        (http_get(admin, "/ready").0 == 200 && cert > 0.0).then_some(())
    })
    .unwrap_or_else(|| panic!("the sidecar at {admin} is not ready with a certificate"));
}

/// A port free on `ip` right now (bound and released), for a process to listen on.
pub fn free_port(ip: std::net::Ipv4Addr) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port on {ip}: {e}"))
}
