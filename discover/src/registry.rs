//! The TTL registry: instances that announce themselves with
//! `PUT /v1/registry/{namespace}/{service}/{instance}` and stay only while they renew
//! (the fleet/etcd discovery pattern, built in).
//!
//! This is the pure core: time is passed in (milliseconds since the Unix epoch), so
//! expiry is tested without sleeping. The server persists [`Registry::to_saved`] to the
//! data directory after every change and restores it with [`Registry::from_saved`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use sidemesh_api::ValidationError;
use sidemesh_api::config::Protocol;
use sidemesh_api::name::{check_label, check_token};
use sidemesh_api::port::ServicePort;
use sidemesh_api::snapshot::MAX_WEIGHT;
use sidemesh_api::state::{ClusterState, Instance, InstancePort, Service, ServicePortSpec};

/// The longest TTL accepted, in seconds (one day).
pub const MAX_TTL_SECONDS: u64 = 86_400;

/// The body of a registration `PUT`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    /// The instance's IP address.
    pub address: IpAddr,
    /// The ports it serves (at least one).
    pub ports: Vec<RegisteredPort>,
    /// Seconds until the registration expires unless renewed by the same `PUT`, 1..=86400.
    pub ttl_seconds: u64,
    /// The instance's zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Whether a sidemesh sidecar fronts the instance.
    #[serde(default)]
    pub meshed: bool,
    /// Labels route backends select subsets by.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Relative weight, 1..=10000 (default 100).
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    100
}

/// One port of a registered instance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisteredPort {
    /// The service port this instance serves.
    pub port: ServicePort,
    /// The port to dial on the instance: for a meshed instance its sidecar's `port_outer`.
    /// Absent: the service's `port_outer` when meshed, else the service's target port
    /// (for a service known only to the registry: `port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<u16>,
    /// The protocol, used when the service is known only to the registry.
    #[serde(default)]
    pub protocol: Protocol,
}

/// A registry key: `(namespace, service, instance)`.
pub type InstanceKey = (String, String, String);

/// One live registration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// What was registered.
    pub registration: Registration,
    /// When it expires, in milliseconds since the Unix epoch.
    pub expires_at_ms: u64,
}

/// The saved form: `"namespace/service/instance"` to its entry.
pub type Saved = BTreeMap<String, Entry>;

/// What a [`Registry::put`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    /// A new instance.
    Created,
    /// An existing instance changed address, ports or other data.
    Updated,
    /// The same data again: only the TTL was renewed (configs do not change).
    Renewed,
}

/// The registry.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    entries: BTreeMap<InstanceKey, Entry>,
}

