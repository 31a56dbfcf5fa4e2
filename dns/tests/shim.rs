//! Integration tests of the DNS shim: real queries over UDP and TCP on loopback, with
//! hickory's resolver as the client and a fake upstream (built on hickory-proto) that can
//! answer, truncate, fail, stay silent or spoof.

// Helpers outside `#[test]` functions are test code too; clippy.toml only knows the latter.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::{Resolver, TokioResolver};
use sidemesh_api::Snapshot;
use sidemesh_dns::{Shim, ShimHandle, ShimOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;
use tokio::time::timeout;

const T: Duration = Duration::from_secs(5);

// ---- config ------------------------------------------------------------------------

fn config(version: u64, services: &[(&str, &str, &str)], upstreams: &[SocketAddr]) -> Snapshot {
    let outbound: Vec<_> = services
        .iter()
        .map(|(name, ns, addr)| {
            serde_json::json!({
                "name": name, "namespace": ns,
                "dns_names": [name, format!("{name}.{ns}"), format!("{name}.{ns}.svc"),
                              format!("{name}.{ns}.svc.cluster.local")],
                "address": addr,
                "ports": [{"port": 8080}]
            })
        })
        .collect();
    let upstreams: Vec<String> = upstreams.iter().map(ToString::to_string).collect();
    let json = serde_json::json!({
        "version": version,
        "identity": {"namespace": "web", "service": "front", "plugin": "sidemesh-proxy"},
        "outbound": outbound,
        "dns": {"upstreams": upstreams, "ttl_seconds": 5}
    });
    Snapshot::from_json(json.to_string().as_bytes()).unwrap()
}

struct Running {
    shim: ShimHandle,
    registry: prometheus::Registry,
    tx: watch::Sender<Option<Snapshot>>,
}

async fn start(snapshot: Option<Snapshot>, fallback: Vec<SocketAddr>) -> Running {
    let (tx, rx) = watch::channel(snapshot);
    let registry = prometheus::Registry::new();
    let opts = ShimOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        fallback_upstreams: fallback,
        search: vec!["web.svc.cluster.local".into(), "svc.cluster.local".into()],
        upstream_timeout: Duration::from_millis(300),
        ..ShimOptions::default()
    };
    let shim = Shim::start(opts, rx, &registry).await.unwrap();
    Running { shim, registry, tx }
}

/// Sums the samples of `name` whose labels include `labels`, from the text exposition.
fn metric(registry: &prometheus::Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    use prometheus::Encoder;
    let mut buf = Vec::new();
    prometheus::TextEncoder::new()
        .encode(&registry.gather(), &mut buf)
        .unwrap();
    let text = String::from_utf8(buf).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// ---- clients -----------------------------------------------------------------------

fn resolver(addr: SocketAddr, tcp: bool) -> TokioResolver {
    let mut ns = if tcp {
        NameServerConfig::tcp(addr.ip())
    } else {
        NameServerConfig::udp(addr.ip())
    };
    for c in &mut ns.connections {
        c.port = addr.port();
    }
    let mut b = Resolver::builder_with_config(
        ResolverConfig::from_name_servers(vec![ns]),
        TokioRuntimeProvider::default(),
    );
    let opts = b.options_mut();
    opts.cache_size = 0;
    opts.attempts = 1;
    opts.timeout = Duration::from_secs(3);
    b.build().unwrap()
}

fn query(name: &str, t: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut m = Message::new(rand::random(), MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

/// Sends raw bytes over UDP and waits (bounded) for one reply.
async fn udp_raw(addr: SocketAddr, bytes: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(bytes, addr).await.unwrap();
    let mut buf = vec![0u8; 65_536];
    let (n, _) = timeout(wait, sock.recv_from(&mut buf)).await.ok()?.ok()?;
    buf.truncate(n);
    Some(buf)
}

async fn udp_ask(addr: SocketAddr, name: &str, t: RecordType, edns: Option<u16>) -> Message {
    let bytes = udp_raw(addr, &query(name, t, edns), T)
        .await
        .expect("a reply");
    Message::from_vec(&bytes).unwrap()
}

async fn tcp_ask(addr: SocketAddr, name: &str, t: RecordType) -> Message {
    let q = query(name, t, None);
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&q);
    s.write_all(&framed).await.unwrap();
    let mut len = [0u8; 2];
    timeout(T, s.read_exact(&mut len)).await.unwrap().unwrap();
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    timeout(T, s.read_exact(&mut buf)).await.unwrap().unwrap();
    Message::from_vec(&buf).unwrap()
}

fn addrs(m: &Message) -> Vec<Ipv4Addr> {
    m.answers
        .iter()
        .filter_map(|r| match r.data {
            RData::A(A(ip)) => Some(ip),
            _ => None,
        })
        .collect()
}

// ---- the fake upstream -------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Answers (see `answer`).
    Normal,
    /// SERVFAIL to everything.
    ServFail,
    /// Never answers.
    Silent,
    /// Sends three forged replies before the real one.
    Spoof,
}

struct Upstream {
    addr: SocketAddr,
    hits: Arc<Mutex<HashMap<String, usize>>>,
}

impl Upstream {
    fn hits(&self, name: &str) -> usize {
        self.hits.lock().unwrap().get(name).copied().unwrap_or(0)
    }
}

const GOOD: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const FORGED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 66);

