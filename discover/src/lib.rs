//! `sidemesh-discover`: the cluster-state store, its sources (state file, TTL registry), and
//! the HTTP API that serves each sidecar its config at `DISCOVER_URL`.
