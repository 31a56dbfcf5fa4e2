//! Request framing checks that hyper does not make for a proxy: a request whose length is
//! ambiguous is answered `400` and its connection closed before anything goes upstream.
//!
//! RFC 9112 §6.1 lets a server either reject a request with both `Content-Length` and
//! `Transfer-Encoding` or process it by the chunked framing alone (and then close). Hyper 1
//! does the latter and erases the evidence: the `Content-Length` never reaches the
//! `HeaderMap` (dropped when it follows `Transfer-Encoding`, removed when it precedes it).
//! A sidecar sits in front of servers that may frame differently, so it refuses such a
//! request instead. Because the header map cannot show the conflict, [`ScanIo`] watches the
//! HTTP/1 bytes hyper reads, tracks message boundaries (head, then a `Content-Length` or
//! chunked body), and notes the index of the first request head that carried both; the
//! service answers that request with [`refuse`]. The scan parses heads with `httparse`, the
//! parser hyper itself uses, so the two agree on where a head ends. If the scan ever cannot
//! follow the stream (a head it cannot parse, an upgrade, a CONNECT), it stops: hyper's own
//! rules (chunked wins, the connection is closed) still hold then.
//!
//! [`refuse`] also checks what the header map does show, for both HTTP/1.1 and HTTP/2:
//! a `Transfer-Encoding` other than exactly `chunked` (RFC 9112 §6.1: chunked must be final
//! and applied once; a proxy cannot forward other codings it strips as hop-by-hop), and
//! `Content-Length` values that disagree or are not numbers (RFC 9110 §8.6). For HTTP/2
//! this is a second guard: h2 0.4.20 already resets such streams itself.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::upstream::Body;

/// Header lines the scan parses in one head; a longer head stops the scan (hyper's
/// `max_headers` limit then decides).
const SCAN_HEADERS: usize = 128;
/// Longest head the scan buffers across reads; beyond it the scan stops (hyper's
/// header-size limit then decides).
const SCAN_HEAD_BYTES: usize = 64 * 1024;
/// `first_conflict` when no head so far had both framing headers.
const NONE: u64 = u64::MAX;

/// What the byte scan learnt about one HTTP/1 connection, shared with its service.
#[derive(Debug)]
pub(crate) struct Scan {
    /// 0-based index of the first request head with both `Content-Length` and
    /// `Transfer-Encoding`, or [`NONE`].
    first_conflict: AtomicU64,
    /// Requests handed to the service so far on this connection.
    served: AtomicU64,
}

impl Scan {
    /// A scan for an HTTP/1 connection; none for HTTP/2, where the frame layer carries
    /// lengths and `Transfer-Encoding` is a protocol error.
    pub(crate) fn for_http1(http1: bool) -> Option<Arc<Scan>> {
        http1.then(|| {
            Arc::new(Scan {
                first_conflict: AtomicU64::new(NONE),
                served: AtomicU64::new(0),
            })
        })
    }
}

/// Answers a request whose framing is ambiguous with `400` and `Connection: close`, or
/// `None` when it may go on. Call it once per request, in order (it counts them).
pub(crate) fn refuse<B>(req: &Request<B>, scan: Option<&Scan>) -> Option<Response<Body>> {
    let index = scan.map(|s| s.served.fetch_add(1, Ordering::Relaxed));
    let conflict = match (scan, index) {
        (Some(s), Some(i)) => s.first_conflict.load(Ordering::Acquire) == i,
        _ => false,
    };
    let why = if conflict {
        Some("content-length-with-transfer-encoding")
    } else {
        header_conflict(req.headers())
    }?;
    Some(refusal(why))
}

