//! The store: the pure core of discover. It holds the state of every source (state file,
//! controller, ...), the TTL registry and the address table, renders every sidecar's config
//! after each change, and gives each config its version.
//!
//! Versions are strictly increasing per sidecar across changes and across restarts: a
//! changed config gets `max(now in ms, highest version ever issued + 1)`, and the highest
//! version, each config's content hash and version, the address table and the registry are
//! all in [`Persisted`], which the server saves in the data directory. Unchanged content
//! keeps its version, so a restart does not wake every poller.
//!
//! No I/O and no clock here: time is passed in, so every rule is a plain unit test.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sidemesh_api::state::{ClusterState, Service};
use sidemesh_api::{SidecarConfig, ValidationError};

use crate::addresses::{AddressTable, fnv1a};
use crate::registry::{self, InstanceKey, PutOutcome, Registration, Registry};
use crate::render::{Cluster, RenderError, SidecarKey};

/// One sidecar's current config, ready to serve.
#[derive(Debug)]
pub struct Sidecar {
    /// The version (also the `ETag`).
    pub version: u64,
    /// The config (with `version` set).
    pub config: SidecarConfig,
    /// The config as JSON, as served.
    pub json: Bytes,
    gzip: OnceLock<Bytes>,
}

impl Sidecar {
    /// The JSON, gzip-compressed (computed once, on first use).
    pub fn gzip(&self) -> Bytes {
        self.gzip
            .get_or_init(|| {
                use std::io::Write;
                let mut enc =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                // Writing to a Vec cannot fail.
                let _ = enc.write_all(&self.json);
                Bytes::from(enc.finish().unwrap_or_default())
            })
            .clone()
    }
}

/// A config's persisted version record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    /// FNV-1a of the config's JSON with version 0.
    pub hash: u64,
    /// The version issued for that content.
    pub version: u64,
}

/// What survives a restart (saved as JSON files in the data directory).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Persisted {
    /// The highest version ever issued.
    #[serde(default)]
    pub max_version: u64,
    /// `namespace/service/plugin` to its version record.
    #[serde(default)]
    pub versions: BTreeMap<String, VersionRecord>,
    /// `namespace/name` to its loopback address.
    #[serde(default)]
    pub addresses: BTreeMap<String, Ipv4Addr>,
    /// The TTL registry.
    #[serde(default)]
    pub registry: registry::Saved,
}

/// What one rebuild changed.
#[derive(Debug, Default)]
pub struct Changes {
    /// Sidecars whose config is new or changed.
    pub changed: Vec<SidecarKey>,
    /// Sidecars that no longer exist.
    pub removed: Vec<SidecarKey>,
    /// Parts of the state left out of some config, per service (`namespace/name`).
    pub dropped: BTreeMap<String, Vec<ValidationError>>,
}

/// A change to some services of one source, for sources that know what changed (the
/// controller): see [`Store::apply_delta`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceDelta {
    /// Services added or replaced whole.
    pub upsert: Vec<Service>,
    /// Services removed, as `(namespace, name)`.
    pub remove: Vec<(String, String)>,
}

impl ServiceDelta {
    /// Whether the delta changes nothing.
    pub fn is_empty(&self) -> bool {
        self.upsert.is_empty() && self.remove.is_empty()
    }
}

/// A service as `GET /v1/services` lists it.
#[derive(Clone, Debug, Serialize)]
pub struct ServiceSummary {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Its loopback address.
    pub address: Option<Ipv4Addr>,
    /// Number of instances (static and registered).
    pub instances: usize,
    /// Its sidecars' plugins and config versions.
    pub sidecars: BTreeMap<String, u64>,
}

/// The store.
#[derive(Debug, Default)]
pub struct Store {
    /// Shared with the source (the file watcher keeps the same value as its last good state).
    sources: BTreeMap<String, Arc<ClusterState>>,
    registry: Registry,
    addresses: AddressTable,
    versions: BTreeMap<String, VersionRecord>,
    max_version: u64,
    sidecars: HashMap<SidecarKey, Arc<Sidecar>>,
    services: Vec<ServiceSummary>,
    /// The merged state of the last rebuild, to find what the next one must re-render.
    previous: Option<ClusterState>,
    /// Mixed into every config's content hash: a fingerprint of what is served with the
    /// configs but not stored in them (the TLS settings); 0 without TLS.
    tls_salt: u64,
}

impl Store {
    /// A store restored from a save, with registrations expired by `now_ms` dropped. Call
    /// [`Store::rebuild`] (or set a source) before serving.
    pub fn new(saved: Persisted, now_ms: u64) -> Store {
        Store {
            registry: Registry::from_saved(saved.registry, now_ms),
            addresses: AddressTable::from_saved(saved.addresses),
            versions: saved.versions,
            max_version: saved.max_version,
            ..Store::default()
        }
    }

