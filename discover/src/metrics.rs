//! Discover's Prometheus metrics, registered on the registry `main` makes. Names are
//! `sidemesh_discover_*`; labels are bounded (routes are patterns, codes are statuses).

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Every discover metric.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// Requests by route pattern and status code.
    pub requests: IntCounterVec,
    /// Long polls waiting for a change right now.
    pub long_polls_waiting: IntGauge,
    /// Sidecar configs rendered with a new version.
    pub configs_rendered: IntCounter,
    /// State (re)loads by result (`ok`, `failed`).
    pub state_reloads: IntCounterVec,
    /// Live instances in the TTL registry.
    pub registry_instances: IntGauge,
    /// Registry instances removed because their TTL ran out.
    pub registry_expired: IntCounter,
    /// Sidecars that have a config.
    pub sidecars: IntGauge,
    /// Time to re-render every sidecar after a change.
    pub rebuild_seconds: Histogram,
    /// Reloads of the extra trusted CAs (`--ca-trust-extra`) by result (`ok`, `failed`).
    pub trust_reloads: IntCounterVec,
    /// Reloads of the signing CA's files (`--ca-cert`/`--ca-key` or the data directory's)
    /// by result (`ok`, `failed`).
    pub ca_reloads: IntCounterVec,
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn new(registry: &Registry) -> prometheus::Result<Metrics> {
        let m = Metrics {
            requests: IntCounterVec::new(
                Opts::new(
                    "sidemesh_discover_requests_total",
                    "HTTP requests by route and status code.",
                ),
                &["route", "code"],
            )?,
            long_polls_waiting: IntGauge::new(
                "sidemesh_discover_long_polls_waiting",
                "Long polls waiting for a config change.",
            )?,
            configs_rendered: IntCounter::new(
                "sidemesh_discover_configs_rendered_total",
                "Sidecar configs rendered with a new version.",
            )?,
            state_reloads: IntCounterVec::new(
                Opts::new(
                    "sidemesh_discover_state_reloads_total",
                    "State file loads and reloads by result.",
                ),
                &["result"],
            )?,
            registry_instances: IntGauge::new(
                "sidemesh_discover_registry_instances",
                "Live instances in the TTL registry.",
            )?,
            registry_expired: IntCounter::new(
                "sidemesh_discover_registry_expired_total",
                "Registry instances removed because their TTL ran out.",
            )?,
            sidecars: IntGauge::new(
                "sidemesh_discover_sidecars",
                "Sidecars (namespace, service, plugin) that have a config.",
            )?,
            rebuild_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "sidemesh_discover_rebuild_duration_seconds",
                    "Time to re-render every sidecar after a state change.",
                )
                .buckets(vec![
                    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ]),
            )?,
            trust_reloads: IntCounterVec::new(
                Opts::new(
                    "sidemesh_discover_trust_reloads_total",
                    "Reloads of the extra trusted CA file that changed the trust bundle, by result.",
                ),
                &["result"],
            )?,
            ca_reloads: IntCounterVec::new(
                Opts::new(
                    "sidemesh_discover_ca_reloads_total",
                    "Reloads of the signing CA's files that changed the signing CA, by result.",
                ),
                &["result"],
            )?,
        };
        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.trust_reloads.clone()))?;
        registry.register(Box::new(m.ca_reloads.clone()))?;
        registry.register(Box::new(m.long_polls_waiting.clone()))?;
        registry.register(Box::new(m.configs_rendered.clone()))?;
        registry.register(Box::new(m.state_reloads.clone()))?;
        registry.register(Box::new(m.registry_instances.clone()))?;
        registry.register(Box::new(m.registry_expired.clone()))?;
        registry.register(Box::new(m.sidecars.clone()))?;
        registry.register(Box::new(m.rebuild_seconds.clone()))?;
        // Pre-create the label sets people alert on, so they read 0 rather than absent.
        for r in ["ok", "failed"] {
            m.state_reloads.with_label_values(&[r]);
            m.trust_reloads.with_label_values(&[r]);
            m.ca_reloads.with_label_values(&[r]);
        }
        Ok(m)
    }
}
