//! Jobs finish without native sidecars: the fallback for clusters before Kubernetes 1.29.
//!
//! A regular sidecar container keeps a Job's pod running after the app exits. On such
//! clusters the injector wraps both sides with small supervisors from the sidemesh binary,
//! which meet through files in a shared `emptyDir`:
//! - `sidemesh copy-self` (an init container from the sidemesh image) copies the binary into
//!   the shared volume, so the app container can run it whatever its image;
//! - `sidemesh job-run --done-file F -- CMD...` runs the app's command and, when it exits,
//!   writes `F` and exits with the app's status;
//! - `sidemesh job-sidecar --done-file F... -- CMD...` runs the proxy and, once every done
//!   file exists, stops it and exits 0, so the pod completes.
//!
//! Only containers with an explicit `command` can be wrapped (an image's entrypoint is not
//! in the pod spec); the injector warns about the others.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

/// `sidemesh copy-self`.
#[derive(clap::Args, Debug)]
pub struct CopySelfArgs {
    /// Where to put the copy (made executable).
    #[arg(long, env = "SIDEMESH_COPY_TO")]
    pub to: PathBuf,
}

/// Copies the running binary to `args.to`.
pub fn copy_self(args: CopySelfArgs) -> anyhow::Result<()> {
    let me = std::env::current_exe().context("cannot find the sidemesh binary")?;
    let tmp = args.to.with_extension("tmp");
    std::fs::copy(&me, &tmp).with_context(|| format!("cannot copy to {}", tmp.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    }
    // Rename so the app never sees a half-written binary.
    std::fs::rename(&tmp, &args.to)?;
    Ok(())
}

/// `sidemesh job-run`.
#[derive(clap::Args, Debug)]
pub struct JobRunArgs {
    /// Written when the command exits.
    #[arg(long, env = "SIDEMESH_DONE_FILE")]
    pub done_file: PathBuf,
    /// The app's command and arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// Runs the app's command, writes the done file when it exits, and returns its exit code.
pub async fn job_run(args: JobRunArgs) -> anyhow::Result<i32> {
    let (program, rest) = args.command.split_first().context("no command to run")?;
    let mut child = tokio::process::Command::new(program)
        .args(rest)
        .spawn()
        .with_context(|| format!("cannot run {program}"))?;
    let code = tokio::select! {
        status = child.wait() => status.map(exit_code).unwrap_or(1),
        _ = terminated() => {
            // The pod is being deleted: pass it on (the kubelet kills us after the grace
            // period anyway) and still tell the sidecar.
            let _ = child.start_kill();
            child.wait().await.map(exit_code).unwrap_or(143)
        }
    };
    write_done(&args.done_file, code)?;
    Ok(code)
}

/// `sidemesh job-sidecar`.
#[derive(clap::Args, Debug)]
pub struct JobSidecarArgs {
    /// Done files to wait for (one per wrapped app container).
    #[arg(
        long = "done-file",
        env = "SIDEMESH_DONE_FILES",
        value_delimiter = ',',
        required = true
    )]
    pub done_files: Vec<PathBuf>,
    /// How often the done files are checked, in milliseconds.
    #[arg(long, env = "SIDEMESH_DONE_POLL_MS", default_value_t = 200)]
    pub poll_ms: u64,
    /// The sidecar's command (the proxy) and arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// Runs the sidecar; returns 0 once every done file exists (after stopping the sidecar), or
/// the sidecar's own exit code if it exits first.
pub async fn job_sidecar(args: JobSidecarArgs) -> anyhow::Result<i32> {
    let (program, rest) = args.command.split_first().context("no command to run")?;
    let mut child = tokio::process::Command::new(program)
        .args(rest)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot run {program}"))?;
    let every = Duration::from_millis(args.poll_ms.max(10));
    let all_done = async {
        loop {
            if args.done_files.iter().all(|f| f.exists()) {
                return;
            }
            tokio::time::sleep(every).await;
        }
    };
    tokio::select! {
        status = child.wait() => Ok(status.map(exit_code).unwrap_or(1)),
        _ = all_done => {
            tracing::info!("every app container exited; stopping the sidecar so the Job completes");
            let _ = child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
            Ok(0)
        }
    }
}

fn write_done(path: &Path, code: i32) -> anyhow::Result<()> {
    std::fs::write(path, format!("{code}\n"))
        .with_context(|| format!("cannot write {}", path.display()))
}

fn exit_code(s: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0))
}

async fn terminated() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending::<()>().await,
    }
}