    /// Sets the fingerprint of the TLS settings served with the configs (see
    /// [`crate::identity::Authority::salt`]). When it changes after the first build, every
    /// config is re-rendered and gets a new version, so its pollers learn the new settings.
    pub fn set_tls_salt(&mut self, salt: u64, now_ms: u64) -> Changes {
        if salt == self.tls_salt {
            return Changes::default();
        }
        self.tls_salt = salt;
        if self.previous.is_none() {
            return Changes::default();
        }
        // Without a previous state every sidecar counts as affected.
        self.previous = None;
        self.rebuild(now_ms)
    }

    /// What to save.
    pub fn persisted(&self) -> Persisted {
        Persisted {
            max_version: self.max_version,
            versions: self.versions.clone(),
            addresses: self.addresses.to_saved().clone(),
            registry: self.registry.to_saved(),
        }
    }

    /// Replaces the state of source `name` and rebuilds.
    pub fn set_source(
        &mut self,
        name: &str,
        state: impl Into<Arc<ClusterState>>,
        now_ms: u64,
    ) -> Changes {
        self.sources.insert(name.to_owned(), state.into());
        self.rebuild(now_ms)
    }

    /// Drops source `name` and rebuilds.
    pub fn remove_source(&mut self, name: &str, now_ms: u64) -> Changes {
        self.sources.remove(name);
        self.rebuild(now_ms)
    }

