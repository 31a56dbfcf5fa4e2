//! Client-side load balancing over one backend's endpoints.
//!
//! A [`Balancer`] is built once per config version from a backend's endpoints (their
//! weights, zones and shared [`EndpointStats`]) and then only read. It knows every policy
//! of the contract: weighted round robin, weighted random, least-request and peak-EWMA (both
//! power of two choices), ring hash and Maglev. Health (outlier ejection, active checks)
//! lives in the shared stats, so a pick always sees the latest state without a rebuild.
//! Zone-aware balancing prefers endpoints in the sidecar's own zone while enough of them
//! are healthy, and spills to all zones otherwise; while the own zone is overloaded next
//! to the others (see [`Load`]), the excess goes to the other zones. When no endpoint is healthy, every
//! endpoint is a candidate again (panic mode): failing open beats refusing all traffic.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;
use sidemesh_api::config::{BalancePolicy, Balancer as BalancerConfig, HashOn};

/// The time constant of the peak-EWMA latency average.
const EWMA_DECAY: Duration = Duration::from_secs(10);
/// The latency assumed for an endpoint that has not answered yet, in nanoseconds.
const DEFAULT_RTT_NS: f64 = 1_000_000.0;
/// Ring points per endpoint of the heaviest weight.
const RING_POINTS: u64 = 100;
/// Maglev table sizes (primes); the smallest at least 100 times the endpoint count is used.
const MAGLEV_SIZES: [usize; 9] = [251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521];
/// Longest round-robin schedule; weights are scaled down to fit.
const MAX_SCHEDULE: u64 = 4096;

/// What one endpoint has shown so far: load, latency and health. Shared across config
/// versions for the same endpoint, so a reload does not forget an ejection or the latency.
#[derive(Debug)]
pub struct EndpointStats {
    /// Requests (or TCP connections) in flight to this endpoint.
    pub inflight: AtomicU64,
    ewma: std::sync::Mutex<Ewma>,
    /// Consecutive 5xx answers.
    pub consecutive_5xx: AtomicU32,
    /// Consecutive connect failures.
    pub consecutive_connect_failures: AtomicU32,
    /// Ejected until this many milliseconds after the process's clock origin (0: not ejected).
    pub ejected_until_ms: AtomicU64,
    /// Ejections in a row (the ejection time grows with it).
    pub ejections: AtomicU32,
    /// Set by active health checking when the endpoint failed its checks.
    pub check_failed: AtomicBool,
}

#[derive(Debug)]
struct Ewma {
    rtt_ns: f64,
    at: Instant,
}

impl Default for EndpointStats {
    fn default() -> Self {
        EndpointStats {
            inflight: AtomicU64::new(0),
            ewma: std::sync::Mutex::new(Ewma {
                rtt_ns: 0.0,
                at: Instant::now(),
            }),
            consecutive_5xx: AtomicU32::new(0),
            consecutive_connect_failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            check_failed: AtomicBool::new(false),
        }
    }
}

impl EndpointStats {
    /// Records one observed latency: a higher sample replaces the average at once (the
    /// "peak"), a lower one decays it towards the sample.
    pub fn observe(&self, rtt: Duration) {
        self.observe_at(rtt, Instant::now());
    }

    /// Records the latency of a request sent at `sent` and answered now (one clock read).
    pub fn observe_since(&self, sent: Instant) {
        let now = Instant::now();
        self.observe_at(now.saturating_duration_since(sent), now);
    }

    fn observe_at(&self, rtt: Duration, now: Instant) {
        let sample = rtt.as_nanos() as f64;
        if let Ok(mut e) = self.ewma.lock() {
            if sample > e.rtt_ns || e.rtt_ns == 0.0 {
                e.rtt_ns = sample;
            } else {
                let elapsed = now.saturating_duration_since(e.at).as_secs_f64();
                let w = (-elapsed / EWMA_DECAY.as_secs_f64()).exp();
                e.rtt_ns = e.rtt_ns * w + sample * (1.0 - w);
            }
            e.at = now;
        }
    }

    /// The current peak-EWMA latency in nanoseconds. It decays while no sample comes, so
    /// an endpoint that was slow once is tried again later; an endpoint never tried
    /// costs nothing, so new endpoints get their first requests at once.
    pub fn rtt_ns(&self) -> f64 {
        match self.ewma.lock() {
            Ok(e) if e.rtt_ns > 0.0 => {
                let idle = e.at.elapsed().as_secs_f64();
                e.rtt_ns * (-idle / EWMA_DECAY.as_secs_f64()).exp()
            }
            Ok(_) => 0.0,
            Err(_) => DEFAULT_RTT_NS,
        }
    }

