//! The sidecar's Prometheus metrics, all named `sidemesh_proxy_*`, registered on the one
//! registry that `main` makes. Labels stay bounded: direction, the service (`namespace/name`,
//! or `inbound` with the app port), the route name from the config, a status class, and
//! fixed reason words. No per-path or per-endpoint series.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// Every metric of the data plane.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// HTTP requests answered, by direction, service, route and status class.
    pub requests: IntCounterVec,
    /// gRPC responses (on `grpc` ports), by direction, service, route and the
    /// `grpc-status` the client got (`none`: the response ended without one, or was cut).
    pub grpc_responses: IntCounterVec,
    /// Time from request start to response headers, by direction and service.
    pub request_duration: HistogramVec,
    /// TCP connections accepted, by direction and service.
    pub tcp_connections: IntCounterVec,
    /// TCP connections open now, by direction.
    pub tcp_open: IntGaugeVec,
    /// Bytes proxied over raw TCP, by direction, service and flow (`to_upstream`, `to_client`).
    pub tcp_bytes: IntCounterVec,
    /// Retries made, by service.
    pub retries: IntCounterVec,
    /// Faults injected by routes, by service and kind (`delay`, `abort`).
    pub faults: IntCounterVec,
    /// Retries refused because the retry budget was spent, by service.
    pub retries_budget_exhausted: IntCounterVec,
    /// Timeouts, by service and kind (`connect`, `request`, `per_try`, `idle`).
    pub timeouts: IntCounterVec,
    /// Requests or connections refused by a circuit-breaker limit, by service and reason.
    pub breaker_rejections: IntCounterVec,
    /// Endpoints ejected by outlier detection, by service.
    pub ejections: IntCounterVec,
    /// Healthy endpoints per backend (service and port).
    pub healthy_endpoints: IntGaugeVec,
    /// Upstream connect failures, by service.
    pub connect_failures: IntCounterVec,
    /// Listeners that could not be bound, by direction.
    pub bind_failures: IntCounterVec,
    /// Listeners open now, by direction.
    pub listeners: IntGaugeVec,
    /// Version of the config in use.
    pub config_version: IntGauge,
    /// Unix time the config in use was applied, in seconds.
    pub config_applied: IntGauge,
    /// Configs applied since start.
    pub config_applies: IntCounter,
    /// Connections refused because the sidecar's connection limit was reached.
    pub connection_limit_rejections: IntCounter,
    /// Time to drain on shutdown or listener removal, in seconds.
    pub drain_duration: Histogram,
    /// Calls to discover's TTL registry (`--register`), by operation and result.
    pub registrations: IntCounterVec,
    /// The `tcp_open` series of each direction (inbound, outbound), resolved once.
    pub tcp_open_by_direction: [IntGauge; 2],
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

