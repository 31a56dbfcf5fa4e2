//! sidemesh's custom resources (group `sidemesh.io`) and their validation.
//!
//! - [`Plugin`] (cluster-scoped): a Rainbond-style plugin — a kind (`sidecar`, `init` or
//!   `netproxy`) and versions that are immutable once published (image, memory, default
//!   variables fixed per version).
//! - [`MeshConfig`] (namespaced, one per workload): the services the workload depends on with
//!   routes and policies per dependency, who may call it (`allow_clients`) and the plugins
//!   attached to it with their variables.
//!
//! Routes and policies are the `DISCOVER_URL` contract's own types
//! ([`sidemesh_api::config`]). In the CRD they are carried as free-form JSON so that one bad
//! route never makes the whole object unreadable to the watcher; [`MeshConfigSpec::validate`]
//! parses them with the contract's strict serde rules and says what to fix, and the result goes
//! into the object's status conditions.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sidemesh_api::config::{
    Balancer, HealthCheck, Limits, OutlierDetection, RetryPolicy, Route, Timeouts,
};
use sidemesh_api::name;

/// The API group of every sidemesh resource.
pub const GROUP: &str = "sidemesh.io";

/// What a plugin is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PluginKind {
    /// A container that runs beside the app for the pod's whole life.
    Sidecar,
    /// An init container that runs to completion before the app starts, in attach order.
    Init,
    /// A replacement for the built-in network proxy (the sidemesh sidecar).
    Netproxy,
}

/// A plugin: an image and a kind, published in immutable versions.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "sidemesh.io",
    version = "v1alpha1",
    kind = "Plugin",
    plural = "plugins",
    shortname = "smplugin",
    status = "ResourceStatus",
    validation = "!has(oldSelf.spec) || oldSelf.spec.versions.all(o, self.spec.versions.exists(v, v.name == o.name && v == o))",
    printcolumn = r#"{"name":"Kind","type":"string","jsonPath":".spec.kind"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PluginSpec {
    /// What the plugin is.
    pub kind: PluginKind,
    /// Published versions. A version is never changed or removed once published: publish a
    /// new version instead. At most 64 (bounded so the API server can cost the
    /// immutability rule).
    #[schemars(length(min = 1, max = 64))]
    pub versions: Vec<PluginVersion>,
    /// The version attached when a workload names none; default: the last in `versions`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_version: Option<String>,
}

/// One immutable version of a plugin.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PluginVersion {
    /// The version's name (a DNS label), e.g. `v1`.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// The container image.
    #[schemars(length(min = 1, max = 512))]
    pub image: String,
    /// Memory request and limit, in MiB.
    pub memory_mib: u32,
    /// CPU request, in millicores (no CPU limit is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_millis: Option<u32>,
    /// The container command; default: the image's entrypoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// The container arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Default values of the plugin's own variables (overridable per workload).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub variables: BTreeMap<String, String>,
}

impl PluginSpec {
    /// The version a workload gets when it names `wanted` (or none).
    pub fn version(&self, wanted: Option<&str>) -> Option<&PluginVersion> {
        match wanted.or(self.default_version.as_deref()) {
            Some(v) => self.versions.iter().find(|x| x.name == v),
            None => self.versions.last(),
        }
    }

    /// Every problem with this spec, each a sentence saying what to fix. `published` is the
    /// versions seen before (from the status), so that a changed version is reported.
    pub fn validate(&self, published: &BTreeMap<String, String>) -> Vec<String> {
        let mut errs = Vec::new();
        if self.versions.is_empty() {
            errs.push("spec.versions is empty: publish at least one version".to_owned());
        }
        let mut seen = BTreeSet::new();
        for (i, v) in self.versions.iter().enumerate() {
            if let Err(e) = name::check_label(&v.name) {
                errs.push(format!("spec.versions[{i}].name: {e}"));
            }
            if !seen.insert(v.name.as_str()) {
                errs.push(format!(
                    "spec.versions[{i}].name: version {:?} is listed twice",
                    v.name
                ));
            }
            if v.image.trim().is_empty() {
                errs.push(format!("spec.versions[{i}].image: set the container image"));
            }
            if v.memory_mib == 0 {
                errs.push(format!(
                    "spec.versions[{i}].memoryMib: set the memory in MiB (at least 1)"
                ));
            }
            for k in v.variables.keys() {
                if !is_env_name(k) {
                    errs.push(format!(
                        "spec.versions[{i}].variables: {k:?} is not a valid environment variable name"
                    ));
                }
            }
            if let Some(old) = published.get(&v.name) {
                if *old != v.fingerprint() {
                    errs.push(format!(
                        "spec.versions[{i}]: version {:?} was changed after it was published; restore it and publish a new version instead",
                        v.name
                    ));
                }
            }
        }
        for old in published.keys() {
            if !seen.contains(old.as_str()) {
                errs.push(format!(
                    "spec.versions: published version {old:?} was removed; put it back (versions are immutable)"
                ));
            }
        }
        if let Some(d) = &self.default_version {
            if !seen.contains(d.as_str()) {
                errs.push(format!(
                    "spec.defaultVersion: {d:?} is not one of spec.versions"
                ));
            }
        }
        errs
    }
}

