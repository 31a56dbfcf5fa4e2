//! A tiny demo backend for `sidemesh up` and tests: an HTTP/1.1 and h2c server that answers
//! every request with `hello from <instance>` (and the header `x-instance`), so a client
//! can see which instance served it.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Response, header};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Flags of `sidemesh demo-backend`.
#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, env = "SIDEMESH_DEMO_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// The instance name put in every answer.
    #[arg(long, env = "SIDEMESH_DEMO_NAME", default_value = "demo")]
    pub name: String,
}

/// Runs `sidemesh demo-backend` until SIGTERM or SIGINT.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    let task = tokio::spawn(serve(listener, args.name, stop.clone()));
    // Watch for the stop signal before announcing readiness (see shutdown::signal).
    let signal = sidemesh_api::shutdown::signal();
    println!(
        "{}",
        crate::cli::ready_line("demo-backend", &[("listen".into(), addr.to_string())])
    );
    signal.await;
    stop.cancel();
    let _ = task.await;
    Ok(())
}

/// Serves the demo answers on `listener` until `stop` fires.
pub async fn serve(listener: TcpListener, name: String, stop: CancellationToken) {
    let body = Bytes::from(format!("hello from {name}\n"));
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => {
                    // Like most servers (Go's net/http, Tomcat, Envoy), answer without
                    // Nagle: on a multiplexed HTTP/2 connection a small response would
                    // otherwise wait for the ACK of the previous one (the client's next
                    // request, about a millisecond at 1,000 req/s per connection).
                    let _ = s.set_nodelay(true);
                    s
                }
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (body, name, stop) = (body.clone(), name.clone(), stop.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |_req| {
                let mut r = Response::new(Full::new(body.clone()));
                if let Ok(v) = header::HeaderValue::from_str(&name) {
                    r.headers_mut().insert("x-instance", v);
                }
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/plain; charset=utf-8"),
                );
                async move { Ok::<_, Infallible>(r) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}
