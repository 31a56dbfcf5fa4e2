//! `sidemesh-api`: the `DISCOVER_URL` contract.
//!
//! - [`config`]: the serde types of one sidecar's config, as discover serves them.
//! - [`snapshot`]: validation of a whole config into an immutable, indexed [`Snapshot`].
//! - [`name`]: the rules for names that become URL segments, file names or DNS labels.
//! - [`port`]: newtypes that keep app ports, remapped ports and service ports apart.
//! - [`state`]: the source-agnostic cluster-state model that discover renders configs from.
//! - [`client`]: the polling loop that sidecars and plugins run against `DISCOVER_URL`.
//!
//! This crate knows nothing of Kubernetes or of the server; the proxy, the DNS shim, the
//! controller and plugins all depend on it. The reference is `docs/discover-api.md`.

#[cfg(feature = "client")]
pub mod client;
pub mod config;
#[cfg(feature = "client")]
pub mod credential;
pub mod name;
pub mod port;
#[cfg(feature = "client")]
pub mod shutdown;
pub mod snapshot;
pub mod state;

#[cfg(feature = "client")]
pub use client::{Client, ClientConfig, ClientError, PostError, Poster};
pub use config::SidecarConfig;
pub use port::{AppPort, OuterPort, ServicePort};
pub use snapshot::{ConfigError, Snapshot, ValidationError, ValidationErrors};
