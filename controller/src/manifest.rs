//! Offline injection of YAML manifests (`sidemesh inject -f`): finds the pod template of every
//! Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, Job and CronJob in a multi-document
//! stream (and in `List` items), injects it with the same rules as the webhook, and leaves
//! every other field and document as it was.
//!
//! Documents are handled as JSON values, not typed workloads, so fields this version of
//! k8s-openapi does not know survive the round trip; only the pod template's `metadata` and
//! `spec` are read into typed objects.

use serde::Deserialize;
use serde_json::Value;

use crate::crd::{MeshConfigSpec, PluginSpec};
use crate::inject::{self, Catalog, InjectConfig, InjectError, Outcome, Skip};

/// What happened to one workload.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// `kind/name`.
    pub object: String,
    /// The outcome.
    pub outcome: Outcome,
}

/// Why a manifest could not be injected.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The YAML did not parse.
    #[error("document {index}: not valid YAML: {source}")]
    Yaml {
        /// 1-based document number.
        index: usize,
        /// The parser's error.
        source: serde_norway::Error,
    },
    /// A pod template did not parse as Kubernetes objects.
    #[error("{object}: the pod template is not a valid pod spec: {source}")]
    Template {
        /// `kind/name`.
        object: String,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// Injection refused the workload.
    #[error("{object}: {source}")]
    Inject {
        /// `kind/name`.
        object: String,
        /// Why.
        source: InjectError,
    },
}