/// The `400` for a request with ambiguous framing, with `Connection: close`.
pub(crate) fn refusal(why: &'static str) -> Response<Body> {
    tracing::debug!(reason = why, "refused a request with ambiguous framing");
    let mut r = Response::new(
        Full::new(Bytes::from(format!("sidemesh: {why}\n")))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = StatusCode::BAD_REQUEST;
    let h = r.headers_mut();
    h.insert(crate::http::ERROR, HeaderValue::from_static(why));
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The framing conflicts visible in a header map.
fn header_conflict(headers: &http::HeaderMap) -> Option<&'static str> {
    body_framing(
        headers
            .iter()
            .map(|(k, v)| (k.as_str().as_bytes(), v.as_bytes())),
    )
    .err()
}

/// How a request's body is framed, from its headers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum BodyFraming {
    /// No `Content-Length` or `Transfer-Encoding`: no body.
    #[default]
    None,
    /// `Content-Length` (one value, possibly repeated).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// The framing of a request from its header lines (`name`, `value`), or the reason it is
/// ambiguous: `Content-Length` with `Transfer-Encoding`, a coding other than exactly
/// `chunked` once, `Content-Length` values that are not numbers or disagree. Both HTTP/1.1
/// engines decide with this one function.
pub(crate) fn body_framing<'a>(
    headers: impl Iterator<Item = (&'a [u8], &'a [u8])>,
) -> Result<BodyFraming, &'static str> {
    // No `Transfer-Encoding`; exactly one `chunked` (true); anything else (false).
    let mut te = None::<bool>;
    let mut has_length = false;
    let mut length = None;
    let mut bad_length = None;
    for (name, value) in headers {
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            for coding in value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                let chunked = coding.eq_ignore_ascii_case(b"chunked");
                te = Some(te.is_none() && chunked);
            }
        } else if name.eq_ignore_ascii_case(b"content-length") {
            has_length = true;
            for part in value.split(|b| *b == b',') {
                match (parse_decimal(part.trim_ascii()), length) {
                    (None, _) => bad_length = bad_length.or(Some("bad-content-length")),
                    (Some(n), Some(prev)) if n != prev => {
                        bad_length = bad_length.or(Some("conflicting-content-length"))
                    }
                    (Some(n), _) => length = Some(n),
                }
            }
        }
    }
    match (te, has_length, bad_length, length) {
        (Some(_), true, _, _) => Err("content-length-with-transfer-encoding"),
        (Some(false), false, _, _) => Err("unsupported-transfer-encoding"),
        (Some(true), false, _, _) => Ok(BodyFraming::Chunked),
        (None, _, Some(why), _) => Err(why),
        (None, _, None, Some(n)) => Ok(BodyFraming::Length(n)),
        (None, _, None, None) => Ok(BodyFraming::None),
    }
}

fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 {
        return None;
    }
    s.iter().try_fold(0u64, |n, b| {
        b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0'))
    })
}

/// Where the scan is in the byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a request head (bytes so far are in `head`).
    Head,
    /// Skipping a body of this many more bytes.
    Body(u64),
    /// Reading a chunk-size line; the size so far, and whether an extension started.
    ChunkSize { size: u64, ext: bool, digits: bool },
    /// Skipping chunk data, then its CRLF.
    ChunkData(u64),
    /// Expecting the CRLF after chunk data.
    ChunkEnd,
    /// Reading trailer lines; the length of the current one.
    Trailers(usize),
    /// Not following the stream any more.
    Stopped,
}

/// Follows the HTTP/1 message boundaries in the bytes read from `inner`.
pub(crate) struct ScanIo<S> {
    inner: S,
    scan: Option<Arc<Scan>>,
    state: State,
    head: Vec<u8>,
    heads: u64,
}

impl<S> ScanIo<S> {
    /// Wraps `inner`; without a scan it only passes bytes through.
    pub(crate) fn new(inner: S, scan: Option<Arc<Scan>>) -> ScanIo<S> {
        let state = if scan.is_some() {
            State::Head
        } else {
            State::Stopped
        };
        ScanIo {
            inner,
            scan,
            state,
            head: Vec::new(),
            heads: 0,
        }
    }

    /// Where the scan is: the index of the first head with both framing headers
    /// (`u64::MAX`: none), the heads seen, and whether it stopped following the stream.
    pub(crate) fn progress(&self) -> (u64, u64, bool) {
        let conflict = self
            .scan
            .as_ref()
            .map_or(NONE, |s| s.first_conflict.load(Ordering::Relaxed));
        (conflict, self.heads, self.state == State::Stopped)
    }

