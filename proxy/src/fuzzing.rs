//! Entry points for fuzzing what the sidecar parses from peers (`proxy/fuzz`, cargo-fuzz on
//! nightly), also run on random and mutated input by the unit tests below, so the
//! properties hold on stable Rust too.
//!
//! Properties:
//! - no input panics;
//! - a request or response head that parses as complete lies inside the input, with every
//!   header inside the head, and no shorter prefix of it parses as complete;
//! - a request the lean engine takes has an origin-form target (starts with `/`);
//! - a body is followed the same way whether its bytes come at once or split anywhere
//!   (chunked framing, `Content-Length`): same bytes taken, same end, same verdict;
//! - protocol detection never changes its mind: once a prefix decides, the whole input
//!   decides the same;
//! - the hyper path's framing scan (`hostile::ScanIo`) comes to the same place (conflict
//!   found, heads seen, stopped or not) whether the bytes come at once or split anywhere.

// Panicking on a broken property is the point of a fuzz harness.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use crate::detect::classify;
use crate::h1::codec::{
    BadChunk, BodyState, Chunked, MAX_HEADERS, Parsed, RequestHead, ResponseFraming, ResponseHead,
};
use crate::hostile::{BodyFraming, Scan, ScanIo};

/// A request head from a client, and its body when it has one.
pub fn h1_request(data: &[u8]) {
    let mut head = RequestHead::default();
    if head.parse(data, MAX_HEADERS) != Parsed::Complete {
        return;
    }
    let len = head.len;
    assert!(
        len <= data.len(),
        "head of {len} bytes in {} bytes",
        data.len()
    );
    assert!(head.target.get(data).starts_with(b"/"));
    if let Some(a) = head.authority {
        within(a.get(data), &data[..len]);
        assert!(!a.get(data).is_empty() && head.header(data, "host").is_some());
    }
    assert!(!head.method.get(data).is_empty());
    for (name, value) in &head.headers {
        within(name.get(data), &data[..len]);
        within(value.get(data), &data[..len]);
    }
    assert_ne!(
        RequestHead::default().parse(&data[..len - 1], MAX_HEADERS),
        Parsed::Complete,
        "a head complete before its end"
    );
    let body = match head.framing {
        BodyFraming::None => return,
        BodyFraming::Length(n) => BodyState::Length(n),
        BodyFraming::Chunked => BodyState::Chunked(Chunked::default()),
    };
    same_in_pieces(body, &data[len..]);
}

/// A response head from an upstream (to a `HEAD` request or not), and its body.
pub fn h1_response(data: &[u8]) {
    for head_request in [false, true] {
        let mut head = ResponseHead::with_capacity(8);
        let Ok(Some(framing)) = head.parse(data, head_request) else {
            continue;
        };
        let len = head.len;
        assert!(len <= data.len());
        assert!((100..=999).contains(&head.status), "status {}", head.status);
        for (name, value) in &head.headers {
            within(name.get(data), &data[..len]);
            within(value.get(data), &data[..len]);
        }
        assert!(
            !matches!(
                ResponseHead::with_capacity(8).parse(&data[..len - 1], head_request),
                Ok(Some(_))
            ),
            "a head complete before its end"
        );
        if head_request {
            assert_eq!(framing, ResponseFraming::None);
        }
        let body = match framing {
            ResponseFraming::None => continue,
            ResponseFraming::Length(n) => BodyState::Length(n),
            ResponseFraming::Chunked => BodyState::Chunked(Chunked::default()),
            ResponseFraming::Close => BodyState::Close,
        };
        same_in_pieces(body, &data[len..]);
    }
}

/// Raw bytes as a chunked body.
pub fn chunked(data: &[u8]) {
    same_in_pieces(BodyState::Chunked(Chunked::default()), data);
}

/// The first bytes a client sends, as the protocol sniffing of `auto` ports sees them.
pub fn detect(data: &[u8]) {
    let whole = classify(data);
    for k in 0..=data.len().min(64) {
        if let Some(d) = classify(&data[..k]) {
            assert_eq!(whole, Some(d), "decided {d:?} on {k} bytes, then {whole:?}");
        }
    }
}