fn a(name: &Name, ip: Ipv4Addr) -> Record {
    Record::from_rdata(name.clone(), 60, RData::A(A(ip)))
}

/// The fake zone `example.test`: `nx.` is NXDOMAIN (with SOA, so cacheable), `big.` has
/// 100 addresses (truncated over UDP), anything else has 192.0.2.7; other zones NXDOMAIN.
fn answer(q: &Message, tcp: bool) -> Message {
    let mut r = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
    r.metadata.recursion_available = true;
    r.metadata.recursion_desired = q.metadata.recursion_desired;
    r.queries = q.queries.clone();
    let Some(query) = q.queries.first() else {
        r.metadata.response_code = ResponseCode::FormErr;
        return r;
    };
    let name = query.name().clone();
    let lower = name.to_lowercase().to_ascii();
    let zone = Name::from_ascii("example.test.").unwrap();
    if lower == "nx.example.test." || !lower.ends_with("example.test.") {
        r.metadata.response_code = ResponseCode::NXDomain;
        r.add_authority(Record::from_rdata(
            zone.clone(),
            30,
            RData::SOA(SOA::new(zone.clone(), zone, 1, 60, 60, 60, 30)),
        ));
    } else if lower == "big.example.test." {
        if tcp {
            for i in 0..100 {
                r.add_answer(a(&name, Ipv4Addr::new(192, 0, 2, i)));
            }
        } else {
            r.metadata.truncation = true;
        }
    } else if query.query_type() == RecordType::A {
        r.add_answer(a(&name, GOOD));
    }
    r
}

