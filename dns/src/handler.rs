//! The request path: one query packet in, at most one response packet out.
//!
//! [`Handler::handle`] is synchronous and does everything that needs no network: header
//! checks, the local name table, the cache. Only a cache miss for a forwarded name comes
//! back as [`Step::Forward`], which [`Handler::resolve`] finishes asynchronously, so the
//! UDP loop answers local and cached names inline without spawning a task.
//!
//! Rules, in order:
//! 1. Fewer than 12 bytes, or QR=1 (a response): dropped, never answered (RFC 1035 section
//!    4.1.1; answering responses is how reflection loops start).
//! 2. OPCODE other than QUERY: NOTIMP (RFC 1035 section 4.1.1).
//! 3. QDCOUNT other than 1, or undecodable: FORMERR (RFC 9619: a query has one question).
//! 4. A client outside loopback and the allowed networks: REFUSED (RFC 5358: recursive
//!    service only for intended clients; the shim is never an open resolver).
//! 5. EDNS version above 0: BADVERS (RFC 6891 section 6.1.3).
//! 6. A mesh name in class IN: A gets the service's loopback address with the config's TTL
//!    and AA=1; AAAA gets the service's `address_v6` when it has one; ANY gets the A record
//!    only (RFC 8482 section 4.2, a minimal answer); every other type gets NOERROR with no
//!    records (NODATA, RFC 2308 section 2.2), never NXDOMAIN, because the name exists
//!    (RFC 8020). A NODATA answer carries an SOA in the authority section whose TTL and
//!    MINIMUM are the config's TTL, so caches keep it exactly that long (RFC 2308 sections
//!    3 and 5: a negative answer without SOA should not be cached at all).
//! 7. Another name in an authoritative zone (`--authoritative-zone`, for universal mode
//!    where no other server knows the mesh's names): NXDOMAIN with the zone's SOA, or
//!    NODATA with it when mesh names exist below the name (an empty non-terminal) or it is
//!    the apex (which answers SOA queries). Never forwarded.
//! 8. ANY, AXFR and IXFR for other names: REFUSED (RFC 8482 section 4.1 permits not
//!    expanding ANY; zone transfers are not a stub resolver's business).
//! 9. Everything else: the cache, else the upstreams (see [`crate::forward`]); SERVFAIL
//!    when no upstream answers, NXDOMAIN only when an upstream said so.
//!
//! Responses to UDP queries fit the client's EDNS payload size (512 bytes without EDNS,
//! RFC 1035 section 4.2.1; at most [`EDNS_PAYLOAD`]); a response that does not fit is sent
//! as header and question with TC=1 so the client retries over TCP (RFC 2181 section 9,
//! RFC 7766 section 5).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, SOA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use tokio::sync::watch;

use crate::cache::{Answer, Cache, Key};
use crate::forward::{EDNS_PAYLOAD, Forwarder, upstream_query};
use crate::metrics::{Metrics, Outcome};
use crate::table::{NameTable, normalise};

/// The transport a query came in on; it decides the response size limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// UDP: responses fit the client's advertised payload size.
    Udp,
    /// TCP: responses up to 65535 bytes.
    Tcp,
}

/// An IP network clients may query from, besides loopback: `10.0.0.0/8`, or one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Network {
    type Err = String;

    fn from_str(s: &str) -> Result<Network, String> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = ip
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or network (a.b.c.d/len)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?,
            None => max,
        };
        Ok(Network { addr, prefix })
    }
}

impl Network {
    /// Whether `ip` is inside this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// What to do with a received packet.
#[derive(Debug)]
pub enum Step {
    /// Send these bytes back.
    Reply(Vec<u8>),
    /// Send nothing.
    Drop,
    /// Ask upstream first; pass this to [`Handler::resolve`].
    Forward(Pending),
}

/// A query waiting for an upstream answer.
#[derive(Debug)]
pub struct Pending {
    request: Message,
    key: Key,
    limit: usize,
    qtype: u16,
}

type Flight = watch::Receiver<Option<Result<Arc<Answer>, ()>>>;

/// Settings of the request path that do not change with the config.
#[derive(Clone, Debug)]
pub struct HandlerSettings {
    /// Upstreams used when the config names none (the pod's original resolvers).
    pub fallback_upstreams: Vec<SocketAddr>,
    /// The shim's own listening addresses: never used as upstreams (that would loop).
    pub own_addrs: Vec<SocketAddr>,
    /// Networks allowed to query, besides loopback.
    pub allow_clients: Vec<Network>,
    /// Time for one upstream exchange.
    pub upstream_timeout: Duration,
    /// Most answers the cache keeps.
    pub cache_size: usize,
    /// Zones the shim alone answers (normalised: lower case, no trailing dot): names in
    /// them that are not mesh names get NXDOMAIN (or NODATA) with the zone's SOA instead
    /// of being forwarded.
    pub authoritative: Vec<String>,
}

/// The request path, shared by the UDP and TCP listeners.
pub struct Handler {
    table: ArcSwap<NameTable>,
    cache: Cache,
    forwarder: Forwarder,
    inflight: Mutex<HashMap<Key, Flight>>,
    settings: HandlerSettings,
    metrics: Metrics,
}

impl Handler {
    /// A handler answering from `table` until [`Handler::set_table`] swaps it.
    pub fn new(table: NameTable, settings: HandlerSettings, metrics: Metrics) -> Handler {
        Handler {
            table: ArcSwap::from_pointee(table),
            cache: Cache::new(settings.cache_size, metrics.cache_entries.clone()),
            forwarder: Forwarder::new(settings.upstream_timeout, metrics.clone()),
            inflight: Mutex::new(HashMap::new()),
            settings,
            metrics,
        }
    }