    /// Whether the endpoint has ever been ejected (only then does its health depend on
    /// the time).
    fn ever_ejected(&self) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) != 0
    }

    /// Whether the endpoint may take traffic at `now_ms` (not ejected, not failing checks).
    pub fn healthy(&self, now_ms: u64) -> bool {
        !self.check_failed.load(Ordering::Relaxed)
            && self.ejected_until_ms.load(Ordering::Relaxed) <= now_ms
    }
}

/// One endpoint as a balancer sees it.
#[derive(Debug)]
pub struct Endpoint {
    /// Where to dial.
    pub addr: SocketAddr,
    /// `addr` as an HTTP/2 `:authority`, made once here rather than formatted per request.
    pub authority: Option<http::uri::Authority>,
    /// Relative weight (1..=10000).
    pub weight: u32,
    /// Whether the endpoint is in the sidecar's own zone.
    pub local: bool,
    /// Whether a sidemesh sidecar fronts it (so the hop is mutual TLS when TLS is on).
    pub meshed: bool,
    /// Load, latency and health, shared across config versions.
    pub stats: Arc<EndpointStats>,
}

/// `addr` as a URI authority (`ip:port`, IPv6 in brackets).
pub fn authority_of(addr: SocketAddr) -> Option<http::uri::Authority> {
    http::uri::Authority::try_from(addr.to_string()).ok()
}

/// Milliseconds since a process-wide origin; the clock of ejections.
pub fn now_ms() -> u64 {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    // Start at 1 so that 0 can mean "never ejected".
    Instant::now().saturating_duration_since(origin).as_millis() as u64 + 1
}

/// A balancer over one backend's endpoints, for one config version.
#[derive(Debug)]
pub struct Balancer {
    policy: BalancePolicy,
    endpoints: Vec<Arc<Endpoint>>,
    zone_aware: bool,
    zone_min_healthy_percent: u8,
    spill: Spill,
    /// Whether some endpoint is meshed (fixed with the endpoints; read per request).
    any_meshed: bool,
    next: AtomicUsize,
    schedule: Vec<u32>,
    ring: Vec<(u64, u32)>,
    maglev: Vec<u32>,
}

impl Balancer {
    /// Builds a balancer. `zone_aware` only has an effect when some endpoints are local.
    pub fn new(
        policy: BalancePolicy,
        endpoints: Vec<Arc<Endpoint>>,
        zone_aware: bool,
        zone_min_healthy_percent: u8,
    ) -> Balancer {
        let zone_aware = zone_aware && endpoints.iter().any(|e| e.local);
        let schedule = match policy {
            BalancePolicy::RoundRobin => schedule(&endpoints),
            _ => Vec::new(),
        };
        let ring = match policy {
            BalancePolicy::RingHash => ring(&endpoints),
            _ => Vec::new(),
        };
        let maglev = match policy {
            BalancePolicy::Maglev => maglev(&endpoints),
            _ => Vec::new(),
        };
        Balancer {
            policy,
            any_meshed: endpoints.iter().any(|e| e.meshed),
            endpoints,
            zone_aware,
            zone_min_healthy_percent,
            spill: Spill::default(),
            next: AtomicUsize::new(0),
            schedule,
            ring,
            maglev,
        }
    }

    /// Sets the spill-over thresholds (the contract's `zone_spill_min_inflight` and
    /// `zone_spill_ratio`; see [`Load::overloaded_next_to`]).
    pub fn with_spill(mut self, min_inflight: u32, ratio: u32) -> Balancer {
        self.spill = Spill {
            min_inflight: u64::from(min_inflight),
            ratio: u64::from(ratio),
        };
        self
    }

    /// The balancing policy.
    pub fn policy(&self) -> BalancePolicy {
        self.policy
    }

    /// The endpoints, in config order.
    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// Whether any endpoint is meshed (behind a sidecar).
    pub fn any_meshed(&self) -> bool {
        self.any_meshed
    }

    /// Whether the policy picks by measured latency ([`EndpointStats::observe_since`]
    /// samples are read only then).
    pub fn uses_latency(&self) -> bool {
        self.policy == BalancePolicy::PeakEwma
    }

    /// How many endpoints are healthy now.
    pub fn healthy_count(&self) -> usize {
        let now = now_ms();
        self.endpoints
            .iter()
            .filter(|e| e.stats.healthy(now))
            .count()
    }

