//! The watches: kube-runtime reflectors for Services, EndpointSlices, Pods, Namespaces,
//! Plugins and MeshConfigs, and the loop that keeps the [`Live`] index up to date from them.
//!
//! Each watch records what changed ([`Changed`]): Services, EndpointSlices and Pods by key,
//! so the index re-derives only the services they feed; a relist, or a change to a Plugin,
//! MeshConfig or Namespace, asks for a full build. Pods are trimmed before they are stored
//! ([`trim_pod`]): only what the index reads stays in memory.
//!
//! Consistency: a reflector store only swaps in a re-listed set when the list is complete
//! (`InitDone`), so after a watch restart (410 Gone, an expired resourceVersion, a dropped
//! connection) the index keeps being built from the last complete set until the new one is
//! whole. The first index is built only once every store has synced; until then nothing is
//! published and the controller is not ready.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

use crate::crd::{MeshConfig, Plugin};
use crate::index::{self, DesiredStatus, IndexConfig, Inputs, PodMeta};
use crate::live::{Changed, Key, Live, Objects, Update, key_of};

/// The reflector stores.
#[derive(Clone)]
pub struct Stores {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    pods: Store<PodMeta>,
    namespaces: Store<Namespace>,
    plugins: Store<Plugin>,
    meshes: Store<MeshConfig>,
}

impl Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stores").finish_non_exhaustive()
    }
}

impl Stores {
    /// Waits until every store has its first complete list.
    pub async fn synced(&self) -> Result<(), reflector::store::WriterDropped> {
        self.services.wait_until_ready().await?;
        self.slices.wait_until_ready().await?;
        self.pods.wait_until_ready().await?;
        self.namespaces.wait_until_ready().await?;
        self.plugins.wait_until_ready().await?;
        self.meshes.wait_until_ready().await?;
        Ok(())
    }

    /// The stores' current contents.
    pub fn inputs(&self) -> Inputs {
        Inputs {
            services: self.services.state(),
            slices: self.slices.state(),
            pods: self.pods.state(),
            namespaces: self.namespaces.state(),
            plugins: self.plugins.state(),
            meshes: self.meshes.state(),
        }
    }
}

impl Objects for Stores {
    fn inputs(&self) -> Inputs {
        Stores::inputs(self)
    }
    fn service(&self, ns: &str, name: &str) -> Option<Arc<Service>> {
        self.services.get(&ObjectRef::new(name).within(ns))
    }
    fn slice(&self, ns: &str, name: &str) -> Option<Arc<EndpointSlice>> {
        self.slices.get(&ObjectRef::new(name).within(ns))
    }
    fn pod(&self, ns: &str, name: &str) -> Option<Arc<PodMeta>> {
        self.pods.get(&ObjectRef::new(name).within(ns))
    }
}

/// What the watches saw change since the index last looked, and the wake-up.
#[derive(Debug, Default)]
pub struct Changes {
    changed: Mutex<Changed>,
    notify: Notify,
}

impl Changes {
    fn record(&self, f: impl FnOnce(&mut Changed)) {
        f(&mut self.changed.lock().unwrap_or_else(|e| e.into_inner()));
        self.notify.notify_one();
    }

