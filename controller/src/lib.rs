//! `sidemesh-controller`: the Kubernetes side of sidemesh, and the only crate that imports
//! kube.
//!
//! - [`crd`]: the `Plugin` and `MeshConfig` custom resources and their validation.
//! - [`inject`]: injection of the proxy and plugin containers, as pure functions over pod specs.
//!
//! - [`index`]: Kubernetes objects to the cluster state, as one pure function.
//! - [`live`]: the index kept up to date per changed object.
//! - [`lease`]: leader election, so one replica writes.
//!
//! Watches, the admission webhook and the install manifests build on these.

pub mod admin;
pub mod cli;
pub mod crd;
pub mod index;
pub mod inject;
pub mod install;
pub mod job;
pub mod lease;
pub mod live;
pub mod manifest;
pub mod review;
pub mod targetport;
pub mod tls;
pub mod watch;
pub mod webhook;