    /// Applies a per-service change to source `source` and re-renders only the sidecars it
    /// can change: the changed services' own and those of the services that use them.
    ///
    /// Incremental when `source` is the only source and a build already happened (the
    /// controller's case); otherwise the delta is applied to the source and everything is
    /// rebuilt, with the same result. Versions, wake-ups and the address table follow the
    /// same rules as [`Store::rebuild`].
    pub fn apply_delta(&mut self, source: &str, delta: ServiceDelta, now_ms: u64) -> Changes {
        let incremental =
            self.previous.is_some() && self.sources.len() == 1 && self.sources.contains_key(source);
        let state = Arc::make_mut(self.sources.entry(source.to_owned()).or_default());
        let mut keys: BTreeSet<(String, String)> = BTreeSet::new();
        for (ns, name) in delta.remove {
            state
                .services
                .retain(|s| !(s.namespace == ns && s.name == name));
            keys.insert((ns, name));
        }
        for svc in delta.upsert {
            let key = (svc.namespace.clone(), svc.name.clone());
            match state
                .services
                .iter_mut()
                .find(|s| s.namespace == key.0 && s.name == key.1)
            {
                Some(s) => *s = svc,
                None => state.services.push(svc),
            }
            keys.insert(key);
        }
        let Some(mut merged) = self.previous.take().filter(|_| incremental) else {
            return self.rebuild(now_ms);
        };
        let state = self.sources.get(source).cloned().unwrap_or_default();
        // The merged entry of each touched service, as a full merge would give it.
        let mut changed: HashSet<(String, String)> = HashSet::new();
        let mut set_changed = false;
        for (ns, name) in keys {
            let defined = state
                .services
                .iter()
                .find(|s| s.namespace == ns && s.name == name)
                .cloned();
            let next = self.registry.merge_service(&ns, &name, defined);
            let at = merged
                .services
                .iter()
                .position(|s| s.namespace == ns && s.name == name);
            match (at, next) {
                (Some(i), Some(n)) if merged.services[i] == n => continue,
                (Some(i), Some(n)) => merged.services[i] = n,
                (Some(i), None) => {
                    merged.services.remove(i);
                    set_changed = true;
                }
                (None, Some(n)) => {
                    merged.services.push(n);
                    set_changed = true;
                }
                (None, None) => continue,
            }
            changed.insert((ns, name));
        }
        if set_changed {
            self.addresses.sync(
                merged
                    .services
                    .iter()
                    .map(|s| (s.namespace.as_str(), s.name.as_str())),
            );
        }
        let mut changes = Changes::default();
        {
            let changed_ref: HashSet<(&str, &str)> = changed
                .iter()
                .map(|(a, b)| (a.as_str(), b.as_str()))
                .collect();
            let affected = with_dependents(&merged, &changed_ref);
            let cluster = Cluster::new(&merged);
            let mut affected: Vec<(&str, &str)> = affected.into_iter().collect();
            affected.sort_unstable();
            for (ns, name) in affected {
                let Some(svc) = cluster.service(ns, name) else {
                    continue;
                };
                let mut keys: Vec<SidecarKey> = cluster.sidecars_of(svc).collect();
                keys.sort();
                let mut versions = BTreeMap::new();
                for key in keys {
                    if let Some(s) = self.render_sidecar(&cluster, &key, now_ms, &mut changes) {
                        versions.insert(key.plugin.clone(), s.version);
                        self.sidecars.insert(key, s);
                    }
                }
                // Plugins detached since, and the summary line.
                let stale: Vec<SidecarKey> = self
                    .summary(ns, name)
                    .map(|s| {
                        s.sidecars
                            .keys()
                            .filter(|p| !versions.contains_key(*p))
                            .map(|p| SidecarKey {
                                namespace: ns.to_owned(),
                                service: name.to_owned(),
                                plugin: p.clone(),
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                self.forget(stale, &mut changes);
                let summary = ServiceSummary {
                    namespace: ns.to_owned(),
                    name: name.to_owned(),
                    address: self.addresses.get(ns, name),
                    instances: svc.instances.len(),
                    sidecars: versions,
                };
                match self.summary_at(ns, name) {
                    Ok(i) => self.services[i] = summary,
                    Err(i) => self.services.insert(i, summary),
                }
            }
        }
        // Services that went: their sidecars and summary line.
        for (ns, name) in &changed {
            if merged
                .services
                .iter()
                .any(|s| &s.namespace == ns && &s.name == name)
            {
                continue;
            }
            if let Ok(i) = self.summary_at(ns, name) {
                let gone = self.services.remove(i);
                let stale = gone
                    .sidecars
                    .into_keys()
                    .map(|plugin| SidecarKey {
                        namespace: ns.clone(),
                        service: name.clone(),
                        plugin,
                    })
                    .collect();
                self.forget(stale, &mut changes);
            }
        }
        if set_changed {
            // Addresses of the services that stayed cannot move, but be exact anyway.
            for s in &mut self.services {
                s.address = self.addresses.get(&s.namespace, &s.name);
            }
        }
        self.previous = Some(merged);
        changes
    }

    fn summary_at(&self, ns: &str, name: &str) -> Result<usize, usize> {
        self.services
            .binary_search_by(|x| (x.namespace.as_str(), x.name.as_str()).cmp(&(ns, name)))
    }

    fn summary(&self, ns: &str, name: &str) -> Option<&ServiceSummary> {
        self.summary_at(ns, name).ok().map(|i| &self.services[i])
    }

    /// Drops sidecars that no longer exist, with their version records (`max_version`
    /// still guards their return).
    fn forget(&mut self, keys: Vec<SidecarKey>, changes: &mut Changes) {
        for key in keys {
            if self.sidecars.remove(&key).is_some() {
                self.versions.remove(&key.to_string());
                changes.removed.push(key);
            }
        }
    }

    /// Registers or renews an instance; rebuilds unless only the TTL was renewed.
    pub fn registry_put(
        &mut self,
        key: InstanceKey,
        registration: Registration,
        now_ms: u64,
    ) -> Result<(PutOutcome, Changes), Vec<ValidationError>> {
        let outcome = self.registry.put(key, registration, now_ms)?;
        let changes = match outcome {
            PutOutcome::Renewed => Changes::default(),
            _ => self.rebuild(now_ms),
        };
        Ok((outcome, changes))
    }

    /// Removes a registered instance; `None` when it was not registered.
    pub fn registry_delete(&mut self, key: &InstanceKey, now_ms: u64) -> Option<Changes> {
        self.registry.delete(key).then(|| self.rebuild(now_ms))
    }

    /// Expires registrations; rebuilds only when some expired.
    pub fn expire(&mut self, now_ms: u64) -> Option<Changes> {
        (!self.registry.expire(now_ms).is_empty()).then(|| self.rebuild(now_ms))
    }

    /// When the next registration expires.
    pub fn next_expiry_ms(&self) -> Option<u64> {
        self.registry.next_expiry_ms()
    }

    /// Number of live registered instances.
    pub fn registry_len(&self) -> usize {
        self.registry.len()
    }

    /// Number of sidecars with a config.
    pub fn sidecar_count(&self) -> usize {
        self.sidecars.len()
    }

    /// The current config of a sidecar.
    pub fn sidecar(&self, key: &SidecarKey) -> Option<Arc<Sidecar>> {
        self.sidecars.get(key).cloned()
    }

    /// Why a sidecar has no config (unknown service, or unknown plugin and which exist).
    pub fn missing(&self, key: &SidecarKey) -> RenderError {
        let attached: Vec<&str> = self
            .services
            .iter()
            .find(|s| s.namespace == key.namespace && s.name == key.service)
            .map(|s| s.sidecars.keys().map(String::as_str).collect())
            .unwrap_or_default();
        if attached.is_empty() {
            RenderError::UnknownService {
                namespace: key.namespace.clone(),
                service: key.service.clone(),
            }
        } else {
            RenderError::UnknownPlugin {
                namespace: key.namespace.clone(),
                service: key.service.clone(),
                plugin: key.plugin.clone(),
                attached: attached.join(", "),
            }
        }
    }

    /// Every service with its address and sidecar versions, sorted.
    pub fn services(&self) -> &[ServiceSummary] {
        &self.services
    }

    /// The merged state: every source, then the registry's instances.
    pub fn merged(&self) -> ClusterState {
        let mut merged = ClusterState::default();
        let mut first = true;
        for state in self.sources.values() {
            if first {
                merged.dns = state.dns.clone();
                first = false;
            }
            for p in &state.plugins {
                if merged.plugin(&p.name).is_none() {
                    merged.plugins.push(p.clone());
                }
            }
            merged.services.extend(state.services.iter().cloned());
        }
        self.registry.merge_into(&mut merged);
        merged
    }

    /// Re-renders every sidecar and assigns versions to changed configs.
    pub fn rebuild(&mut self, now_ms: u64) -> Changes {
        let merged = self.merged();
        let affected = affected(self.previous.as_ref(), &merged);
        if !matches!(
            affected,
            Affected::Some {
                set_changed: false,
                ..
            }
        ) {
            self.addresses.sync(
                merged
                    .services
                    .iter()
                    .map(|s| (s.namespace.as_str(), s.name.as_str())),
            );
        }
        let cluster = Cluster::new(&merged);
        let mut changes = Changes::default();
        let mut next: HashMap<SidecarKey, Arc<Sidecar>> =
            HashMap::with_capacity(self.sidecars.len());
        let mut keys: Vec<SidecarKey> = cluster.sidecars().collect();
        keys.sort();
        for key in keys {
            // A sidecar none of whose inputs changed keeps its config as it is.
            if !affected.contains(&key.namespace, &key.service) {
                if let Some(s) = self.sidecars.get(&key) {
                    next.insert(key, s.clone());
                    continue;
                }
            }
            if let Some(sidecar) = self.render_sidecar(&cluster, &key, now_ms, &mut changes) {
                next.insert(key, sidecar);
            }
        }
        for key in self.sidecars.keys() {
            if !next.contains_key(key) {
                changes.removed.push(key.clone());
            }
        }
        // Forget records of sidecars that are gone (max_version still guards their return);
        // also, on the first build, records restored for sidecars that no longer exist.
        let first = self.previous.is_none();
        if first || !changes.removed.is_empty() {
            self.versions.retain(|k, _| {
                let mut parts = k.splitn(3, '/');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(namespace), Some(service), Some(plugin)) => {
                        next.contains_key(&SidecarKey {
                            namespace: namespace.to_owned(),
                            service: service.to_owned(),
                            plugin: plugin.to_owned(),
                        })
                    }
                    _ => false,
                }
            });
        }
        let mut services: Vec<ServiceSummary> = merged
            .services
            .iter()
            .filter(|s| {
                cluster
                    .service(&s.namespace, &s.name)
                    .is_some_and(|c| std::ptr::eq(c, *s))
            })
            .map(|s| ServiceSummary {
                namespace: s.namespace.clone(),
                name: s.name.clone(),
                address: self.addresses.get(&s.namespace, &s.name),
                instances: s.instances.len(),
                sidecars: BTreeMap::new(),
            })
            .collect();
        services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        for (key, s) in &next {
            if let Ok(i) = services.binary_search_by(|x| {
                (x.namespace.as_str(), x.name.as_str())
                    .cmp(&(key.namespace.as_str(), key.service.as_str()))
            }) {
                services[i].sidecars.insert(key.plugin.clone(), s.version);
            }
        }
        self.services = services;
        self.sidecars = next;
        self.previous = Some(merged);
        changes
    }

    /// Renders one sidecar and gives it its version: the same `Arc` when its config did not
    /// change, a new one (recorded in `changes`) when it did, `None` when it cannot be
    /// rendered (recorded in `changes.dropped`).
    fn render_sidecar(
        &mut self,
        cluster: &Cluster<'_>,
        key: &SidecarKey,
        now_ms: u64,
        changes: &mut Changes,
    ) -> Option<Arc<Sidecar>> {
        let rendered = match cluster.render(key, &self.addresses) {
            Ok(r) => r,
            Err(e) => {
                changes
                    .dropped
                    .entry(format!("{}/{}", key.namespace, key.service))
                    .or_default()
                    .push(ValidationError {
                        path: format!("plugins[{}]", key.plugin),
                        message: e.to_string(),
                    });
                return None;
            }
        };
        if !rendered.dropped.is_empty() {
            changes
                .dropped
                .entry(format!("{}/{}", key.namespace, key.service))
                .or_insert(rendered.dropped);
        }
        let mut config = rendered.config;
        let unversioned = serde_json::to_vec(&config).unwrap_or_default();
        let hash = fnv1a(&unversioned) ^ self.tls_salt;
        let name = key.to_string();
        let version = match self.versions.get(&name) {
            Some(r) if r.hash == hash => r.version,
            _ => {
                let v = now_ms.max(self.max_version + 1);
                self.max_version = v;
                self.versions
                    .insert(name, VersionRecord { hash, version: v });
                v
            }
        };
        let unchanged = self
            .sidecars
            .get(key)
            .filter(|s| s.version == version)
            .cloned();
        let sidecar = match unchanged {
            Some(s) => s,
            None => {
                config.version = version;
                let json = Bytes::from(with_version(unversioned, version, &config));
                changes.changed.push(key.clone());
                Arc::new(Sidecar {
                    version,
                    config,
                    json,
                    gzip: OnceLock::new(),
                })
            }
        };
        Some(sidecar)
    }
}

/// What a new state changes, relative to the previous one.
#[derive(Debug)]
pub enum Affected<'a> {
    /// Everything must be re-rendered (first build, DNS settings or plugins changed).
    All,
    /// Only these services' sidecars.
    Some {
        /// Services that changed, appeared, or use (directly or as a route backend) a
        /// service that changed, appeared or went.
        services: HashSet<(&'a str, &'a str)>,
        /// Whether a service appeared or went (the address table must follow).
        set_changed: bool,
    },
}

impl Affected<'_> {
    /// Whether the sidecars of `namespace/name` must be re-rendered.
    pub fn contains(&self, namespace: &str, name: &str) -> bool {
        match self {
            Affected::All => true,
            Affected::Some { services, .. } => services.contains(&(namespace, name)),
        }
    }
}

