//! `sidemesh-discover`: the cluster-state store, its sources (state file, TTL registry), and
//! the HTTP API that serves each sidecar its config at `DISCOVER_URL`.
//!
//! - [`store`]: the pure core: sources, registry, rendering of every sidecar, versions.
//! - [`render`]: the pure function from cluster state to one sidecar's config.
//! - [`registry`]: the TTL registry of self-announced instances.
//! - [`statefile`]: the YAML state file source and its watcher.
//! - [`addresses`]: the stable loopback address of each service.

pub mod addresses;
pub mod registry;
pub mod render;
pub mod statefile;
pub mod store;