    /// Picks an endpoint. `hash` is the request's hash key for ring hash and Maglev (when
    /// absent those pick at random); `avoid` is an endpoint to skip if another is eligible
    /// (the one a retry just failed on). Allocation-free: one pass over the endpoints'
    /// counters decides the zone and health filter, then the policy picks through it.
    pub fn pick(&self, hash: Option<u64>, avoid: Option<SocketAddr>) -> Option<Arc<Endpoint>> {
        match self.endpoints.len() {
            0 => return None,
            1 => return self.endpoints.first().cloned(),
            _ => {}
        }
        // The clock is read only when an ejection can have ended: health is the same at
        // any time while no endpoint was ever ejected (one ejected meanwhile reads as
        // still ejected at time 0, as it should).
        let now = if self.endpoints.iter().any(|e| e.stats.ever_ejected()) {
            now_ms()
        } else {
            0
        };
        let filter = self.filter(now);
        // Narrowest first; each fallback only when the filter left nothing (health changed
        // between the pass and the pick, or only the avoided endpoint was left).
        let i = self
            .pick_with(hash, &|e| filter.admits(e, now) && Some(e.addr) != avoid)
            .or_else(|| self.pick_with(hash, &|e| filter.admits(e, now)))
            .or_else(|| self.pick_with(hash, &|_| true));
        i.and_then(|i| self.endpoints.get(i).cloned())
    }

    /// Picks by the policy among the endpoints `ok` admits.
    fn pick_with(&self, hash: Option<u64>, ok: &dyn Fn(&Endpoint) -> bool) -> Option<usize> {
        let ok = |i: usize| self.endpoints.get(i).is_some_and(|e| ok(e));
        match (self.policy, hash) {
            (BalancePolicy::RoundRobin, _) => self.pick_rr(&ok),
            (BalancePolicy::RingHash, Some(h)) => self.pick_ring(h, &ok),
            (BalancePolicy::Maglev, Some(h)) => self.pick_maglev(h, &ok),
            // Weights already shape which two are drawn; the cost compares load alone, so
            // an idle backend is split exactly by weight.
            (BalancePolicy::LeastRequest, _) => {
                self.p2c(&ok, |e| e.stats.inflight.load(Ordering::Relaxed) as f64)
            }
            (BalancePolicy::PeakEwma, _) => self.p2c(&ok, |e| {
                e.stats.rtt_ns() * (e.stats.inflight.load(Ordering::Relaxed) as f64 + 1.0)
            }),
            _ => weighted_random(&self.endpoints, &ok),
        }
    }

    /// Decides, from the endpoints' health and load now, which of them a pick may use.
    fn filter(&self, now: u64) -> Filter {
        let (mut healthy, mut local, mut own, mut other) =
            (0usize, 0usize, Load::default(), Load::default());
        for e in &self.endpoints {
            local += usize::from(e.local);
            if !e.stats.healthy(now) {
                continue;
            }
            healthy += 1;
            let zone = if e.local { &mut own } else { &mut other };
            zone.endpoints += 1;
            zone.weight += u64::from(e.weight);
            zone.inflight += e.stats.inflight.load(Ordering::Relaxed);
        }
        if healthy == 0 {
            // Panic mode: every endpoint is a candidate again.
            return Filter {
                health: false,
                zone: Zone::Any,
            };
        }
        let zone = if !self.zone_aware {
            Zone::Any
        } else if own.endpoints == 0
            || own.endpoints * 100 < usize::from(self.zone_min_healthy_percent) * local
        {
            // Too few healthy endpoints at home: all healthy endpoints share the traffic.
            Zone::Any
        } else if own.overloaded_next_to(&other, &self.spill) {
            Zone::Remote
        } else {
            Zone::Local
        };
        Filter { health: true, zone }
    }

    fn pick_rr(&self, ok: &impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.schedule.len();
        for _ in 0..n {
            let k = self.next.fetch_add(1, Ordering::Relaxed) % n;
            let i = *self.schedule.get(k)? as usize;
            if ok(i) {
                return Some(i);
            }
        }
        None
    }

    fn pick_ring(&self, h: u64, ok: &impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.ring.len();
        let start = self.ring.partition_point(|(p, _)| *p < h);
        (0..n)
            .map(|k| self.ring[(start + k) % n].1 as usize)
            .find(|i| ok(*i))
    }

    fn pick_maglev(&self, h: u64, ok: &impl Fn(usize) -> bool) -> Option<usize> {
        let m = self.maglev.len() as u64;
        let mut key = h;
        // An ineligible owner: rehash a few times, then fall back to any eligible endpoint,
        // so most keys keep their endpoint while one is out.
        for _ in 0..16 {
            let i = *self.maglev.get((key % m) as usize)? as usize;
            if ok(i) {
                return Some(i);
            }
            key = mix(key.wrapping_add(0x9e37_79b9_7f4a_7c15));
        }
        (0..self.endpoints.len()).find(|i| ok(*i))
    }

