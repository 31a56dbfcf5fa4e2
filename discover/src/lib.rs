//! `sidemesh-discover`: the cluster-state store, its sources (state file, TTL registry), and
//! the HTTP API that serves each sidecar its config at `DISCOVER_URL`.
//!
//! - [`store`]: the pure core: sources, registry, rendering of every sidecar, versions.
//! - [`render`]: the pure function from cluster state to one sidecar's config.
//! - [`registry`]: the TTL registry of self-announced instances.
//! - [`statefile`]: the YAML state file source and its watcher.
//! - [`server`]: [`Discover`], the service other parts host in-process, and its HTTP API.
//! - [`rainbond`]: the Rainbond plugin-config shape of a config.
//! - [`metrics`]: the `sidemesh_discover_*` metrics.
//! - [`addresses`]: the stable loopback address of each service.
//! - [`auth`]: bearer tokens that say who may fetch which workload's config and certificate.
//! - [`identity`]: the mesh CA that signs sidecars' certificates for mutual TLS.

pub mod addresses;
pub mod auth;
pub mod cli;
pub mod identity;
pub mod metrics;
pub mod rainbond;
pub mod registry;
pub mod render;
pub mod review;
pub mod server;
pub mod statefile;
pub mod store;

pub use server::{Discover, Options, Serving};
