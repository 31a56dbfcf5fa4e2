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