impl PluginVersion {
    /// A stable digest of everything a version fixes, recorded in the status when published.
    pub fn fingerprint(&self) -> String {
        // serde_json of a struct with BTreeMaps is deterministic; no hashing needed for
        // the handful of versions a plugin has.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The status the controller writes on sidemesh objects.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceStatus {
    /// `Ready` is `True` when the object is valid and in use, else `False` with a message
    /// that says what to fix.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Plugins only: the published versions' fingerprints, so changes can be refused.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub published_versions: BTreeMap<String, String>,
    /// The `metadata.generation` the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The mesh config of one workload: what it uses, who may call it, what is attached to it.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "sidemesh.io",
    version = "v1alpha1",
    kind = "MeshConfig",
    plural = "meshconfigs",
    shortname = "smc",
    namespaced,
    status = "ResourceStatus",
    printcolumn = r#"{"name":"Service","type":"string","jsonPath":".spec.service"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshConfigSpec {
    /// The workload's service name (its identity); default: the object's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The services this workload calls. Without any, it reaches no mesh service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dependencies: Vec<Dependency>,
    /// Clients allowed to call this workload, as `namespace/service` or `namespace/*`.
    /// Absent means everyone; an empty list means no one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_clients: Option<Vec<String>>,
    /// Plugins attached to this workload, injected in this order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plugins: Vec<AttachedPlugin>,
}

/// A service the workload depends on, with its policies. Policies are the `DISCOVER_URL`
/// contract's types (see `docs/discover-api.md`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Dependency {
    /// The service, as `name` (same namespace) or `namespace/name`.
    pub service: String,
    /// HTTP routes, as the contract's `Route` objects.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "free_form_list")]
    pub routes: Vec<serde_json::Value>,
    /// The contract's `Balancer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form")]
    pub balancer: Option<serde_json::Value>,
    /// The contract's `Timeouts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form")]
    pub timeouts: Option<serde_json::Value>,
    /// The contract's `RetryPolicy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form")]
    pub retry: Option<serde_json::Value>,
    /// The contract's `Limits`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form")]
    pub limits: Option<serde_json::Value>,
    /// The contract's `OutlierDetection`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form")]
    pub outlier_detection: Option<serde_json::Value>,
    /// The contract's `HealthCheck`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form")]
    pub health_check: Option<serde_json::Value>,
}

/// A plugin attached to a workload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AttachedPlugin {
    /// The `Plugin` object's name.
    pub name: String,
    /// The version; default: the plugin's default version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The plugin's own variables for this workload (over the version's defaults). They go
    /// into that plugin's container only.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub variables: BTreeMap<String, String>,
}

/// A dependency's policies, parsed into the contract's types.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DependencyPolicy {
    /// The dependency's namespace.
    pub namespace: String,
    /// The dependency's service name.
    pub name: String,
    /// Routes, in order.
    pub routes: Vec<Route>,
    /// Balancer, when given.
    pub balancer: Option<Balancer>,
    /// Timeouts, when given.
    pub timeouts: Option<Timeouts>,
    /// Retry policy, when given.
    pub retry: Option<RetryPolicy>,
    /// Limits, when given.
    pub limits: Option<Limits>,
    /// Outlier detection, when given.
    pub outlier_detection: Option<OutlierDetection>,
    /// Health checking, when given.
    pub health_check: Option<HealthCheck>,
}

impl MeshConfigSpec {
    /// The workload's service name: `spec.service`, else the object's name.
    pub fn service_name<'a>(&'a self, object_name: &'a str) -> &'a str {
        self.service.as_deref().unwrap_or(object_name)
    }