    fn p2c(&self, ok: &impl Fn(usize) -> bool, cost: impl Fn(&Endpoint) -> f64) -> Option<usize> {
        let a = weighted_random(&self.endpoints, ok)?;
        let Some(b) = weighted_random(&self.endpoints, &|i| i != a && ok(i)) else {
            return Some(a);
        };
        let (ea, eb) = (self.endpoints.get(a)?, self.endpoints.get(b)?);
        Some(if cost(eb) < cost(ea) { b } else { a })
    }
}

/// When the own zone counts as overloaded next to the others.
#[derive(Clone, Copy, Debug)]
struct Spill {
    /// In-flight requests per own-zone endpoint below which the zone never counts as
    /// overloaded: crossing zones costs latency and money, so light load stays at home.
    min_inflight: u64,
    /// How much busier (in-flight requests per unit of weight) the own zone must be than
    /// the other zones before a request spills over.
    ratio: u64,
}

impl Default for Spill {
    fn default() -> Spill {
        Spill {
            min_inflight: u64::from(BalancerConfig::DEFAULT_ZONE_SPILL_MIN_INFLIGHT),
            ratio: u64::from(BalancerConfig::DEFAULT_ZONE_SPILL_RATIO),
        }
    }
}

/// Healthy endpoints of one side (own zone or the others), their weight and load.
#[derive(Debug, Default)]
struct Load {
    endpoints: usize,
    weight: u64,
    inflight: u64,
}

impl Load {
    /// Whether this (own) zone is overloaded next to `other`: its endpoints average at
    /// least `spill.min_inflight` requests in flight, and per unit of weight it carries
    /// more than `spill.ratio` times the load of the other zones. Spilling raises the
    /// other zones' load, so the share that spills settles by itself.
    fn overloaded_next_to(&self, other: &Load, spill: &Spill) -> bool {
        other.endpoints > 0
            && self.inflight >= spill.min_inflight.saturating_mul(self.endpoints as u64)
            && u128::from(self.inflight) * u128::from(other.weight)
                > u128::from(spill.ratio) * u128::from(other.inflight) * u128::from(self.weight)
    }
}

/// Which zone a pick may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Zone {
    Any,
    Local,
    Remote,
}

/// Which endpoints one pick may use.
#[derive(Clone, Copy, Debug)]
struct Filter {
    /// Only healthy endpoints (false in panic mode).
    health: bool,
    zone: Zone,
}

impl Filter {
    fn admits(&self, e: &Endpoint, now: u64) -> bool {
        let zone = match self.zone {
            Zone::Any => true,
            Zone::Local => e.local,
            Zone::Remote => !e.local,
        };
        zone && (!self.health || e.stats.healthy(now))
    }
}

fn weighted_random(endpoints: &[Arc<Endpoint>], ok: &impl Fn(usize) -> bool) -> Option<usize> {
    let total: u64 = endpoints
        .iter()
        .enumerate()
        .filter(|(i, _)| ok(*i))
        .map(|(_, e)| u64::from(e.weight))
        .sum();
    if total == 0 {
        return None;
    }
    let mut r = rand::rng().random_range(0..total);
    for (i, e) in endpoints.iter().enumerate() {
        if !ok(i) {
            continue;
        }
        let w = u64::from(e.weight);
        if r < w {
            return Some(i);
        }
        r -= w;
    }
    None
}

