//! `proxy_load`: the proxy benchmark's own load tools, for what wrk and h2load do not give.
//!
//! - `rate`: HTTP/1.1 or h2c GETs at a fixed rate, latency measured from each request's
//!   *intended* send time (so a stalled proxy is not hidden by a stalled generator), and
//!   printed as one JSON line with p50, p99 and p99.9 in microseconds.
//! - `http`: a lean HTTP/1.1 backend answering every request with a fixed `200`
//!   (`sidemesh_bench::http_backend`), cheaper than `sidemesh demo-backend`.
//! - `sink` / `echo`: TCP servers that discard, or echo, what they read.
//! - `bulk`: pushes bytes through a TCP address for some seconds; prints MB/s.
//! - `rtt`: 1-byte ping-pong over one TCP connection; prints round-trip percentiles.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sidemesh_bench::percentile;
use tokio::sync::Mutex;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fixed-rate GETs with latency percentiles.
    Rate {
        /// Where to send (`ip:port`).
        #[arg(long)]
        addr: SocketAddr,
        /// Requests per second.
        #[arg(long, default_value_t = 2000)]
        rate: u64,
        /// Seconds to run.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Connections.
        #[arg(long, default_value_t = 32)]
        connections: usize,
        /// Speak h2c (prior knowledge) instead of HTTP/1.1.
        #[arg(long)]
        h2: bool,
    },
    /// A lean HTTP/1.1 server answering `hello from <name>` to every request.
    Http {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, default_value = "backend")]
        name: String,
    },
    /// A TCP server discarding what it reads.
    Sink {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// A TCP server echoing what it reads.
    Echo {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Pushes bytes for some seconds; prints MB/s.
    Bulk {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Connections pushing at once, each from its own thread.
        #[arg(long, default_value_t = 1)]
        streams: usize,
    },
    /// 1-byte ping-pong; prints round-trip percentiles.
    Rtt {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 20_000)]
        count: usize,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Rate {
            addr,
            rate,
            seconds,
            connections,
            h2,
        } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(fixed_rate(addr, rate, seconds, connections, h2))
        }
        Cmd::Http { listen, name } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(sidemesh_bench::http_backend::run(listen, &name))
        }
        Cmd::Sink { listen } => serve(listen, false),
        Cmd::Echo { listen } => serve(listen, true),
        Cmd::Bulk {
            addr,
            seconds,
            streams,
        } => bulk(addr, seconds, streams),
        Cmd::Rtt { addr, count } => rtt(addr, count),
    }
}

type H1 = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;
type H2 = hyper::client::conn::http2::SendRequest<Empty<Bytes>>;

async fn fixed_rate(
    addr: SocketAddr,
    rate: u64,
    seconds: u64,
    connections: usize,
    h2: bool,
) -> anyhow::Result<()> {
    let total = rate * seconds;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let rx = Arc::new(Mutex::new(rx));
    let mut workers = Vec::new();
    for _ in 0..connections.max(1) {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        stream.set_nodelay(true)?;
        let io = TokioIo::new(stream);
        let rx = rx.clone();
        if h2 {
            let (send, conn) = hyper::client::conn::http2::handshake::<_, _, Empty<Bytes>>(
                TokioExecutor::new(),
                io,
            )
            .await?;
            tokio::spawn(conn);
            workers.push(tokio::spawn(h2_worker(send, rx, addr)));
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(conn);
            workers.push(tokio::spawn(h1_worker(send, rx, addr)));
        }
    }
    // The schedule runs on its own thread with `nanosleep`: tokio's timer wheel has 1 ms
    // ticks, which put up to a millisecond of the generator's own lag into every latency.
    let start = Instant::now() + Duration::from_millis(50);
    let pace = std::thread::spawn(move || {
        for i in 0..total {
            let intended = start + Duration::from_nanos(i * 1_000_000_000 / rate);
            std::thread::sleep(intended.saturating_duration_since(Instant::now()));
            if tx.send(intended).is_err() {
                break;
            }
        }
    });
    let mut lat = Vec::with_capacity(total as usize);
    let mut errors = 0u64;
    for w in workers {
        let (l, e) = w.await?;
        lat.extend(l);
        errors += e;
    }
    pace.join()
        .map_err(|_| anyhow::anyhow!("the pacing thread panicked"))?;
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.total_cmp(b));
    let p = |q| percentile(&lat, q).unwrap_or(f64::NAN);
    println!(
        "{}",
        serde_json::json!({
            "requests": lat.len(), "errors": errors,
            "achieved_rps": (lat.len() as f64 / elapsed).round(),
            "p50_us": p(50.0).round(), "p99_us": p(99.0).round(), "p999_us": p(99.9).round(),
        })
    );
    Ok(())
}

