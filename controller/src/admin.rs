//! The controller's admin endpoint (plain HTTP): `/ready` (200 once the first complete index
//! is published, else 503), `/live` (always 200) and `/metrics` (Prometheus text format).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tokio::net::TcpListener;

/// Serves the admin endpoint until the task is dropped.
pub async fn serve(listener: TcpListener, ready: Arc<AtomicBool>, registry: prometheus::Registry) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let ready = ready.clone();
        let registry = registry.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let r = answer(&req, &ready, &registry);
                async move { Ok::<_, Infallible>(r) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .await;
        });
    }
}

fn answer<B>(
    req: &Request<B>,
    ready: &AtomicBool,
    registry: &prometheus::Registry,
) -> Response<Full<Bytes>> {
    let (status, body) = match req.uri().path() {
        "/ready" if ready.load(Ordering::SeqCst) => (StatusCode::OK, "ready\n".to_owned()),
        "/ready" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the initial sync of the watches\n".to_owned(),
        ),
        "/live" => (StatusCode::OK, "live\n".to_owned()),
        "/metrics" => match prometheus::TextEncoder::new().encode_to_string(&registry.gather()) {
            Ok(text) => (StatusCode::OK, text),
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        },
        _ => (StatusCode::NOT_FOUND, "not found\n".to_owned()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}
