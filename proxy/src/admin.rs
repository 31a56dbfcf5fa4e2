//! The sidecar's admin server: `/live` (200 while the process runs), `/ready` (200 once
//! the first config is applied and all its listeners are bound; 503 before that and while
//! draining on shutdown), `/metrics` (the Prometheus text format of the registry), and,
//! to clients on loopback only, `/config` and `/endpoints` ([`crate::introspect`]).

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::Applied;

/// What `/ready`, `/config` and `/endpoints` look at.
#[derive(Clone, Debug)]
pub struct Readiness {
    /// The data plane's applied config.
    pub applied: watch::Receiver<Option<Applied>>,
    /// Set on shutdown: from then on `/ready` answers 503.
    pub draining: Arc<AtomicBool>,
    /// The mutual TLS state and the config: with TLS on, ready only with a certificate.
    pub tls: Option<(
        Arc<crate::tls::MeshTls>,
        watch::Receiver<Option<sidemesh_api::Snapshot>>,
    )>,
    /// The data plane's state in force, for `/endpoints`.
    pub state: Option<crate::StateView>,
}

impl Readiness {
    fn waiting_for_certificate(&self) -> bool {
        let Some((tls, snapshots)) = &self.tls else {
            return false;
        };
        let wants = snapshots
            .borrow()
            .as_ref()
            .is_some_and(sidemesh_api::Snapshot::wants_tls);
        wants && !tls.is_on()
    }

    /// `(ready, reason)`.
    pub fn check(&self) -> (bool, String) {
        if self.draining.load(Ordering::Acquire) {
            return (false, "draining\n".to_owned());
        }
        match &*self.applied.borrow() {
            None => (false, "no config applied yet\n".to_owned()),
            Some(a) if !a.failed.is_empty() => (
                false,
                format!(
                    "config {} applied but {} listener(s) not bound: {:?}\n",
                    a.version,
                    a.failed.len(),
                    a.failed
                ),
            ),
            Some(a) if self.waiting_for_certificate() => (
                false,
                format!(
                    "config {} applied; waiting for the mesh certificate from discover\n",
                    a.version
                ),
            ),
            Some(a) => (
                true,
                format!(
                    "ready: config {}, {} listener(s)\n",
                    a.version,
                    a.listening.len()
                ),
            ),
        }
    }
}

/// Serves the admin endpoints on `listener` until `stop` fires.
pub async fn serve(
    listener: TcpListener,
    registry: prometheus::Registry,
    readiness: Readiness,
    stop: CancellationToken,
) {
    let ctx = Arc::new((registry, readiness));
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let ctx = ctx.clone();
                async move { Ok::<_, Infallible>(route(&ctx.0, &ctx.1, &req, peer.ip())) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json(body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut text = serde_json::to_vec_pretty(body).unwrap_or_default();
    text.push(b'\n');
    let mut r = Response::new(Full::new(Bytes::from(text)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

/// `/config` and `/endpoints` show the mesh's layout (services, endpoint addresses) and
/// answer only on loopback: from inside the pod, `kubectl exec` or `kubectl port-forward`,
/// not from the pod network the probes and the scraper come from.
fn local_only(peer: IpAddr, view: impl FnOnce() -> serde_json::Value) -> Response<Full<Bytes>> {
    let loopback = match peer {
        IpAddr::V4(a) => a.is_loopback(),
        IpAddr::V6(a) => a.is_loopback() || a.to_ipv4_mapped().is_some_and(|a| a.is_loopback()),
    };
    if loopback {
        json(&view())
    } else {
        text(
            StatusCode::FORBIDDEN,
            "only from loopback: use kubectl exec or kubectl port-forward\n",
        )
    }
}

fn route(
    registry: &prometheus::Registry,
    readiness: &Readiness,
    req: &Request<Incoming>,
    peer: IpAddr,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    match req.uri().path() {
        "/live" => text(StatusCode::OK, "live\n"),
        "/ready" => {
            let (ok, why) = readiness.check();
            let status = if ok {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, why)
        }
        "/metrics" => match prometheus::TextEncoder::new().encode_to_string(&registry.gather()) {
            Ok(body) => {
                let mut r = text(StatusCode::OK, body);
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                r
            }
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        },
        "/config" => local_only(peer, || {
            let snapshot = readiness.tls.as_ref().and_then(|(_, s)| s.borrow().clone());
            let credentials = readiness.tls.as_ref().and_then(|(t, _)| t.credentials());
            crate::introspect::config(
                snapshot.as_ref(),
                readiness.applied.borrow().as_ref(),
                credentials.as_deref(),
            )
        }),
        "/endpoints" => local_only(peer, || {
            let state = readiness.state.as_ref().and_then(crate::StateView::state);
            crate::introspect::endpoints(state.as_deref())
        }),
        _ => text(
            StatusCode::NOT_FOUND,
            "try /ready, /live, /metrics, /config or /endpoints\n",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_views_answer_only_on_loopback() {
        for (peer, status) in [
            ("127.0.0.1", 200),
            ("127.9.8.7", 200),
            ("::1", 200),
            ("::ffff:127.0.0.1", 200),
            ("10.0.0.5", 403),
            ("::ffff:10.0.0.5", 403),
            ("fd00::1", 403),
        ] {
            let r = local_only(peer.parse().unwrap(), || serde_json::json!({}));
            assert_eq!(r.status().as_u16(), status, "{peer}");
        }
    }

    #[test]
    fn with_tls_on_ready_waits_for_the_certificate() {
        let tls = Arc::new(crate::tls::MeshTls::new(&prometheus::Registry::new()).unwrap());
        let ca = crate::tls::tests::Ca::new();
        let json = serde_json::json!({
            "version": 3,
            "identity": {"namespace": "shop", "service": "web", "plugin": "sidemesh-proxy"},
            "tls": {"trust_bundle_pem": ca.pem, "csr_url": "sidemesh-proxy/certificate"},
        });
        let snap = sidemesh_api::Snapshot::from_json(json.to_string().as_bytes()).unwrap();
        let (_snap_tx, snapshots) = watch::channel(Some(snap));
        let (_applied_tx, applied) = watch::channel(Some(Applied {
            version: 3,
            listening: Vec::new(),
            failed: Vec::new(),
        }));
        let r = Readiness {
            applied,
            draining: Arc::new(AtomicBool::new(false)),
            tls: Some((tls.clone(), snapshots)),
            state: None,
        };
        let (ready, why) = r.check();
        assert!(!ready && why.contains("certificate"), "{why}");
        tls.install(Some(ca.issue("shop", "web", -60, 3600)));
        assert!(r.check().0);
    }
}
