//! Forwarding to upstream resolvers: one question out, one checked answer back.
//!
//! Each upstream query goes out over a fresh UDP socket bound to port 0 (the kernel picks
//! a random ephemeral port) with a random 16-bit ID, so an off-path attacker must guess
//! both (RFC 5452 section 9.2). A reply is accepted only if it comes from the upstream's
//! address and port, carries the ID, has QR=1, and repeats the question exactly (name
//! compared case-insensitively, type, class: RFC 5452 section 3). Anything else is counted
//! and ignored, and the wait goes on until the deadline.
//!
//! A reply with TC=1 is asked again over TCP (RFC 7766 section 5, RFC 1035 section 4.2.2).
//! SERVFAIL, REFUSED, NOTIMP, FORMERR, timeouts and network errors move on to the next
//! upstream; the upstream that last answered is tried first next time, so one dead server
//! costs one timeout, not one per query. NOERROR and NXDOMAIN are final answers.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::timeout_at;

use crate::metrics::Metrics;

/// The EDNS payload size the shim advertises upstream and to clients: the DNS Flag Day
/// 2020 value, which avoids IP fragmentation on common paths.
pub const EDNS_PAYLOAD: u16 = 1232;

/// Why no upstream gave an answer.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// There is no upstream to ask.
    #[error("no upstream resolver configured")]
    NoUpstream,
    /// Every upstream failed; the last failure.
    #[error("all {tried} upstream(s) failed; last: {last}")]
    AllFailed {
        /// How many were tried.
        tried: usize,
        /// The last failure.
        last: String,
    },
}

/// Asks upstreams, with failover.
pub struct Forwarder {
    timeout: Duration,
    preferred: AtomicUsize,
    metrics: Metrics,
}

impl Forwarder {
    /// A forwarder that waits at most `timeout` for each upstream exchange.
    pub fn new(timeout: Duration, metrics: Metrics) -> Forwarder {
        Forwarder {
            timeout,
            preferred: AtomicUsize::new(0),
            metrics,
        }
    }

    /// Asks `upstreams` (starting with the one that answered last) the question `query`
    /// until one gives NOERROR or NXDOMAIN.
    pub async fn ask(
        &self,
        upstreams: &[SocketAddr],
        query: &Query,
    ) -> Result<Message, ForwardError> {
        if upstreams.is_empty() {
            return Err(ForwardError::NoUpstream);
        }
        let start = self.preferred.load(Ordering::Relaxed) % upstreams.len();
        let mut last = String::new();
        for i in 0..upstreams.len() {
            let idx = (start + i) % upstreams.len();
            let Some(&upstream) = upstreams.get(idx) else {
                continue;
            };
            let began = Instant::now();
            let result = self.exchange(upstream, query).await;
            self.metrics
                .upstream_duration
                .observe(began.elapsed().as_secs_f64());
            match result {
                Ok(msg)
                    if matches!(
                        msg.metadata.response_code,
                        ResponseCode::NoError | ResponseCode::NXDomain
                    ) =>
                {
                    self.preferred.store(idx, Ordering::Relaxed);
                    return Ok(msg);
                }
                Ok(msg) => {
                    last = format!("{upstream} answered {}", msg.metadata.response_code);
                }
                Err(e) => last = format!("{upstream}: {e}"),
            }
            tracing::debug!(upstream = %upstream, error = %last, "upstream failed, trying the next");
        }
        Err(ForwardError::AllFailed {
            tried: upstreams.len(),
            last,
        })
    }