    /// Follows `data`, the next bytes read from the client.
    pub(crate) fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            data = match self.state {
                State::Stopped => return,
                State::Head => self.feed_head(data),
                State::Body(n) => {
                    let (left, rest) = skip(n, data);
                    self.state = if left == 0 {
                        State::Head
                    } else {
                        State::Body(left)
                    };
                    rest
                }
                State::ChunkData(n) => {
                    let (left, rest) = skip(n, data);
                    self.state = if left == 0 {
                        State::ChunkEnd
                    } else {
                        State::ChunkData(left)
                    };
                    rest
                }
                _ => {
                    self.state = chunk_byte(self.state, data[0]);
                    &data[1..]
                }
            };
        }
    }

    /// Consumes head bytes; returns what follows a complete head.
    fn feed_head<'a>(&mut self, data: &'a [u8]) -> &'a [u8] {
        // Most heads arrive in one read: parse in place, copy only a partial head.
        if self.head.is_empty() {
            match self.parse_head(data) {
                Some(n) => return &data[n..],
                None if self.state == State::Stopped => return &[],
                None => {}
            }
        }
        let before = self.head.len();
        if before + data.len() > SCAN_HEAD_BYTES {
            self.state = State::Stopped;
            self.head = Vec::new();
            return &[];
        }
        if before == 0 {
            self.head.extend_from_slice(data);
        } else {
            self.head.extend_from_slice(data);
            let head = std::mem::take(&mut self.head);
            let parsed = self.parse_head(&head);
            match parsed {
                Some(n) => {
                    // The head ended inside this read: the rest is body or the next head.
                    let rest = n.saturating_sub(before);
                    return &data[rest.min(data.len())..];
                }
                None => self.head = head,
            }
        }
        if self.state == State::Stopped {
            self.head = Vec::new();
        }
        &[]
    }

    /// Parses a complete head at the start of `buf`, sets the next state, and returns its
    /// length; `None` if it is incomplete (or unparsable: then the scan stops).
    fn parse_head(&mut self, buf: &[u8]) -> Option<usize> {
        let mut headers = [httparse::EMPTY_HEADER; SCAN_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let n = match req.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return None,
            Err(_) => {
                self.state = State::Stopped;
                return None;
            }
        };
        let index = self.heads;
        self.heads += 1;
        let (mut cl, mut te, mut chunked, mut upgrade) = (None::<Option<u64>>, false, false, false);
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                let v = parse_decimal(h.value.trim_ascii());
                cl = Some(match cl {
                    None => v,
                    Some(prev) if prev == v => v,
                    Some(_) => None,
                });
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                te = true;
                chunked = h
                    .value
                    .rsplit(|b| *b == b',')
                    .next()
                    .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if h.name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            }
        }
        if te && cl.is_some() {
            if let Some(scan) = &self.scan {
                // Only the first matters: hyper closes the connection after it.
                let _ = scan.first_conflict.compare_exchange(
                    NONE,
                    index,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                );
            }
        }
        self.state = if upgrade || req.method == Some("CONNECT") {
            // What follows may not be HTTP/1 any more.
            State::Stopped
        } else if te {
            if chunked {
                State::ChunkSize {
                    size: 0,
                    ext: false,
                    digits: false,
                }
            } else {
                State::Stopped
            }
        } else {
            match cl {
                None | Some(Some(0)) => State::Head,
                Some(Some(n)) => State::Body(n),
                Some(None) => State::Stopped,
            }
        };
        Some(n)
    }
}

/// Skips up to `n` body bytes of `data`: the bytes still to skip, and what follows.
fn skip(n: u64, data: &[u8]) -> (u64, &[u8]) {
    let take = data.len().min(usize::try_from(n).unwrap_or(usize::MAX));
    (n - take as u64, &data[take..])
}

