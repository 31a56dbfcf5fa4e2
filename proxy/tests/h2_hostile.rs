//! HTTP/2 abuse at the sidecar's h2c listener, with frames written by hand: rapid reset
//! (CVE-2023-44487) and an endless CONTINUATION sequence (CVE-2024-27316 class). The
//! abusive connection must be closed with a GOAWAY after bounded work, while the sidecar
//! keeps serving other connections.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;

use serde_json::json;
use sidemesh_proxy::http2::Engine;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const CANCEL: u32 = 0x8;
const ENHANCE_YOUR_CALM: u32 = 0xb;

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// HPACK for `GET http://x/`: indexed :method GET, :scheme http, :path /, and a literal
/// :authority (RFC 7541 appendix A).
const GET_BLOCK: &[u8] = &[0x82, 0x86, 0x84, 0x01, 0x01, b'x'];

/// Every case runs against both HTTP/2 engines.
const ENGINES: [Engine; 2] = [Engine::Lean, Engine::Hyper];

/// A sidecar on `engine` with one h2c outbound service in front of a counting backend.
async fn setup(engine: Engine) -> (Running, Backend, Ipv4Addr) {
    let ip = loopback();
    let be = backend(ip, "a").await;
    let svc = loopback();
    let cfg = outbound_config(1, svc, 80, "http2", &[be.addr], json!({}));
    (start_h2(ip, &cfg, engine).await, be, svc)
}

/// Opens an h2c connection and sends the preface and an empty SETTINGS frame.
async fn open(svc: Ipv4Addr) -> TcpStream {
    let mut s = TcpStream::connect((svc, 80)).await.unwrap();
    let mut hello = PREFACE.to_vec();
    frame(&mut hello, SETTINGS, 0, 0, &[]);
    s.write_all(&hello).await.unwrap();
    s
}

/// Reads one frame: its type, stream id and payload (None at the end of the stream).
async fn read_frame(r: &mut OwnedReadHalf) -> Option<(u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await.ok()?;
    let stream = u32::from_be_bytes([head[5] & 0x7f, head[6], head[7], head[8]]);
    Some((head[3], stream, payload))
}

