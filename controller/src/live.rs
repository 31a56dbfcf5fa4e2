//! The live index: the last full [`index::build`], kept up to date one changed object at a
//! time, so that an EndpointSlice change costs the work of one Service, not of the cluster.
//!
//! The watches record what changed ([`Changed`]): Services, EndpointSlices and Pods by key.
//! [`Live::update`] maps those to the service entries they feed (a slice to its Service, a
//! pod to the services whose slices name it and to the workload it serves when injected),
//! recomputes only those with [`index::service_entry`] — the very function the full build
//! uses — and hands discover the entries that differ ([`Update::Delta`]).
//!
//! Everything else falls back to a full build ([`Update::Full`]): Plugin, MeshConfig and
//! Namespace changes (they reshape validation, statuses and the webhook's lookups), a change
//! to the cluster DNS or discover Service (they feed every config), and every relist
//! (`InitDone`, e.g. after 410 Gone). A relist's store is swapped in whole, so a full build
//! never sees half a list.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service as KubeService;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use sidemesh_api::state;

use crate::index::{self, Built, IndexConfig, Inputs, MeshPart, PodMeta};

/// `(namespace, name)`.
pub type Key = (String, String);

/// What changed since the last update.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changed {
    /// Rebuild everything.
    pub all: bool,
    /// Services, by key.
    pub services: BTreeSet<Key>,
    /// EndpointSlices, by key.
    pub slices: BTreeSet<Key>,
    /// Pods, by key.
    pub pods: BTreeSet<Key>,
}

impl Changed {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        !self.all && self.services.is_empty() && self.slices.is_empty() && self.pods.is_empty()
    }
}

/// Where the live index reads objects by key (the reflector stores, or plain lists in tests).
pub trait Objects {
    /// Everything, for a full build.
    fn inputs(&self) -> Inputs;
    /// One Service.
    fn service(&self, ns: &str, name: &str) -> Option<Arc<KubeService>>;
    /// One EndpointSlice.
    fn slice(&self, ns: &str, name: &str) -> Option<Arc<EndpointSlice>>;
    /// One Pod's metadata.
    fn pod(&self, ns: &str, name: &str) -> Option<Arc<PodMeta>>;
}

/// Plain lists answer by scanning (tests).
impl Objects for Inputs {
    fn inputs(&self) -> Inputs {
        self.clone()
    }
    fn service(&self, ns: &str, name: &str) -> Option<Arc<KubeService>> {
        find(&self.services, ns, name, |s| &s.metadata)
    }
    fn slice(&self, ns: &str, name: &str) -> Option<Arc<EndpointSlice>> {
        find(&self.slices, ns, name, |s| &s.metadata)
    }
    fn pod(&self, ns: &str, name: &str) -> Option<Arc<PodMeta>> {
        find(&self.pods, ns, name, |s| &s.metadata)
    }
}