async fn upstream(mode: Mode) -> Upstream {
    let (udp, tcp) = loop {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        if let Ok(tcp) = TcpListener::bind(udp.local_addr().unwrap()).await {
            break (Arc::new(udp), tcp);
        }
    };
    let addr = udp.local_addr().unwrap();
    let hits: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let h = hits.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        let forger = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        loop {
            let Ok((n, src)) = udp.recv_from(&mut buf).await else {
                return;
            };
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let name = q.queries[0].name().to_lowercase().to_ascii();
            *h.lock().unwrap().entry(name.clone()).or_default() += 1;
            let reply = match mode {
                Mode::Silent => continue,
                Mode::ServFail => {
                    let mut r = answer(&q, false);
                    r.answers.clear();
                    r.authorities.clear();
                    r.metadata.response_code = ResponseCode::ServFail;
                    r
                }
                Mode::Normal | Mode::Spoof => answer(&q, false),
            };
            if mode == Mode::Spoof {
                let qname = q.queries[0].name().clone();
                // Right ID and question, wrong source port.
                let mut f = answer(&q, false);
                f.answers = vec![a(&qname, FORGED)];
                forger.send_to(&f.to_vec().unwrap(), src).await.unwrap();
                // Right source, wrong ID.
                let mut f2 = answer(&q, false);
                f2.answers = vec![a(&qname, FORGED)];
                f2.metadata.id = q.metadata.id.wrapping_add(1);
                udp.send_to(&f2.to_vec().unwrap(), src).await.unwrap();
                // Right source and ID, another question.
                let mut other = q.clone();
                other.queries = vec![Query::query(
                    Name::from_ascii("evil.example.test.").unwrap(),
                    RecordType::A,
                )];
                let mut f3 = answer(&other, false);
                f3.answers = vec![a(&qname, FORGED)];
                udp.send_to(&f3.to_vec().unwrap(), src).await.unwrap();
            }
            let bytes = reply.to_vec().unwrap();
            let udp = udp.clone();
            let delay = if name.starts_with("slow.") { 200 } else { 0 };
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(delay)).await;
                let _ = udp.send_to(&bytes, src).await;
            });
        }
    });
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = tcp.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut len = [0u8; 2];
                if s.read_exact(&mut len).await.is_err() {
                    return;
                }
                let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
                if s.read_exact(&mut buf).await.is_err() {
                    return;
                }
                let Ok(q) = Message::from_vec(&buf) else {
                    return;
                };
                let bytes = answer(&q, true).to_vec().unwrap();
                let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
                framed.extend_from_slice(&bytes);
                let _ = s.write_all(&framed).await;
            });
        }
    });
    Upstream { addr, hits }
}

// ---- tests -------------------------------------------------------------------------

#[tokio::test]
async fn local_names_over_udp_and_tcp_with_hickory_resolver() {
    let snap = config(1, &[("tomcat", "shop", "127.1.0.7")], &[]);
    let r = start(Some(snap), vec![]).await;
    let want = IpAddr::V4(Ipv4Addr::new(127, 1, 0, 7));
    for tcp in [false, true] {
        let client = resolver(r.shim.udp_addr(), tcp);
        for name in [
            "tomcat.",
            "TOMCAT.Shop.",
            "tomcat.shop.svc.",
            "tomcat.shop.svc.cluster.local.",
            "tomcat.web.svc.cluster.local.",
            "tomcat.svc.cluster.local.",
        ] {
            let ips: Vec<IpAddr> = client.lookup_ip(name).await.unwrap().iter().collect();
            assert_eq!(ips, vec![want], "{name} over tcp={tcp}");
        }
        // AAAA for a mesh name: no records, but the name exists (not NXDOMAIN).
        let err = client
            .lookup("tomcat.shop.", RecordType::AAAA)
            .await
            .unwrap_err();
        assert!(err.is_no_records_found() && !err.is_nx_domain(), "{err}");
    }
    assert!(
        metric(
            &r.registry,
            "sidemesh_dns_queries_total",
            &[("outcome", "local")]
        ) >= 12.0
    );
}