/// The services of `current` whose sidecars a change from `previous` may have changed.
pub fn affected<'a>(previous: Option<&ClusterState>, current: &'a ClusterState) -> Affected<'a> {
    let Some(previous) = previous else {
        return Affected::All;
    };
    if previous.dns != current.dns || previous.plugins != current.plugins {
        return Affected::All;
    }
    fn index(state: &ClusterState) -> HashMap<(&str, &str), usize> {
        let mut by_key = HashMap::with_capacity(state.services.len());
        for (i, s) in state.services.iter().enumerate() {
            by_key
                .entry((s.namespace.as_str(), s.name.as_str()))
                .or_insert(i);
        }
        by_key
    }
    let before = index(previous);
    let after = index(current);
    let mut changed: HashSet<(&str, &str)> = HashSet::new();
    for (key, &i) in &after {
        let same = before
            .get(key)
            .is_some_and(|&j| previous.services[j] == current.services[i]);
        if !same {
            changed.insert(*key);
        }
    }
    let mut set_changed = after.keys().any(|k| !before.contains_key(k));
    for key in before.keys() {
        if !after.contains_key(key) {
            changed.insert(*key);
            set_changed = true;
        }
    }
    Affected::Some {
        services: with_dependents(current, &changed),
        set_changed,
    }
}