    /// Parses every dependency into the contract's types. `namespace` is the object's, used
    /// for dependencies named without one. Errors say where and what to fix.
    pub fn validate(&self, namespace: &str) -> Result<Vec<DependencyPolicy>, Vec<String>> {
        let mut errs = Vec::new();
        let mut out = Vec::new();
        if let Some(s) = &self.service {
            if let Err(e) = name::check_label(s) {
                errs.push(format!("spec.service: {e}"));
            }
        }
        if let Some(clients) = &self.allow_clients {
            for (i, c) in clients.iter().enumerate() {
                if let Err(e) = name::check_client(c) {
                    errs.push(format!("spec.allowClients[{i}]: {e}"));
                }
            }
        }
        let mut seen = BTreeSet::new();
        for (i, d) in self.dependencies.iter().enumerate() {
            let at = format!("spec.dependencies[{i}]");
            let (ns, svc) = match d.service.split_once('/') {
                Some((ns, svc)) => (ns, svc),
                None => (namespace, d.service.as_str()),
            };
            for (what, v) in [("namespace", ns), ("name", svc)] {
                if let Err(e) = name::check_label(v) {
                    errs.push(format!("{at}.service: the {what} {e}"));
                }
            }
            if !seen.insert((ns.to_owned(), svc.to_owned())) {
                errs.push(format!("{at}.service: {ns}/{svc} is listed twice"));
            }
            let mut p = DependencyPolicy {
                namespace: ns.to_owned(),
                name: svc.to_owned(),
                ..Default::default()
            };
            for (j, r) in d.routes.iter().enumerate() {
                match serde_json::from_value::<Route>(r.clone()) {
                    Ok(r) => p.routes.push(r),
                    Err(e) => errs.push(format!("{at}.routes[{j}]: {e}")),
                }
            }
            p.balancer = parse_opt(&d.balancer, &format!("{at}.balancer"), &mut errs);
            p.timeouts = parse_opt(&d.timeouts, &format!("{at}.timeouts"), &mut errs);
            p.retry = parse_opt(&d.retry, &format!("{at}.retry"), &mut errs);
            p.limits = parse_opt(&d.limits, &format!("{at}.limits"), &mut errs);
            p.outlier_detection = parse_opt(
                &d.outlier_detection,
                &format!("{at}.outlierDetection"),
                &mut errs,
            );
            p.health_check = parse_opt(&d.health_check, &format!("{at}.healthCheck"), &mut errs);
            out.push(p);
        }
        let mut names = BTreeSet::new();
        for (i, p) in self.plugins.iter().enumerate() {
            if p.name.is_empty() {
                errs.push(format!("spec.plugins[{i}].name: name the Plugin object"));
            }
            if !names.insert(p.name.as_str()) {
                errs.push(format!(
                    "spec.plugins[{i}].name: plugin {:?} is attached twice",
                    p.name
                ));
            }
            for k in p.variables.keys() {
                if !is_env_name(k) {
                    errs.push(format!(
                        "spec.plugins[{i}].variables: {k:?} is not a valid environment variable name"
                    ));
                }
            }
        }
        if errs.is_empty() { Ok(out) } else { Err(errs) }
    }
}

fn parse_opt<T: serde::de::DeserializeOwned>(
    v: &Option<serde_json::Value>,
    at: &str,
    errs: &mut Vec<String>,
) -> Option<T> {
    let v = v.as_ref()?;
    match serde_json::from_value(v.clone()) {
        Ok(t) => Some(t),
        Err(e) => {
            errs.push(format!("{at}: {e}"));
            None
        }
    }
}

/// Whether `s` is a portable environment variable name (`[A-Za-z_][A-Za-z0-9_]*`).
pub fn is_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The `Ready` condition for a validation result: `True`, or `False` with every problem.
pub fn ready_condition(errors: &[String], generation: Option<i64>, now: &str) -> Condition {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    let (status, reason, message) = if errors.is_empty() {
        ("True", "Valid", "valid and in use".to_owned())
    } else {
        ("False", "Invalid", errors.join("; "))
    };
    let time = now
        .parse::<k8s_openapi::jiff::Timestamp>()
        .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
    Condition {
        type_: "Ready".to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time: Time(time),
    }
}