    /// Swaps in a new name table (built off the hot path).
    pub fn set_table(&self, table: NameTable) {
        self.metrics.table_updates.inc();
        self.table.store(Arc::new(table));
    }

    /// The current name table.
    pub fn table(&self) -> Arc<NameTable> {
        self.table.load_full()
    }

    /// Handles one packet from `src`, as far as it can without the network.
    pub fn handle(&self, packet: &[u8], src: IpAddr, transport: Transport) -> Step {
        if let Some((reply, qtype)) = self.fast_local(packet, src) {
            self.metrics.query(qtype, Outcome::Local);
            return Step::Reply(reply);
        }
        self.handle_decoded(packet, src, transport)
    }

    /// The fast path for the dominant query: one A question of class IN for a mesh
    /// name, optionally with a plain EDNS(0) OPT record, from an allowed client. It reads
    /// the wire bytes directly and builds the reply by copying the question; anything
    /// unusual returns `None` and takes [`Handler::handle_decoded`], which decodes with
    /// hickory-proto. Both produce the same reply (a unit test compares them).
    pub(crate) fn fast_local(&self, packet: &[u8], src: IpAddr) -> Option<(Vec<u8>, u16)> {
        let head = packet.get(..12)?;
        // QR=0, OPCODE=0 (byte 2, bits 7..3); QDCOUNT=1, ANCOUNT=NSCOUNT=0, ARCOUNT<=1.
        if head[2] & 0xf8 != 0 || head[4..10] != [0, 1, 0, 0, 0, 0] || head[10] != 0 {
            return None;
        }
        let arcount = head[11];
        if arcount > 1 || !self.allowed(src) {
            return None;
        }
        // QNAME: plain labels (no compression in a question), normalised as the table
        // stores names (RFC 1035 section 4.1.2; at most 255 bytes, section 3.1).
        let mut name = [0u8; 256];
        let mut len = 0usize;
        let mut at = 12usize;
        loop {
            let l = usize::from(*packet.get(at)?);
            at += 1;
            if l == 0 {
                break;
            }
            if l > 63 || at - 12 + l > 254 {
                return None;
            }
            if len > 0 {
                *name.get_mut(len)? = b'.';
                len += 1;
            }
            for &b in packet.get(at..at + l)? {
                if !(b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                    return None;
                }
                *name.get_mut(len)? = b.to_ascii_lowercase();
                len += 1;
            }
            at += l;
        }
        let qend = at + 4;
        let tail = packet.get(at..qend)?;
        let qtype = u16::from_be_bytes([tail[0], tail[1]]);
        // A only: AAAA needs the service's IPv6 address or an SOA, built by the decoding path.
        if qtype != 1 || tail[2..4] != [0, 1] {
            return None;
        }
        // Optional OPT: root name, TYPE 41, CLASS = payload, TTL = ext-rcode, version 0,
        // flags; RDLENGTH 0, and then the end of the packet.
        let edns = if arcount == 1 {
            let opt = packet.get(qend..qend + 11)?;
            if opt[0] != 0 || opt[1..3] != [0, 41] || opt[5] != 0 || opt[6] != 0 {
                return None;
            }
            // No options (RDLENGTH 0): options are rare in stub queries, and their many
            // validity rules are left to the decoding path (fuzzing found the difference).
            if opt[9..11] != [0, 0] || qend + 11 != packet.len() {
                return None;
            }
            true
        } else {
            if qend != packet.len() {
                return None;
            }
            false
        };
        let name = std::str::from_utf8(name.get(..len)?).ok()?;
        let table = self.table.load();
        let addr = table.lookup(name)?;

        let mut out = Vec::with_capacity(qend + 16 + 11);
        // ID; QR, OPCODE 0, AA, RD copied; RA, CD copied, RCODE 0 (RFC 1035 4.1.1, RFC 6895 2).
        out.extend_from_slice(&head[..2]);
        out.push(0x84 | (head[2] & 0x01));
        out.push(0x80 | (head[3] & 0x10));
        out.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, u8::from(edns)]);
        out.extend_from_slice(packet.get(12..qend)?);
        // The owner is a pointer to the question's name (offset 12).
        out.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
        out.extend_from_slice(&table.ttl.to_be_bytes());
        out.extend_from_slice(&[0, 4]);
        out.extend_from_slice(&addr.octets());
        if edns {
            let [hi, lo] = EDNS_PAYLOAD.to_be_bytes();
            out.extend_from_slice(&[0, 0, 41, hi, lo, 0, 0, 0, 0, 0, 0]);
        }
        Some((out, qtype))
    }

    /// The general request path: decodes with hickory-proto and applies every rule.
    pub fn handle_decoded(&self, packet: &[u8], src: IpAddr, transport: Transport) -> Step {
        let Some(head) = packet.get(..12) else {
            self.metrics.query(0, Outcome::Dropped);
            return Step::Drop;
        };
        if head[2] & 0x80 != 0 {
            self.metrics.query(0, Outcome::Dropped);
            return Step::Drop;
        }
        let opcode = (head[2] >> 3) & 0x0f;
        if opcode != 0 {
            self.metrics.query(0, Outcome::FormErr);
            return Step::Reply(header_only(head, ResponseCode::NotImp));
        }
        if u16::from_be_bytes([head[4], head[5]]) != 1 {
            self.metrics.query(0, Outcome::FormErr);
            return Step::Reply(header_only(head, ResponseCode::FormErr));
        }
        let request = match Message::from_vec(packet) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(%src, error = %e, "undecodable query");
                self.metrics.query(0, Outcome::FormErr);
                return Step::Reply(header_only(head, ResponseCode::FormErr));
            }
        };
        let Some(query) = request.queries.first() else {
            self.metrics.query(0, Outcome::FormErr);
            return Step::Reply(header_only(head, ResponseCode::FormErr));
        };
        let qtype = u16::from(query.query_type());
        let limit = match transport {
            Transport::Tcp => usize::from(u16::MAX),
            Transport::Udp => request.edns.as_ref().map_or(512, |e| {
                usize::from(e.max_payload().clamp(512, EDNS_PAYLOAD))
            }),
        };
        if !self.allowed(src) {
            self.metrics.query(qtype, Outcome::Refused);
            return Step::Reply(respond(&request, ResponseCode::Refused, &[], limit, false));
        }
        if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            self.metrics.query(qtype, Outcome::FormErr);
            return Step::Reply(respond(&request, ResponseCode::BADVERS, &[], limit, false));
        }

        if query.query_class() == DNSClass::IN {
            let table = self.table.load();
            let mut name = String::with_capacity(64);
            if normalise(query.name().iter(), &mut name) {
                if let Some(addr) = table.lookup(&name) {
                    self.metrics.query(qtype, Outcome::Local);
                    let owner = query.name();
                    let answers = match (query.query_type(), table.lookup_v6(&name)) {
                        (RecordType::A | RecordType::ANY, _) => {
                            vec![Record::from_rdata(
                                owner.clone(),
                                table.ttl,
                                RData::A(A(addr)),
                            )]
                        }
                        (RecordType::AAAA, Some(v6)) => {
                            vec![Record::from_rdata(
                                owner.clone(),
                                table.ttl,
                                RData::AAAA(AAAA(v6)),
                            )]
                        }
                        _ => Vec::new(),
                    };
                    // NODATA: the name is its own zone's apex as far as the client can
                    // tell (the shim owns exactly the names it answers).
                    let soa = if answers.is_empty() {
                        let apex = self
                            .zone_of(&name)
                            .map_or(owner.clone(), |z| apex_name(owner, z));
                        vec![soa_record(&apex, &table)]
                    } else {
                        Vec::new()
                    };
                    let sections = Sections {
                        answers: &answers,
                        authorities: &soa,
                        ..Sections::default()
                    };
                    return Step::Reply(respond(
                        &request,
                        ResponseCode::NoError,
                        &[sections],
                        limit,
                        true,
                    ));
                }
                if let Some(zone) = self.zone_of(&name) {
                    let apex = apex_name(query.name(), zone);
                    let soa = vec![soa_record(&apex, &table)];
                    let at_apex = name.len() == zone.len();
                    let (rcode, outcome) = if at_apex || table.has_names_below(&name) {
                        (ResponseCode::NoError, Outcome::Local)
                    } else {
                        (ResponseCode::NXDomain, Outcome::NxDomain)
                    };
                    self.metrics.query(qtype, outcome);
                    let apex_soa = at_apex && query.query_type() == RecordType::SOA;
                    let sections = if apex_soa {
                        Sections {
                            answers: &soa,
                            ..Sections::default()
                        }
                    } else {
                        Sections {
                            authorities: &soa,
                            ..Sections::default()
                        }
                    };
                    return Step::Reply(respond(&request, rcode, &[sections], limit, true));
                }
            }
        }
        if matches!(
            query.query_type(),
            RecordType::ANY | RecordType::AXFR | RecordType::IXFR
        ) {
            self.metrics.query(qtype, Outcome::Refused);
            return Step::Reply(respond(&request, ResponseCode::Refused, &[], limit, false));
        }

        let key = cache_key(query);
        if let Some(answer) = self.cache.get(&key, Instant::now()) {
            let outcome = if answer.rcode == ResponseCode::NXDomain {
                Outcome::NxDomain
            } else {
                Outcome::Cached
            };
            self.metrics.query(qtype, outcome);
            return Step::Reply(reply_with(&request, &answer, limit));
        }
        Step::Forward(Pending {
            request,
            key,
            limit,
            qtype,
        })
    }

    /// Counts a query dropped before [`Handler::resolve`] (e.g. over the in-flight limit).
    pub fn dropped(&self, p: &Pending) {
        self.metrics.query(p.qtype, Outcome::Dropped);
    }

    /// Finishes a [`Step::Forward`]: joins an identical query in flight, or asks upstream;
    /// returns the response bytes (SERVFAIL when no upstream answered).
    pub async fn resolve(self: &Arc<Self>, p: Pending) -> Vec<u8> {
        let mut flight = self.flight(&p);
        let result = match flight.wait_for(Option::is_some).await {
            Ok(v) => v.clone().unwrap_or(Err(())),
            Err(_) => Err(()),
        };
        match result {
            Ok(answer) => {
                let outcome = if answer.rcode == ResponseCode::NXDomain {
                    Outcome::NxDomain
                } else {
                    Outcome::Forwarded
                };
                self.metrics.query(p.qtype, outcome);
                reply_with(&p.request, &answer, p.limit)
            }
            Err(()) => {
                self.metrics.query(p.qtype, Outcome::ServFail);
                respond(&p.request, ResponseCode::ServFail, &[], p.limit, false)
            }
        }
    }

    /// The in-flight upstream query for `p`'s question, started if there is none. The
    /// upstream work runs in its own task, so a client that goes away (a closed TCP
    /// connection) does not cancel it for the others waiting on it.
    fn flight(self: &Arc<Self>, p: &Pending) -> Flight {
        let (tx, rx) = watch::channel(None);
        let Some(q) = p.request.queries.first() else {
            // `handle` only forwards queries with one question; answer SERVFAIL otherwise.
            let _ = tx.send(Some(Err(())));
            return rx;
        };
        let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(rx) = inflight.get(&p.key) {
            self.metrics.coalesced.inc();
            return rx.clone();
        }
        inflight.insert(p.key.clone(), rx.clone());
        drop(inflight);
        let query = upstream_query(q.name(), q.query_type(), q.query_class());
        let upstreams = self.upstreams();
        let this = Arc::clone(self);
        let key = p.key.clone();
        tokio::spawn(async move {
            let result = match this.forwarder.ask(&upstreams, &query).await {
                Ok(msg) => {
                    let answer = Arc::new(Answer {
                        rcode: msg.metadata.response_code,
                        answers: msg.answers,
                        authorities: msg.authorities,
                        additionals: msg.additionals,
                        received: Instant::now(),
                    });
                    this.cache.insert(key.clone(), answer.clone());
                    Ok(answer)
                }
                Err(e) => {
                    // Debug, not warn: a flood of queries while upstreams are down must not flood the
                    // log; `sidemesh_dns_queries_total{outcome="servfail"}` shows it.
                    tracing::debug!(name = %query.name(), qtype = %query.query_type(), error = %e, "no upstream answered");
                    Err(())
                }
            };
            this.inflight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key);
            let _ = tx.send(Some(result));
        });
        rx
    }

    /// The upstreams to ask: the config's, else the fallback ones; never the shim itself.
    fn upstreams(&self) -> Vec<SocketAddr> {
        let table = self.table.load();
        let list = if table.upstreams.is_empty() {
            &self.settings.fallback_upstreams
        } else {
            &table.upstreams
        };
        list.iter().copied().filter(|u| !self.is_own(*u)).collect()
    }

    fn is_own(&self, u: SocketAddr) -> bool {
        self.settings.own_addrs.iter().any(|own| {
            own.port() == u.port()
                && (own.ip() == u.ip()
                    || (own.ip().is_unspecified() && (u.ip().is_loopback() || u.ip() == own.ip())))
        })
    }

    /// The authoritative zone `name` (normalised) is in, if any.
    fn zone_of(&self, name: &str) -> Option<&str> {
        self.settings
            .authoritative
            .iter()
            .find(|z| {
                name.strip_suffix(z.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.ends_with('.'))
            })
            .map(String::as_str)
    }

    fn allowed(&self, src: IpAddr) -> bool {
        let src = match src {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(src, IpAddr::V4),
            v4 => v4,
        };
        src.is_loopback() || self.settings.allow_clients.iter().any(|n| n.contains(src))
    }
}