#[tokio::test]
async fn forwards_caches_and_keeps_nxdomain() {
    let up = upstream(Mode::Normal).await;
    let r = start(Some(config(1, &[], &[])), vec![up.addr]).await;
    let addr = r.shim.udp_addr();
    let m = udp_ask(addr, "www.Example.test.", RecordType::A, None).await;
    assert_eq!(addrs(&m), vec![GOOD]);
    assert_eq!(
        m.queries[0].name().to_ascii(),
        "www.Example.test.",
        "question echoed as asked"
    );
    let m = udp_ask(addr, "WWW.example.TEST.", RecordType::A, Some(1232)).await;
    assert_eq!(addrs(&m), vec![GOOD]);
    assert!(m.answers[0].ttl <= 60);
    assert!(m.edns.is_some());
    assert_eq!(
        up.hits("www.example.test."),
        1,
        "second answer came from the cache"
    );

    for _ in 0..2 {
        let m = udp_ask(addr, "nx.example.test.", RecordType::A, None).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(m.authorities.len(), 1, "SOA passed on for negative caching");
    }
    assert_eq!(
        up.hits("nx.example.test."),
        1,
        "negative answer cached (RFC 2308)"
    );
    assert_eq!(
        metric(
            &r.registry,
            "sidemesh_dns_queries_total",
            &[("outcome", "cached")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &r.registry,
            "sidemesh_dns_queries_total",
            &[("outcome", "nxdomain")]
        ),
        2.0
    );
    assert_eq!(metric(&r.registry, "sidemesh_dns_cache_entries", &[]), 2.0);
    // And through hickory's resolver over TCP.
    let client = resolver(addr, true);
    let ips: Vec<IpAddr> = client
        .lookup_ip("www.example.test.")
        .await
        .unwrap()
        .iter()
        .collect();
    assert_eq!(ips, vec![IpAddr::V4(GOOD)]);
}

#[tokio::test]
async fn identical_concurrent_queries_are_coalesced() {
    let up = upstream(Mode::Normal).await;
    let r = start(None, vec![up.addr]).await;
    let addr = r.shim.udp_addr();
    let asks: Vec<_> = (0..20)
        .map(|_| tokio::spawn(udp_ask(addr, "slow.example.test.", RecordType::A, None)))
        .collect();
    for a in asks {
        assert_eq!(addrs(&a.await.unwrap()), vec![GOOD]);
    }
    assert_eq!(up.hits("slow.example.test."), 1);
    assert!(metric(&r.registry, "sidemesh_dns_coalesced_queries_total", &[]) >= 1.0);
}

#[tokio::test]
async fn truncated_upstream_reply_is_retried_over_tcp_and_fitted_to_the_client() {
    let up = upstream(Mode::Normal).await;
    let r = start(None, vec![up.addr]).await;
    let addr = r.shim.udp_addr();
    // Over TCP the client gets all 100 records, which the shim fetched over TCP.
    let m = tcp_ask(addr, "big.example.test.", RecordType::A).await;
    assert_eq!(m.answers.len(), 100);
    // Over UDP without EDNS (512 bytes), TC=1 and no records.
    let bytes = udp_raw(addr, &query("big.example.test.", RecordType::A, None), T)
        .await
        .unwrap();
    assert!(bytes.len() <= 512);
    let m = Message::from_vec(&bytes).unwrap();
    assert!(m.metadata.truncation && m.answers.is_empty());
    // With EDNS 4096 the shim still caps UDP at 1232 (RFC 6891, DNS flag day 2020).
    let bytes = udp_raw(
        addr,
        &query("big.example.test.", RecordType::A, Some(4096)),
        T,
    )
    .await
    .unwrap();
    assert!(bytes.len() <= 1232, "{}", bytes.len());
    assert!(Message::from_vec(&bytes).unwrap().metadata.truncation);
}

#[tokio::test]
async fn fails_over_and_servfails_only_when_all_fail() {
    let silent = upstream(Mode::Silent).await;
    let broken = upstream(Mode::ServFail).await;
    let good = upstream(Mode::Normal).await;
    let r = start(None, vec![silent.addr, broken.addr, good.addr]).await;
    let addr = r.shim.udp_addr();
    let m = udp_ask(addr, "a.example.test.", RecordType::A, None).await;
    assert_eq!(addrs(&m), vec![GOOD]);
    assert_eq!(
        (
            silent.hits("a.example.test."),
            broken.hits("a.example.test.")
        ),
        (1, 1)
    );
    // The good upstream is now preferred: the next query does not wait for the silent one.
    let started = std::time::Instant::now();
    let m = udp_ask(addr, "b.example.test.", RecordType::A, None).await;
    assert_eq!(addrs(&m), vec![GOOD]);
    assert!(started.elapsed() < Duration::from_millis(250));
    assert_eq!(silent.hits("b.example.test."), 0);

    let r2 = start(None, vec![silent.addr, broken.addr]).await;
    let m = udp_ask(r2.shim.udp_addr(), "c.example.test.", RecordType::A, None).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(
        metric(
            &r2.registry,
            "sidemesh_dns_queries_total",
            &[("outcome", "servfail")]
        ),
        1.0
    );
    // No upstream at all: SERVFAIL too, never NXDOMAIN.
    let r3 = start(None, vec![]).await;
    let m = udp_ask(r3.shim.udp_addr(), "d.example.test.", RecordType::A, None).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
}

#[tokio::test]
async fn spoofed_upstream_replies_are_ignored() {
    let up = upstream(Mode::Spoof).await;
    let r = start(None, vec![up.addr]).await;
    let m = udp_ask(r.shim.udp_addr(), "bank.example.test.", RecordType::A, None).await;
    assert_eq!(addrs(&m), vec![GOOD]);
    // The forged answers never reached the cache either.
    let m = udp_ask(r.shim.udp_addr(), "bank.example.test.", RecordType::A, None).await;
    assert_eq!(addrs(&m), vec![GOOD]);
    assert_eq!(
        metric(
            &r.registry,
            "sidemesh_dns_upstream_rejected_replies_total",
            &[]
        ),
        3.0
    );
}

#[tokio::test]
async fn names_follow_the_config_without_restart() {
    let up = upstream(Mode::Normal).await;
    let r = start(
        Some(config(1, &[("tomcat", "shop", "127.1.0.7")], &[])),
        vec![up.addr],
    )
    .await;
    let addr = r.shim.udp_addr();
    assert_eq!(
        addrs(&udp_ask(addr, "tomcat.", RecordType::A, None).await),
        [Ipv4Addr::new(127, 1, 0, 7)]
    );
    assert_eq!(
        udp_ask(addr, "mysql.", RecordType::A, None)
            .await
            .metadata
            .response_code,
        ResponseCode::NXDomain
    );
    // Version 2 adds mysql and removes tomcat; its upstream list is the same fake.
    r.tx.send(Some(config(
        2,
        &[("mysql", "data", "127.1.0.9")],
        &[up.addr],
    )))
    .unwrap();
    let mut ok = false;
    for _ in 0..100 {
        if addrs(&udp_ask(addr, "mysql.data.svc.cluster.local.", RecordType::A, None).await)
            == [Ipv4Addr::new(127, 1, 0, 9)]
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "new name resolves after the update");
    let m = udp_ask(addr, "tomcat.", RecordType::A, None).await;
    assert_eq!(
        m.metadata.response_code,
        ResponseCode::NXDomain,
        "removed name is forwarded"
    );
    assert_eq!(up.hits("tomcat."), 1);
}

#[tokio::test]
async fn hostile_packets_never_crash_or_stall_it() {
    let r = start(
        Some(config(1, &[("tomcat", "shop", "127.1.0.7")], &[])),
        vec![],
    )
    .await;
    let addr = r.shim.udp_addr();
    // A response (QR=1) is never answered.
    let mut q = query("tomcat.", RecordType::A, None);
    q[2] |= 0x80;
    assert!(
        udp_raw(addr, &q, Duration::from_millis(300))
            .await
            .is_none()
    );
    // Random junk and mangled queries, over UDP and TCP.
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let base = query("tomcat.shop.svc.cluster.local.", RecordType::A, Some(1232));
    for i in 0..2000usize {
        let mut p = if i % 2 == 0 {
            base.clone()
        } else {
            (0..(i % 300)).map(|_| rand::random::<u8>()).collect()
        };
        if i % 2 == 0 && !p.is_empty() {
            for _ in 0..(1 + i % 4) {
                let at = rand::random::<u32>() as usize % p.len();
                p[at] = rand::random();
            }
            p.truncate(rand::random::<u32>() as usize % (p.len() + 1));
        }
        let _ = sock.send_to(&p, addr).await;
    }
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(&[0x00, 0x20, 1, 2, 3]).await.unwrap();
    drop(tcp);
    // Still answering, promptly.
    let m = udp_ask(addr, "tomcat.", RecordType::A, None).await;
    assert_eq!(addrs(&m), [Ipv4Addr::new(127, 1, 0, 7)]);
    let m = tcp_ask(addr, "tomcat.", RecordType::A).await;
    assert_eq!(addrs(&m), [Ipv4Addr::new(127, 1, 0, 7)]);
    // ANY for a forwarded name is refused; for a mesh name, one A record.
    let m = udp_ask(addr, "example.test.", RecordType::ANY, None).await;
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    let m = udp_ask(addr, "tomcat.", RecordType::ANY, None).await;
    assert_eq!(m.answers.len(), 1);
}

#[tokio::test]
async fn binds_loopback_by_default_and_stops_on_shutdown() {
    assert_eq!(
        ShimOptions::default().listen,
        "127.0.0.1:53".parse().unwrap()
    );
    let r = start(None, vec![]).await;
    let addr = r.shim.udp_addr();
    assert!(addr.ip().is_loopback());
    assert_eq!(r.shim.tcp_addr(), addr);
    r.shim.shutdown().await;
    assert!(
        udp_raw(
            addr,
            &query("x.", RecordType::A, None),
            Duration::from_millis(300)
        )
        .await
        .is_none()
    );
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn a_burst_from_many_clients_gets_each_its_own_answer() {
    let r = start(
        Some(config(1, &[("tomcat", "shop", "127.1.0.7")], &[])),
        vec![],
    )
    .await;
    let addr = r.shim.udp_addr();
    let mut clients = Vec::new();
    for i in 0..64u16 {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut m = Message::from_vec(&query("tomcat.", RecordType::A, None)).unwrap();
        m.metadata.id = i;
        sock.send_to(&m.to_vec().unwrap(), addr).await.unwrap();
        clients.push((i, sock));
    }
    for (i, sock) in clients {
        let mut buf = vec![0u8; 4096];
        let (n, from) = timeout(T, sock.recv_from(&mut buf)).await.unwrap().unwrap();
        assert_eq!(from, addr);
        let m = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!(m.metadata.id, i);
        assert_eq!(addrs(&m), [Ipv4Addr::new(127, 1, 0, 7)]);
    }
}

#[tokio::test]
async fn pipelined_tcp_queries_are_answered_as_ready_and_matched_by_id() {
    // RFC 7766 sections 6.2.1.1 and 7: a slow upstream query must not hold up the answers
    // queued behind it on the same connection.
    let up = upstream(Mode::Normal).await;
    let r = start(
        Some(config(1, &[("tomcat", "shop", "127.1.0.7")], &[])),
        vec![up.addr],
    )
    .await;
    let mut s = tokio::net::TcpStream::connect(r.shim.udp_addr())
        .await
        .unwrap();
    let asked = [
        ("slow.example.test.", RecordType::A),
        ("tomcat.shop.", RecordType::A),
        ("www.example.test.", RecordType::A),
    ];
    let mut ids = Vec::new();
    let mut burst = Vec::new();
    // 3 kinds × 10 rounds, all written before reading anything.
    for _ in 0..10 {
        for (name, t) in asked {
            let q = query(name, t, None);
            ids.push((u16::from_be_bytes([q[0], q[1]]), name));
            burst.extend_from_slice(&(q.len() as u16).to_be_bytes());
            burst.extend_from_slice(&q);
        }
    }
    s.write_all(&burst).await.unwrap();
    let mut order = Vec::new();
    for _ in 0..ids.len() {
        let mut len = [0u8; 2];
        timeout(T, s.read_exact(&mut len)).await.unwrap().unwrap();
        let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
        timeout(T, s.read_exact(&mut buf)).await.unwrap().unwrap();
        let m = Message::from_vec(&buf).unwrap();
        let name = ids
            .iter()
            .find(|(id, _)| *id == m.metadata.id)
            .map(|(_, n)| *n)
            .expect("a reply to an ID that was asked");
        assert_eq!(m.queries[0].name().to_ascii(), name);
        assert_eq!(m.answers.len(), 1, "{name}");
        order.push(name);
    }
    // Every query got exactly one reply; the slow ones came last.
    for (name, _) in asked {
        assert_eq!(order.iter().filter(|n| **n == name).count(), 10, "{name}");
    }
    assert!(
        order[..20].iter().all(|n| *n != "slow.example.test."),
        "a slow answer held up the others: {order:?}"
    );
}