impl Registry {
    /// A registry restored from a save, minus what has expired by `now_ms` and entries
    /// whose keys are malformed.
    pub fn from_saved(saved: Saved, now_ms: u64) -> Registry {
        let mut entries = BTreeMap::new();
        for (key, entry) in saved {
            let mut parts = key.splitn(3, '/');
            let (Some(ns), Some(svc), Some(inst)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if entry.expires_at_ms <= now_ms || check_key(ns, svc, inst).is_err() {
                continue;
            }
            entries.insert((ns.to_owned(), svc.to_owned(), inst.to_owned()), entry);
        }
        Registry { entries }
    }

    /// The saved form.
    pub fn to_saved(&self) -> Saved {
        self.entries
            .iter()
            .map(|((ns, svc, inst), e)| (format!("{ns}/{svc}/{inst}"), e.clone()))
            .collect()
    }

    /// Number of live instances.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Registers or renews an instance.
    pub fn put(
        &mut self,
        key: InstanceKey,
        registration: Registration,
        now_ms: u64,
    ) -> Result<PutOutcome, Vec<ValidationError>> {
        let mut errors = Vec::new();
        if let Err(e) = check_key(&key.0, &key.1, &key.2) {
            errors.push(e);
        }
        check_registration(&registration, &mut errors);
        if !errors.is_empty() {
            return Err(errors);
        }
        let expires_at_ms = now_ms.saturating_add(registration.ttl_seconds * 1000);
        let outcome = match self.entries.get(&key) {
            None => PutOutcome::Created,
            Some(old) if same_data(&old.registration, &registration) => PutOutcome::Renewed,
            Some(_) => PutOutcome::Updated,
        };
        self.entries.insert(
            key,
            Entry {
                registration,
                expires_at_ms,
            },
        );
        Ok(outcome)
    }

    /// Removes an instance; whether it was there.
    pub fn delete(&mut self, key: &InstanceKey) -> bool {
        self.entries.remove(key).is_some()
    }

    /// Removes what has expired by `now_ms`; returns the services that lost instances.
    pub fn expire(&mut self, now_ms: u64) -> BTreeSet<(String, String)> {
        let mut gone = BTreeSet::new();
        self.entries.retain(|(ns, svc, _), e| {
            let keep = e.expires_at_ms > now_ms;
            if !keep {
                gone.insert((ns.clone(), svc.clone()));
            }
            keep
        });
        gone
    }

    /// When the next registration expires, if any.
    pub fn next_expiry_ms(&self) -> Option<u64> {
        self.entries.values().map(|e| e.expires_at_ms).min()
    }

    /// Adds the registered instances to `state`. A service the state does not define is
    /// created from its registrations (ports from the first registration that lists them).
    pub fn merge_into(&self, state: &mut ClusterState) {
        merge_entries(state, self.entries.iter());
    }

    /// One service as [`Registry::merge_into`] would leave it: `defined` (the sources'
    /// definition, if any) with this service's registered instances added, or a service
    /// made from its registrations alone; `None` when neither exists. Touches only this
    /// service's entries, so a per-service change costs nothing for the others.
    pub fn merge_service(&self, ns: &str, name: &str, defined: Option<Service>) -> Option<Service> {
        let mut state = ClusterState {
            services: defined.into_iter().collect(),
            ..ClusterState::default()
        };
        let from = (ns.to_owned(), name.to_owned(), String::new());
        let entries = self
            .entries
            .range(from..)
            .take_while(|((n, s, _), _)| n == ns && s == name);
        merge_entries(&mut state, entries);
        state.services.pop()
    }
}

/// Adds the instances of `entries` to `state` (see [`Registry::merge_into`]).
fn merge_entries<'a>(
    state: &mut ClusterState,
    entries: impl Iterator<Item = (&'a InstanceKey, &'a Entry)>,
) {
    // Services at or past this index were created here from registrations.
    let defined = state.services.len();
    let mut index: BTreeMap<(String, String), usize> = state
        .services
        .iter()
        .enumerate()
        .map(|(i, s)| ((s.namespace.clone(), s.name.clone()), i))
        .collect();
    for ((ns, svc, inst), e) in entries {
        let r = &e.registration;
        let i = *index.entry((ns.clone(), svc.clone())).or_insert_with(|| {
            state.services.push(Service {
                namespace: ns.clone(),
                name: svc.clone(),
                ports: Vec::new(),
                instances: Vec::new(),
                use_services: Vec::new(),
                allow_clients: None,
                inbound_timeouts: Default::default(),
                inbound_limits: Default::default(),
                plugins: Vec::new(),
            });
            state.services.len() - 1
        });
        let Some(service) = state.services.get_mut(i) else {
            continue;
        };
        if i >= defined {
            for p in &r.ports {
                if !service.ports.iter().any(|sp| sp.port == p.port) {
                    service.ports.push(ServicePortSpec {
                        port: p.port,
                        target_port: None,
                        port_outer: None,
                        protocol: p.protocol,
                        name: None,
                        tls_mode: None,
                    });
                }
            }
        }
        let explicit = r.ports.iter().any(|p| p.target.is_some());
        let ports = if explicit {
            r.ports
                .iter()
                .map(|p| InstancePort {
                    port: p.port,
                    target: p.target.unwrap_or_else(|| {
                        service
                            .ports
                            .iter()
                            .find(|sp| sp.port == p.port)
                            .map(|sp| match (r.meshed, sp.port_outer) {
                                (true, Some(o)) => o.get(),
                                _ => sp.app_port().get(),
                            })
                            .unwrap_or(p.port.get())
                    }),
                })
                .collect()
        } else {
            // Only the listed ports, dialled as the service's ports say.
            r.ports
                .iter()
                .filter_map(|p| {
                    let sp = service.ports.iter().find(|sp| sp.port == p.port)?;
                    let target = match (r.meshed, sp.port_outer) {
                        (true, Some(o)) => o.get(),
                        (true, None) => return None,
                        (false, _) => sp.app_port().get(),
                    };
                    Some(InstancePort {
                        port: p.port,
                        target,
                    })
                })
                .collect()
        };
        service.instances.push(Instance {
            name: Some(inst.clone()),
            address: r.address,
            ports,
            meshed: r.meshed,
            zone: r.zone.clone(),
            labels: r.labels.clone(),
            weight: r.weight,
        });
    }
}

