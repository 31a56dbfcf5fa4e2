//! End-to-end: `sidemesh install` prints parseable manifests with a fresh webhook certificate
//! each run, `--cert-manager` prints exactly what `deploy/sidemesh.yaml` holds, and
//! `--mesh-ca` puts the mesh CA into a Secret the controller mounts.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a failed unwrap is a failed test.

mod common;

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

/// `--mesh-ca generate` prints the mesh CA as a Secret the controller mounts and uses; a CA
/// made that way is one discover signs with (its config's trust bundle).
#[test]
fn install_mesh_ca_generate_prints_a_secret_discover_accepts() {
    let printed = install(&["--mesh-ca", "generate"]);
    for want in [
        "name: sidemesh-mesh-ca",
        "SIDEMESH_CA_CERT",
        "/var/run/sidemesh/mesh-ca/ca.key",
        "secretName: sidemesh-mesh-ca",
    ] {
        assert!(printed.contains(want), "missing {want}");
    }
    assert_eq!(
        printed.matches("BEGIN PRIVATE KEY").count(),
        2,
        "webhook and mesh CA keys"
    );
    let secret = install(&["--cert-manager", "--mesh-ca", "secret"]);
    assert!(secret.contains("secretName: sidemesh-mesh-ca") && !secret.contains("PRIVATE KEY"));
    assert!(
        Command::new(env!("CARGO_BIN_EXE_sidemesh"))
            .args(["install", "--mesh-ca", "sometimes"])
            .output()
            .unwrap()
            .status
            .code()
            == Some(2),
        "an unknown --mesh-ca value is a usage error"
    );

    let sidemesh_controller::install::MeshCa::Generated { cert_pem, key_pem } =
        sidemesh_controller::install::generate_mesh_ca().unwrap()
    else {
        unreachable!()
    };
    let dir = tempfile::tempdir().unwrap();
    let (crt, key, state) = (
        dir.path().join("ca.crt"),
        dir.path().join("ca.key"),
        dir.path().join("state.yaml"),
    );
    std::fs::write(&crt, &cert_pem).unwrap();
    std::fs::write(&key, &key_pem).unwrap();
    std::fs::write(&state, "services: [{namespace: shop, name: web}]\n").unwrap();
    let d = common::start_discover(
        &state,
        &dir.path().join("data"),
        &[
            "--ca-cert",
            crt.to_str().unwrap(),
            "--ca-key",
            key.to_str().unwrap(),
        ],
        &[],
    );
    let (status, answer) =
        common::http_get(&d.addr("listen"), "/v1/sidecars/shop/web/sidemesh-proxy");
    assert_eq!(status, 200, "{answer}");
    let body: serde_json::Value =
        serde_json::from_str(answer.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(
        body["tls"]["trust_bundle_pem"].as_str().unwrap().trim(),
        cert_pem.trim()
    );
}
