//! A lean HTTP/1.1 backend for the proxy benchmark: it answers every request with a fixed
//! `200` (`hello from <name>`), so that the load side of a benchmark run costs as little CPU
//! as possible and the proxy under test, not the backend sharing the load core, is what
//! saturates first.
//!
//! It is a real HTTP/1.1 server within a narrow scope: keep-alive, pipelining (the answers
//! to every complete request in one read go out in one write), request bodies framed by
//! `Content-Length` (read and discarded), `Connection: close`. A chunked request body, or a
//! malformed request, gets a `400`/`501` and the connection is closed: the benchmark never
//! sends either, and neither may be mistaken for a success.

use std::net::SocketAddr;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Most bytes of request head accepted before answering `431`.
const MAX_HEAD: usize = 16 * 1024;
/// Most headers per request.
const MAX_HEADERS: usize = 64;

/// What one parsed request asks of the server.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A complete request head of `head` bytes, followed by `body` bytes of body.
    Request { head: usize, body: u64, close: bool },
    /// More bytes are needed.
    Partial,
    /// The request cannot be served; answer with this status line and close.
    Reject(&'static str),
}

/// Parses the request at the start of `buf`.
pub fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Parsed::Reject("431 Request Header Fields Too Large");
        }
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => {
            return Parsed::Reject("431 Request Header Fields Too Large");
        }
        Err(_) => return Parsed::Reject("400 Bad Request"),
    };
    let mut body = 0u64;
    let mut close = req.version == Some(0);
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            match std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
            {
                Some(n) => body = n,
                None => return Parsed::Reject("400 Bad Request"),
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Parsed::Reject("501 Not Implemented");
        } else if h.name.eq_ignore_ascii_case("connection") {
            close = h.value.eq_ignore_ascii_case(b"close");
        }
    }
    Parsed::Request { head, body, close }
}

/// Serves `listen` until the process ends; prints one ready line.
pub async fn run(listen: SocketAddr, name: &str) -> anyhow::Result<()> {
    let l = TcpListener::bind(listen)
        .await
        .with_context(|| format!("bind {listen}"))?;
    println!(
        "{}",
        serde_json::json!({"ready": "http", "listen": l.local_addr()?.to_string()})
    );
    let body = format!("hello from {name}\n");
    let answer: &'static [u8] = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain; charset=utf-8\r\nx-instance: {name}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
    .leak();
    loop {
        let s = match l.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors, say: wait rather than spin.
                eprintln!("proxy_load http: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            let _ = serve(s, answer).await;
        });
    }
}

/// Answers the requests of one connection.
async fn serve(mut s: TcpStream, answer: &[u8]) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(4096);
    let mut out = Vec::with_capacity(4096);
    // Body bytes of the current request still to be read and dropped.
    let mut skip = 0u64;
    loop {
        if s.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
        let mut at = 0;
        let mut close = false;
        loop {
            let rest = &buf[at..];
            if skip > 0 {
                let n = rest.len().min(usize::try_from(skip).unwrap_or(usize::MAX));
                skip -= n as u64;
                at += n;
                if skip > 0 {
                    break;
                }
                continue;
            }
            if rest.is_empty() {
                break;
            }
            match parse(rest) {
                Parsed::Request {
                    head,
                    body,
                    close: c,
                } => {
                    out.extend_from_slice(answer);
                    at += head;
                    skip = body;
                    if c {
                        close = true;
                        break;
                    }
                }
                Parsed::Partial => break,
                Parsed::Reject(status) => {
                    out.extend_from_slice(b"HTTP/1.1 ");
                    out.extend_from_slice(status.as_bytes());
                    out.extend_from_slice(b"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                    close = true;
                    break;
                }
            }
        }
        buf.drain(..at);
        if !out.is_empty() {
            s.write_all(&out).await?;
            out.clear();
        }
        if close {
            return s.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_keep_alive_close_and_bodies() {
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nhost: a\r\n\r\nGET"),
            Parsed::Request {
                head: 27,
                body: 0,
                close: false
            }
        );
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"),
            Parsed::Request {
                head: 57,
                body: 5,
                close: true
            }
        );
        assert_eq!(
            parse(b"GET / HTTP/1.0\r\n\r\n"),
            Parsed::Request {
                head: 18,
                body: 0,
                close: true
            }
        );
        assert_eq!(parse(b"GET / HTTP/1.1\r\nhost"), Parsed::Partial);
    }

    #[test]
    fn rejects_what_it_does_not_serve() {
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"),
            Parsed::Reject("501 Not Implemented")
        );
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\ncontent-length: x\r\n\r\n"),
            Parsed::Reject("400 Bad Request")
        );
        assert_eq!(
            parse(b"GE\0T / HTTP/1.1\r\n\r\n"),
            Parsed::Reject("400 Bad Request")
        );
        let long = [b'a'; MAX_HEAD + 1];
        assert_eq!(
            parse(&[b"GET / HTTP/1.1\r\nx: ".as_slice(), &long].concat()),
            Parsed::Reject("431 Request Header Fields Too Large")
        );
    }

    #[tokio::test]
    async fn answers_pipelined_requests_and_bodies_over_a_real_socket() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            serve(s, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await
        });
        let mut c = TcpStream::connect(addr).await.unwrap();
        // Two pipelined requests, the second with a body split over two writes.
        c.write_all(b"GET / HTTP/1.1\r\n\r\nPOST / HTTP/1.1\r\ncontent-length: 4\r\n\r\nab")
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        c.write_all(b"cdGET / HTTP/1.1\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(std::time::Duration::from_secs(5), c.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8(got).unwrap();
        assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 3, "{text}");
        server.await.unwrap().unwrap();
    }
}