    /// Takes what changed so far.
    fn take(&self) -> Changed {
        std::mem::take(&mut *self.changed.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Keeps only what the index reads of a Pod's metadata (the watch is metadata-only): name,
/// namespace, labels and the `sidemesh.io/*` annotations. At 100,000 pods, whole Pods were
/// most of the controller's memory.
pub fn trim_pod(pod: &mut PodMeta) {
    let meta = &mut pod.metadata;
    meta.managed_fields = None;
    meta.owner_references = None;
    meta.finalizers = None;
    if let Some(a) = &mut meta.annotations {
        a.retain(|k, _| k.starts_with("sidemesh.io/"));
    }
}

/// Drops what no one reads from any stored object (server-side apply bookkeeping).
fn trim_meta<K: Resource>(obj: &mut K) {
    obj.meta_mut().managed_fields = None;
}

/// The watch metrics.
#[derive(Clone, Debug)]
pub struct Metrics {
    events: prometheus::IntCounterVec,
    errors: prometheus::IntCounterVec,
    builds: prometheus::Histogram,
    services: prometheus::IntGauge,
}

impl Metrics {
    /// Registers the watch metrics.
    pub fn new(registry: &prometheus::Registry) -> prometheus::Result<Metrics> {
        let events = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "sidemesh_controller_watch_events_total",
                "Watch events applied, by resource.",
            ),
            &["resource"],
        )?;
        let errors = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "sidemesh_controller_watch_errors_total",
                "Watch errors (each followed by a retry with backoff), by resource.",
            ),
            &["resource"],
        )?;
        let builds = prometheus::Histogram::with_opts(
            prometheus::HistogramOpts::new(
                "sidemesh_controller_index_build_seconds",
                "Time to bring the index up to date after changes (a full build or a per-service update).",
            )
            .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
        )?;
        let services = prometheus::IntGauge::new(
            "sidemesh_controller_services",
            "Services in the last published cluster state.",
        )?;
        registry.register(Box::new(events.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(builds.clone()))?;
        registry.register(Box::new(services.clone()))?;
        Ok(Metrics {
            events,
            errors,
            builds,
            services,
        })
    }
}

/// Starts one reflector per watched resource; each records in `changed` what it changed.
/// The tasks run until aborted (errors are retried with backoff).
pub fn start(
    client: &Client,
    changed: Arc<Changes>,
    metrics: &Metrics,
) -> (Stores, Vec<tokio::task::JoinHandle<()>>) {
    let mut tasks = Vec::new();
    let stores = Stores {
        services: reflect(
            watcher(Api::all(client.clone()), watcher::Config::default()),
            "services",
            Marker {
                changed: changed.clone(),
                mark: |c, k| {
                    c.services.insert(k);
                },
                trim: trim_meta,
            },
            metrics,
            &mut tasks,
        ),
        slices: reflect(
            watcher(Api::all(client.clone()), watcher::Config::default()),
            "endpointslices",
            Marker {
                changed: changed.clone(),
                mark: |c, k| {
                    c.slices.insert(k);
                },
                trim: trim_meta,
            },
            metrics,
            &mut tasks,
        ),
        pods: reflect(
            watcher(
                Api::<PodMeta>::all(client.clone()),
                watcher::Config::default(),
            ),
            "pods",
            Marker {
                changed: changed.clone(),
                mark: |c, k| {
                    c.pods.insert(k);
                },
                trim: trim_pod,
            },
            metrics,
            &mut tasks,
        ),
        namespaces: reflect(
            watcher(Api::all(client.clone()), watcher::Config::default()),
            "namespaces",
            Marker {
                changed: changed.clone(),
                mark: |c, _| c.all = true,
                trim: trim_meta,
            },
            metrics,
            &mut tasks,
        ),
        plugins: reflect(
            watcher(Api::all(client.clone()), watcher::Config::default()),
            "plugins",
            Marker {
                changed: changed.clone(),
                mark: |c, _| c.all = true,
                trim: trim_meta,
            },
            metrics,
            &mut tasks,
        ),
        meshes: reflect(
            watcher(Api::all(client.clone()), watcher::Config::default()),
            "meshconfigs",
            Marker {
                changed: changed.clone(),
                mark: |c, _| c.all = true,
                trim: trim_meta,
            },
            metrics,
            &mut tasks,
        ),
    };
    (stores, tasks)
}

/// How one watch records its changes.
struct Marker<K> {
    changed: Arc<Changes>,
    /// Records a changed (or deleted) object by key.
    mark: fn(&mut Changed, Key),
    /// Trims an object before it is stored.
    trim: fn(&mut K),
}

fn reflect<K>(
    events: impl futures::Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static,
    resource: &'static str,
    marker: Marker<K>,
    metrics: &Metrics,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store();
    let trim = marker.trim;
    let stream = reflector::reflector(writer, events.modify(trim)).default_backoff();
    let metrics = metrics.clone();
    tasks.push(tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            // The store changes on these (before the event comes out); `Init`/`InitApply`
            // only fill the buffer that `InitDone` swaps in whole.
            let key = match ev {
                Ok(watcher::Event::Apply(o) | watcher::Event::Delete(o)) => {
                    key_of(o.meta()).or_else(|| Some((String::new(), o.meta().name.clone()?)))
                }
                Ok(watcher::Event::InitDone) => None,
                Ok(_) => continue,
                Err(e) => {
                    metrics.errors.with_label_values(&[resource]).inc();
                    tracing::warn!(resource, error = %e, "watch failed; retrying");
                    continue;
                }
            };
            metrics.events.with_label_values(&[resource]).inc();
            marker.changed.record(|c| match key {
                Some(k) => (marker.mark)(c, k),
                // A relist: the index rebuilds from the complete new set.
                None => c.all = true,
            });
        }
    }));
    reader
}

