//! End-to-end: `sidemesh install` prints parseable manifests with a fresh webhook certificate
//! each run, and `--cert-manager` prints exactly what `deploy/sidemesh.yaml` holds.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.
use std::process::Command;

fn install(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_sidemesh"))
        .arg("install")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn install_prints_every_kind_with_a_fresh_certificate() {
    let a = install(&[]);
    for kind in [
        "kind: Namespace",
        "kind: CustomResourceDefinition",
        "kind: ServiceAccount",
        "kind: ClusterRole",
        "kind: ClusterRoleBinding",
        "kind: Secret",
        "kind: Deployment",
        "kind: Service",
        "kind: MutatingWebhookConfiguration",
    ] {
        assert!(a.contains(kind), "missing {kind}");
    }
    assert!(a.contains("BEGIN PRIVATE KEY"));
    let b = install(&[]);
    assert_ne!(a, b, "each install generates its own CA and key");
}

#[test]
fn install_cert_manager_matches_deploy() {
    let printed = install(&["--cert-manager"]);
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/sidemesh.yaml"))
            .unwrap();
    assert_eq!(printed, committed);
    assert!(!printed.contains("PRIVATE KEY"));
}
