//! `sidemesh-discover`: the cluster-state store, its sources (state file, TTL registry), and
//! the HTTP API that serves each sidecar its config at `DISCOVER_URL`.
//!
//! - [`render`]: the pure function from cluster state to one sidecar's config.
//! - [`addresses`]: the stable loopback address of each service.

pub mod addresses;
pub mod render;