    /// One exchange with one upstream: UDP, then TCP if the reply was truncated.
    async fn exchange(&self, upstream: SocketAddr, query: &Query) -> Result<Message, String> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let msg = timeout_at(deadline, self.udp(upstream, query))
            .await
            .map_err(|_| "timed out".to_owned())??;
        if !msg.metadata.truncation {
            return Ok(msg);
        }
        // The TCP retry gets its own full timeout: the UDP part may have used most of it.
        let deadline = tokio::time::Instant::now() + self.timeout;
        timeout_at(deadline, self.tcp(upstream, query))
            .await
            .map_err(|_| "timed out over TCP".to_owned())?
    }

    async fn udp(&self, upstream: SocketAddr, query: &Query) -> Result<Message, String> {
        let id: u16 = rand::random();
        let bytes = request(id, query)?;
        let local: SocketAddr = if upstream.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let sock = UdpSocket::bind(local).await.map_err(|e| e.to_string())?;
        sock.send_to(&bytes, upstream)
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 4096];
        // Bounded: the caller's deadline ends the wait; this caps the work an attacker can
        // cause by flooding the port with junk meanwhile.
        for _ in 0..256 {
            let (n, from) = sock.recv_from(&mut buf).await.map_err(|e| e.to_string())?;
            if from != upstream {
                self.metrics.upstream_rejected.inc();
                tracing::debug!(%from, %upstream, "reply from the wrong address, ignored");
                continue;
            }
            match check_reply(buf.get(..n).unwrap_or_default(), id, query) {
                Some(msg) => return Ok(msg),
                None => {
                    self.metrics.upstream_rejected.inc();
                    tracing::debug!(%upstream, "reply with the wrong ID or question, ignored");
                }
            }
        }
        Err("too many bogus replies".to_owned())
    }

    async fn tcp(&self, upstream: SocketAddr, query: &Query) -> Result<Message, String> {
        let id: u16 = rand::random();
        let bytes = request(id, query)?;
        let len = u16::try_from(bytes.len()).map_err(|_| "query too long".to_owned())?;
        let mut stream = TcpStream::connect(upstream)
            .await
            .map_err(|e| e.to_string())?;
        let mut framed = Vec::with_capacity(bytes.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&bytes);
        stream.write_all(&framed).await.map_err(|e| e.to_string())?;
        // RFC 1035 section 4.2.2: two-byte length, then the message; the length bounds it.
        let mut len = [0u8; 2];
        stream
            .read_exact(&mut len)
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream
            .read_exact(&mut buf)
            .await
            .map_err(|e| e.to_string())?;
        match check_reply(&buf, id, query) {
            Some(msg) => Ok(msg),
            None => {
                self.metrics.upstream_rejected.inc();
                Err("TCP reply with the wrong ID or question".to_owned())
            }
        }
    }
}

/// Encodes the upstream query: recursion desired, EDNS with our payload size and no DO
/// bit (the shim does not validate DNSSEC, so it does not ask for signatures).
fn request(id: u16, query: &Query) -> Result<Vec<u8>, String> {
    let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.add_query(query.clone());
    let mut edns = Edns::new();
    edns.set_max_payload(EDNS_PAYLOAD);
    msg.set_edns(edns);
    msg.to_vec().map_err(|e| e.to_string())
}

/// Decodes `bytes` and returns it only if it is the reply to query `id` for `query`.
pub fn check_reply(bytes: &[u8], id: u16, query: &Query) -> Option<Message> {
    // Cheap checks on the raw header first: ID and QR (RFC 1035 section 4.1.1).
    let head = bytes.get(..4)?;
    if u16::from_be_bytes([head[0], head[1]]) != id || head[2] & 0x80 == 0 {
        return None;
    }
    let msg = Message::from_vec(bytes).ok()?;
    let [q] = msg.queries.as_slice() else {
        return None;
    };
    let same = q.name().eq_ignore_root_case(query.name()) || q.name() == query.name();
    (same && q.query_type() == query.query_type() && q.query_class() == query.query_class())
        .then_some(msg)
}

/// The question as the shim asks it upstream: the name in lower case (the cache key is
/// case-insensitive, so the question must be too), the client's type and class.
pub fn upstream_query(name: &Name, qtype: RecordType, qclass: DNSClass) -> Query {
    let mut name = name.to_lowercase();
    name.set_fqdn(true);
    let mut q = Query::query(name, qtype);
    q.set_query_class(qclass);
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q() -> Query {
        upstream_query(
            &Name::from_ascii("Example.COM.").unwrap(),
            RecordType::A,
            DNSClass::IN,
        )
    }

    fn reply(id: u16, name: &str, qr: bool) -> Vec<u8> {
        let mut m = Message::new(
            id,
            if qr {
                MessageType::Response
            } else {
                MessageType::Query
            },
            OpCode::Query,
        );
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        m.to_vec().unwrap()
    }

    #[test]
    fn replies_must_match_id_qr_and_question() {
        assert!(check_reply(&reply(7, "example.com.", true), 7, &q()).is_some());
        assert!(check_reply(&reply(7, "EXAMPLE.com.", true), 7, &q()).is_some());
        assert!(check_reply(&reply(8, "example.com.", true), 7, &q()).is_none());
        assert!(check_reply(&reply(7, "example.com.", false), 7, &q()).is_none());
        assert!(check_reply(&reply(7, "example.org.", true), 7, &q()).is_none());
        assert!(check_reply(&[0, 7], 7, &q()).is_none());
        assert!(check_reply(&[], 7, &q()).is_none());
    }

    #[test]
    fn upstream_query_is_lower_case_fqdn() {
        assert_eq!(q().name().to_ascii(), "example.com.");
    }
}
