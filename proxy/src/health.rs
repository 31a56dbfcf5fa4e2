//! Active health checking: for services whose config asks for it, every endpoint is probed
//! on an interval, by TCP connect or by `GET <path>` expecting a 2xx. After
//! `unhealthy_threshold` failures in a row the endpoint is marked failed (balancers skip
//! it); after `healthy_threshold` successes in a row it is back. Checks restart with each
//! config version; the marks live in the shared endpoint stats, so they survive reloads.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sidemesh_api::config::HealthCheck;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::balance::EndpointStats;
use crate::state::State;

/// Starts the checks of `state`; they stop when `stop` fires. Endpoints of services
/// without checks are cleared of any earlier failed mark.
pub(crate) fn spawn(state: &State, stop: &CancellationToken) {
    let mut seen: HashSet<(SocketAddr, usize)> = HashSet::new();
    for target in state.listeners.values() {
        let service = &target.service;
        for ep in target.default_backend.balancer.endpoints() {
            let key = (ep.addr, Arc::as_ptr(&ep.stats) as usize);
            if !seen.insert(key) {
                continue;
            }
            match &service.health_check {
                None => ep.stats.check_failed.store(false, Ordering::Relaxed),
                Some(hc) => {
                    tokio::spawn(check_loop(
                        ep.addr,
                        ep.stats.clone(),
                        hc.clone(),
                        stop.clone(),
                    ));
                }
            }
        }
    }
}

async fn check_loop(
    addr: SocketAddr,
    stats: Arc<EndpointStats>,
    hc: HealthCheck,
    stop: CancellationToken,
) {
    let interval = Duration::from_millis(hc.interval_ms.max(10));
    let timeout = Duration::from_millis(hc.timeout_ms.max(1));
    let (mut ok_run, mut fail_run) = (0u32, 0u32);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let ok = tokio::time::timeout(timeout, probe(addr, hc.http_path.as_deref()))
            .await
            .unwrap_or(false);
        if ok {
            ok_run += 1;
            fail_run = 0;
            if ok_run >= hc.healthy_threshold.max(1)
                && stats.check_failed.swap(false, Ordering::Relaxed)
            {
                tracing::info!(endpoint = %addr, "health check passes again");
            }
        } else {
            fail_run += 1;
            ok_run = 0;
            if fail_run >= hc.unhealthy_threshold.max(1)
                && !stats.check_failed.swap(true, Ordering::Relaxed)
            {
                tracing::warn!(endpoint = %addr, "health check failing; endpoint out of rotation");
            }
        }
    }
}

/// One probe: connect, and for HTTP checks send a GET and read the status line.
async fn probe(addr: SocketAddr, path: Option<&str>) -> bool {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return false;
    };
    let Some(path) = path else {
        return true;
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: sidemesh-health-check\r\nConnection: close\r\n\r\n"
    );
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    // The status line fits in the first bytes; read at most a small, fixed amount.
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        match s.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    let line = &buf[..n];
    line.starts_with(b"HTTP/1.") && line.get(9) == Some(&b'2')
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn server(reply: &'static [u8]) -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(reply).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn probes() {
        let ok = server(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
        let bad = server(b"HTTP/1.1 503 Unavailable\r\nContent-Length: 0\r\n\r\n").await;
        assert!(probe(ok, Some("/healthz")).await);
        assert!(!probe(bad, Some("/healthz")).await);
        assert!(probe(bad, None).await, "TCP check only connects");
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        assert!(!probe(closed, None).await);
    }
}