/// A smooth weighted round-robin order (each endpoint's turns spread out, not bunched).
fn schedule(endpoints: &[Arc<Endpoint>]) -> Vec<u32> {
    let total: u64 = endpoints.iter().map(|e| u64::from(e.weight)).sum();
    let scale = total.div_ceil(MAX_SCHEDULE).max(1);
    let weights: Vec<i64> = endpoints
        .iter()
        .map(|e| (u64::from(e.weight) / scale).max(1) as i64)
        .collect();
    let sum: i64 = weights.iter().sum();
    let mut current = vec![0i64; weights.len()];
    let mut out = Vec::with_capacity(sum as usize);
    for _ in 0..sum {
        let mut best = 0;
        for (i, w) in weights.iter().enumerate() {
            current[i] += w;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= sum;
        out.push(best as u32);
    }
    out
}

fn ring(endpoints: &[Arc<Endpoint>]) -> Vec<(u64, u32)> {
    let max = endpoints
        .iter()
        .map(|e| u64::from(e.weight))
        .max()
        .unwrap_or(1);
    let mut ring = Vec::new();
    for (i, e) in endpoints.iter().enumerate() {
        let points = (u64::from(e.weight) * RING_POINTS).div_ceil(max).max(1);
        let base = hash_bytes(e.addr.to_string().as_bytes());
        for k in 0..points {
            ring.push((mix(base ^ mix(k + 1)), i as u32));
        }
    }
    ring.sort_unstable();
    ring
}

fn maglev(endpoints: &[Arc<Endpoint>]) -> Vec<u32> {
    let n = endpoints.len();
    let want = n * 100;
    let m = MAGLEV_SIZES
        .iter()
        .copied()
        .find(|s| *s >= want)
        .unwrap_or(MAGLEV_SIZES[MAGLEV_SIZES.len() - 1]);
    let perms: Vec<(usize, usize)> = endpoints
        .iter()
        .map(|e| {
            let h = hash_bytes(e.addr.to_string().as_bytes());
            let offset = (h % m as u64) as usize;
            let skip = (mix(h) % (m as u64 - 1)) as usize + 1;
            (offset, skip)
        })
        .collect();
    let max_w = endpoints.iter().map(|e| e.weight).max().unwrap_or(1);
    let mut next = vec![0usize; n];
    let mut table = vec![u32::MAX; m];
    let mut filled = 0;
    let mut round: u64 = 0;
    while filled < m {
        for i in 0..n {
            // Weighted Maglev: endpoint i takes a turn in a round in proportion to its
            // weight relative to the heaviest one.
            let w = u64::from(endpoints[i].weight);
            let turns = (round + 1) * w / u64::from(max_w) - round * w / u64::from(max_w);
            for _ in 0..turns {
                let (offset, skip) = perms[i];
                let mut c = (offset + next[i] * skip) % m;
                while table[c] != u32::MAX {
                    next[i] += 1;
                    c = (offset + next[i] * skip) % m;
                }
                table[c] = i as u32;
                next[i] += 1;
                filled += 1;
                if filled == m {
                    return table;
                }
            }
        }
        round += 1;
    }
    table
}

/// A stable 64-bit hash (FNV-1a, then a finalizer), the same in every sidecar, so that
/// consistent hashing agrees across processes and restarts.
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

/// The splitmix64 finalizer: spreads the bits of `x`.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A request's headers as the hashing policies read them: either engine's form (hyper's
/// `HeaderMap`, or the lean engine's parsed head) without copying it into the other.
pub trait RequestHeaders {
    /// The values of header `name` (lower case), in order.
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a;
}

impl RequestHeaders for http::HeaderMap {
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.get_all(name).iter().map(|v| v.as_bytes())
    }
}

