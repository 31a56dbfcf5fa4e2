//! The watches: kube-runtime reflectors for Services, EndpointSlices, Pods, Namespaces,
//! Plugins and MeshConfigs, and the loop that turns their stores into a [`Built`] index.
//!
//! Consistency: a reflector store only swaps in a re-listed set when the list is complete
//! (`InitDone`), so after a watch restart (410 Gone, an expired resourceVersion, a dropped
//! connection) the index keeps being built from the last complete set until the new one is
//! whole. The first index is built only once every store has synced; until then nothing is
//! published and the controller is not ready.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

use crate::crd::{MeshConfig, Plugin};
use crate::index::{self, Built, DesiredStatus, IndexConfig, Inputs};

/// The reflector stores.
#[derive(Clone)]
pub struct Stores {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    pods: Store<Pod>,
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
                "Time to build the index from the watched objects.",
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

/// Starts one reflector per watched resource; each wakes `changed` when its store changes.
/// The tasks run until aborted (errors are retried with backoff).
pub fn start(
    client: &Client,
    changed: Arc<Notify>,
    metrics: &Metrics,
) -> (Stores, Vec<tokio::task::JoinHandle<()>>) {
    let mut tasks = Vec::new();
    let stores = Stores {
        services: reflect(
            Api::all(client.clone()),
            "services",
            &changed,
            metrics,
            &mut tasks,
        ),
        slices: reflect(
            Api::all(client.clone()),
            "endpointslices",
            &changed,
            metrics,
            &mut tasks,
        ),
        pods: reflect(
            Api::all(client.clone()),
            "pods",
            &changed,
            metrics,
            &mut tasks,
        ),
        namespaces: reflect(
            Api::all(client.clone()),
            "namespaces",
            &changed,
            metrics,
            &mut tasks,
        ),
        plugins: reflect(
            Api::all(client.clone()),
            "plugins",
            &changed,
            metrics,
            &mut tasks,
        ),
        meshes: reflect(
            Api::all(client.clone()),
            "meshconfigs",
            &changed,
            metrics,
            &mut tasks,
        ),
    };
    (stores, tasks)
}

fn reflect<K>(
    api: Api<K>,
    resource: &'static str,
    changed: &Arc<Notify>,
    metrics: &Metrics,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store();
    let stream =
        reflector::reflector(writer, watcher(api, watcher::Config::default())).default_backoff();
    let changed = changed.clone();
    let metrics = metrics.clone();
    tasks.push(tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                // The store changes on these; `Init`/`InitApply` only fill its buffer.
                Ok(
                    watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone,
                ) => {
                    metrics.events.with_label_values(&[resource]).inc();
                    changed.notify_one();
                }
                Ok(_) => {}
                Err(e) => {
                    metrics.errors.with_label_values(&[resource]).inc();
                    tracing::warn!(resource, error = %e, "watch failed; retrying");
                }
            }
        }
    }));
    reader
}

/// Builds the index once every store has synced and again after every change (changes that
/// arrive within `debounce` of each other are built once), handing each result to
/// `publish`. Marks `ready` after the first publish. Runs until the task is dropped.
pub async fn run_index(
    stores: Stores,
    changed: Arc<Notify>,
    cfg: IndexConfig,
    debounce: Duration,
    metrics: Metrics,
    ready: Arc<AtomicBool>,
    mut publish: impl FnMut(Built) + Send,
) {
    if stores.synced().await.is_err() {
        tracing::error!("a watch stopped before its first sync");
        return;
    }
    loop {
        let started = Instant::now();
        let built = index::build(&stores.inputs(), &cfg);
        metrics.builds.observe(started.elapsed().as_secs_f64());
        metrics.services.set(built.state.services.len() as i64);
        tracing::debug!(services = built.state.services.len(), "index built");
        publish(built);
        if !ready.swap(true, Ordering::SeqCst) {
            tracing::info!("initial sync done; ready");
        }
        changed.notified().await;
        tokio::time::sleep(debounce).await;
    }
}

/// Remembers the statuses written, so only changes are written again.
#[derive(Debug, Default)]
pub struct StatusTracker {
    last: BTreeMap<index::ObjectKey, DesiredStatus>,
}

impl StatusTracker {
    /// The objects whose desired status differs from the one last written.
    pub fn changed(&self, built: &Built) -> Vec<(index::ObjectKey, DesiredStatus)> {
        built
            .statuses
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
