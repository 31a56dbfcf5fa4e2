//! The webhook over real HTTPS on 127.0.0.1:0 with a CA generated in the test: plain,
//! already-injected, opted-out, malformed and oversized AdmissionReviews, and a certificate
//! swapped on disk while the server runs.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a failed unwrap is a failed test.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use sidemesh_controller::inject::{INJECT, InjectConfig};
use sidemesh_controller::install::{WebhookCerts, generate_certs};
use sidemesh_controller::tls::ReloadingCert;
use sidemesh_controller::webhook::{self, Lookups, MAX_BODY_BYTES, Metrics, Webhook};

const REVIEW: &str = include_str!("../testdata/admission-review.json");

struct Server {
    addr: SocketAddr,
    ready: Arc<std::sync::atomic::AtomicBool>,
    cert: Arc<ReloadingCert>,
    registry: prometheus::Registry,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn write_certs(dir: &Path, c: &WebhookCerts) {
    std::fs::write(dir.join("tls.crt"), &c.cert_pem).unwrap();
    std::fs::write(dir.join("tls.key"), &c.key_pem).unwrap();
}

async fn start(certs: &WebhookCerts) -> Server {
    let dir = tempfile::tempdir().unwrap();
    write_certs(dir.path(), certs);
    let cert =
        ReloadingCert::load(&dir.path().join("tls.crt"), &dir.path().join("tls.key")).unwrap();
    let tls = cert.server_config().unwrap();
    let registry = prometheus::Registry::new();
    let mut lookups = Lookups::default();
    lookups.namespace_labels.insert(
        "shop".into(),
        BTreeMap::from([(INJECT.to_owned(), "enabled".to_owned())]),
    );
    let (_tx, rx) = tokio::sync::watch::channel(Arc::new(lookups));
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Keep the sender alive for the server's life by leaking it into the task.
    let hook = Arc::new(Webhook {
        config: InjectConfig::default(),
        lookups: rx,
        ready: ready.clone(),
        metrics: Metrics::new(&registry).unwrap(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let _keep = _tx;
        webhook::serve(listener, tls, hook).await;
    });
    Server {
        addr,
        ready,
        cert,
        registry,
        task,
        _dir: dir,
    }
}

/// POSTs `body` to `/inject`, trusting only `ca_pem`; returns the status and JSON body.
async fn post(
    addr: SocketAddr,
    ca_pem: &str,
    body: Vec<u8>,
) -> Result<(u16, serde_json::Value), String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::post("/inject")
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    ))
}

fn certs() -> WebhookCerts {
    generate_certs(&["localhost".to_owned()]).unwrap()
}

fn review_with(f: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_str(REVIEW).unwrap();
    f(&mut v);
    serde_json::to_vec(&v).unwrap()
}

async fn timed<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .expect("test timed out")
}

#[tokio::test]
async fn admission_reviews_over_https() {
    timed(async {
        let c = certs();
        let s = start(&c).await;

        // Before the watches have synced: 503, so the failure policy applies.
        let (status, _) = post(s.addr, &c.ca_pem, REVIEW.as_bytes().to_vec())
            .await
            .unwrap();
        assert_eq!(status, 503);
        s.ready.store(true, std::sync::atomic::Ordering::SeqCst);

        // Plain: injected, with a JSONPatch.
        let (status, body) = post(s.addr, &c.ca_pem, REVIEW.as_bytes().to_vec())
            .await
            .unwrap();
        assert_eq!(status, 200);
        let r = &body["response"];
        assert_eq!(
            (r["allowed"].as_bool(), r["patchType"].as_str()),
            (Some(true), Some("JSONPatch"))
        );
        assert_eq!(r["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");

        // Already injected: allowed, no patch.
        let already = review_with(|v| {
            v["request"]["object"]["metadata"]["annotations"] =
                serde_json::json!({"sidemesh.io/injected": "0.1.0"});
        });
        let (status, body) = post(s.addr, &c.ca_pem, already).await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(body["response"]["allowed"], true);
        assert!(body["response"].get("patch").is_none(), "{body}");

        // Opted out by annotation although the namespace opted in: allowed, no patch.
        let out = review_with(|v| {
            v["request"]["object"]["metadata"]["annotations"] =
                serde_json::json!({"sidemesh.io/inject": "disabled"});
        });
        let (_, body) = post(s.addr, &c.ca_pem, out).await.unwrap();
        assert_eq!(body["response"]["allowed"], true);
        assert!(body["response"].get("patch").is_none());

        // A pod the injector cannot handle: denied with a message that says what to do.
        let host = review_with(|v| v["request"]["object"]["spec"]["hostNetwork"] = true.into());
        let (status, body) = post(s.addr, &c.ca_pem, host).await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(body["response"]["allowed"], false);
        let msg = body["response"]["status"]["message"].as_str().unwrap();
        assert!(msg.contains("sidemesh.io/inject: disabled"), "{msg}");

        // Malformed: 400 with a JSON error.
        let (status, body) = post(s.addr, &c.ca_pem, b"{\"kind\": 7".to_vec())
            .await
            .unwrap();
        assert_eq!(status, 400);
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("not an AdmissionReview")
        );

        // Oversized: 413, and the server still answers afterwards.
        let big = vec![b' '; MAX_BODY_BYTES + 1];
        let (status, _) = post(s.addr, &c.ca_pem, big).await.unwrap();
        assert_eq!(status, 413);
        let (status, _) = post(s.addr, &c.ca_pem, REVIEW.as_bytes().to_vec())
            .await
            .unwrap();
        assert_eq!(status, 200);

        let text = prometheus::TextEncoder::new()
            .encode_to_string(&s.registry.gather())
            .unwrap();
        for want in [
            r#"result="injected"} 2"#,
            r#"result="denied"} 1"#,
            r#"result="malformed"} 1"#,
            r#"result="too_large"} 1"#,
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
    })
    .await;
}

#[tokio::test]
async fn certificate_is_reloaded_when_the_files_change() {
    timed(async {
        let old = certs();
        let s = start(&old).await;
        s.ready.store(true, std::sync::atomic::Ordering::SeqCst);
        let watcher = tokio::spawn(s.cert.clone().watch(Duration::from_millis(50)));
        assert!(
            post(s.addr, &old.ca_pem, REVIEW.as_bytes().to_vec())
                .await
                .is_ok()
        );

        // A half-written key is refused and the old certificate stays.
        std::fs::write(
            s._dir.path().join("tls.key"),
            "-----BEGIN PRIVATE KEY-----\n",
        )
        .unwrap();
        assert!(s.cert.reload().is_err());
        assert!(
            post(s.addr, &old.ca_pem, REVIEW.as_bytes().to_vec())
                .await
                .is_ok()
        );

        let new = certs();
        write_certs(s._dir.path(), &new);
        // Poll until the server presents the new certificate (bounded by `timed`).
        loop {
            if post(s.addr, &new.ca_pem, REVIEW.as_bytes().to_vec())
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let err = post(s.addr, &old.ca_pem, REVIEW.as_bytes().to_vec())
            .await
            .unwrap_err();
        assert!(
            err.contains("certificate") || err.contains("UnknownIssuer"),
            "{err}"
        );
        watcher.abort();
    })
    .await;
}