/// The services of `current` that are in `changed` or use one that is (directly or as a
/// route backend): the ones whose sidecars must be rendered again.
fn with_dependents<'a>(
    current: &'a ClusterState,
    changed: &HashSet<(&str, &str)>,
) -> HashSet<(&'a str, &'a str)> {
    let mut services = HashSet::new();
    if changed.is_empty() {
        return services;
    }
    for s in &current.services {
        let key = (s.namespace.as_str(), s.name.as_str());
        let uses_changed = s.use_services.iter().any(|d| {
            changed.contains(&d.target(&s.namespace))
                || d.routes.iter().flat_map(|r| &r.backends).any(|b| {
                    b.service
                        .as_deref()
                        .and_then(|t| t.split_once('/'))
                        .is_some_and(|t| changed.contains(&t))
                })
        });
        if uses_changed || changed.contains(&key) {
            services.insert(key);
        }
    }
    services
}

/// The served JSON: the unversioned JSON (`{"version":0,...`, version being the first
/// field) with the version put in, without serializing the config a second time.
fn with_version(unversioned: Vec<u8>, version: u64, config: &SidecarConfig) -> Vec<u8> {
    const PREFIX: &[u8] = b"{\"version\":0,";
    match unversioned.strip_prefix(PREFIX) {
        Some(rest) => {
            let mut out = Vec::with_capacity(unversioned.len() + 20);
            out.extend_from_slice(format!("{{\"version\":{version},").as_bytes());
            out.extend_from_slice(rest);
            out
        }
        None => serde_json::to_vec(config).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(yaml: &str) -> ClusterState {
        serde_norway::from_str(yaml).unwrap()
    }

    fn key(ns: &str, svc: &str) -> SidecarKey {
        SidecarKey {
            namespace: ns.into(),
            service: svc.into(),
            plugin: "sidemesh-proxy".into(),
        }
    }

    const S: &str = "services:
- {namespace: demo, name: web, use_services: [{service: api}]}
- {namespace: demo, name: api, ports: [{port: 80}], instances: [{address: 10.0.0.1}]}
- {namespace: demo, name: lone, ports: [{port: 81}]}
";

    #[test]
    fn versions_increase_only_for_changed_configs() {
        let mut st = Store::default();
        let c = st.set_source("file", state(S), 1_000);
        assert_eq!(c.changed.len(), 3);
        let web1 = st.sidecar(&key("demo", "web")).unwrap().version;
        let lone1 = st.sidecar(&key("demo", "lone")).unwrap().version;
        // Rendered in key order (api, lone, web), each a fresh version.
        assert_eq!(lone1, 1_001);
        assert_eq!(web1, 1_002);
        // Same state again: nothing changes.
        let c = st.set_source("file", state(S), 2_000);
        assert!(c.changed.is_empty() && c.removed.is_empty());
        // api's instance changes: only web (which uses api) sees it; api's own config
        // (no inbound, no dependencies) and lone's do not change.
        let edited = S.replace("10.0.0.1", "10.0.0.2");
        let c = st.set_source("file", state(&edited), 1_500);
        let changed: Vec<String> = c.changed.iter().map(|k| k.service.clone()).collect();
        assert_eq!(changed, ["web"]);
        let web2 = st.sidecar(&key("demo", "web")).unwrap().version;
        assert_eq!(web2, 1_500);
        let c = st.set_source("file", state(S), 1_200);
        assert_eq!(c.changed.len(), 1);
        let web3 = st.sidecar(&key("demo", "web")).unwrap().version;
        assert_eq!(web3, 1_501, "clock went back, versions still increase");
        assert_eq!(st.sidecar(&key("demo", "lone")).unwrap().version, lone1);
        let sidecar = st.sidecar(&key("demo", "web")).unwrap();
        let parsed = sidemesh_api::Snapshot::from_json(&sidecar.json).unwrap();
        assert_eq!(parsed.version(), web3);
        let gzipped = sidecar.gzip();
        let mut gz = flate2::read::GzDecoder::new(&gzipped[..]);
        let mut back = Vec::new();
        std::io::Read::read_to_end(&mut gz, &mut back).unwrap();
        assert_eq!(back, sidecar.json);
    }

    #[test]
    fn restart_keeps_unchanged_versions_and_never_goes_back() {
        let mut st = Store::default();
        st.set_source("file", state(S), 5_000);
        let web = st.sidecar(&key("demo", "web")).unwrap().version;
        let addr = st.services()[0].address;
        let saved: Persisted =
            serde_json::from_str(&serde_json::to_string(&st.persisted()).unwrap()).unwrap();
        // Restart with the clock behind.
        let mut st2 = Store::new(saved.clone(), 10);
        let c = st2.set_source("file", state(S), 10);
        assert_eq!(st2.sidecar(&key("demo", "web")).unwrap().version, web);
        assert_eq!(
            c.changed.len(),
            3,
            "a fresh process serves all, versions unchanged"
        );
        assert_eq!(st2.services()[0].address, addr);
        // Changed content after a restart with the clock behind: higher than anything before.
        let mut st3 = Store::new(saved, 10);
        st3.set_source("file", state(&S.replace("10.0.0.1", "10.0.0.9")), 10);
        assert!(st3.sidecar(&key("demo", "web")).unwrap().version > web);
    }

    #[test]
    fn registry_changes_rebuild_and_renewals_do_not() {
        let mut st = Store::default();
        st.set_source("file", state(S), 1_000);
        let reg: Registration = serde_json::from_value(serde_json::json!({
            "address": "10.0.0.7", "ports": [{"port": 80}], "ttl_seconds": 2
        }))
        .unwrap();
        let k = ("demo".to_owned(), "api".to_owned(), "i1".to_owned());
        let (o, c) = st.registry_put(k.clone(), reg.clone(), 2_000).unwrap();
        assert_eq!(o, PutOutcome::Created);
        assert_eq!(c.changed, [key("demo", "web")]);
        let web = st.sidecar(&key("demo", "web")).unwrap();
        assert_eq!(web.config.outbound[0].ports[0].endpoints.len(), 2);
        let (o, c) = st.registry_put(k.clone(), reg, 3_000).unwrap();
        assert_eq!(o, PutOutcome::Renewed);
        assert!(c.changed.is_empty());
        assert!(st.expire(4_999).is_none());
        let c = st.expire(5_000).unwrap();
        assert_eq!(c.changed, [key("demo", "web")]);
        let web = st.sidecar(&key("demo", "web")).unwrap();
        assert_eq!(web.config.outbound[0].ports[0].endpoints.len(), 1);
        assert!(st.registry_delete(&k, 6_000).is_none());
    }

    #[test]
    fn only_sidecars_whose_inputs_changed_are_rendered_again() {
        let yaml = "services:
- {namespace: demo, name: web, use_services: [{service: api}]}
- {namespace: demo, name: canary, use_services: [{service: other, routes: [{name: r, backends: [{weight: 1}, {service: demo/api, weight: 1}]}]}]}
- {namespace: demo, name: other, ports: [{port: 82}]}
- {namespace: demo, name: api, ports: [{port: 80}], instances: [{address: 10.0.0.1}]}
- {namespace: demo, name: lone, ports: [{port: 81}]}
";
        let mut st = Store::default();
        st.set_source("file", state(yaml), 1);
        let keep: Vec<Arc<Sidecar>> = ["lone", "other"]
            .iter()
            .map(|s| st.sidecar(&key("demo", s)).unwrap())
            .collect();
        let edited = state(&yaml.replace("10.0.0.1", "10.0.0.2"));
        let mut m2 = edited.clone();
        st.registry.merge_into(&mut m2);
        let Affected::Some {
            services,
            set_changed,
        } = affected(st.previous.as_ref(), &m2)
        else {
            panic!("expected some");
        };
        assert!(!set_changed);
        let mut affected: Vec<_> = services.into_iter().collect();
        affected.sort();
        assert_eq!(
            affected,
            [("demo", "api"), ("demo", "canary"), ("demo", "web")]
        );
        let c = st.set_source("file", edited, 2);
        let mut changed: Vec<&str> = c.changed.iter().map(|k| k.service.as_str()).collect();
        changed.sort();
        assert_eq!(changed, ["canary", "web"]);
        // Untouched sidecars are the very same values.
        assert!(Arc::ptr_eq(
            &keep[0],
            &st.sidecar(&key("demo", "lone")).unwrap()
        ));
        assert!(Arc::ptr_eq(
            &keep[1],
            &st.sidecar(&key("demo", "other")).unwrap()
        ));
        // The spliced JSON is what serializing the versioned config gives.
        let web = st.sidecar(&key("demo", "web")).unwrap();
        assert_eq!(web.json, serde_json::to_vec(&web.config).unwrap());
        // DNS changes re-render everything.
        let mut dns = state(yaml);
        dns.dns.ttl_seconds = 9;
        let c = st.set_source("file", dns, 3);
        assert_eq!(c.changed.len(), 5);
    }

    /// Every sidecar's config with its version zeroed, and the summaries without versions.
    type Summary = (String, String, usize, Vec<String>);

    fn served(st: &Store) -> (BTreeMap<String, String>, Vec<Summary>) {
        let configs = st
            .sidecars
            .iter()
            .map(|(k, s)| {
                let mut c = s.config.clone();
                c.version = 0;
                (k.to_string(), serde_json::to_string(&c).unwrap())
            })
            .collect();
        let summaries = st
            .services()
            .iter()
            .map(|s| {
                assert_eq!(s.address, st.addresses.get(&s.namespace, &s.name));
                let plugins = s.sidecars.keys().cloned().collect();
                (s.namespace.clone(), s.name.clone(), s.instances, plugins)
            })
            .collect();
        (configs, summaries)
    }

    fn svc(yaml: &str) -> Service {
        serde_norway::from_str(yaml).unwrap()
    }

    #[test]
    fn deltas_render_what_a_full_rebuild_renders_and_only_the_affected() {
        let base = "services:
- {namespace: demo, name: web, use_services: [{service: api}, {service: new}], plugins: [{name: logger}]}
- {namespace: demo, name: canary, use_services: [{service: other, routes: [{name: r, backends: [{weight: 1}, {service: demo/api, weight: 1}]}]}]}
- {namespace: demo, name: other, ports: [{port: 82}]}
- {namespace: demo, name: api, ports: [{port: 80}], instances: [{address: 10.0.0.1}]}
- {namespace: demo, name: lone, ports: [{port: 81}]}
- {namespace: demo, name: gone, ports: [{port: 83}], use_services: [{service: lone}]}
";
        let mut st = Store::default();
        st.set_source("k8s", state(base), 1_000);
        // A registered instance of api must survive api's redefinition.
        let reg: Registration = serde_json::from_value(serde_json::json!({
            "address": "10.0.0.7", "ports": [{"port": 80}], "ttl_seconds": 60
        }))
        .unwrap();
        let k = ("demo".to_owned(), "api".to_owned(), "i1".to_owned());
        st.registry_put(k, reg, 1_100).unwrap();
        let lone = st.sidecar(&key("demo", "lone")).unwrap();
        let steps: Vec<(ServiceDelta, Vec<&str>)> = vec![
            // An endpoint change: api itself (no config change: no inbound ports, no
            // dependencies) is rendered, and its users web and canary change.
            (
                ServiceDelta {
                    upsert: vec![svc(
                        "{namespace: demo, name: api, ports: [{port: 80}], instances: [{address: 10.0.0.1}, {address: 10.0.0.2}]}",
                    )],
                    remove: vec![],
                },
                vec!["canary", "web"],
            ),
            // A service web already depends on appears: it gets an address, web changes.
            (
                ServiceDelta {
                    upsert: vec![svc(
                        "{namespace: demo, name: new, ports: [{port: 90}], instances: [{address: 10.0.1.1}]}",
                    )],
                    remove: vec![],
                },
                vec!["new", "web"],
            ),
            // A service goes: its sidecar is removed, nobody else changes.
            (
                ServiceDelta {
                    upsert: vec![],
                    remove: vec![("demo".into(), "gone".into())],
                },
                vec![],
            ),
            // A plugin detached, and the same content again (no change).
            (
                ServiceDelta {
                    upsert: vec![
                        svc(
                            "{namespace: demo, name: web, use_services: [{service: api}, {service: new}]}",
                        ),
                        svc("{namespace: demo, name: other, ports: [{port: 82}]}"),
                    ],
                    remove: vec![],
                },
                vec![],
            ),
        ];
        let mut last_version = st.max_version;
        for (i, (delta, expect_changed)) in steps.into_iter().enumerate() {
            let removed_gone = delta.remove.len();
            let c = st.apply_delta("k8s", delta, 1_000 + i as u64);
            let mut changed: Vec<&str> = c.changed.iter().map(|k| k.service.as_str()).collect();
            changed.sort();
            changed.dedup(); // one service, several plugins
            assert_eq!(changed, expect_changed, "step {i}");
            for k in &c.changed {
                let v = st.sidecar(k).unwrap().version;
                assert!(v > last_version, "step {i}: versions strictly increase");
            }
            last_version = st.max_version;
            if removed_gone > 0 {
                assert_eq!(c.removed, [key("demo", "gone")]);
            }
            if i == 3 {
                let mut logger = key("demo", "web");
                logger.plugin = "logger".into();
                assert_eq!(c.removed, [logger.clone()]);
                assert!(st.sidecar(&logger).is_none());
            }
            // The same source state rendered from scratch serves the same configs.
            let mut fresh = Store {
                registry: st.registry.clone(),
                addresses: st.addresses.clone(),
                ..Store::default()
            };
            let source = st.sources["k8s"].clone();
            fresh.set_source("k8s", source, 1);
            assert_eq!(served(&st), served(&fresh), "step {i}");
        }
        // An untouched sidecar is the very same value throughout.
        assert!(Arc::ptr_eq(
            &lone,
            &st.sidecar(&key("demo", "lone")).unwrap()
        ));
        // With a second source the delta still applies, through a full rebuild.
        st.set_source(
            "file",
            state("services: [{namespace: other, name: x}]"),
            5_000,
        );
        let c = st.apply_delta(
            "k8s",
            ServiceDelta {
                upsert: vec![],
                remove: vec![("demo".into(), "lone".into())],
            },
            5_001,
        );
        assert_eq!(c.removed, [key("demo", "lone")]);
        assert!(st.sidecar(&key("other", "x")).is_some());
    }

    #[test]
    fn unknown_sidecars_say_what_exists() {
        let mut st = Store::default();
        st.set_source("file", state(S), 1);
        let mut k = key("demo", "web");
        k.plugin = "nope".into();
        assert!(st.sidecar(&k).is_none());
        assert!(st.missing(&k).to_string().contains("sidemesh-proxy"));
        assert!(matches!(
            st.missing(&key("demo", "x")),
            RenderError::UnknownService { .. }
        ));
        let c = st.remove_source("file", 2);
        assert_eq!(c.removed.len(), 3);
        assert_eq!(st.sidecar_count(), 0);
    }
}