/// A client's bytes as the hyper path's framing scan follows them.
pub fn scan(data: &[u8]) {
    let scanned = |piece: &dyn Fn(usize) -> usize| {
        let mut io = ScanIo::new((), Scan::for_http1(true));
        let mut at = 0;
        while at < data.len() {
            let end = (at + piece(at)).min(data.len());
            io.feed(&data[at..end]);
            at = end;
        }
        io.progress()
    };
    let at_once = scanned(&|_| data.len());
    assert_eq!(at_once, scanned(&|_| 1), "at once vs byte by byte");
    let mixed = scanned(&|i| 1 + usize::from(data[i % data.len()] % 13));
    assert_eq!(at_once, mixed, "at once vs in pieces");
}

/// Asserts `part` is a sub-slice of `of`.
fn within(part: &[u8], of: &[u8]) {
    let (start, end) = (of.as_ptr() as usize, of.as_ptr() as usize + of.len());
    let p = part.as_ptr() as usize;
    assert!(
        part.is_empty() || (p >= start && p + part.len() <= end),
        "a span outside the head"
    );
}

/// What following a body over some input came to: bytes taken, whether it ended, or the
/// error that stopped it (after how many bytes).
#[derive(Debug, PartialEq, Eq)]
enum Followed {
    Taken(usize, bool),
    Bad(BadChunk),
}

/// Follows `body` over `data` at once, byte by byte, and in pieces whose sizes come from
/// the data itself; all must agree.
fn same_in_pieces(body: BodyState, data: &[u8]) {
    let at_once = follow(body, data, |_| data.len().max(1));
    let by_byte = follow(body, data, |_| 1);
    assert_eq!(at_once, by_byte, "at once vs byte by byte");
    let mixed = follow(body, data, |i| 1 + usize::from(data[i % data.len()] % 7));
    assert_eq!(at_once, mixed, "at once vs in pieces");
}

fn follow(mut body: BodyState, data: &[u8], piece: impl Fn(usize) -> usize) -> Followed {
    let mut at = 0;
    while at < data.len() {
        let end = (at + piece(at)).min(data.len());
        match body.step(&data[at..end]) {
            Ok((n, done)) => {
                assert!(n <= end - at, "took {n} of {} bytes", end - at);
                at += n;
                if done {
                    return Followed::Taken(at, true);
                }
                assert_eq!(at, end, "stopped short without ending");
            }
            Err(e) => return Followed::Bad(e),
        }
    }
    Followed::Taken(at, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQUESTS: [&[u8]; 4] = [
        b"GET /a?b=c HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n",
        b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4;e=1\r\nabcd\r\n0\r\nT: v\r\n\r\n",
        b"PUT /p HTTP/1.1\r\nContent-Length: 5\r\nConnection: keep-alive, x\r\n\r\nhelloGET",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    ];
    const RESPONSES: [&[u8]; 3] = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n1a\r\n01234567890123456789012345\r\n0\r\n\r\n",
        b"HTTP/1.0 404 Not Found\r\nConnection: close\r\n\r\nbye",
    ];

    #[test]
    fn seeds_pass_as_they_are() {
        for r in REQUESTS {
            h1_request(r);
            detect(r);
        }
        for r in RESPONSES {
            h1_response(r);
        }
        chunked(b"5\r\nhello\r\n0\r\n\r\n");
        scan(REQUESTS[1]);
        // The scan sees something: the second head has both framing headers.
        let two = b"GET / HTTP/1.1\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        scan(two);
        let mut io = ScanIo::new((), Scan::for_http1(true));
        io.feed(two);
        assert_eq!(io.progress(), (1, 2, false));
    }

    #[test]
    fn random_and_mutated_input_keeps_the_properties() {
        for i in 0..20_000usize {
            let seed: &[u8] = if i % 2 == 0 {
                REQUESTS[i % REQUESTS.len()]
            } else {
                RESPONSES[i % RESPONSES.len()]
            };
            let mut p: Vec<u8> = if i % 5 == 0 {
                (0..(i % 300)).map(|_| rand::random::<u8>()).collect()
            } else {
                seed.to_vec()
            };
            if !p.is_empty() && i % 5 != 0 {
                for _ in 0..(1 + i % 4) {
                    let at = rand::random_range(0..p.len());
                    // Mostly bytes that matter to the grammar.
                    p[at] = *b"\r\n :;,0aF\t\x00"
                        .get(rand::random_range(0..14))
                        .unwrap_or(&rand::random::<u8>());
                }
            }
            h1_request(&p);
            h1_response(&p);
            chunked(&p);
            detect(&p);
            scan(&p);
        }
    }
}
