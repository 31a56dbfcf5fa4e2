//! Entry points for fuzzing the packet path (`dns/fuzz`), also run on random input by the
//! unit tests below so the properties are checked on stable Rust too.
//!
//! Properties: no input panics; a packet with QR=1 or under 12 bytes is never answered;
//! every reply decodes, has QR=1, carries the query's ID and fits 512 bytes unless the
//! query advertised EDNS (then [`crate::forward::EDNS_PAYLOAD`]); the wire-level fast path
//! for local names answers exactly as the decoding path does; the upstream reply check
//! accepts only replies with the ID and question it was given.

// Panicking on a broken property is the point of a fuzz harness.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::OnceLock;
use std::time::Duration;

use hickory_proto::op::Message;
use hickory_proto::rr::{DNSClass, Name, RecordType};

use crate::forward::{EDNS_PAYLOAD, check_reply, upstream_query};
use crate::handler::{Handler, HandlerSettings, Step, Transport};
use crate::metrics::Metrics;
use crate::table::NameTable;

fn handler() -> Option<&'static Handler> {
    static H: OnceLock<Option<Handler>> = OnceLock::new();
    H.get_or_init(|| {
        let json = br#"{"version": 1,
            "identity": {"namespace": "web", "service": "front", "plugin": "fuzz"},
            "outbound": [{"name": "tomcat", "namespace": "shop", "address": "127.1.0.7",
                          "dns_names": ["tomcat", "tomcat.shop"], "ports": [{"port": 8080}]}]}"#;
        let snap = sidemesh_api::Snapshot::from_json(json).ok()?;
        let table = NameTable::build(Some(&snap), &["web.svc.cluster.local".to_owned()]);
        let metrics = Metrics::new(&prometheus::Registry::new()).ok()?;
        Some(Handler::new(
            table,
            HandlerSettings {
                fallback_upstreams: vec![],
                own_addrs: vec![],
                allow_clients: vec![],
                upstream_timeout: Duration::from_millis(1),
                cache_size: 16,
                authoritative: Vec::new(),
            },
            metrics,
        ))
    })
    .as_ref()
}

/// Feeds one client packet through the request path and checks the properties.
pub fn packet(data: &[u8]) {
    let Some(h) = handler() else { return };
    let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
    if let Some((fast, _)) = h.fast_local(data, lo) {
        // The wire-level fast path must agree with the decoding path byte for byte.
        match h.handle_decoded(data, lo, Transport::Udp) {
            Step::Reply(slow) => assert_eq!(fast, slow, "fast and decoding paths differ"),
            _ => panic!("fast path answered a packet the decoding path does not"),
        }
    }
    for transport in [Transport::Udp, Transport::Tcp] {
        let step = h.handle(data, IpAddr::V4(Ipv4Addr::LOCALHOST), transport);
        let Step::Reply(bytes) = step else { continue };
        assert!(
            data.len() >= 12 && data[2] & 0x80 == 0,
            "answered a response or runt"
        );
        let reply = Message::from_vec(&bytes).expect("replies decode");
        assert_eq!(bytes[2] & 0x80, 0x80, "QR set");
        assert_eq!(bytes[..2], data[..2], "ID echoed");
        if transport == Transport::Udp {
            let limit = if reply.edns.is_some() {
                EDNS_PAYLOAD
            } else {
                512
            };
            assert!(bytes.len() <= usize::from(limit), "UDP reply fits");
        }
    }
}

/// Feeds one upstream reply to the reply check for a fixed question.
pub fn upstream_reply(data: &[u8]) {
    let Ok(name) = Name::from_ascii("www.example.test.") else {
        return;
    };
    let query = upstream_query(&name, RecordType::A, DNSClass::IN);
    let id = data
        .get(..2)
        .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
    if let Some(msg) = check_reply(data, id, &query) {
        assert_eq!(msg.metadata.id, id);
        assert_eq!(msg.queries.len(), 1);
        assert!(msg.queries[0].name().eq_ignore_root_case(query.name()));
    }
    // A different ID is never accepted.
    assert!(check_reply(data, id.wrapping_add(1), &query).is_none());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_and_mutated_packets_keep_the_properties() {
        let seeds: Vec<Vec<u8>> = ["tomcat.", "tomcat.web.svc.cluster.local.", "x.example."]
            .iter()
            .map(|n| {
                let mut m = Message::query();
                m.add_query(hickory_proto::op::Query::query(
                    Name::from_ascii(n).unwrap(),
                    RecordType::A,
                ));
                let mut e = hickory_proto::op::Edns::new();
                e.set_max_payload(4096);
                m.set_edns(e);
                m.to_vec().unwrap()
            })
            .collect();
        for i in 0..20_000usize {
            let mut p = if i % 3 == 0 {
                (0..(i % 600)).map(|_| rand::random::<u8>()).collect()
            } else {
                seeds[i % seeds.len()].clone()
            };
            if !p.is_empty() && i % 3 != 0 {
                for _ in 0..(1 + i % 5) {
                    let at = rand::random_range(0..p.len());
                    p[at] = rand::random();
                }
            }
            packet(&p);
            upstream_reply(&p);
        }
    }
}