async fn next(rx: &Mutex<tokio::sync::mpsc::UnboundedReceiver<Instant>>) -> Option<Instant> {
    rx.lock().await.recv().await
}

/// A GET of `http://addr/`. Over HTTP/1.1 hyper's connection writes the URI as given, so
/// the target goes out in absolute form (`GET http://addr/ HTTP/1.1`, as to a proxy), with
/// a `Host` header: until 2026-12-05 that sent every request of the sidecar's `h1_2k` rows
/// to its hyper engine instead of the lean one (`docs/proxy.md`, "Fixed-rate HTTP/1.1").
fn request(addr: SocketAddr, h2: bool) -> http::Request<Empty<Bytes>> {
    let mut r = http::Request::get(format!("http://{addr}/"));
    if !h2 {
        r = r.header("host", addr.to_string());
    }
    r.body(Empty::new()).unwrap_or_default()
}

async fn h1_worker(
    mut send: H1,
    rx: Arc<Mutex<tokio::sync::mpsc::UnboundedReceiver<Instant>>>,
    addr: SocketAddr,
) -> (Vec<f64>, u64) {
    let (mut lat, mut errors) = (Vec::new(), 0);
    while let Some(intended) = next(&rx).await {
        let ok = match send.send_request(request(addr, false)).await {
            Ok(r) => r.into_body().collect().await.is_ok(),
            Err(_) => false,
        };
        if ok {
            lat.push(intended.elapsed().as_secs_f64() * 1e6);
        } else {
            errors += 1;
            if send.ready().await.is_err() {
                break;
            }
        }
    }
    (lat, errors)
}

async fn h2_worker(
    send: H2,
    rx: Arc<Mutex<tokio::sync::mpsc::UnboundedReceiver<Instant>>>,
    addr: SocketAddr,
) -> (Vec<f64>, u64) {
    // Each request of this connection runs as its own task (multiplexed).
    let mut tasks = tokio::task::JoinSet::new();
    while let Some(intended) = next(&rx).await {
        let mut s = send.clone();
        tasks.spawn(async move {
            let r = s.send_request(request(addr, true)).await.ok()?;
            r.into_body().collect().await.ok()?;
            Some(intended.elapsed().as_secs_f64() * 1e6)
        });
    }
    let (mut lat, mut errors) = (Vec::new(), 0);
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Some(l)) => lat.push(l),
            _ => errors += 1,
        }
    }
    (lat, errors)
}

fn serve(listen: SocketAddr, echo: bool) -> anyhow::Result<()> {
    let l = TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
    println!(
        "{}",
        serde_json::json!({"ready": "tcp", "listen": l.local_addr()?.to_string()})
    );
    for s in l.incoming() {
        let Ok(mut s) = s else { continue };
        std::thread::spawn(move || {
            let _ = s.set_nodelay(true);
            let mut buf = vec![0u8; 256 * 1024];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || (echo && s.write_all(&buf[..n]).is_err()) {
                    break;
                }
            }
        });
    }
    Ok(())
}

fn bulk(addr: SocketAddr, seconds: u64, streams: usize) -> anyhow::Result<()> {
    let conns = (0..streams.max(1))
        .map(|_| TcpStream::connect(addr).with_context(|| format!("connect {addr}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let start = Instant::now();
    let push = move |mut s: TcpStream| -> std::io::Result<u64> {
        let buf = vec![7u8; 256 * 1024];
        let mut sent = 0u64;
        while start.elapsed() < Duration::from_secs(seconds) {
            s.write_all(&buf)?;
            sent += buf.len() as u64;
        }
        Ok(sent)
    };
    let threads: Vec<_> = conns
        .into_iter()
        .map(|s| std::thread::spawn(move || push(s)))
        .collect();
    let mut sent = 0u64;
    for t in threads {
        sent += t
            .join()
            .map_err(|_| anyhow::anyhow!("a bulk thread panicked"))??;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"bytes": sent, "mb_per_s": (sent as f64 / secs / 1e6).round()})
    );
    Ok(())
}

fn rtt(addr: SocketAddr, count: usize) -> anyhow::Result<()> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let mut lat = Vec::with_capacity(count);
    let mut b = [0u8; 1];
    for _ in 0..count {
        let t = Instant::now();
        s.write_all(b"x")?;
        s.read_exact(&mut b)?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    let p = |q| percentile(&lat, q).unwrap_or(f64::NAN);
    println!(
        "{}",
        serde_json::json!({"count": count, "p50_us": p(50.0).round(), "p99_us": p(99.0).round()})
    );
    Ok(())
}
