//! The forwarding cache: upstream answers kept for their TTL, with a bound on entries.
//!
//! - Positive answers live for the smallest TTL in the answer section (RFC 1035 section
//!   3.2.1, RFC 2181 section 5.2: an RRset's records share one TTL; the smallest governs a
//!   reply that holds several).
//! - Negative answers (NXDOMAIN, and NOERROR with no answer = NODATA) live for
//!   min(SOA TTL, SOA MINIMUM) of the SOA in the authority section (RFC 2308 section 5);
//!   without an SOA they are not cached (RFC 2308 section 5, "SHOULD NOT be cached").
//! - Both are capped ([`MAX_TTL`], [`MAX_NEGATIVE_TTL`]); SERVFAIL is never cached here.
//! - When full, expired entries go first, then the entries closest to expiry. Answers of
//!   more than [`MAX_CACHED_RECORDS`] records are not cached, which bounds the memory.
//!
//! Keys are the lower-cased wire name with type and class, so `Example.COM` and
//! `example.com` share an entry (RFC 4343: DNS names compare case-insensitively).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{RData, Record};

/// Longest time a positive answer is kept, whatever its TTL (1 hour).
pub const MAX_TTL: u32 = 3_600;
/// Longest time a negative answer is kept (5 minutes, as many stub caches do).
pub const MAX_NEGATIVE_TTL: u32 = 300;
/// Answers with more records than this are passed on but not cached, so the cache's memory
/// stays bounded by entries times a modest answer size.
pub const MAX_CACHED_RECORDS: usize = 64;

/// What a cached (or fresh) upstream answer holds: the sections the client gets back.
#[derive(Debug)]
pub struct Answer {
    /// The upstream's response code (NOERROR or NXDOMAIN).
    pub rcode: ResponseCode,
    /// Answer section.
    pub answers: Vec<Record>,
    /// Authority section.
    pub authorities: Vec<Record>,
    /// Additional section, without the OPT pseudo-record (RFC 6891 section 6.1.1: OPT is
    /// hop-by-hop, never cached or forwarded).
    pub additionals: Vec<Record>,
    /// When the upstream answered.
    pub received: Instant,
}

impl Answer {
    /// How long this answer may be cached, in seconds (0: not at all).
    pub fn cache_ttl(&self) -> u32 {
        if self.answers.len() + self.authorities.len() + self.additionals.len() > MAX_CACHED_RECORDS
        {
            return 0;
        }
        let negative = self.rcode == ResponseCode::NXDomain || self.answers.is_empty();
        if self.rcode != ResponseCode::NoError && self.rcode != ResponseCode::NXDomain {
            return 0;
        }
        if negative {
            self.authorities
                .iter()
                .find_map(|r| match &r.data {
                    RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
                    _ => None,
                })
                .map_or(0, |t| t.min(MAX_NEGATIVE_TTL))
        } else {
            self.answers
                .iter()
                .map(|r| r.ttl)
                .min()
                .map_or(0, |t| t.min(MAX_TTL))
        }
    }

    /// The records of one section with their TTLs lowered by the time spent in the cache
    /// (RFC 1035 section 4.1.3: a cached RR's TTL counts down).
    pub fn aged(records: &[Record], elapsed: u32) -> Vec<Record> {
        records
            .iter()
            .map(|r| {
                let mut r = r.clone();
                r.ttl = r.ttl.saturating_sub(elapsed);
                r
            })
            .collect()
    }
}

/// A cache key: lower-cased wire-format name, type, class.
pub type Key = (Vec<u8>, u16, u16);

struct Entry {
    answer: Arc<Answer>,
    expires: Instant,
}

/// The bounded TTL cache.
pub struct Cache {
    entries: Mutex<HashMap<Key, Entry>>,
    capacity: usize,
    gauge: prometheus::IntGauge,
}

impl Cache {
    /// A cache of at most `capacity` answers (0 turns caching off), reporting its size
    /// in `gauge`.
    pub fn new(capacity: usize, gauge: prometheus::IntGauge) -> Cache {
        Cache {
            entries: Mutex::new(HashMap::new()),
            capacity,
            gauge,
        }
    }

    /// A live answer for `key`, if any.
    pub fn get(&self, key: &Key, now: Instant) -> Option<Arc<Answer>> {
        let mut map = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(key) {
            Some(e) if e.expires > now => Some(e.answer.clone()),
            Some(_) => {
                map.remove(key);
                self.gauge.set(map.len() as i64);
                None
            }
            None => None,
        }
    }