/// The last `zone`'s labels of `name` (as asked, case kept): the zone apex.
fn apex_name(name: &Name, zone: &str) -> Name {
    let labels = if zone.is_empty() {
        0
    } else {
        zone.split('.').count()
    };
    name.trim_to(labels)
}

/// The SOA of a zone the shim answers for (RFC 1035 section 3.3.13): the apex as primary
/// server, `hostmaster.<apex>` as mailbox, the config version as serial, and the
/// config's TTL as both the record's TTL and MINIMUM, which is how long a negative answer
/// may be cached (RFC 2308 section 5). Refresh, retry and expire only matter to secondary
/// servers, which the shim has none of.
fn soa_record(apex: &Name, table: &NameTable) -> Record {
    let mut apex = apex.clone();
    apex.set_fqdn(true);
    let rname = Name::from_ascii("hostmaster")
        .ok()
        .and_then(|h| h.append_domain(&apex).ok())
        .unwrap_or_else(|| apex.clone());
    let serial = table.version.map_or(0, |v| v as u32);
    let soa = SOA::new(apex.clone(), rname, serial, 3600, 600, 86400, table.ttl);
    Record::from_rdata(apex, table.ttl, RData::SOA(soa))
}

/// The sections of a response besides the question.
#[derive(Default)]
struct Sections<'a> {
    answers: &'a [Record],
    authorities: &'a [Record],
    additionals: &'a [Record],
}