fn find<T>(
    list: &[Arc<T>],
    ns: &str,
    name: &str,
    meta: impl Fn(&T) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Option<Arc<T>> {
    list.iter()
        .find(|o| {
            let m = meta(o);
            m.namespace.as_deref() == Some(ns) && m.name.as_deref() == Some(name)
        })
        .cloned()
}

/// What an update gives discover.
#[derive(Debug)]
pub enum Update {
    /// A full build: replace the whole state (and the lookups and statuses).
    Full(Box<Built>),
    /// Service entries that changed.
    Delta {
        /// Entries new or changed, whole.
        upsert: Vec<state::Service>,
        /// Entries gone.
        remove: Vec<Key>,
    },
}

/// The live index.
#[derive(Debug, Default)]
pub struct Live {
    cfg: IndexConfig,
    meshes: BTreeMap<Key, MeshPart>,
    services: BTreeMap<Key, state::Service>,
    /// Slice to the service it belongs to.
    slice_owner: HashMap<Key, Key>,
    /// Service to its slices' names.
    service_slices: HashMap<Key, BTreeSet<String>>,
    /// Slice to the pods its endpoints name.
    slice_pods: HashMap<Key, Vec<Key>>,
    /// Pod to the slices that name it (one entry per naming slice).
    pod_slices: HashMap<Key, Vec<Key>>,
    /// Injected pod to the workload it serves.
    pod_workload: HashMap<Key, Key>,
    /// Workload to its number of injected pods.
    workload_pods: HashMap<Key, usize>,
}

impl Live {
    /// A full build from `objects`.
    pub fn full(objects: &dyn Objects, cfg: &IndexConfig) -> (Live, Built) {
        let inputs = objects.inputs();
        let built = index::build(&inputs, cfg);
        let mut live = Live {
            cfg: cfg.clone(),
            meshes: built.meshes.clone(),
            services: built
                .state
                .services
                .iter()
                .map(|s| ((s.namespace.clone(), s.name.clone()), s.clone()))
                .collect(),
            ..Live::default()
        };
        for s in &inputs.slices {
            if let Some(key) = key_of(&s.metadata) {
                live.track_slice(key, Some(s));
            }
        }
        for p in &inputs.pods {
            if let Some(key) = key_of(&p.metadata) {
                live.track_pod(key, Some(p));
            }
        }
        (live, built)
    }

    /// Applies `changed`; `None` when no service entry changed.
    pub fn update(&mut self, objects: &dyn Objects, changed: Changed) -> Option<Update> {
        if changed.all {
            return Some(self.rebuild(objects));
        }
        let mut keys: BTreeSet<Key> = changed.services;
        for key in changed.slices {
            let slice = objects.slice(&key.0, &key.1);
            if let Some(old) = self.track_slice(key.clone(), slice.as_ref()) {
                keys.insert(old);
            }
            if let Some(new) = self.slice_owner.get(&key) {
                keys.insert(new.clone());
            }
        }
        for key in changed.pods {
            for slice in self.pod_slices.get(&key).into_iter().flatten() {
                if let Some(owner) = self.slice_owner.get(slice) {
                    keys.insert(owner.clone());
                }
            }
            let pod = objects.pod(&key.0, &key.1);
            if let Some(old) = self.track_pod(key.clone(), pod.as_ref()) {
                keys.insert(old);
            }
            if let Some(new) = self.pod_workload.get(&key) {
                keys.insert(new.clone());
            }
        }
        let feeds_all = |k: &Key| {
            (k.0.as_str(), k.1.as_str())
                == (
                    self.cfg.cluster_dns.0.as_str(),
                    self.cfg.cluster_dns.1.as_str(),
                )
                || (k.0.as_str(), k.1.as_str())
                    == (
                        self.cfg.discover_service.0.as_str(),
                        self.cfg.discover_service.1.as_str(),
                    )
        };
        if keys.iter().any(feeds_all) {
            return Some(self.rebuild(objects));
        }
        let mut upsert = Vec::new();
        let mut remove = Vec::new();
        for key in keys {
            let next = self.entry(objects, &key);
            match (next, self.services.get(&key)) {
                (Some(n), Some(old)) if n == *old => {}
                (Some(n), _) => {
                    upsert.push(n.clone());
                    self.services.insert(key, n);
                }
                (None, Some(_)) => {
                    self.services.remove(&key);
                    remove.push(key);
                }
                (None, None) => {}
            }
        }
        if upsert.is_empty() && remove.is_empty() {
            return None;
        }
        Some(Update::Delta { upsert, remove })
    }

    /// Number of service entries.
    pub fn len(&self) -> usize {
        self.services.len()
    }

    /// Whether there are no service entries.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// Every service entry, in key order (what a full build would give discover).
    pub fn services(&self) -> impl Iterator<Item = &state::Service> {
        self.services.values()
    }

    fn rebuild(&mut self, objects: &dyn Objects) -> Update {
        let (live, built) = Live::full(objects, &self.cfg);
        *self = live;
        Update::Full(Box::new(built))
    }

    /// One service's entry from the objects as they are now.
    fn entry(&self, objects: &dyn Objects, key: &Key) -> Option<state::Service> {
        let (ns, name) = (key.0.as_str(), key.1.as_str());
        let kube = objects.service(ns, name);
        let slices: Vec<Arc<EndpointSlice>> = self
            .service_slices
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|s| objects.slice(ns, s))
            .collect();
        let slices: Vec<&EndpointSlice> = slices.iter().map(Arc::as_ref).collect();
        index::service_entry(
            ns,
            name,
            kube.as_deref(),
            &slices,
            &|ns, name| objects.pod(ns, name),
            self.workload_pods.contains_key(key),
            self.meshes.get(key),
        )
    }

    /// Records a slice as it now is (`None`: gone); returns the service it belonged to.
    fn track_slice(&mut self, key: Key, slice: Option<&Arc<EndpointSlice>>) -> Option<Key> {
        let old = self.slice_owner.remove(&key);
        if let Some(owner) = &old {
            if let Some(names) = self.service_slices.get_mut(owner) {
                names.remove(&key.1);
                if names.is_empty() {
                    self.service_slices.remove(owner);
                }
            }
        }
        for pod in self.slice_pods.remove(&key).unwrap_or_default() {
            if let Some(slices) = self.pod_slices.get_mut(&pod) {
                if let Some(i) = slices.iter().position(|s| *s == key) {
                    slices.swap_remove(i);
                }
                if slices.is_empty() {
                    self.pod_slices.remove(&pod);
                }
            }
        }
        if let Some(slice) = slice {
            if let Some(svc) = index::slice_service(slice) {
                let owner = (key.0.clone(), svc.to_owned());
                self.service_slices
                    .entry(owner.clone())
                    .or_default()
                    .insert(key.1.clone());
                self.slice_owner.insert(key.clone(), owner);
            }
            let pods = index::slice_pods(slice);
            for pod in &pods {
                self.pod_slices
                    .entry(pod.clone())
                    .or_default()
                    .push(key.clone());
            }
            self.slice_pods.insert(key, pods);
        }
        old
    }

    /// Records a pod as it now is (`None`: gone); returns the workload it served.
    fn track_pod(&mut self, key: Key, pod: Option<&Arc<PodMeta>>) -> Option<Key> {
        let old = self.pod_workload.remove(&key);
        if let Some(w) = &old {
            if let Some(n) = self.workload_pods.get_mut(w) {
                *n -= 1;
                if *n == 0 {
                    self.workload_pods.remove(w);
                }
            }
        }
        if let Some(w) = pod.and_then(|p| index::injected_workload(p)) {
            *self.workload_pods.entry(w.clone()).or_default() += 1;
            self.pod_workload.insert(key, w);
        }
        old
    }
}

