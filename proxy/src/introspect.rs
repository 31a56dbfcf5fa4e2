//! What the admin server's `/config` and `/endpoints` show: the config the sidecar runs
//! (as Envoy's `/config_dump` does) and every listener's backends with their endpoints'
//! live state (as Envoy's `/clusters` and Linkerd's `diagnostics endpoints` do). Both are
//! JSON, built on request from the current state; nothing here runs per proxied request.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::Applied;
use crate::balance::{Endpoint, now_ms};
use crate::state::{Backend, State, Target};
use crate::tls::Credentials;

/// What plugin variables are replaced with: they may hold secrets.
pub const REDACTED: &str = "(redacted)";

/// `/config`: the applied config version and its listeners, the certificate (identity and
/// times, never the key), and the config from discover with plugin variable values
/// redacted.
pub fn config(
    snapshot: Option<&sidemesh_api::Snapshot>,
    applied: Option<&Applied>,
    credentials: Option<&Credentials>,
) -> Value {
    let applied = applied.map(|a| {
        json!({
            "version": a.version,
            "listening": sorted(&a.listening),
            "failed": sorted(&a.failed),
        })
    });
    let certificate = credentials.map(|c| {
        json!({
            "identity": c.identity,
            "trust_domain": c.trust_domain,
            "not_after": unix_seconds(c.not_after),
            "renew_at": unix_seconds(c.renew_at),
        })
    });
    let config = snapshot.map(|s| {
        let mut config = s.config().clone();
        for v in config.plugin.variables.values_mut() {
            *v = REDACTED.to_owned();
        }
        // Plain data with string keys: serializing cannot fail.
        serde_json::to_value(&config).unwrap_or(Value::Null)
    });
    json!({ "applied": applied, "certificate": certificate, "config": config })
}

/// `/endpoints`: per listener (sorted by address), each backend it can send to, once,
/// with the routes that use it, its policy and its endpoints' state now.
pub fn endpoints(state: Option<&State>) -> Value {
    let Some(state) = state else {
        return json!({ "version": null, "listeners": [] });
    };
    let now = now_ms();
    let mut listeners: Vec<_> = state.listeners.iter().collect();
    listeners.sort_by_key(|(addr, _)| **addr);
    let listeners: Vec<Value> = listeners
        .into_iter()
        .map(|(addr, target)| {
            json!({
                "address": addr,
                "direction": target.direction.as_str(),
                "service": &*target.service.name,
                "protocol": target.protocol,
                "backends": backends(target, now),
            })
        })
        .collect();
    json!({ "version": state.snapshot.version(), "listeners": listeners })
}

/// The distinct backends of a listener, in the order routes name them, the default last.
fn backends(target: &Target, now: u64) -> Vec<Value> {
    let mut seen: Vec<(&Arc<Backend>, Vec<&str>)> = Vec::new();
    let used = target
        .routes
        .iter()
        .flat_map(|r| r.backends.iter().map(move |(_, b)| (b, &*r.name)))
        .chain(std::iter::once((&target.default_backend, "default")));
    for (backend, by) in used {
        match seen.iter_mut().find(|(b, _)| Arc::ptr_eq(b, backend)) {
            Some((_, names)) if !names.contains(&by) => names.push(by),
            Some(_) => {}
            None => seen.push((backend, vec![by])),
        }
    }
    seen.into_iter()
        .map(|(b, used_by)| {
            json!({
                "service": &*b.service.name,
                "protocol": b.protocol,
                "policy": b.balancer.policy(),
                "used_by": used_by,
                "healthy": b.balancer.healthy_count(),
                "endpoints": b
                    .balancer
                    .endpoints()
                    .iter()
                    .map(|e| endpoint(e, now, b.balancer.uses_latency()))
                    .collect::<Vec<_>>(),
            })
        })
        .collect()
}

/// One endpoint's state; its latency only where the policy measures it (peak EWMA).
fn endpoint(e: &Endpoint, now: u64, latency: bool) -> Value {
    use std::sync::atomic::Ordering::Relaxed;
    let s = &e.stats;
    let ejected_until = s.ejected_until_ms.load(Relaxed);
    json!({
        "address": e.addr,
        "weight": e.weight,
        "local_zone": e.local,
        "meshed": e.meshed,
        "healthy": s.healthy(now),
        "ejected_for_ms": ejected_until.saturating_sub(now),
        "ejections": s.ejections.load(Relaxed),
        "failing_health_checks": s.check_failed.load(Relaxed),
        "consecutive_5xx": s.consecutive_5xx.load(Relaxed),
        "consecutive_connect_failures": s.consecutive_connect_failures.load(Relaxed),
        "in_flight": s.inflight.load(Relaxed),
        "latency_ewma_ms": latency.then(|| s.rtt_ns() / 1e6),
    })
}

fn sorted(addrs: &[std::net::SocketAddr]) -> Vec<std::net::SocketAddr> {
    let mut v = addrs.to_vec();
    v.sort();
    v
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