    /// Keeps `answer` for its cache TTL (nothing happens when that is 0).
    pub fn insert(&self, key: Key, answer: Arc<Answer>) {
        let ttl = answer.cache_ttl();
        if ttl == 0 || self.capacity == 0 {
            return;
        }
        let expires = answer.received + Duration::from_secs(u64::from(ttl));
        let mut map = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= self.capacity && !map.contains_key(&key) {
            let now = Instant::now();
            map.retain(|_, e| e.expires > now);
            if map.len() >= self.capacity {
                // Still full of live answers: drop the tenth closest to expiry, so a burst
                // of new names pays for this scan once per many inserts.
                let mut by_expiry: Vec<(Instant, Key)> =
                    map.iter().map(|(k, e)| (e.expires, k.clone())).collect();
                by_expiry.sort_unstable_by_key(|(t, _)| *t);
                let n = (self.capacity / 10).max(1);
                for (_, k) in by_expiry.into_iter().take(n) {
                    map.remove(&k);
                }
            }
        }
        map.insert(key, Entry { answer, expires });
        self.gauge.set(map.len() as i64);
    }

    /// Entries held (live or not yet purged).
    pub fn len(&self) -> usize {
        self.entries.lock().map_or(0, |m| m.len())
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::Name;
    use hickory_proto::rr::rdata::{A, SOA};
    use std::net::Ipv4Addr;

    fn a(ttl: u32) -> Record {
        Record::from_rdata(
            Name::from_ascii("x.example.").unwrap(),
            ttl,
            RData::A(A(Ipv4Addr::new(192, 0, 2, 1))),
        )
    }

    fn soa(ttl: u32, minimum: u32) -> Record {
        let n = Name::from_ascii("example.").unwrap();
        Record::from_rdata(
            n.clone(),
            ttl,
            RData::SOA(SOA::new(n.clone(), n, 1, 2, 3, 4, minimum)),
        )
    }

    fn answer(rcode: ResponseCode, answers: Vec<Record>, auth: Vec<Record>) -> Answer {
        Answer {
            rcode,
            answers,
            authorities: auth,
            additionals: vec![],
            received: Instant::now(),
        }
    }

    #[test]
    fn ttls_follow_rfc_2308() {
        assert_eq!(
            answer(ResponseCode::NoError, vec![a(60), a(30)], vec![]).cache_ttl(),
            30
        );
        assert_eq!(
            answer(ResponseCode::NoError, vec![a(999_999)], vec![]).cache_ttl(),
            MAX_TTL
        );
        assert_eq!(
            answer(ResponseCode::NXDomain, vec![], vec![soa(100, 40)]).cache_ttl(),
            40
        );
        assert_eq!(
            answer(ResponseCode::NoError, vec![], vec![soa(20, 40)]).cache_ttl(),
            20
        );
        assert_eq!(
            answer(ResponseCode::NXDomain, vec![], vec![]).cache_ttl(),
            0,
            "no SOA, no negative caching"
        );
        assert_eq!(
            answer(ResponseCode::ServFail, vec![a(60)], vec![]).cache_ttl(),
            0
        );
        assert_eq!(
            answer(
                ResponseCode::NoError,
                vec![a(60); MAX_CACHED_RECORDS + 1],
                vec![]
            )
            .cache_ttl(),
            0,
            "huge answers are not cached"
        );
    }

    #[test]
    fn bounded_and_expiring() {
        let g = prometheus::IntGauge::new("g", "g").unwrap();
        let c = Cache::new(20, g.clone());
        for i in 0..100u16 {
            c.insert(
                (vec![i as u8], 1, 1),
                Arc::new(answer(ResponseCode::NoError, vec![a(60)], vec![])),
            );
            assert!(c.len() <= 20);
        }
        assert_eq!(g.get(), c.len() as i64);
        let key = (vec![99], 1, 1);
        let now = Instant::now();
        assert!(c.get(&key, now).is_some());
        assert!(c.get(&key, now + Duration::from_secs(61)).is_none());
        assert!(c.get(&(vec![250], 1, 1), now).is_none());
    }

    #[test]
    fn aged_counts_down() {
        let r = Answer::aged(&[a(60), a(3)], 5);
        assert_eq!(r[0].ttl, 55);
        assert_eq!(r[1].ttl, 0);
    }
}