/// One byte of chunked framing outside chunk data (RFC 9112 §7.1).
fn chunk_byte(state: State, b: u8) -> State {
    match state {
        State::ChunkSize { size, ext, digits } => match b {
            b'\n' if digits && size == 0 => State::Trailers(0),
            b'\n' if digits => State::ChunkData(size),
            _ if ext => state,
            b';' if digits => State::ChunkSize {
                size,
                ext: true,
                digits,
            },
            b'\r' | b' ' | b'\t' if digits => state,
            _ => match (b as char).to_digit(16) {
                Some(d) if size >> 60 == 0 => State::ChunkSize {
                    size: size << 4 | u64::from(d),
                    ext,
                    digits: true,
                },
                _ => State::Stopped,
            },
        },
        State::ChunkEnd => match b {
            b'\r' => State::ChunkEnd,
            b'\n' => State::ChunkSize {
                size: 0,
                ext: false,
                digits: false,
            },
            _ => State::Stopped,
        },
        State::Trailers(len) => match b {
            b'\n' if len == 0 => State::Head,
            b'\n' => State::Trailers(0),
            b'\r' => State::Trailers(len),
            _ => State::Trailers(len + 1),
        },
        other => other,
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ScanIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if self.state != State::Stopped {
            if let Some(new) = buf.filled().get(before..) {
                self.feed(new);
            }
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ScanIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `chunks` to a scan and returns the conflicting head's index and the end state.
    fn scan(chunks: &[&[u8]]) -> (Option<u64>, State, u64) {
        let s = Scan::for_http1(true);
        let mut io = ScanIo::new((), s.clone());
        for c in chunks {
            io.feed(c);
        }
        let first = s.unwrap().first_conflict.load(Ordering::Relaxed);
        ((first != NONE).then_some(first), io.state, io.heads)
    }

    #[test]
    fn finds_the_conflicting_head_after_bodies_of_both_kinds() {
        let stream: &[u8] = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nCL: 1\r\n0\r\nT: v\r\n\r\n\
POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert_eq!(scan(&[stream]), (Some(2), State::Head, 3));
        // The same bytes one at a time.
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(scan(&bytes), (Some(2), State::Head, 3));
    }

    #[test]
    fn body_text_that_looks_like_a_head_is_not_a_head() {
        let inner = "GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let outer = format!(
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{inner}",
            inner.len()
        );
        assert_eq!(scan(&[outer.as_bytes()]), (None, State::Head, 1));
    }

    #[test]
    fn stops_where_it_cannot_follow() {
        let up = b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\x81";
        assert_eq!(scan(&[up]).1, State::Stopped);
        assert_eq!(
            scan(&[b"GET / HTTP/1.1\r\nX: a\x01\r\n\r\n"]).1,
            State::Stopped
        );
        let bad_chunk = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n";
        assert_eq!(scan(&[bad_chunk]).1, State::Stopped);
        let huge = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff\r\n";
        assert_eq!(scan(&[huge]).1, State::Stopped);
    }

    #[test]
    fn header_conflicts() {
        let check = |pairs: &[(&str, &str)]| {
            let mut b = Request::post("/");
            for (k, v) in pairs {
                b = b.header(*k, *v);
            }
            header_conflict(b.body(()).unwrap().headers())
        };
        assert_eq!(check(&[("transfer-encoding", "chunked")]), None);
        assert_eq!(
            check(&[("content-length", "3"), ("content-length", "3")]),
            None
        );
        assert_eq!(
            check(&[("transfer-encoding", "chunked"), ("content-length", "3")]),
            Some("content-length-with-transfer-encoding")
        );
        for te in [
            "gzip, chunked",
            "chunked, chunked",
            "identity",
            "chunked, gzip",
        ] {
            assert_eq!(
                check(&[("transfer-encoding", te)]),
                Some("unsupported-transfer-encoding"),
                "{te}"
            );
        }
        assert_eq!(
            check(&[("content-length", "3"), ("content-length", "30")]),
            Some("conflicting-content-length")
        );
        assert_eq!(
            check(&[("content-length", "3, 30")]),
            Some("conflicting-content-length")
        );
        assert_eq!(
            check(&[("content-length", "-1")]),
            Some("bad-content-length")
        );
    }
}