impl Metrics {
    /// Makes and registers the metrics.
    pub fn new(registry: &Registry) -> prometheus::Result<Metrics> {
        let counter = |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<_> {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<_> {
            let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "sidemesh_proxy_request_duration_seconds",
                "Time from request start to response headers.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["direction", "service"],
        )?;
        registry.register(Box::new(request_duration.clone()))?;
        let config_version = IntGauge::new(
            "sidemesh_proxy_dataplane_config_version",
            "Version of the config the data plane has applied.",
        )?;
        registry.register(Box::new(config_version.clone()))?;
        let config_applied = IntGauge::new(
            "sidemesh_proxy_dataplane_applied_timestamp_seconds",
            "Unix time the data plane applied the config in use.",
        )?;
        registry.register(Box::new(config_applied.clone()))?;
        let config_applies = IntCounter::new(
            "sidemesh_proxy_dataplane_config_applies_total",
            "Configs applied since start.",
        )?;
        registry.register(Box::new(config_applies.clone()))?;
        let connection_limit_rejections = IntCounter::new(
            "sidemesh_proxy_connection_limit_rejections_total",
            "Connections closed at once because the sidecar's connection limit was reached.",
        )?;
        registry.register(Box::new(connection_limit_rejections.clone()))?;
        let drain_duration = Histogram::with_opts(
            HistogramOpts::new(
                "sidemesh_proxy_drain_duration_seconds",
                "Time a removed listener (or the whole sidecar) took to drain.",
            )
            .buckets(vec![0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0]),
        )?;
        registry.register(Box::new(drain_duration.clone()))?;
        let tcp_open = gauge(
            "sidemesh_proxy_tcp_connections_open",
            "Client connections open now.",
            &["direction"],
        )?;
        Ok(Metrics {
            requests: counter(
                "sidemesh_proxy_requests_total",
                "HTTP requests answered.",
                &["direction", "service", "route", "status_class"],
            )?,
            grpc_responses: counter(
                "sidemesh_proxy_grpc_responses_total",
                "gRPC responses sent to clients on grpc ports, by grpc-status (none: without one).",
                &["direction", "service", "route", "grpc_status"],
            )?,
            request_duration,
            faults: counter(
                "sidemesh_proxy_faults_injected_total",
                "Faults injected by routes' fault settings.",
                &["service", "kind"],
            )?,
            tcp_connections: counter(
                "sidemesh_proxy_tcp_connections_total",
                "TCP connections accepted.",
                &["direction", "service"],
            )?,
            tcp_open_by_direction: [
                tcp_open.with_label_values(&["inbound"]),
                tcp_open.with_label_values(&["outbound"]),
            ],
            tcp_open,
            tcp_bytes: counter(
                "sidemesh_proxy_tcp_bytes_total",
                "Bytes proxied over raw TCP.",
                &["direction", "service", "flow"],
            )?,
            retries: counter(
                "sidemesh_proxy_retries_total",
                "Retries made.",
                &["service"],
            )?,
            retries_budget_exhausted: counter(
                "sidemesh_proxy_retry_budget_exhausted_total",
                "Retries not made because the retry budget was spent.",
                &["service"],
            )?,
            timeouts: counter(
                "sidemesh_proxy_timeouts_total",
                "Timeouts by kind.",
                &["service", "kind"],
            )?,
            breaker_rejections: counter(
                "sidemesh_proxy_breaker_rejections_total",
                "Requests refused by a circuit-breaker limit.",
                &["service", "reason"],
            )?,
            ejections: counter(
                "sidemesh_proxy_outlier_ejections_total",
                "Endpoints ejected by outlier detection.",
                &["service"],
            )?,
            healthy_endpoints: gauge(
                "sidemesh_proxy_healthy_endpoints",
                "Healthy endpoints per backend.",
                &["service", "port"],
            )?,
            connect_failures: counter(
                "sidemesh_proxy_connect_failures_total",
                "Upstream connect failures.",
                &["service"],
            )?,
            bind_failures: counter(
                "sidemesh_proxy_listener_bind_failures_total",
                "Listeners that could not be bound.",
                &["direction"],
            )?,
            listeners: gauge(
                "sidemesh_proxy_listeners",
                "Listeners open now.",
                &["direction"],
            )?,
            registrations: counter(
                "sidemesh_proxy_registry_calls_total",
                "Calls to discover's TTL registry, by operation and result.",
                &["op", "result"],
            )?,
            config_version,
            config_applied,
            config_applies,
            connection_limit_rejections,
            drain_duration,
        })
    }
}

/// The request series of one listener's service and route, resolved once.
#[derive(Debug)]
pub struct RequestMetrics {
    by_class: [prometheus::IntCounter; 5],
    duration: Histogram,
    /// The gRPC series, each resolved on first use (only `grpc` ports have any).
    grpc: Box<GrpcSeries>,
}

/// The `sidemesh_proxy_grpc_responses_total` series of one route.
#[derive(Debug)]
struct GrpcSeries {
    vec: IntCounterVec,
    labels: [Box<str>; 3],
    /// Codes 0..=16, then `none`.
    codes: [std::sync::OnceLock<IntCounter>; 18],
}

impl RequestMetrics {
    /// Resolves the series for `direction`, `service` and `route`.
    pub fn new(m: &Metrics, direction: &str, service: &str, route: &str) -> RequestMetrics {
        let class = |c: &str| {
            m.requests
                .with_label_values(&[direction, service, route, c])
        };
        RequestMetrics {
            by_class: [
                class("1xx"),
                class("2xx"),
                class("3xx"),
                class("4xx"),
                class("5xx"),
            ],
            duration: m.request_duration.with_label_values(&[direction, service]),
            grpc: Box::new(GrpcSeries {
                vec: m.grpc_responses.clone(),
                labels: [direction.into(), service.into(), route.into()],
                codes: Default::default(),
            }),
        }
    }

    /// Counts one gRPC response by the `grpc-status` its client got (`None`: none). A code
    /// above 16 counts as 2, `UNKNOWN`, as clients read it.
    pub fn grpc(&self, code: Option<u8>) {
        const NAMES: [&str; 18] = [
            "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15",
            "16", "none",
        ];
        let i = match code {
            Some(c @ 0..=16) => usize::from(c),
            Some(_) => 2,
            None => 17,
        };
        let g = &self.grpc;
        let c = g.codes[i].get_or_init(|| {
            let [d, s, r] = &g.labels;
            g.vec.with_label_values(&[&**d, &**s, &**r, NAMES[i]])
        });
        c.inc();
    }

    /// Counts one answered request.
    pub fn observe(&self, status: u16, took: std::time::Duration) {
        let i = match status {
            100..=199 => 0,
            200..=299 => 1,
            300..=399 => 2,
            400..=499 => 3,
            _ => 4,
        };
        if let Some(c) = self.by_class.get(i) {
            c.inc();
        }
        self.duration.observe(took.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_responses_are_counted_by_code_with_bad_codes_as_unknown() {
        let registry = Registry::new();
        let m = Metrics::new(&registry).unwrap();
        let rm = RequestMetrics::new(&m, "outbound", "shop/cart", "default");
        for code in [Some(0), Some(0), Some(14), Some(99), None] {
            rm.grpc(code);
        }
        let get = |code: &str| {
            m.grpc_responses
                .with_label_values(&["outbound", "shop/cart", "default", code])
                .get()
        };
        assert_eq!(
            [get("0"), get("14"), get("2"), get("none"), get("13")],
            [2, 1, 1, 1, 0]
        );
    }
}
