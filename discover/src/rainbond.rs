//! The Rainbond plugin-config shape of a sidecar's config, served at
//! `GET /v1/resources/{namespace}/{service}/{plugin}`, so a plugin written for Rainbond's
//! `DISCOVER_URL` works unchanged.
//!
//! Rainbond's resource spec has three parts: `base_ports` (the workload's own ports, each
//! with the mesh `listen_port`), `base_services` (one entry per dependency port) and
//! `base_normal` (the plugin's variables). Every `options` map holds strings only. The
//! field-by-field mapping is in `docs/discover-http.md`.

use std::collections::BTreeMap;

use serde::Serialize;
use sidemesh_api::SidecarConfig;

/// Rainbond's `ResourceSpec`.
#[derive(Debug, Serialize)]
pub struct ResourceSpec {
    /// The workload's own ports.
    pub base_ports: Vec<BasePort>,
    /// One entry per (dependency, port).
    pub base_services: Vec<BaseService>,
    /// The plugin's variables.
    pub base_normal: BaseNormal,
}

/// One of the workload's ports.
#[derive(Debug, Serialize)]
pub struct BasePort {
    /// The service name.
    pub service_alias: String,
    /// `name.namespace`, standing in for Rainbond's service id.
    pub service_id: String,
    /// The app's own port.
    pub port: u16,
    /// The port the mesh listens on for it (`port_outer`).
    pub listen_port: u16,
    /// The protocol (`http`, `http2`, `grpc`, `tcp`, `auto`).
    pub protocol: String,
    /// String-valued extras.
    pub options: BTreeMap<String, String>,
}

/// One port of one dependency.
#[derive(Debug, Serialize)]
pub struct BaseService {
    /// The workload's service name.
    pub service_alias: String,
    /// The workload as `name.namespace`.
    pub service_id: String,
    /// The dependency's name.
    pub depend_service_alias: String,
    /// The dependency as `name.namespace`.
    pub depend_service_id: String,
    /// The dependency's port.
    pub port: u16,
    /// The protocol.
    pub protocol: String,
    /// String-valued extras: address, endpoints, policies.
    pub options: BTreeMap<String, String>,
}

/// The plugin's own variables.
#[derive(Debug, Serialize)]
pub struct BaseNormal {
    /// Variable name to value.
    pub options: BTreeMap<String, String>,
}

fn protocol(p: sidemesh_api::config::Protocol) -> String {
    match p {
        // Rainbond calls HTTP/1.1 ports "http".
        sidemesh_api::config::Protocol::Http1 => "http".to_owned(),
        other => other.as_str().to_owned(),
    }
}

/// Maps a sidecar config to Rainbond's shape.
pub fn resource_spec(c: &SidecarConfig) -> ResourceSpec {
    let id = &c.identity;
    let service_id = format!("{}.{}", id.service, id.namespace);
    let base_ports = c
        .inbound
        .iter()
        .map(|p| {
            let mut options = BTreeMap::new();
            if let Some(list) = &p.allow_clients {
                options.insert("allow_clients".to_owned(), list.join(","));
            }
            options.insert(
                "request_timeout_ms".into(),
                p.timeouts.request_ms.to_string(),
            );
            options.insert("max_requests".into(), p.limits.max_requests.to_string());
            BasePort {
                service_alias: id.service.clone(),
                service_id: service_id.clone(),
                port: p.port.get(),
                listen_port: p.port_outer.get(),
                protocol: protocol(p.protocol),
                options,
            }
        })
        .collect();
    let mut base_services = Vec::new();
    for o in &c.outbound {
        for p in &o.ports {
            let mut options = BTreeMap::new();
            options.insert("address".to_owned(), o.address.to_string());
            options.insert("dns_names".to_owned(), o.dns_names.join(","));
            let endpoints: Vec<String> = p
                .endpoints
                .iter()
                .map(|e| std::net::SocketAddr::new(e.address, e.port).to_string())
                .collect();
            options.insert("endpoints".to_owned(), endpoints.join(","));
            options.insert(
                "balancer".to_owned(),
                serde_json::to_value(o.balancer.policy)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
            );
            options.insert(
                "connect_timeout_ms".into(),
                o.timeouts.connect_ms.to_string(),
            );
            options.insert(
                "request_timeout_ms".into(),
                o.timeouts.request_ms.to_string(),
            );
            options.insert("retry_attempts".into(), o.retry.attempts.to_string());
            options.insert(
                "max_connections".into(),
                o.limits.max_connections.to_string(),
            );
            options.insert(
                "max_pending_requests".into(),
                o.limits.max_pending_requests.to_string(),
            );
            options.insert("max_requests".into(), o.limits.max_requests.to_string());
            if !o.routes.is_empty() {
                options.insert(
                    "routes".to_owned(),
                    serde_json::to_string(&o.routes).unwrap_or_default(),
                );
            }
            base_services.push(BaseService {
                service_alias: id.service.clone(),
                service_id: service_id.clone(),
                depend_service_alias: o.name.clone(),
                depend_service_id: format!("{}.{}", o.name, o.namespace),
                port: p.port.get(),
                protocol: protocol(p.protocol),
                options,
            });
        }
    }
    ResourceSpec {
        base_ports,
        base_services,
        base_normal: BaseNormal {
            options: c.plugin.variables.clone(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_ports_services_and_variables_as_strings() {
        let state: sidemesh_api::state::ClusterState = serde_norway::from_str(
            "services:
- {namespace: demo, name: web, ports: [{port: 8000, port_outer: 18000, protocol: http1}],
   use_services: [{service: api}], plugins: [{name: sidemesh-proxy, variables: {K: v}}]}
- {namespace: demo, name: api, ports: [{port: 80, protocol: grpc}], instances: [{address: 10.0.0.1}]}
",
        )
        .unwrap();
        let mut t = crate::addresses::AddressTable::default();
        t.sync([("demo", "web"), ("demo", "api")]);
        let key = crate::render::SidecarKey {
            namespace: "demo".into(),
            service: "web".into(),
            plugin: "sidemesh-proxy".into(),
        };
        let c = crate::render::Cluster::new(&state)
            .render(&key, &t)
            .unwrap()
            .config;
        let v = serde_json::to_value(resource_spec(&c)).unwrap();
        assert_eq!(v["base_ports"][0]["port"], 8000);
        assert_eq!(v["base_ports"][0]["listen_port"], 18000);
        assert_eq!(v["base_ports"][0]["protocol"], "http");
        let s = &v["base_services"][0];
        assert_eq!(s["depend_service_alias"], "api");
        assert_eq!(s["depend_service_id"], "api.demo");
        assert_eq!(s["protocol"], "grpc");
        assert_eq!(s["options"]["endpoints"], "10.0.0.1:80");
        assert_eq!(v["base_normal"]["options"]["K"], "v");
        for part in ["base_ports", "base_services"] {
            for item in v[part].as_array().unwrap() {
                for (_, value) in item["options"].as_object().unwrap() {
                    assert!(value.is_string(), "{part}: {value}");
                }
            }
        }
    }
}
