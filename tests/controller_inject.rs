//! End-to-end: `sidemesh inject -f` on realistic manifests, from a file and from stdin.

use std::io::Write;
use std::process::{Command, Stdio};

const WORKLOADS: &str = "controller/testdata/workloads.yaml";
const CATALOG: &str = "controller/testdata/catalog.yaml";

fn sidemesh() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sidemesh"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    c
}

#[test]
fn inject_file_prints_injected_manifests_and_a_summary() {
    let out = sidemesh()
        .args(["inject", "-f", WORKLOADS, "--catalog", CATALOG])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("deployment/web injected (ports 8080"),
        "{stderr}"
    );
    assert!(
        stderr.contains("daemonset/node-agent skipped: opted out"),
        "{stderr}"
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.matches("\n---\n").count(), 8, "nine documents out");
    assert!(stdout.contains("name: plugin-code-pull"));
    assert!(stdout.contains("sidemesh.io/port-map"));
}

#[test]
fn inject_stdin_twice_changes_nothing_the_second_time() {
    let run = |input: &[u8], native: &str| {
        let mut child = sidemesh()
            .args([
                "inject",
                "-f",
                "-",
                "--catalog",
                CATALOG,
                "--native-sidecars",
                native,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            out.stdout,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let input = std::fs::read(format!("{}/{WORKLOADS}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let (once, _) = run(&input, "false");
    let text = String::from_utf8_lossy(&once);
    assert!(
        text.contains("wait-ready"),
        "legacy mode holds the app with postStart"
    );
    let (twice, summary) = run(&once, "false");
    assert_eq!(once, twice);
    assert!(
        summary.contains("deployment/web already injected"),
        "{summary}"
    );
}

#[test]
fn inject_refuses_what_it_cannot_handle() {
    let mut child = sidemesh()
        .args(["inject", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"kind: Pod\nmetadata: {name: p}\nspec:\n  hostNetwork: true\n  containers: [{name: a, image: a}]\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("pod/p: hostNetwork pods cannot be meshed"),
        "{stderr}"
    );
}
