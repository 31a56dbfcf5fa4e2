//! End-to-end: the Job fallback for clusters without native sidecars. `job-run` runs the app
//! and leaves a done file; `job-sidecar` stops the proxy once every done file exists, so the
//! pod completes; `copy-self` puts the binary into the shared volume.
#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

fn sidemesh() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sidemesh"))
}

/// Waits (bounded) for a child to exit; kills it and fails if it does not.
fn wait_bounded(mut child: Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("process {} did not exit within {within:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sidecar_stops_when_the_app_is_done() {
    let dir = tempfile::tempdir().unwrap();
    let done = dir.path().join("app.done");
    let sidecar = sidemesh()
        .args(["job-sidecar", "--poll-ms", "20", "--done-file"])
        .arg(&done)
        .args(["--", "sleep", "60"])
        .spawn()
        .unwrap();
    let app = sidemesh()
        .args(["job-run", "--done-file"])
        .arg(&done)
        .args(["--", "sh", "-c", "exit 3"])
        .status()
        .unwrap();
    assert_eq!(app.code(), Some(3), "the app's exit code is kept");
    assert_eq!(std::fs::read_to_string(&done).unwrap(), "3\n");
    let status = wait_bounded(sidecar, Duration::from_secs(15));
    assert_eq!(status.code(), Some(0));
}

#[test]
fn sidecar_that_exits_first_keeps_its_code() {
    let dir = tempfile::tempdir().unwrap();
    let sidecar = sidemesh()
        .args(["job-sidecar", "--done-file"])
        .arg(dir.path().join("never.done"))
        .args(["--", "sh", "-c", "exit 4"])
        .spawn()
        .unwrap();
    assert_eq!(
        wait_bounded(sidecar, Duration::from_secs(15)).code(),
        Some(4)
    );
}

#[test]
fn copy_self_makes_a_runnable_copy() {
    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("sidemesh");
    let ok = sidemesh()
        .args(["copy-self", "--to"])
        .arg(&to)
        .status()
        .unwrap();
    assert!(ok.success());
    let out = Command::new(&to).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("sidemesh "));
}