/// `(namespace, name)` of an object.
pub fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Option<Key> {
    Some((meta.namespace.clone()?, meta.name.clone()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Arc<T> {
        Arc::new(serde_json::from_value(v).unwrap())
    }

    fn replace<T>(list: &mut Vec<Arc<T>>, key: &Key, new: Option<Arc<T>>)
    where
        T: kube::Resource,
    {
        list.retain(|o| key_of(o.meta()).as_ref() != Some(key));
        list.extend(new);
    }

    /// After each change the live index holds exactly what a full build gives.
    fn check(live: &Live, objects: &Inputs, cfg: &IndexConfig) {
        let built = index::build(objects, cfg);
        let live: Vec<&state::Service> = live.services().collect();
        let full: Vec<&state::Service> = built.state.services.iter().collect();
        assert_eq!(live, full);
    }

    fn key(ns: &str, name: &str) -> Key {
        (ns.to_owned(), name.to_owned())
    }

    #[test]
    fn trimmed_pods_build_the_same_state() {
        let cfg = IndexConfig::default();
        let full = crate::index::tests::inputs();
        let mut trimmed = full.clone();
        trimmed.pods = full
            .pods
            .iter()
            .map(|p| {
                let mut p = p.as_ref().clone();
                p.metadata.annotations.get_or_insert_default().insert(
                    "kubectl.kubernetes.io/last-applied-configuration".into(),
                    "{}".into(),
                );
                crate::watch::trim_pod(&mut p);
                Arc::new(p)
            })
            .collect();
        for p in &trimmed.pods {
            let a = p.metadata.annotations.as_ref().unwrap();
            assert!(a.keys().all(|k| k.starts_with("sidemesh.io/")), "{a:?}");
        }
        assert_eq!(
            index::build(&trimmed, &cfg).state,
            index::build(&full, &cfg).state
        );
    }

    #[test]
    fn per_object_changes_match_a_full_build_and_touch_only_their_service() {
        let cfg = IndexConfig::default();
        let mut objects = crate::index::tests::inputs();
        let (mut live, built) = Live::full(&objects, &cfg);
        assert_eq!(built.state.services.len(), live.services().count());
        check(&live, &objects, &cfg);

        // A new ready endpoint in web's slice, for a new injected pod.
        let web_slice = objects
            .slices
            .iter()
            .find(|s| index::slice_service(s) == Some("web"))
            .unwrap()
            .clone();
        let slice_key = key_of(&web_slice.metadata).unwrap();
        let mut v = serde_json::to_value(web_slice.as_ref()).unwrap();
        v["endpoints"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({
                "addresses": ["10.1.9.9"], "conditions": {"ready": true},
                "targetRef": {"kind": "Pod", "namespace": "shop", "name": "web-new"}
            }));
        replace(&mut objects.slices, &slice_key, Some(json(v)));
        let changed = Changed {
            slices: [slice_key.clone()].into(),
            ..Changed::default()
        };
        let Some(Update::Delta { upsert, remove }) = live.update(&objects, changed) else {
            panic!("expected a delta");
        };
        assert!(remove.is_empty());
        let names: Vec<&str> = upsert.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["web"]);
        let new = upsert[0]
            .instances
            .iter()
            .find(|i| i.address.to_string() == "10.1.9.9")
            .unwrap();
        assert!(!new.meshed, "its pod is not known yet");
        check(&live, &objects, &cfg);

        // The pod arrives, injected: the endpoint becomes meshed.
        let mut pod = serde_json::to_value(
            objects
                .pods
                .iter()
                .find(|p| {
                    p.metadata.namespace.as_deref() == Some("shop")
                        && p.metadata
                            .annotations
                            .as_ref()
                            .is_some_and(|a| a.contains_key("sidemesh.io/port-map"))
                        && index::injected_workload(p) == Some(key("shop", "web"))
                })
                .unwrap()
                .as_ref(),
        )
        .unwrap();
        pod["metadata"]["name"] = "web-new".into();
        replace(&mut objects.pods, &key("shop", "web-new"), Some(json(pod)));
        let changed = Changed {
            pods: [key("shop", "web-new")].into(),
            ..Changed::default()
        };
        let Some(Update::Delta { upsert, .. }) = live.update(&objects, changed) else {
            panic!("expected a delta");
        };
        assert_eq!(upsert.len(), 1);
        let new = upsert[0]
            .instances
            .iter()
            .find(|i| i.address.to_string() == "10.1.9.9")
            .unwrap();
        assert!(new.meshed);
        check(&live, &objects, &cfg);

        // A change that changes nothing gives nothing.
        let changed = Changed {
            pods: [key("shop", "web-new")].into(),
            ..Changed::default()
        };
        assert!(live.update(&objects, changed).is_none());

        // The Service goes; its injected pods keep an entry (without ports).
        replace(&mut objects.services, &key("shop", "web"), None);
        let changed = Changed {
            services: [key("shop", "web")].into(),
            ..Changed::default()
        };
        let Some(Update::Delta { upsert, remove }) = live.update(&objects, changed) else {
            panic!("expected a delta");
        };
        assert!(remove.is_empty());
        assert!(upsert[0].ports.is_empty());
        check(&live, &objects, &cfg);

        // The slice goes too, and the mysql Service: mysql's entry is removed.
        replace(&mut objects.slices, &slice_key, None);
        replace(&mut objects.services, &key("shop", "mysql"), None);
        let changed = Changed {
            services: [key("shop", "mysql")].into(),
            slices: [slice_key].into(),
            ..Changed::default()
        };
        let Some(Update::Delta { remove, .. }) = live.update(&objects, changed) else {
            panic!("expected a delta");
        };
        assert_eq!(remove, [key("shop", "mysql")]);
        check(&live, &objects, &cfg);

        // The cluster DNS Service feeds every config: a full build.
        let changed = Changed {
            services: [key("kube-system", "kube-dns")].into(),
            ..Changed::default()
        };
        assert!(matches!(
            live.update(&objects, changed),
            Some(Update::Full(_))
        ));
        // And so does a relist.
        let changed = Changed {
            all: true,
            ..Changed::default()
        };
        let Some(Update::Full(b)) = live.update(&objects, changed) else {
            panic!("expected a full build");
        };
        assert_eq!(b.state, index::build(&objects, &cfg).state);
        check(&live, &objects, &cfg);
    }
}