fn same_data(a: &Registration, b: &Registration) -> bool {
    Registration {
        ttl_seconds: 0,
        ..a.clone()
    } == Registration {
        ttl_seconds: 0,
        ..b.clone()
    }
}

/// Checks the path segments of a registry key.
pub fn check_key(ns: &str, svc: &str, inst: &str) -> Result<(), ValidationError> {
    let e = |path: &str, message: String| ValidationError {
        path: path.to_owned(),
        message,
    };
    check_label(ns).map_err(|m| e("namespace", m))?;
    check_label(svc).map_err(|m| e("service", m))?;
    check_token(inst).map_err(|m| e("instance", m))?;
    if inst.contains('/') || inst == "." || inst == ".." {
        return Err(e(
            "instance",
            "must not contain '/' or be '.' or '..'".into(),
        ));
    }
    Ok(())
}

fn check_registration(r: &Registration, errors: &mut Vec<ValidationError>) {
    let mut err = |path: &str, message: String| {
        errors.push(ValidationError {
            path: path.to_owned(),
            message,
        })
    };
    if r.address.is_unspecified() || r.address.is_multicast() {
        err(
            "address",
            format!("must be a unicast address, got {}", r.address),
        );
    }
    if r.ports.is_empty() {
        err("ports", "must list at least one port".into());
    }
    let mut seen = BTreeSet::new();
    for (i, p) in r.ports.iter().enumerate() {
        if p.port.get() == 0 {
            err(
                &format!("ports[{i}].port"),
                "must be within 1..=65535, got 0".into(),
            );
        } else if !seen.insert(p.port) {
            err(
                &format!("ports[{i}].port"),
                format!("port {} is listed twice", p.port),
            );
        }
        if p.target == Some(0) {
            err(
                &format!("ports[{i}].target"),
                "must be within 1..=65535, got 0".into(),
            );
        }
    }
    if r.ttl_seconds == 0 || r.ttl_seconds > MAX_TTL_SECONDS {
        err(
            "ttl_seconds",
            format!(
                "must be within 1..={MAX_TTL_SECONDS}, got {}",
                r.ttl_seconds
            ),
        );
    }
    if let Some(z) = &r.zone {
        if let Err(m) = check_token(z) {
            err("zone", m);
        }
    }
    for (k, v) in &r.labels {
        if let Err(m) = check_token(k).and_then(|()| check_token(v)) {
            err(&format!("labels[{k:?}]"), m);
        }
    }
    if r.weight == 0 || r.weight > MAX_WEIGHT {
        err(
            "weight",
            format!("must be within 1..={MAX_WEIGHT}, got {}", r.weight),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(v: serde_json::Value) -> Registration {
        serde_json::from_value(v).unwrap()
    }

    fn key(i: &str) -> InstanceKey {
        ("demo".into(), "api".into(), i.into())
    }

    #[test]
    fn put_renew_update_delete_expire() {
        let mut r = Registry::default();
        let a = reg(
            serde_json::json!({"address": "10.0.0.1", "ports": [{"port": 80}], "ttl_seconds": 5}),
        );
        assert_eq!(r.put(key("a"), a.clone(), 1000), Ok(PutOutcome::Created));
        assert_eq!(r.put(key("a"), a.clone(), 2000), Ok(PutOutcome::Renewed));
        assert_eq!(r.next_expiry_ms(), Some(7000));
        let mut b = a.clone();
        b.zone = Some("z1".into());
        assert_eq!(r.put(key("a"), b, 2000), Ok(PutOutcome::Updated));
        r.put(key("b"), a, 2000).unwrap();
        assert!(r.expire(6999).is_empty());
        let gone = r.expire(7000);
        assert_eq!(gone.len(), 1);
        assert!(r.is_empty());
        assert!(!r.delete(&key("a")));
    }

    #[test]
    fn invalid_registrations_name_the_field() {
        let mut r = Registry::default();
        let bad = reg(serde_json::json!({
            "address": "0.0.0.0", "ports": [{"port": 0}], "ttl_seconds": 0, "weight": 0,
            "zone": "a b"
        }));
        let errs = r
            .put(("demo".into(), "api".into(), "..".into()), bad, 0)
            .unwrap_err();
        let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        for want in [
            "instance",
            "address",
            "ports[0].port",
            "ttl_seconds",
            "weight",
            "zone",
        ] {
            assert!(text.iter().any(|t| t.starts_with(want)), "{want}: {text:?}");
        }
        assert!(check_key("demo", "a/b", "x").is_err());
        assert!(check_key("demo", "api", "x\u{1}").is_err());
        assert!(r.is_empty());
    }

    #[test]
    fn saved_entries_restore_minus_expired() {
        let mut r = Registry::default();
        let a = reg(
            serde_json::json!({"address": "10.0.0.1", "ports": [{"port": 80}], "ttl_seconds": 5}),
        );
        r.put(key("a"), a.clone(), 0).unwrap();
        let mut long = a;
        long.ttl_seconds = 60;
        r.put(key("b"), long, 0).unwrap();
        let saved = serde_json::to_string(&r.to_saved()).unwrap();
        let back = Registry::from_saved(serde_json::from_str(&saved).unwrap(), 10_000);
        assert_eq!(back.len(), 1);
        assert_eq!(back.to_saved().keys().next().unwrap(), "demo/api/b");
    }

    #[test]
    fn merge_adds_instances_and_creates_unknown_services() {
        let mut state: ClusterState = serde_norway::from_str(
            "services:\n- {namespace: demo, name: api, ports: [{port: 80, port_outer: 18080}]}\n",
        )
        .unwrap();
        let mut r = Registry::default();
        let meshed = reg(
            serde_json::json!({"address": "10.0.0.1", "ports": [{"port": 80}], "ttl_seconds": 5, "meshed": true}),
        );
        r.put(key("a"), meshed, 0).unwrap();
        let other = reg(
            serde_json::json!({"address": "10.0.0.2", "ports": [{"port": 9000, "target": 19000, "protocol": "grpc"}], "ttl_seconds": 5, "meshed": true}),
        );
        r.put(("new".into(), "svc".into(), "x".into()), other, 0)
            .unwrap();
        r.merge_into(&mut state);
        let api = state.service("demo", "api").unwrap();
        assert_eq!(api.instances[0].ports[0].target, 18080);
        assert_eq!(api.ports.len(), 1);
        let new = state.service("new", "svc").unwrap();
        assert_eq!(new.ports[0].protocol, Protocol::Grpc);
        assert_eq!(new.instances[0].ports[0].target, 19000);
        state.check().unwrap();
    }
}