/// The cache key of a question: lower-cased wire name, type, class.
fn cache_key(q: &Query) -> Key {
    let mut name = Vec::with_capacity(64);
    for label in q.name().iter() {
        name.push(u8::try_from(label.len()).unwrap_or(u8::MAX));
        name.extend(label.iter().map(u8::to_ascii_lowercase));
    }
    (name, u16::from(q.query_type()), u16::from(q.query_class()))
}

/// The response to `request` carrying `answer` with TTLs aged by its time in the cache.
fn reply_with(request: &Message, answer: &Answer, limit: usize) -> Vec<u8> {
    let elapsed = u32::try_from(answer.received.elapsed().as_secs()).unwrap_or(u32::MAX);
    let answers = Answer::aged(&answer.answers, elapsed);
    let authorities = Answer::aged(&answer.authorities, elapsed);
    let additionals = Answer::aged(&answer.additionals, elapsed);
    let sections = Sections {
        answers: &answers,
        authorities: &authorities,
        additionals: &additionals,
    };
    respond(request, answer.rcode, &[sections], limit, false)
}

/// Encodes the response to `request`: its ID, opcode, RD and CD copied (RFC 6895 section
/// 2), RA set, the question echoed as asked, an OPT record when the query had one (RFC 6891
/// section 6.1.1), and TC with empty sections when it would not fit in `limit` bytes.
fn respond(
    request: &Message,
    rcode: ResponseCode,
    sections: &[Sections<'_>],
    limit: usize,
    authoritative: bool,
) -> Vec<u8> {
    let mut m = Message::new(request.metadata.id, MessageType::Response, OpCode::Query);
    m.metadata.recursion_desired = request.metadata.recursion_desired;
    m.metadata.checking_disabled = request.metadata.checking_disabled;
    m.metadata.recursion_available = true;
    m.metadata.authoritative = authoritative;
    m.metadata.response_code = rcode;
    m.queries = request.queries.clone();
    for s in sections {
        m.answers.extend_from_slice(s.answers);
        m.authorities.extend_from_slice(s.authorities);
        m.additionals.extend_from_slice(s.additionals);
    }
    if request.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        m.set_edns(edns);
    }
    match m.to_vec() {
        Ok(bytes) if bytes.len() <= limit => bytes,
        Ok(_) => {
            m.answers.clear();
            m.authorities.clear();
            m.additionals.clear();
            m.metadata.truncation = true;
            m.metadata.authoritative = false;
            m.to_vec()
                .unwrap_or_else(|_| header_only_for(&request.metadata, ResponseCode::ServFail))
        }
        Err(e) => {
            tracing::debug!(error = %e, "cannot encode a response");
            header_only_for(&request.metadata, ResponseCode::ServFail)
        }
    }
}

