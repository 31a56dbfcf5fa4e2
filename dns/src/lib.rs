//! `sidemesh-dns`: the DNS shim.
//!
//! It will answer the mesh's service names with each service's loopback address from the
//! sidecar's config, and forward and cache everything else. Not built yet: see the DNS issue.