/// The hash key of a request for `hash_on`, when the request has one.
pub fn request_hash(
    hash_on: Option<&HashOn>,
    headers: &impl RequestHeaders,
    client: SocketAddr,
) -> Option<u64> {
    match hash_on? {
        HashOn::Header(name) => headers.values(name).next().map(hash_bytes),
        HashOn::Cookie(name) => headers
            .values("cookie")
            .filter_map(|v| std::str::from_utf8(v).ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| hash_bytes(v.as_bytes())),
        HashOn::SourceIp => Some(match client.ip() {
            std::net::IpAddr::V4(a) => hash_bytes(&a.octets()),
            std::net::IpAddr::V6(a) => hash_bytes(&a.octets()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn eps(weights: &[u32]) -> Vec<Arc<Endpoint>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let addr: SocketAddr = format!("10.0.0.{}:80", i + 1).parse().unwrap();
                Arc::new(Endpoint {
                    addr,
                    authority: authority_of(addr),
                    weight: *w,
                    local: false,
                    meshed: false,
                    stats: Arc::default(),
                })
            })
            .collect()
    }

    #[test]
    fn any_meshed_follows_the_endpoints() {
        let plain = Balancer::new(BalancePolicy::RoundRobin, eps(&[1, 1]), false, 50);
        assert!(!plain.any_meshed());
        let mut mixed = eps(&[1, 1]);
        if let Some(e) = mixed.get_mut(1).and_then(Arc::get_mut) {
            e.meshed = true;
        }
        let mixed = Balancer::new(BalancePolicy::RoundRobin, mixed, false, 50);
        assert!(mixed.any_meshed());
    }

    fn counts(b: &Balancer, n: usize, hash: impl Fn(usize) -> Option<u64>) -> HashMap<u16, usize> {
        let mut m = HashMap::new();
        for k in 0..n {
            let e = b.pick(hash(k), None).unwrap();
            *m.entry(last_octet(&e)).or_default() += 1;
        }
        m
    }

    fn last_octet(e: &Endpoint) -> u16 {
        match e.addr.ip() {
            std::net::IpAddr::V4(v) => u16::from(v.octets()[3]),
            std::net::IpAddr::V6(_) => 0,
        }
    }

    fn share(m: &HashMap<u16, usize>, k: u16, n: usize) -> f64 {
        *m.get(&k).unwrap_or(&0) as f64 / n as f64
    }

    #[test]
    fn round_robin_follows_weights_exactly() {
        let b = Balancer::new(BalancePolicy::RoundRobin, eps(&[100, 300]), false, 70);
        let m = counts(&b, 400, |_| None);
        assert_eq!(m[&1], 100);
        assert_eq!(m[&2], 300);
        // Smooth: the heavy endpoint never takes more than 3 turns in a row.
        let seq: Vec<u16> = (0..8)
            .map(|_| last_octet(&b.pick(None, None).unwrap()))
            .collect();
        assert!(seq.contains(&1), "{seq:?}");
    }

    #[test]
    fn random_and_p2c_follow_weights() {
        for policy in [
            BalancePolicy::Random,
            BalancePolicy::LeastRequest,
            BalancePolicy::PeakEwma,
        ] {
            let b = Balancer::new(policy, eps(&[100, 100, 200]), false, 70);
            let n = 20_000;
            let m = counts(&b, n, |_| None);
            for k in [1, 2, 3] {
                assert!(share(&m, k, n) > 0.1, "{policy:?} {m:?}");
            }
            assert!((share(&m, 3, n) - 0.5).abs() < 0.05, "{policy:?} {m:?}");
        }
    }

    #[test]
    fn least_request_avoids_the_busy_endpoint() {
        let e = eps(&[100, 100]);
        e[0].stats.inflight.store(50, Ordering::Relaxed);
        let b = Balancer::new(BalancePolicy::LeastRequest, e, false, 70);
        let m = counts(&b, 1000, |_| None);
        // With two endpoints P2C always compares both: the idle one always wins.
        assert_eq!(m.get(&2), Some(&1000));
    }

    #[test]
    fn peak_ewma_prefers_the_fast_endpoint() {
        let e = eps(&[100, 100]);
        e[0].stats.observe(Duration::from_millis(50));
        e[1].stats.observe(Duration::from_millis(1));
        let b = Balancer::new(BalancePolicy::PeakEwma, e, false, 70);
        let m = counts(&b, 1000, |_| None);
        assert_eq!(m.get(&2), Some(&1000));
    }

    #[test]
    fn hashing_is_sticky_and_spreads() {
        for policy in [BalancePolicy::RingHash, BalancePolicy::Maglev] {
            let b = Balancer::new(policy, eps(&[100, 100, 100, 100]), false, 70);
            let n = 8000;
            let m = counts(&b, n, |k| Some(hash_bytes(format!("user-{k}").as_bytes())));
            for k in 1..=4 {
                let s = share(&m, k, n);
                assert!((0.15..0.35).contains(&s), "{policy:?} {m:?}");
            }
            for k in 0..100 {
                let h = Some(hash_bytes(format!("user-{k}").as_bytes()));
                assert_eq!(b.pick(h, None).unwrap().addr, b.pick(h, None).unwrap().addr);
            }
        }
    }

    #[test]
    fn hashing_moves_few_keys_when_an_endpoint_goes() {
        for policy in [BalancePolicy::RingHash, BalancePolicy::Maglev] {
            let all = eps(&[100, 100, 100, 100, 100]);
            let b5 = Balancer::new(policy, all.clone(), false, 70);
            let b4 = Balancer::new(policy, all[..4].to_vec(), false, 70);
            let n = 5000;
            let mut moved = 0;
            for k in 0..n {
                let h = Some(hash_bytes(format!("k{k}").as_bytes()));
                let a = b5.pick(h, None).unwrap().addr;
                let b = b4.pick(h, None).unwrap().addr;
                if a != b && a != all[4].addr {
                    moved += 1;
                }
            }
            // Keys of the remaining endpoints mostly stay put.
            assert!(moved < n / 10, "{policy:?} moved {moved}");
        }
    }

    #[test]
    fn weighted_hashing() {
        for policy in [BalancePolicy::RingHash, BalancePolicy::Maglev] {
            let b = Balancer::new(policy, eps(&[100, 300]), false, 70);
            let n = 8000;
            let m = counts(&b, n, |k| Some(hash_bytes(format!("w{k}").as_bytes())));
            let s = share(&m, 2, n);
            assert!((0.65..0.85).contains(&s), "{policy:?} {m:?}");
        }
    }

    #[test]
    fn ejected_endpoints_are_skipped_and_panic_mode_uses_all() {
        let e = eps(&[100, 100, 100]);
        e[0].stats
            .ejected_until_ms
            .store(u64::MAX, Ordering::Relaxed);
        for policy in [
            BalancePolicy::RoundRobin,
            BalancePolicy::Random,
            BalancePolicy::PeakEwma,
            BalancePolicy::RingHash,
            BalancePolicy::Maglev,
        ] {
            let b = Balancer::new(policy, e.clone(), false, 70);
            let m = counts(&b, 600, |k| Some(k as u64 * 7919));
            assert_eq!(m.get(&1), None, "{policy:?} {m:?}");
        }
        for x in &e {
            x.stats.check_failed.store(true, Ordering::Relaxed);
        }
        let b = Balancer::new(BalancePolicy::Random, e.clone(), false, 70);
        assert_eq!(counts(&b, 300, |_| None).len(), 3);
    }

    #[test]
    fn an_endpoint_whose_ejection_ended_takes_traffic_again() {
        let e = eps(&[100, 100]);
        let b = Balancer::new(BalancePolicy::RoundRobin, e.clone(), false, 70);
        // Never ejected: the pick reads no clock, and both take turns.
        let m = counts(&b, 100, |_| None);
        assert_eq!((m.get(&1), m.get(&2)), (Some(&50), Some(&50)), "{m:?}");
        // Ejected now: skipped.
        e[0].stats
            .ejected_until_ms
            .store(u64::MAX, Ordering::Relaxed);
        assert_eq!(counts(&b, 100, |_| None).get(&1), None);
        // The ejection ended (`now_ms` is at least 1): back in turn.
        e[0].stats.ejected_until_ms.store(1, Ordering::Relaxed);
        let m = counts(&b, 100, |_| None);
        assert_eq!((m.get(&1), m.get(&2)), (Some(&50), Some(&50)), "{m:?}");
    }

    #[test]
    fn zone_aware_prefers_local_and_spills_over() {
        let mut e = eps(&[100, 100, 100, 100]);
        for x in e.iter_mut().take(2) {
            Arc::get_mut(x).unwrap().local = true;
        }
        let b = Balancer::new(BalancePolicy::Random, e.clone(), true, 70);
        let m = counts(&b, 1000, |_| None);
        assert_eq!(
            m.get(&3).copied().unwrap_or(0) + m.get(&4).copied().unwrap_or(0),
            0
        );
        // One of two local endpoints down: 50 % < 70 %, so traffic spills to all healthy.
        e[0].stats
            .ejected_until_ms
            .store(u64::MAX, Ordering::Relaxed);
        let m = counts(&b, 3000, |_| None);
        assert_eq!(m.get(&1), None);
        for k in [2, 3, 4] {
            assert!(share(&m, k, 3000) > 0.2, "{m:?}");
        }
    }

    /// Four endpoints, the first `local` of them in the own zone.
    fn zoned(local: usize) -> Vec<Arc<Endpoint>> {
        let mut e = eps(&[100, 100, 100, 100]);
        for x in e.iter_mut().take(local) {
            Arc::get_mut(x).unwrap().local = true;
        }
        e
    }

    #[test]
    fn zone_aware_spills_when_the_own_zone_is_overloaded() {
        let e = zoned(2);
        for policy in [
            BalancePolicy::Random,
            BalancePolicy::PeakEwma,
            BalancePolicy::RoundRobin,
        ] {
            let b = Balancer::new(policy, e.clone(), true, 70);
            // Busy but not overloaded: below the per-endpoint floor, everything stays home.
            e[0].stats.inflight.store(7, Ordering::Relaxed);
            e[1].stats.inflight.store(7, Ordering::Relaxed);
            let m = counts(&b, 500, |_| None);
            assert_eq!(
                m.get(&1).unwrap_or(&0) + m.get(&2).unwrap_or(&0),
                500,
                "{m:?}"
            );
            // Over the floor and more than twice as loaded per weight as the other zone.
            e[0].stats.inflight.store(20, Ordering::Relaxed);
            e[1].stats.inflight.store(20, Ordering::Relaxed);
            e[2].stats.inflight.store(5, Ordering::Relaxed);
            let m = counts(&b, 500, |_| None);
            assert_eq!(
                m.get(&3).unwrap_or(&0) + m.get(&4).unwrap_or(&0),
                500,
                "{m:?}"
            );
            // The other zone catches up: back home.
            e[2].stats.inflight.store(15, Ordering::Relaxed);
            e[3].stats.inflight.store(15, Ordering::Relaxed);
            let m = counts(&b, 500, |_| None);
            assert_eq!(
                m.get(&1).unwrap_or(&0) + m.get(&2).unwrap_or(&0),
                500,
                "{m:?}"
            );
            for x in &e {
                x.stats.inflight.store(0, Ordering::Relaxed);
            }
        }
    }

    #[test]
    fn zone_spill_thresholds_come_from_the_config() {
        let e = zoned(2);
        let home = |m: &HashMap<u16, usize>| m.get(&1).unwrap_or(&0) + m.get(&2).unwrap_or(&0);
        // 20 in flight per own endpoint, 5 at the others: spills with the defaults.
        for (x, n) in e.iter().zip([20, 20, 5, 5]) {
            x.stats.inflight.store(n, Ordering::Relaxed);
        }
        let defaults = Balancer::new(BalancePolicy::Random, e.clone(), true, 70);
        assert_eq!(home(&counts(&defaults, 300, |_| None)), 0);
        // A floor of 32 per endpoint: not overloaded yet, everything stays home.
        let floor = Balancer::new(BalancePolicy::Random, e.clone(), true, 70).with_spill(32, 2);
        assert_eq!(home(&counts(&floor, 300, |_| None)), 300);
        // A ratio of 4: 20 is not more than 4 x 5, so it stays home too.
        let ratio = Balancer::new(BalancePolicy::Random, e.clone(), true, 70).with_spill(8, 4);
        assert_eq!(home(&counts(&ratio, 300, |_| None)), 300);
        // A ratio of 3: 20 > 3 x 5, so it spills.
        let spill = Balancer::new(BalancePolicy::Random, e.clone(), true, 70).with_spill(8, 3);
        assert_eq!(home(&counts(&spill, 300, |_| None)), 0);
    }

    /// Runs a closed-loop model: each tick `arrivals` requests are picked (and held in
    /// flight), then each endpoint finishes up to its capacity. Returns the own zone's share
    /// of the picks after warm-up and the most requests ever in flight at one endpoint.
    fn simulate(b: &Balancer, e: &[Arc<Endpoint>], caps: &[u64], arrivals: usize) -> (f64, u64) {
        let (mut home, mut total, mut peak) = (0usize, 0usize, 0u64);
        for tick in 0..2000 {
            for _ in 0..arrivals {
                let p = b.pick(None, None).unwrap();
                let n = p.stats.inflight.fetch_add(1, Ordering::Relaxed) + 1;
                peak = peak.max(n);
                if tick >= 200 {
                    total += 1;
                    home += usize::from(p.local);
                }
            }
            for (x, cap) in e.iter().zip(caps) {
                let n = x.stats.inflight.load(Ordering::Relaxed);
                x.stats
                    .inflight
                    .store(n.saturating_sub(*cap), Ordering::Relaxed);
            }
        }
        for x in e {
            x.stats.inflight.store(0, Ordering::Relaxed);
        }
        (home as f64 / total as f64, peak)
    }

    #[test]
    fn zone_spill_over_settles_at_the_own_zone_capacity() {
        // One own-zone endpoint that finishes 2 requests a tick, three others with 4 each.
        let e = zoned(1);
        let caps = [2, 4, 4, 4];
        for policy in [BalancePolicy::LeastRequest, BalancePolicy::Random] {
            let b = Balancer::new(policy, e.clone(), true, 70);
            // Light load: all of it stays in the own zone.
            let (home, peak) = simulate(&b, &e, &caps, 1);
            assert_eq!((home, peak), (1.0, 1), "{policy:?}");
            // 10 a tick: the own zone keeps about its capacity (2 of 10), the rest spills,
            // and no queue grows without bound.
            let (home, peak) = simulate(&b, &e, &caps, 10);
            assert!((0.15..0.3).contains(&home), "{policy:?} home share {home}");
            assert!(peak < 40, "{policy:?} peak in flight {peak}");
        }
    }

    #[test]
    fn avoid_skips_the_failed_endpoint() {
        let e = eps(&[100, 100]);
        let b = Balancer::new(BalancePolicy::Random, e.clone(), false, 70);
        for _ in 0..100 {
            assert_eq!(b.pick(None, Some(e[0].addr)).unwrap().addr, e[1].addr);
        }
    }

    #[test]
    fn request_hash_reads_header_cookie_and_ip() {
        let mut h = http::HeaderMap::new();
        h.insert("x-user", "alice".parse().unwrap());
        h.insert(http::header::COOKIE, "a=1; session=xyz".parse().unwrap());
        let ip: SocketAddr = "10.1.1.1:5000".parse().unwrap();
        assert_eq!(
            request_hash(Some(&HashOn::Header("x-user".into())), &h, ip),
            Some(hash_bytes(b"alice"))
        );
        assert_eq!(
            request_hash(Some(&HashOn::Cookie("session".into())), &h, ip),
            Some(hash_bytes(b"xyz"))
        );
        assert_eq!(
            request_hash(Some(&HashOn::SourceIp), &h, ip),
            Some(hash_bytes(&[10, 1, 1, 1]))
        );
        assert_eq!(
            request_hash(Some(&HashOn::Cookie("none".into())), &h, ip),
            None
        );
    }
}
