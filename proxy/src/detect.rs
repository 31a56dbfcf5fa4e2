//! Protocol detection for `auto` ports: peek at the first bytes a client sends without
//! consuming them. The HTTP/2 connection preface (RFC 9113 §3.4) means h2c with prior
//! knowledge; an upper-case method token followed by a space means HTTP/1.x (RFC 9112 §3);
//! anything else, or nothing within the peek timeout (a protocol where the server speaks
//! first, such as SMTP or MySQL), is raw TCP.

use std::time::Duration;

use tokio::net::TcpStream;

/// The HTTP/2 client connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The longest method token we wait for.
const MAX_METHOD: usize = 20;

/// What a client speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    /// HTTP/1.x.
    Http1,
    /// HTTP/2 with prior knowledge.
    Http2,
    /// Anything else.
    Tcp,
}

/// Classifies the bytes seen so far; `None` means more are needed to decide.
pub fn classify(buf: &[u8]) -> Option<Detected> {
    if buf.is_empty() {
        return None;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Some(Detected::Http2)
        } else {
            None
        };
    }
    for (i, b) in buf.iter().enumerate().take(MAX_METHOD + 1) {
        match b {
            b'A'..=b'Z' | b'-' | b'_' => {}
            b' ' if i > 0 => return Some(Detected::Http1),
            _ => return Some(Detected::Tcp),
        }
    }
    if buf.len() > MAX_METHOD {
        Some(Detected::Tcp)
    } else {
        None
    }
}

/// Peeks at `stream` until the protocol is known, for at most `timeout`.
pub async fn detect(stream: &TcpStream, timeout: Duration) -> Detected {
    let mut buf = [0u8; 32];
    let deadline = tokio::time::Instant::now() + timeout;
    let mut seen = 0;
    loop {
        let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await;
        let n = match peeked {
            Err(_) | Ok(Err(_)) | Ok(Ok(0)) => return Detected::Tcp,
            Ok(Ok(n)) => n,
        };
        if let Some(d) = classify(&buf[..n]) {
            return d;
        }
        if n == seen {
            // Same bytes as last time: wait a little for the rest instead of spinning.
            if tokio::time::Instant::now() >= deadline {
                return Detected::Tcp;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        seen = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"M-SEARCH * HTTP/1.1"), Some(Detected::Http1));
        assert_eq!(classify(b"GE"), None);
        assert_eq!(
            classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Some(Detected::Http2)
        );
        assert_eq!(classify(b"PRI * HT"), None);
        assert_eq!(classify(b"\x16\x03\x01"), Some(Detected::Tcp));
        assert_eq!(classify(b"hello"), Some(Detected::Tcp));
        assert_eq!(classify(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"), Some(Detected::Tcp));
    }

    #[tokio::test]
    async fn server_first_protocols_fall_back_to_tcp() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        let t0 = std::time::Instant::now();
        assert_eq!(
            detect(&server, Duration::from_millis(100)).await,
            Detected::Tcp
        );
        assert!(t0.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn split_method_is_waited_for() {
        use tokio::io::AsyncWriteExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        client.write_all(b"GE").await.unwrap();
        let d = tokio::spawn(async move { detect(&server, Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        client.write_all(b"T / HTTP/1.1\r\n").await.unwrap();
        assert_eq!(d.await.unwrap(), Detected::Http1);
    }
}