fn free_form(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

fn free_form_list(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "items": { "type": "object", "x-kubernetes-preserve-unknown-fields": true }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    fn plugin() -> PluginSpec {
        serde_json::from_value(serde_json::json!({
            "kind": "init",
            "versions": [
                {"name": "v1", "image": "registry.example/code-pull:1", "memoryMib": 64,
                 "variables": {"REPO": "https://git.example/app.git"}},
                {"name": "v2", "image": "registry.example/code-pull:2", "memoryMib": 64}
            ]
        }))
        .unwrap()
    }

    #[test]
    fn plugin_version_defaults_to_last_or_named() {
        let p = plugin();
        assert_eq!(p.version(None).unwrap().name, "v2");
        assert_eq!(p.version(Some("v1")).unwrap().name, "v1");
        assert!(p.version(Some("v9")).is_none());
    }

    #[test]
    fn plugin_changed_or_removed_version_is_reported() {
        let p = plugin();
        let mut published: BTreeMap<_, _> = p
            .versions
            .iter()
            .map(|v| (v.name.clone(), v.fingerprint()))
            .collect();
        assert!(p.validate(&published).is_empty());
        let mut changed = p.clone();
        changed.versions[0].memory_mib = 128;
        let errs = changed.validate(&published);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].contains("changed after it was published"),
            "{errs:?}"
        );
        published.insert("v0".into(), "x".into());
        let errs = p.validate(&published);
        assert!(
            errs.iter().any(|e| e.contains("\"v0\" was removed")),
            "{errs:?}"
        );
    }

    #[test]
    fn plugin_bad_fields_say_what_to_fix() {
        let mut p = plugin();
        p.versions[0].image = String::new();
        p.versions[1].name = "V_2".into();
        p.versions[1]
            .variables
            .insert("BAD-NAME".into(), "x".into());
        p.default_version = Some("v7".into());
        let errs = p.validate(&BTreeMap::new());
        assert_eq!(errs.len(), 4, "{errs:?}");
        assert!(errs[0].contains("spec.versions[0].image"));
    }

    #[test]
    fn mesh_config_parses_contract_policies() {
        let spec: MeshConfigSpec = serde_json::from_value(serde_json::json!({
            "dependencies": [
                {"service": "tomcat",
                 "routes": [{"name": "api", "match": {"path": {"prefix": "/api"}},
                             "backends": [{"subset": {"version": "v2"}, "weight": 10000}]}],
                 "balancer": {"policy": "round_robin"},
                 "retry": {"attempts": 3}},
                {"service": "db/mysql"}
            ],
            "allowClients": ["shop/web", "ops/*"],
            "plugins": [{"name": "code-pull", "variables": {"BRANCH": "main"}}]
        }))
        .unwrap();
        let deps = spec.validate("shop").unwrap();
        assert_eq!(deps.len(), 2);
        assert_eq!(
            (deps[0].namespace.as_str(), deps[0].name.as_str()),
            ("shop", "tomcat")
        );
        assert_eq!(deps[0].routes[0].name, "api");
        assert_eq!(deps[0].retry.as_ref().unwrap().attempts, 3);
        assert_eq!(
            (deps[1].namespace.as_str(), deps[1].name.as_str()),
            ("db", "mysql")
        );
    }

    #[test]
    fn mesh_config_errors_point_at_the_field() {
        let spec: MeshConfigSpec = serde_json::from_value(serde_json::json!({
            "dependencies": [
                {"service": "Tomcat!", "routes": [{"name": "r", "bogus": 1}],
                 "balancer": {"policy": "fastest"}},
                {"service": "tomcat"}, {"service": "tomcat"}
            ],
            "allowClients": ["not a client"],
            "plugins": [{"name": "x"}, {"name": "x"}]
        }))
        .unwrap();
        let errs = spec.validate("shop").unwrap_err();
        let joined = errs.join("\n");
        for want in [
            "spec.dependencies[0].service",
            "spec.dependencies[0].routes[0]: unknown field `bogus`",
            "spec.dependencies[0].balancer",
            "spec.dependencies[2].service: shop/tomcat is listed twice",
            "spec.allowClients[0]",
            "spec.plugins[1].name",
        ] {
            assert!(joined.contains(want), "missing {want:?} in\n{joined}");
        }
    }

    #[test]
    fn crds_carry_schemas_and_the_immutability_rule() {
        let crd = serde_json::to_value(Plugin::crd()).unwrap();
        assert_eq!(crd["spec"]["group"], GROUP);
        assert_eq!(crd["spec"]["scope"], "Cluster");
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        assert!(schema["properties"]["spec"]["properties"]["versions"].is_object());
        assert!(schema.to_string().contains("oldSelf.spec.versions.all"));
        assert_eq!(
            schema["properties"]["spec"]["properties"]["versions"]["maxItems"],
            64
        );
        let crd = serde_json::to_value(MeshConfig::crd()).unwrap();
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        let deps = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
            ["dependencies"]["items"]["properties"];
        assert_eq!(
            deps["routes"]["items"]["x-kubernetes-preserve-unknown-fields"],
            true
        );
    }

    #[test]
    fn ready_condition_lists_problems() {
        let c = ready_condition(&["a".into(), "b".into()], Some(3), "2026-01-01T00:00:00Z");
        assert_eq!((c.status.as_str(), c.message.as_str()), ("False", "a; b"));
        assert_eq!(ready_condition(&[], None, "x").status, "True");
    }
}