/// Reads every `Plugin` and `MeshConfig` document of a YAML stream into a catalog (other
/// documents are ignored). `default_namespace` is used for MeshConfigs without one.
pub fn catalog_from_yaml(
    text: &str,
    default_namespace: &str,
    catalog: &mut Catalog,
) -> Result<(), ManifestError> {
    for (i, doc) in documents(text)?.into_iter().enumerate() {
        for obj in flatten_lists(doc) {
            let name = obj["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let spec = obj.get("spec").cloned().unwrap_or(Value::Null);
            match obj["kind"].as_str() {
                Some("Plugin") => {
                    let spec: PluginSpec =
                        serde_json::from_value(spec).map_err(|e| ManifestError::Template {
                            object: format!("document {}: plugin/{name}", i + 1),
                            source: e,
                        })?;
                    catalog.plugins.insert(name, spec);
                }
                Some("MeshConfig") => {
                    let spec: MeshConfigSpec =
                        serde_json::from_value(spec).map_err(|e| ManifestError::Template {
                            object: format!("document {}: meshconfig/{name}", i + 1),
                            source: e,
                        })?;
                    let ns = obj["metadata"]["namespace"]
                        .as_str()
                        .unwrap_or(default_namespace)
                        .to_owned();
                    let svc = spec.service_name(&name).to_owned();
                    catalog.meshes.insert((ns, svc), spec);
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// Injects every workload in a YAML stream; returns the new stream and one report per
/// workload. Any workload that cannot be injected fails the whole run, so a half-injected
/// stream is never printed.
pub fn inject_yaml(
    text: &str,
    default_namespace: &str,
    cfg: &InjectConfig,
    catalog: &Catalog,
) -> Result<(String, Vec<Report>), Vec<ManifestError>> {
    let docs = documents(text).map_err(|e| vec![e])?;
    let mut out = Vec::new();
    let mut reports = Vec::new();
    let mut errors = Vec::new();
    for mut doc in docs {
        if let Err(e) = inject_value(&mut doc, default_namespace, cfg, catalog, &mut reports) {
            errors.push(e);
        }
        out.push(doc);
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let mut text = String::new();
    for (i, doc) in out.iter().enumerate() {
        if i > 0 {
            text.push_str("---\n");
        }
        // A serde_json::Value always serialises.
        text.push_str(&serde_norway::to_string(doc).unwrap_or_default());
    }
    Ok((text, reports))
}

/// Injects one Kubernetes object (or `List`) given as JSON, in place.
pub fn inject_value(
    doc: &mut Value,
    default_namespace: &str,
    cfg: &InjectConfig,
    catalog: &Catalog,
    reports: &mut Vec<Report>,
) -> Result<(), ManifestError> {
    let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
    if kind == "List" {
        if let Some(items) = doc.get_mut("items").and_then(Value::as_array_mut) {
            for item in items {
                inject_value(item, default_namespace, cfg, catalog, reports)?;
            }
        }
        return Ok(());
    }
    let name = doc["metadata"]["name"]
        .as_str()
        .or_else(|| doc["metadata"]["generateName"].as_str())
        .unwrap_or("unnamed")
        .to_owned();
    let namespace = doc["metadata"]["namespace"]
        .as_str()
        .unwrap_or(default_namespace)
        .to_owned();
    let object = format!("{}/{name}", kind.to_ascii_lowercase());
    let (template, is_job): (Option<&mut Value>, bool) = match kind.as_str() {
        "Pod" => (Some(doc), false),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "ReplicationController" => {
            (doc.pointer_mut("/spec/template"), false)
        }
        "Job" => (doc.pointer_mut("/spec/template"), true),
        "CronJob" => (doc.pointer_mut("/spec/jobTemplate/spec/template"), true),
        _ => (None, false),
    };
    let Some(template) = template else {
        return Ok(());
    };
    let parse_err = |source| ManifestError::Template {
        object: object.clone(),
        source,
    };
    let mut meta: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta =
        serde_json::from_value(template.get("metadata").cloned().unwrap_or(Value::Null))
            .map_err(parse_err)?;
    let mut spec: k8s_openapi::api::core::v1::PodSpec =
        serde_json::from_value(template.get("spec").cloned().unwrap_or(Value::Null))
            .map_err(parse_err)?;
    let outcome = inject::inject(&namespace, &mut meta, &mut spec, is_job, cfg, catalog).map_err(
        |source| ManifestError::Inject {
            object: object.clone(),
            source,
        },
    )?;
    if let Outcome::Injected { .. } = outcome {
        // Only the typed parts are replaced; everything else in the document stays as it was.
        merge_into(
            template,
            "metadata",
            serde_json::to_value(&meta).map_err(parse_err)?,
        );
        merge_into(
            template,
            "spec",
            serde_json::to_value(&spec).map_err(parse_err)?,
        );
    }
    reports.push(Report { object, outcome });
    Ok(())
}

fn merge_into(parent: &mut Value, key: &str, value: Value) {
    if let Some(map) = parent.as_object_mut() {
        map.insert(key.to_owned(), value);
    } else {
        *parent = serde_json::json!({ key: value });
    }
}

fn documents(text: &str) -> Result<Vec<Value>, ManifestError> {
    let mut docs = Vec::new();
    for (i, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        let v = Value::deserialize(de).map_err(|source| ManifestError::Yaml {
            index: i + 1,
            source,
        })?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

fn flatten_lists(doc: Value) -> Vec<Value> {
    if doc["kind"] == "List" {
        if let Some(Value::Array(items)) = doc.get("items") {
            return items.clone();
        }
    }
    vec![doc]
}

/// A line for the user about one report, like `deployment/web injected (8080→28080)`.
pub fn describe(r: &Report) -> String {
    match &r.outcome {
        Outcome::Injected { port_map, warnings } => {
            let ports: Vec<String> = port_map
                .iter()
                .map(|(a, o)| format!("{a}\u{2192}{o}"))
                .collect();
            let mut s = if ports.is_empty() {
                format!("{} injected (no ports to remap)", r.object)
            } else {
                format!("{} injected (ports {})", r.object, ports.join(", "))
            };
            for w in warnings {
                s.push_str(&format!("\n  warning: {w}"));
            }
            s
        }
        Outcome::Skipped(Skip::OptedOut) => format!("{} skipped: opted out", r.object),
        Outcome::Skipped(Skip::AlreadyInjected) => format!("{} already injected", r.object),
        Outcome::Skipped(Skip::NotOptedIn) => format!("{} skipped: not opted in", r.object),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WORKLOADS: &str = include_str!("../testdata/workloads.yaml");
    const CATALOG: &str = include_str!("../testdata/catalog.yaml");

    fn catalog() -> Catalog {
        let mut c = Catalog::default();
        catalog_from_yaml(CATALOG, "default", &mut c).unwrap();
        c
    }

    fn docs(text: &str) -> Vec<Value> {
        documents(text).unwrap()
    }

    #[test]
    fn catalog_reads_plugins_and_mesh_configs() {
        let c = catalog();
        assert_eq!(c.plugins.len(), 2);
        let mesh = &c.meshes[&("shop".to_owned(), "web".to_owned())];
        assert_eq!(mesh.plugins.len(), 2);
    }

    #[test]
    fn realistic_manifests_round_trip() {
        let (out, reports) =
            inject_yaml(WORKLOADS, "default", &InjectConfig::default(), &catalog()).unwrap();
        let summary: Vec<String> = reports.iter().map(describe).collect();
        assert_eq!(
            summary,
            [
                "deployment/web injected (ports 8080\u{2192}28080, 9102\u{2192}29102)",
                "statefulset/mysql injected (ports 3306\u{2192}23306)",
                "daemonset/node-agent skipped: opted out",
                "job/migrate injected (no ports to remap)",
                "cronjob/report injected (no ports to remap)",
                "pod/debug injected (no ports to remap)",
            ]
        );
        let before = docs(WORKLOADS);
        let after = docs(&out);
        assert_eq!(before.len(), after.len());
        // Non-workloads and skipped workloads are unchanged.
        for i in [0, 2, 4, 8] {
            assert_eq!(before[i], after[i], "document {i} changed");
        }
        // Fields outside the pod template survive; the template gets the proxy and plugins.
        let web = &after[1];
        assert_eq!(web["spec"]["replicas"], 3);
        assert_eq!(web["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "25%");
        let t = &web["spec"]["template"];
        assert_eq!(t["metadata"]["labels"]["version"], "v2");
        assert_eq!(
            t["metadata"]["annotations"]["sidemesh.io/port-map"],
            r#"{"8080":28080,"9102":29102}"#
        );
        let inits: Vec<&str> = t["spec"]["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            inits,
            ["sidemesh-proxy", "plugin-code-pull", "plugin-log-shipper"]
        );
        let shipper = &t["spec"]["initContainers"][2];
        assert_eq!(shipper["restartPolicy"], "Always");
        assert_eq!(shipper["envFrom"][0]["configMapRef"]["name"], "web-config");
        let containers = t["spec"]["containers"].as_array().unwrap();
        assert_eq!(containers.len(), 1);
        assert_eq!(containers[0]["readinessProbe"]["httpGet"]["port"], 8080);
        assert_eq!(containers[0]["resources"]["limits"]["memory"], "512Mi");
        assert_eq!(
            t["spec"]["topologySpreadConstraints"][0]["topologyKey"],
            "topology.kubernetes.io/zone"
        );
        let pull = &t["spec"]["initContainers"][1]["env"];
        let names: Vec<&str> = pull
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "MYSQL_HOST",
                "MYSQL_PASSWORD",
                "GIT_BRANCH",
                "GIT_TOKEN",
                "DISCOVER_URL",
                "SIDEMESH_DISCOVER_AUTHORIZATION"
            ]
        );
        // The StatefulSet's volume claim templates and the CronJob's schedule survive.
        assert_eq!(
            after[3]["spec"]["volumeClaimTemplates"],
            before[3]["spec"]["volumeClaimTemplates"]
        );
        assert_eq!(after[6]["spec"]["schedule"], "0 3 * * *");
        let job_tmpl = &after[6]["spec"]["jobTemplate"]["spec"]["template"]["spec"];
        assert_eq!(job_tmpl["initContainers"][0]["restartPolicy"], "Always");
        assert_eq!(
            job_tmpl["dnsConfig"]["searches"][0],
            "shop.svc.cluster.local"
        );
        // The bare pod without a namespace gets the default one in its DNS search list.
        assert_eq!(
            after[7]["spec"]["dnsConfig"]["searches"][0],
            "default.svc.cluster.local"
        );
    }

    #[test]
    fn second_pass_is_identical() {
        let cfg = InjectConfig::default();
        let (once, _) = inject_yaml(WORKLOADS, "default", &cfg, &catalog()).unwrap();
        let (twice, reports) = inject_yaml(&once, "default", &cfg, &catalog()).unwrap();
        assert_eq!(once, twice);
        assert!(
            reports
                .iter()
                .all(|r| matches!(r.outcome, Outcome::Skipped(_)))
        );
    }

    #[test]
    fn lists_are_walked() {
        let list = r#"{"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a", "labels": {"app": "a"}},
             "spec": {"containers": [{"name": "a", "image": "a"}]}}]}"#;
        let (out, reports) =
            inject_yaml(list, "ns", &InjectConfig::default(), &Catalog::default()).unwrap();
        assert_eq!(reports.len(), 1);
        assert_eq!(
            docs(&out)[0]["items"][0]["spec"]["initContainers"][0]["name"],
            "sidemesh-proxy"
        );
    }

    #[test]
    fn failures_name_the_object_and_print_nothing() {
        let mut c = catalog();
        c.plugins.remove("code-pull");
        let errs = inject_yaml(WORKLOADS, "default", &InjectConfig::default(), &c).unwrap_err();
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0]
                .to_string()
                .starts_with("deployment/web: plugin \"code-pull\""),
            "{}",
            errs[0]
        );
        let errs = inject_yaml("a: [1\n", "d", &InjectConfig::default(), &c).unwrap_err();
        assert!(
            errs[0]
                .to_string()
                .starts_with("document 1: not valid YAML"),
            "{}",
            errs[0]
        );
        let bad = "kind: Pod\nmetadata: {name: p}\nspec: {containers: 7}\n";
        let errs = inject_yaml(bad, "d", &InjectConfig::default(), &c).unwrap_err();
        assert!(
            errs[0]
                .to_string()
                .contains("pod/p: the pod template is not a valid pod spec"),
            "{}",
            errs[0]
        );
    }
}