/// Builds the index once every store has synced, then keeps it up to date from what the
/// watches record (changes that arrive within `debounce` of each other are applied
/// together), handing each [`Update`] to `publish`. Marks `ready` after the first publish.
/// Runs until the task is dropped.
pub async fn run_index(
    stores: Stores,
    changed: Arc<Changes>,
    cfg: IndexConfig,
    debounce: Duration,
    metrics: Metrics,
    ready: Arc<AtomicBool>,
    mut publish: impl FnMut(Update) + Send,
) {
    if stores.synced().await.is_err() {
        tracing::error!("a watch stopped before its first sync");
        return;
    }
    // What happened during the first lists is in the first build.
    changed.take();
    let started = Instant::now();
    let (mut live, built) = Live::full(&stores, &cfg);
    metrics.builds.observe(started.elapsed().as_secs_f64());
    metrics.services.set(live.len() as i64);
    publish(Update::Full(Box::new(built)));
    ready.store(true, Ordering::SeqCst);
    tracing::info!(services = live.len(), "initial sync done; ready");
    loop {
        changed.notify.notified().await;
        tokio::time::sleep(debounce).await;
        let batch = changed.take();
        if batch.is_empty() {
            continue;
        }
        let started = Instant::now();
        let update = live.update(&stores, batch);
        metrics.builds.observe(started.elapsed().as_secs_f64());
        metrics.services.set(live.len() as i64);
        if let Some(update) = update {
            tracing::debug!(
                services = live.len(),
                full = matches!(update, Update::Full(_)),
                "index updated"
            );
            publish(update);
        }
    }
}

/// Remembers the statuses written, so only changes are written again.
#[derive(Debug, Default)]
pub struct StatusTracker {
    last: BTreeMap<index::ObjectKey, DesiredStatus>,
}

impl StatusTracker {
    /// The objects whose desired status differs from the one last written.
    pub fn changed(
        &self,
        statuses: &BTreeMap<index::ObjectKey, DesiredStatus>,
    ) -> Vec<(index::ObjectKey, DesiredStatus)> {
        statuses
            .iter()
            .filter(|(k, v)| self.last.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Records a status as written.
    pub fn written(&mut self, key: index::ObjectKey, status: DesiredStatus) {
        self.last.insert(key, status);
    }
}

/// Writes one object's status (a merge patch on the `status` subresource).
pub async fn write_status(
    client: &Client,
    key: &index::ObjectKey,
    status: &DesiredStatus,
) -> Result<(), kube::Error> {
    use kube::api::{Patch, PatchParams};
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let cond = crate::crd::ready_condition(&status.problems, status.generation, &now);
    let mut body = serde_json::json!({
        "status": {
            "conditions": [cond],
            "observedGeneration": status.generation,
        }
    });
    let params = PatchParams::default();
    match key {
        index::ObjectKey::Plugin(name) => {
            body["status"]["publishedVersions"] = serde_json::json!(status.published_versions);
            Api::<Plugin>::all(client.clone())
                .patch_status(name, &params, &Patch::Merge(&body))
                .await?;
        }
        index::ObjectKey::MeshConfig(ns, name) => {
            Api::<MeshConfig>::namespaced(client.clone(), ns)
                .patch_status(name, &params, &Patch::Merge(&body))
                .await?;
        }
    }
    Ok(())
}

/// Applies a JSON merge patch to a Service (the numeric `targetPort` rewrite).
pub async fn patch_service(
    client: &Client,
    namespace: &str,
    name: &str,
    patch: &serde_json::Value,
) -> Result<(), kube::Error> {
    use kube::api::{Patch, PatchParams};
    Api::<Service>::namespaced(client.clone(), namespace)
        .patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await?;
    Ok(())
}
