//! The shim's Prometheus metrics, registered in the registry `main` made.
//!
//! Labels are bounded: `type` is one of a fixed list of query types (anything else is
//! `other`), `outcome` one of [`Outcome`]. The per-label counters are resolved once at
//! start, so counting on the hot path is one atomic add.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// How a query was answered (the `outcome` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Answered from the mesh name table.
    Local,
    /// Answered with a fresh upstream reply.
    Forwarded,
    /// Answered from the cache.
    Cached,
    /// Answered NXDOMAIN (the upstream said so, fresh or cached).
    NxDomain,
    /// Answered SERVFAIL (no upstream gave a usable answer).
    ServFail,
    /// Refused: a client outside the allowed sources, or ANY for a forwarded name.
    Refused,
    /// Answered FORMERR, NOTIMP or BADVERS: a query the shim cannot make sense of.
    FormErr,
    /// Not answered: a response (QR=1), a runt packet, or over the in-flight limit.
    Dropped,
}

impl Outcome {
    const ALL: [Outcome; 8] = [
        Outcome::Local,
        Outcome::Forwarded,
        Outcome::Cached,
        Outcome::NxDomain,
        Outcome::ServFail,
        Outcome::Refused,
        Outcome::FormErr,
        Outcome::Dropped,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Local => "local",
            Outcome::Forwarded => "forwarded",
            Outcome::Cached => "cached",
            Outcome::NxDomain => "nxdomain",
            Outcome::ServFail => "servfail",
            Outcome::Refused => "refused",
            Outcome::FormErr => "formerr",
            Outcome::Dropped => "dropped",
        }
    }
}

/// Query types with their own `type` label value; the rest count as `other`.
const TYPES: [(u16, &str); 12] = [
    (1, "A"),
    (28, "AAAA"),
    (5, "CNAME"),
    (12, "PTR"),
    (33, "SRV"),
    (16, "TXT"),
    (15, "MX"),
    (2, "NS"),
    (6, "SOA"),
    (65, "HTTPS"),
    (64, "SVCB"),
    (255, "ANY"),
];
const OTHER: usize = TYPES.len();

/// The shim's metrics.
#[derive(Clone)]
pub struct Metrics {
    /// `[type][outcome]`, resolved once.
    queries: Vec<[IntCounter; 8]>,
    /// Time of one upstream exchange, successful or not.
    pub upstream_duration: Histogram,
    /// Upstream replies thrown away: wrong source, ID or question, or undecodable.
    pub upstream_rejected: IntCounter,
    /// Queries that joined an identical one already in flight.
    pub coalesced: IntCounter,
    /// Entries in the answer cache.
    pub cache_entries: IntGauge,
    /// Config versions applied to the name table.
    pub table_updates: IntCounter,
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<Metrics> {
        let queries_vec = IntCounterVec::new(
            Opts::new(
                "sidemesh_dns_queries_total",
                "DNS queries received, by query type and how they were answered.",
            ),
            &["type", "outcome"],
        )?;
        let mut queries = Vec::with_capacity(TYPES.len() + 1);
        for t in TYPES.iter().map(|(_, n)| *n).chain(["other"]) {
            let row = Outcome::ALL.map(|o| queries_vec.with_label_values(&[t, o.as_str()]));
            queries.push(row);
        }
        let upstream_duration = Histogram::with_opts(
            HistogramOpts::new(
                "sidemesh_dns_upstream_duration_seconds",
                "Time of one exchange with an upstream resolver (UDP, or UDP then TCP).",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        )?;
        let upstream_rejected = IntCounter::new(
            "sidemesh_dns_upstream_rejected_replies_total",
            "Upstream replies discarded: wrong source, ID or question, or malformed.",
        )?;
        let coalesced = IntCounter::new(
            "sidemesh_dns_coalesced_queries_total",
            "Queries answered by joining an identical upstream query already in flight.",
        )?;
        let cache_entries = IntGauge::new(
            "sidemesh_dns_cache_entries",
            "Answers held in the forwarding cache.",
        )?;
        let table_updates = IntCounter::new(
            "sidemesh_dns_table_updates_total",
            "Config versions applied to the local name table.",
        )?;
        registry.register(Box::new(queries_vec))?;
        registry.register(Box::new(upstream_duration.clone()))?;
        registry.register(Box::new(upstream_rejected.clone()))?;
        registry.register(Box::new(coalesced.clone()))?;
        registry.register(Box::new(cache_entries.clone()))?;
        registry.register(Box::new(table_updates.clone()))?;
        Ok(Metrics {
            queries,
            upstream_duration,
            upstream_rejected,
            coalesced,
            cache_entries,
            table_updates,
        })
    }

    /// Counts one query of type `qtype` (the numeric RR type) answered with `outcome`.
    pub fn query(&self, qtype: u16, outcome: Outcome) {
        let row = TYPES.iter().position(|(t, _)| *t == qtype).unwrap_or(OTHER);
        let col = Outcome::ALL.iter().position(|o| *o == outcome).unwrap_or(0);
        if let Some(c) = self.queries.get(row).and_then(|r| r.get(col)) {
            c.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Encoder;

    #[test]
    fn counts_by_type_and_outcome() {
        let r = Registry::new();
        let m = Metrics::new(&r).unwrap();
        m.query(1, Outcome::Local);
        m.query(1, Outcome::Local);
        m.query(99, Outcome::Dropped);
        let text = {
            let mut buf = Vec::new();
            prometheus::TextEncoder::new()
                .encode(&r.gather(), &mut buf)
                .unwrap();
            String::from_utf8(buf).unwrap()
        };
        assert!(text.contains(r#"sidemesh_dns_queries_total{outcome="local",type="A"} 2"#));
        assert!(text.contains(r#"sidemesh_dns_queries_total{outcome="dropped",type="other"} 1"#));
        assert!(Metrics::new(&r).is_err(), "registering twice must fail");
    }
}