/// Reads frames until a GOAWAY (returns its error code) or the end of the stream (None),
/// within 10 s.
async fn goaway(r: &mut OwnedReadHalf) -> Option<u32> {
    let read = async {
        loop {
            let (kind, _, payload) = read_frame(r).await?;
            if kind == GOAWAY && payload.len() >= 8 {
                return Some(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
            }
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("GOAWAY or close in time")
}

/// A normal h2c request on a fresh connection still succeeds.
async fn still_serves(svc: Ipv4Addr) {
    let (status, backend, _) = get(&h2_client(), &format!("http://{svc}/"), &[]).await;
    assert_eq!((status, backend.as_str()), (200, "a"));
}

async fn rapid_reset_gets_goaway_and_bounded_upstream_work_on(engine: Engine) {
    let (_p, be, svc) = setup(engine).await;
    still_serves(svc).await;
    let before = be.hits.load(Ordering::Relaxed);
    let (mut r, mut w) = open(svc).await.into_split();
    let streams = 10_000u32;
    let writer = tokio::spawn(async move {
        let mut sent = 0u32;
        for batch in 0..streams / 100 {
            let mut buf = Vec::new();
            for i in 0..100 {
                let id = 2 * (batch * 100 + i) + 1;
                frame(&mut buf, HEADERS, END_STREAM | END_HEADERS, id, GET_BLOCK);
                frame(&mut buf, RST_STREAM, 0, id, &CANCEL.to_be_bytes());
            }
            if w.write_all(&buf).await.is_err() {
                break;
            }
            sent += 100;
        }
        sent
    });
    let code = goaway(&mut r).await;
    let sent = tokio::time::timeout(WAIT, writer).await.unwrap().unwrap();
    assert_eq!(code, Some(ENHANCE_YOUR_CALM), "after {sent} streams");
    // The other connections are unaffected, and few of the reset streams went upstream.
    still_serves(svc).await;
    let upstream = be.hits.load(Ordering::Relaxed) - before - 1;
    assert!(
        upstream < u64::from(streams) / 20,
        "{upstream} of {sent} reset streams reached the upstream"
    );
}

/// Sends `first` as a HEADERS frame without END_HEADERS, then CONTINUATION frames of
/// `chunk` without END_HEADERS until the sidecar stops reading (at most 256 MiB); returns
/// the GOAWAY code and how many bytes were written.
async fn continuation_flood(svc: Ipv4Addr, first: &[u8], chunk: &[u8]) -> (Option<u32>, usize) {
    let (mut r, mut w) = open(svc).await.into_split();
    let first = first.to_vec();
    let chunk = chunk.to_vec();
    let writer = tokio::spawn(async move {
        let mut buf = Vec::new();
        frame(&mut buf, HEADERS, END_STREAM, 1, &first);
        let mut written = 0;
        if w.write_all(&buf).await.is_err() {
            return written;
        }
        written += buf.len();
        let mut many = Vec::new();
        for _ in 0..64 {
            frame(&mut many, CONTINUATION, 0, 1, &chunk);
        }
        while written < 256 << 20 {
            if w.write_all(&many).await.is_err() {
                break;
            }
            written += many.len();
        }
        written
    });
    let code = goaway(&mut r).await;
    drop(r);
    let written = tokio::time::timeout(WAIT, writer).await.unwrap().unwrap();
    (code, written)
}

async fn endless_continuation_is_cut_off_with_bounded_memory_on(engine: Engine) {
    let (_p, be, svc) = setup(engine).await;
    // A literal header whose name claims 1 MiB: the decoder needs more with every frame.
    let mut first = vec![0x00, 0x7f];
    let mut n = (1u32 << 20) - 127;
    while n >= 128 {
        first.push((n % 128) as u8 | 0x80);
        n /= 128;
    }
    first.push(n as u8);
    let (code, written) = continuation_flood(svc, &first, &[b'a'; 16_384]).await;
    assert!(code.is_some(), "no GOAWAY after {written} bytes");
    // Empty CONTINUATION frames: no bytes to buffer, only the frame count grows.
    let (code, written_empty) = continuation_flood(svc, GET_BLOCK, &[]).await;
    assert_eq!(code, Some(ENHANCE_YOUR_CALM), "after {written_empty} bytes");
    // What was accepted before the close is bounded by the header list limit plus socket
    // buffers, not by what the peer was willing to send (256 MiB).
    assert!(written < 32 << 20, "{written} bytes accepted");
    still_serves(svc).await;
    assert_eq!(
        be.hits.load(Ordering::Relaxed),
        1,
        "a flood reached the upstream"
    );
}

async fn more_streams_than_allowed_are_refused_not_queued_on(engine: Engine) {
    let (_p, _be, svc) = setup(engine).await;
    // Open 1,000 streams whose request bodies never end: past the advertised concurrency
    // limit (256) the sidecar refuses streams instead of holding them.
    let (mut r, mut w) = open(svc).await.into_split();
    let mut buf = Vec::new();
    for i in 0..1000u32 {
        frame(&mut buf, HEADERS, END_HEADERS, 2 * i + 1, GET_BLOCK);
    }
    w.write_all(&buf).await.unwrap();
    let refused = async {
        let mut refused = 0;
        let mut goaway = false;
        while refused < 1000 - 256 && !goaway {
            let Some((kind, _, _)) = read_frame(&mut r).await else {
                break;
            };
            match kind {
                RST_STREAM => refused += 1,
                GOAWAY => goaway = true,
                _ => {}
            }
        }
        (refused, goaway)
    };
    let (refused, goaway) = tokio::time::timeout(WAIT, refused).await.unwrap();
    assert!(
        refused >= 1000 - 256 || goaway,
        "{refused} streams refused, no GOAWAY"
    );
    // The 256 admitted streams hold upstream streams while their bodies stay open; other
    // clients are still served meanwhile, and after the abusive client goes.
    still_serves(svc).await;
    drop((r, w));
    still_serves(svc).await;
}

async fn differing_content_lengths_over_h2_never_reach_the_upstream_on(engine: Engine) {
    // Content-length values that disagree: h2 (0.4.20) resets the stream itself, and the
    // sidecar's own header check would answer 400; either way an HTTP/1 upstream never
    // sees both values.
    let (_p, be, svc) = setup(engine).await;
    let (mut r, mut w) = open(svc).await.into_split();
    let mut block = vec![0x83, 0x86, 0x84, 0x01, 0x01, b'x']; // POST http://x/
    for v in [b"3".as_slice(), b"30".as_slice()] {
        block.extend_from_slice(&[0x00, 14]);
        block.extend_from_slice(b"content-length");
        block.push(v.len() as u8);
        block.extend_from_slice(v);
    }
    let mut buf = Vec::new();
    frame(&mut buf, HEADERS, END_HEADERS, 1, &block);
    frame(&mut buf, 0x0, END_STREAM, 1, b"abc"); // DATA
    w.write_all(&buf).await.unwrap();
    // The answer on stream 1: HEADERS starting with the indexed `:status 400` (RFC 7541
    // appendix A, index 12), or a reset of the stream; never a success.
    let answer = async {
        loop {
            match read_frame(&mut r).await? {
                (HEADERS, 1, payload) => return Some(payload.first() == Some(&0x8c)),
                (RST_STREAM | GOAWAY, _, _) => return Some(true),
                _ => {}
            }
        }
    };
    let refused = tokio::time::timeout(WAIT, answer).await.unwrap();
    assert_eq!(refused, Some(true));
    assert_eq!(
        be.hits.load(Ordering::Relaxed),
        0,
        "the request reached the upstream"
    );
}

#[tokio::test]
async fn rapid_reset_gets_goaway_and_bounded_upstream_work() {
    for engine in ENGINES {
        rapid_reset_gets_goaway_and_bounded_upstream_work_on(engine).await;
    }
}

#[tokio::test]
async fn endless_continuation_is_cut_off_with_bounded_memory() {
    for engine in ENGINES {
        endless_continuation_is_cut_off_with_bounded_memory_on(engine).await;
    }
}

#[tokio::test]
async fn more_streams_than_allowed_are_refused_not_queued() {
    for engine in ENGINES {
        more_streams_than_allowed_are_refused_not_queued_on(engine).await;
    }
}

#[tokio::test]
async fn differing_content_lengths_over_h2_never_reach_the_upstream() {
    for engine in ENGINES {
        differing_content_lengths_over_h2_never_reach_the_upstream_on(engine).await;
    }
}
