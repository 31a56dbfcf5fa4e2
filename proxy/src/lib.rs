//! `sidemesh-proxy`: the sidecar data plane.
//!
//! It will own the inbound and outbound listeners, protocol handling (HTTP/1.1, HTTP/2,
//! raw TCP), routing, client-side load balancing, connection pools, resilience (timeouts,
//! retries, circuit breaking, outlier detection), TLS between sidecars, and hot reload of
//! the config that `sidemesh_api::client` delivers. Not built yet: see the sidecar issue.