fn header_only_for(meta: &hickory_proto::op::Metadata, rcode: ResponseCode) -> Vec<u8> {
    let [id0, id1] = meta.id.to_be_bytes();
    let flags2 = if meta.recursion_desired { 1 } else { 0 };
    header_only(&[id0, id1, flags2, 0], rcode)
}

/// A 12-byte response with no sections, built from a query header that may not decode:
/// ID and OPCODE and RD copied, QR and RA set (RFC 1035 section 4.1.1).
fn header_only(head: &[u8], rcode: ResponseCode) -> Vec<u8> {
    let id = [
        head.first().copied().unwrap_or(0),
        head.get(1).copied().unwrap_or(0),
    ];
    let flags = head.get(2).copied().unwrap_or(0);
    let byte2 = 0x80 | (flags & 0x78) | (flags & 0x01);
    // Only the low 4 bits fit the header; FORMERR/NOTIMP/SERVFAIL all do.
    let byte3 = 0x80 | (u16::from(rcode) & 0x0f) as u8;
    let mut out = vec![0u8; 12];
    out[..4].copy_from_slice(&[id[0], id[1], byte2, byte3]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn handler() -> Handler {
        let snap = crate::table::tests::snapshot(1);
        let table = NameTable::build(Some(&snap), &["web.svc.cluster.local".to_owned()]);
        let metrics = Metrics::new(&prometheus::Registry::new()).unwrap();
        Handler::new(
            table,
            HandlerSettings {
                fallback_upstreams: vec![],
                own_addrs: vec!["127.0.0.1:5353".parse().unwrap()],
                allow_clients: vec!["10.1.0.0/16".parse().unwrap()],
                upstream_timeout: Duration::from_millis(100),
                cache_size: 10,
                authoritative: vec![],
            },
            metrics,
        )
    }

    fn query(name: &str, t: RecordType, edns: Option<u16>) -> Vec<u8> {
        let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    const LO: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    fn reply(h: &Handler, packet: &[u8], src: IpAddr) -> Message {
        match h.handle(packet, src, Transport::Udp) {
            Step::Reply(b) => Message::from_vec(&b).unwrap(),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    #[test]
    fn local_a_in_any_case_and_form() {
        let h = handler();
        for name in [
            "tomcat.",
            "TomCat",
            "tomcat.shop.",
            "TOMCAT.shop.svc.cluster.local.",
            "tomcat.web.svc.cluster.local.",
        ] {
            let r = reply(&h, &query(name, RecordType::A, None), LO);
            assert_eq!(r.metadata.id, 0x1234);
            assert_eq!(r.metadata.message_type, MessageType::Response);
            assert_eq!(r.metadata.response_code, ResponseCode::NoError, "{name}");
            assert!(r.metadata.authoritative && r.metadata.recursion_desired);
            assert_eq!(r.answers.len(), 1, "{name}");
            assert_eq!(r.answers[0].ttl, 7);
            assert_eq!(r.answers[0].data, RData::A(A(Ipv4Addr::new(127, 1, 0, 7))));
            // The question is echoed exactly as asked (case preserved).
            assert_eq!(
                r.queries[0].name().to_ascii().trim_end_matches('.'),
                name.trim_end_matches('.')
            );
        }
    }

    /// The SOA in a NODATA or NXDOMAIN answer: its owner, TTL and MINIMUM.
    fn soa_of(r: &Message) -> (String, u32, u32) {
        assert_eq!(r.authorities.len(), 1, "{r:?}");
        let rec = &r.authorities[0];
        let RData::SOA(soa) = &rec.data else {
            panic!("not an SOA: {rec:?}");
        };
        (rec.name.to_ascii(), rec.ttl, soa.minimum)
    }

    #[test]
    fn local_aaaa_when_configured_nodata_with_soa_otherwise_any_is_minimal() {
        let h = handler();
        let r = reply(&h, &query("tomcat.shop.", RecordType::AAAA, None), LO);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.metadata.authoritative);
        assert_eq!(r.answers.len(), 1);
        assert_eq!(r.answers[0].ttl, 7);
        assert_eq!(
            r.answers[0].data,
            RData::AAAA(AAAA("fd00::7".parse().unwrap()))
        );
        // db has no IPv6 address: NODATA, with an SOA so caches keep it for the TTL.
        for (name, t) in [
            ("db.Data.", RecordType::AAAA),
            ("tomcat.shop.", RecordType::MX),
            ("tomcat.shop.", RecordType::TXT),
        ] {
            let r = reply(&h, &query(name, t, Some(1232)), LO);
            assert_eq!(
                r.metadata.response_code,
                ResponseCode::NoError,
                "{name} {t}"
            );
            assert!(r.answers.is_empty());
            assert_eq!(soa_of(&r), (name.to_owned(), 7, 7), "{name} {t}");
            assert!(r.edns.is_some(), "OPT echoed when the query had one");
        }
        let r = reply(&h, &query("tomcat.", RecordType::ANY, None), LO);
        assert_eq!(r.answers.len(), 1);
        let r = reply(&h, &query("example.com.", RecordType::ANY, None), LO);
        assert_eq!(r.metadata.response_code, ResponseCode::Refused);
    }

    #[test]
    fn authoritative_zone_answers_nxdomain_and_empty_non_terminals_itself() {
        let mut h = handler();
        h.settings.authoritative = vec!["cluster.local".to_owned()];
        let code = |name: &str, t: RecordType| {
            let r = reply(&h, &query(name, t, None), LO);
            assert!(r.metadata.authoritative, "{name}");
            (r.metadata.response_code, r)
        };
        // Not a mesh name, nothing below it: NXDOMAIN with the zone's SOA (case kept).
        let (rc, r) = code("nosuch.shop.svc.Cluster.Local.", RecordType::A);
        assert_eq!(rc, ResponseCode::NXDomain);
        assert_eq!(soa_of(&r), ("Cluster.Local.".to_owned(), 7, 7));
        // Empty non-terminals and the apex exist: NODATA, never NXDOMAIN (RFC 8020).
        for name in [
            "shop.svc.cluster.local.",
            "svc.cluster.local.",
            "cluster.local.",
        ] {
            let (rc, r) = code(name, RecordType::A);
            assert_eq!(rc, ResponseCode::NoError, "{name}");
            assert!(r.answers.is_empty());
            assert_eq!(soa_of(&r).0, "cluster.local.");
        }
        // The apex answers its SOA.
        let (rc, r) = code("cluster.local.", RecordType::SOA);
        assert_eq!(rc, ResponseCode::NoError);
        assert!(matches!(r.answers[..], [ref soa] if soa.record_type() == RecordType::SOA));
        // A mesh name in the zone keeps its answer; its NODATA names the zone's apex.
        let (_, r) = code("tomcat.shop.svc.cluster.local.", RecordType::A);
        assert_eq!(r.answers.len(), 1);
        let (_, r) = code("db.data.svc.cluster.local.", RecordType::AAAA);
        assert_eq!(soa_of(&r).0, "cluster.local.");
        // Names outside the zone still go upstream; a zone is matched on label bounds.
        for name in ["example.com.", "xcluster.local."] {
            let q = query(name, RecordType::A, None);
            assert!(
                matches!(h.handle(&q, LO, Transport::Udp), Step::Forward(_)),
                "{name}"
            );
        }
    }

    #[test]
    fn responses_and_runts_are_dropped() {
        let h = handler();
        let mut q = query("tomcat.", RecordType::A, None);
        q[2] |= 0x80;
        assert!(matches!(h.handle(&q, LO, Transport::Udp), Step::Drop));
        assert!(matches!(h.handle(&q[..5], LO, Transport::Udp), Step::Drop));
        assert!(matches!(h.handle(&[], LO, Transport::Tcp), Step::Drop));
    }

    #[test]
    fn malformed_and_odd_queries_get_error_codes() {
        let h = handler();
        let mut q = query("tomcat.", RecordType::A, None);
        q[5] = 2; // QDCOUNT 2
        let r = reply(&h, &q, LO);
        assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
        let mut q = query("tomcat.", RecordType::A, None);
        q.truncate(q.len() - 3);
        assert_eq!(
            reply(&h, &q, LO).metadata.response_code,
            ResponseCode::FormErr
        );
        let mut q = query("tomcat.", RecordType::A, None);
        q[2] |= 2 << 3; // OPCODE STATUS
        assert_eq!(
            reply(&h, &q, LO).metadata.response_code,
            ResponseCode::NotImp
        );
        let mut m = Message::from_vec(&query("tomcat.", RecordType::A, Some(1232))).unwrap();
        m.edns.as_mut().unwrap().set_version(1);
        let r = reply(&h, &m.to_vec().unwrap(), LO);
        // BADVERS and BADSIG share code 16 (RFC 6891 section 9, RFC 8945).
        assert_eq!(u16::from(r.metadata.response_code), 16);
        assert!(r.edns.is_some());
    }

    #[test]
    fn only_loopback_and_allowed_networks_are_served() {
        let h = handler();
        let q = query("tomcat.", RecordType::A, None);
        let far = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
        assert_eq!(
            reply(&h, &q, far).metadata.response_code,
            ResponseCode::Refused
        );
        let near = IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3));
        assert_eq!(reply(&h, &q, near).answers.len(), 1);
        assert_eq!(
            reply(&h, &q, IpAddr::V6(Ipv6Addr::LOCALHOST)).answers.len(),
            1
        );
    }

    #[test]
    fn other_names_go_upstream_and_never_to_ourselves() {
        let h = handler();
        let q = query("example.com.", RecordType::A, None);
        assert!(matches!(h.handle(&q, LO, Transport::Udp), Step::Forward(_)));
        assert!(h.is_own("127.0.0.1:5353".parse().unwrap()));
        assert!(!h.is_own("127.0.0.1:53".parse().unwrap()));
    }

    #[test]
    fn too_large_for_udp_is_truncated() {
        let h = handler();
        let q = Message::from_vec(&query("big.example.", RecordType::A, None)).unwrap();
        let records: Vec<Record> = (0..100)
            .map(|i| {
                Record::from_rdata(
                    Name::from_ascii("big.example.").unwrap(),
                    60,
                    RData::A(A(Ipv4Addr::new(192, 0, 2, i))),
                )
            })
            .collect();
        let s = Sections {
            answers: &records,
            ..Sections::default()
        };
        let bytes = respond(&q, ResponseCode::NoError, &[s], 512, false);
        let r = Message::from_vec(&bytes).unwrap();
        assert!(r.metadata.truncation && r.answers.is_empty());
        assert_eq!(r.queries.len(), 1);
        let s = Sections {
            answers: &records,
            ..Sections::default()
        };
        let bytes = respond(&q, ResponseCode::NoError, &[s], 65535, false);
        assert_eq!(Message::from_vec(&bytes).unwrap().answers.len(), 100);
        drop(h);
    }

    #[test]
    fn fast_path_replies_like_the_decoding_path() {
        let h = handler();
        let mut seen_fast = 0;
        let names = [
            "tomcat.",
            "TomCat.shop.",
            "tomcat.web.svc.cluster.local.",
            "nope.",
        ];
        for i in 0..4000usize {
            let t = [RecordType::A, RecordType::AAAA, RecordType::MX][i % 3];
            let edns = [None, Some(512), Some(4096)][(i / 3) % 3];
            let mut p = query(
                names[i % names.len()],
                t,
                if i % 2 == 0 { edns } else { None },
            );
            if i % 5 == 0 {
                let at = rand::random_range(0..p.len());
                p[at] = rand::random();
            }
            if i % 7 == 0 {
                p[3] |= 0x10; // CD
            }
            for transport in [Transport::Udp, Transport::Tcp] {
                let Some((fast, _)) = h.fast_local(&p, LO) else {
                    continue;
                };
                seen_fast += 1;
                let Step::Reply(slow) = h.handle_decoded(&p, LO, transport) else {
                    panic!("fast path answered what the decoding path does not: {p:?}");
                };
                assert_eq!(fast, slow, "bytes differ for {p:?}");
            }
        }
        assert!(seen_fast > 1000, "{seen_fast}");
        // Found by the fuzzer: an OPT record whose options hickory rejects (FORMERR).
        let crash = [
            0, 2, 1, 0, 0, 1, 0, 0, 0, 0, 0, 1, 6, b'T', b'o', b'm', b'C', b'a', b't', 4, b's',
            b'h', b'o', b'p', 0, 0, 28, 0, 1, 0, 0, 41, 0x6e, 0, 0, 0, 0x74, 0x50, 0, 0x0f, 0,
            0x61, 0, 1, 0, 0, 0x29, 2, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert!(h.fast_local(&crash, LO).is_none());
        crate::fuzzing::packet(&crash);
    }

    #[test]
    fn networks_parse_and_match() {
        let n: Network = "10.1.0.0/16".parse().unwrap();
        assert!(n.contains("10.1.200.3".parse().unwrap()));
        assert!(!n.contains("10.2.0.1".parse().unwrap()));
        let any: Network = "0.0.0.0/0".parse().unwrap();
        assert!(any.contains("192.0.2.1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Network>().is_err());
        assert!("nope".parse::<Network>().is_err());
        let one: Network = "fd00::1".parse().unwrap();
        assert!(one.contains("fd00::1".parse().unwrap()));
        assert!(!one.contains("fd00::2".parse().unwrap()));
    }
}
