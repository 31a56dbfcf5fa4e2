//! Numeric `targetPort`s: pointing a Kubernetes Service at the pods' inbound proxies without
//! iptables.
//!
//! A named `targetPort` already reaches the proxy: the injector moves the app port's name
//! onto the proxy's `port_outer` port. A numeric one names the app's port, so plain clients
//! through the ClusterIP would bypass the inbound proxy (and `allow_clients`). When a Service
//! opts in (annotation `sidemesh.io/rewrite-target-ports: enabled`, or its namespace's label
//! of that name), the controller rewrites each numeric `targetPort` to the proxy's port
//! *name* for that app port (read from the pods' `sidemesh.io/port-names` annotation),
//! records the original numbers in `sidemesh.io/original-target-ports`, and restores them
//! when the opt-in goes away.
//!
//! A name only resolves on pods that declare it, so the rewrite is made only while every
//! ready endpoint of the Service is an injected pod and they all agree on the names; when
//! that stops being true (an uninjected pod joins, say), the numbers are restored, so no pod
//! silently drops out of the Service.
//!
//! [`desired`] is the pure rule, over real Service objects; it returns the JSON merge patch
//! to send (with the `resourceVersion` read, so a concurrent edit makes it fail, not clobber).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Value, json};

/// Service annotation (and namespace label) that opts in with `enabled`.
pub const REWRITE: &str = "sidemesh.io/rewrite-target-ports";
/// Service annotation with the numbers replaced, JSON `{"<service port>": <targetPort>}`.
pub const ORIGINAL: &str = "sidemesh.io/original-target-ports";

/// Whether a Service opts in, by its own annotation or its namespace's label.
pub fn opted_in(svc: &Service, namespace_labels: Option<&BTreeMap<String, String>>) -> bool {
    let own = svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(REWRITE))
        .map(String::as_str);
    match own {
        Some(v) => v == "enabled",
        None => namespace_labels
            .and_then(|l| l.get(REWRITE))
            .is_some_and(|v| v == "enabled"),
    }
}

/// The proxy port names all of a Service's ready endpoints agree on (app port to name),
/// given each endpoint pod's `sidemesh.io/port-names` (`None` for a pod that is not
/// injected or not known). `None` unless there is at least one endpoint and all agree.
pub fn agreed_names(
    endpoints: impl IntoIterator<Item = Option<BTreeMap<u16, String>>>,
) -> Option<BTreeMap<u16, String>> {
    let mut agreed: Option<BTreeMap<u16, String>> = None;
    for names in endpoints {
        let names = names?;
        match &agreed {
            None => agreed = Some(names),
            Some(a) if *a == names => {}
            Some(_) => return None,
        }
    }
    agreed
}

/// The merge patch that brings `svc` where it should be, or `None` when it is there.
/// `names` are the endpoints' agreed proxy port names ([`agreed_names`]).
pub fn desired(
    svc: &Service,
    opted_in: bool,
    names: Option<&BTreeMap<u16, String>>,
) -> Option<Value> {
    let original: BTreeMap<String, i32> = svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ORIGINAL))
        .and_then(|raw| serde_json::from_str(raw).ok())
        .unwrap_or_default();
    let had_annotation = svc
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(ORIGINAL));
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let mut ports = spec.ports.clone().unwrap_or_default();
    let mut recorded = original.clone();
    let mut changed = false;
    match (opted_in, names) {
        (true, Some(names)) => {
            for p in &mut ports {
                let key = p.port.to_string();
                // A port rewritten before keeps its recorded number, should the names move.
                let number = match (&p.target_port, recorded.get(&key)) {
                    (Some(IntOrString::Int(n)), _) => Some(*n),
                    (None, _) => Some(p.port),
                    (Some(IntOrString::String(_)), Some(n)) => Some(*n),
                    (Some(IntOrString::String(_)), None) => None, // named by the user
                };
                let Some(number) = number else { continue };
                let name = u16::try_from(number).ok().and_then(|n| names.get(&n));
                let Some(name) = name else { continue };
                let want = IntOrString::String(name.clone());
                if p.target_port.as_ref() != Some(&want) {
                    p.target_port = Some(want);
                    changed = true;
                }
                recorded.insert(key, number);
            }
        }
        _ => {
            // Not wanted (or not safe): put every recorded number back.
            for p in &mut ports {
                if let Some(n) = recorded.remove(&p.port.to_string()) {
                    if p.target_port != Some(IntOrString::Int(n)) {
                        p.target_port = Some(IntOrString::Int(n));
                        changed = true;
                    }
                }
            }
            recorded.clear();
        }
    }
    let annotation = if recorded.is_empty() {
        if had_annotation {
            Some(Value::Null)
        } else {
            None
        }
    } else if recorded != original || !had_annotation {
        Some(Value::String(
            serde_json::to_string(&recorded).unwrap_or_default(),
        ))
    } else {
        None
    };
    if !changed && annotation.is_none() {
        return None;
    }
    let mut patch = json!({
        "metadata": {"resourceVersion": svc.metadata.resource_version},
    });
    if let Some(a) = annotation {
        patch["metadata"]["annotations"] = json!({ ORIGINAL: a });
    }
    if changed {
        // A merge patch replaces the whole list: send every port, as read, with the changes.
        patch["spec"] = json!({ "ports": ports });
    }
    Some(patch)
}

/// Every patch the cluster needs now: for each Service that opts in or carries a record,
/// what [`desired`] says given its ready endpoints' pods. Returns `(namespace, name, patch)`.
pub fn plan(inputs: &crate::index::Inputs) -> Vec<(String, String, Value)> {
    let namespace_labels: BTreeMap<&str, &BTreeMap<String, String>> = inputs
        .namespaces
        .iter()
        .filter_map(|n| Some((n.metadata.name.as_deref()?, n.metadata.labels.as_ref()?)))
        .collect();
    let candidates: Vec<(&str, &str, &Service, bool)> = inputs
        .services
        .iter()
        .filter_map(|s| {
            let ns = s.metadata.namespace.as_deref()?;
            let name = s.metadata.name.as_deref()?;
            let wanted = opted_in(s, namespace_labels.get(ns).copied());
            let recorded = s
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(ORIGINAL));
            (wanted || recorded).then_some((ns, name, s.as_ref(), wanted))
        })
        .collect();
    if candidates.is_empty() {
        return Vec::new();
    }
    let pods = crate::index::pods_by_key(&inputs.pods);
    let mut out = Vec::new();
    for (ns, name, svc, wanted) in candidates {
        let endpoints = inputs
            .slices
            .iter()
            .filter(|s| {
                s.metadata.namespace.as_deref() == Some(ns)
                    && crate::index::slice_service(s) == Some(name)
            })
            .flat_map(|s| s.endpoints.iter().flatten())
            .filter(|ep| ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
            .map(|ep| {
                let r = ep.target_ref.as_ref()?;
                let pod = pods.get(&(r.namespace.as_deref().unwrap_or(ns), r.name.as_deref()?))?;
                crate::inject::parse_port_names(&pod.metadata)
            });
        let names = agreed_names(endpoints);
        if let Some(patch) = desired(svc, wanted, names.as_ref()) {
            out.push((ns.to_owned(), name.to_owned(), patch));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(v: Value) -> Service {
        serde_json::from_value(v).unwrap()
    }

    fn web(annotations: Value) -> Service {
        service(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop", "resourceVersion": "41",
                         "annotations": annotations},
            "spec": {"clusterIP": "10.96.3.4", "selector": {"app": "web"},
                     "ports": [
                        {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
                        {"name": "grpc", "port": 9000, "targetPort": "grpc", "protocol": "TCP"},
                        {"name": "metrics", "port": 9102, "protocol": "TCP"}
                     ]}
        }))
    }

    fn names() -> BTreeMap<u16, String> {
        BTreeMap::from([(8080, "sm-28080".to_owned()), (9000, "grpc".to_owned())])
    }

    /// The Service as the API server would hold it after the merge patch.
    fn apply(svc: &Service, patch: &Value) -> Service {
        let mut v = serde_json::to_value(svc).unwrap();
        fn merge(target: &mut Value, patch: &Value) {
            match (target, patch) {
                (Value::Object(t), Value::Object(p)) => {
                    for (k, pv) in p {
                        if pv.is_null() {
                            t.remove(k);
                        } else {
                            merge(t.entry(k.clone()).or_insert(Value::Null), pv);
                        }
                    }
                }
                (t, p) => *t = p.clone(),
            }
        }
        merge(&mut v, patch);
        service(v)
    }

    fn targets(svc: &Service) -> Vec<Option<IntOrString>> {
        svc.spec
            .as_ref()
            .unwrap()
            .ports
            .iter()
            .flatten()
            .map(|p| p.target_port.clone())
            .collect()
    }

    #[test]
    fn opt_in_rewrites_numbers_to_the_proxy_names_and_opt_out_restores_them() {
        let svc = web(json!({REWRITE: "enabled"}));
        let patch = desired(&svc, opted_in(&svc, None), Some(&names())).unwrap();
        assert_eq!(patch["metadata"]["resourceVersion"], "41");
        let after = apply(&svc, &patch);
        assert_eq!(
            targets(&after),
            [
                Some(IntOrString::String("sm-28080".into())),
                // Named by the user: the injector moved that name already.
                Some(IntOrString::String("grpc".into())),
                // No targetPort means the port itself; 9102 has no proxy port: left alone.
                None,
            ]
        );
        let ann = after.metadata.annotations.as_ref().unwrap();
        assert_eq!(ann[ORIGINAL], r#"{"80":8080}"#);
        // Idempotent: the next pass has nothing to do.
        assert_eq!(desired(&after, true, Some(&names())), None);

        // Opt-out: the numbers come back and the record goes.
        let mut out = after.clone();
        out.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(REWRITE.into(), "disabled".into());
        assert!(!opted_in(&out, None));
        let patch = desired(&out, false, Some(&names())).unwrap();
        let restored = apply(&out, &patch);
        assert_eq!(targets(&restored), targets(&svc));
        assert!(
            !restored
                .metadata
                .annotations
                .unwrap()
                .contains_key(ORIGINAL)
        );
    }

    #[test]
    fn an_uninjected_endpoint_restores_the_numbers() {
        let svc = web(json!({REWRITE: "enabled"}));
        let rewritten = apply(&svc, &desired(&svc, true, Some(&names())).unwrap());
        // A pod without the proxy joins: names no longer agree, so the rewrite is undone.
        let agreed = agreed_names([Some(names()), None]);
        assert_eq!(agreed, None);
        let patch = desired(&rewritten, true, agreed.as_ref()).unwrap();
        assert_eq!(targets(&apply(&rewritten, &patch)), targets(&svc));
        // Pods that disagree do too; no endpoints at all is not agreement either.
        let mut other = names();
        other.insert(8080, "sm-28081".into());
        assert_eq!(agreed_names([Some(names()), Some(other)]), None);
        assert_eq!(agreed_names(std::iter::empty()), None);
        assert_eq!(agreed_names([Some(names()), Some(names())]), Some(names()));
    }

    #[test]
    fn plan_over_the_test_cluster() {
        let mut inputs = crate::index::tests::inputs();
        // Nothing opts in: nothing to do.
        assert!(plan(&inputs).is_empty());
        // web opts in; its one ready endpoint is an injected pod that names its proxy ports.
        let web = inputs
            .services
            .iter_mut()
            .find(|s| s.metadata.name.as_deref() == Some("web"))
            .unwrap();
        std::sync::Arc::make_mut(web)
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(REWRITE.into(), "enabled".into());
        for p in &mut inputs.pods {
            if p.metadata.name.as_deref() == Some("web-7c9f8d6b5-x2x9q") {
                std::sync::Arc::make_mut(p)
                    .metadata
                    .annotations
                    .get_or_insert_default()
                    .insert(
                        crate::inject::PORT_NAMES.into(),
                        r#"{"8080":"http","9000":"sm-29000","8081":"sm-28081"}"#.into(),
                    );
            }
        }
        let planned = plan(&inputs);
        assert_eq!(planned.len(), 1);
        let (ns, name, patch) = &planned[0];
        assert_eq!((ns.as_str(), name.as_str()), ("shop", "web"));
        let ports = patch["spec"]["ports"].as_array().unwrap();
        assert!(
            ports.iter().any(|p| p["targetPort"] == "sm-29000"),
            "{ports:?}"
        );
    }

    #[test]
    fn namespace_label_opts_in_and_services_without_records_are_left_alone() {
        let svc = web(json!({}));
        let ns = BTreeMap::from([(REWRITE.to_owned(), "enabled".to_owned())]);
        assert!(opted_in(&svc, Some(&ns)));
        assert!(!opted_in(&svc, None));
        // The Service's own annotation wins over its namespace.
        let off = web(json!({REWRITE: "disabled"}));
        assert!(!opted_in(&off, Some(&ns)));
        // Not opted in and never rewritten: nothing to do.
        assert_eq!(desired(&svc, false, Some(&names())), None);
        let external = service(json!({
            "metadata": {"name": "db", "namespace": "shop", "annotations": {REWRITE: "enabled"}},
            "spec": {"type": "ExternalName", "externalName": "db.example.com"}
        }));
        assert_eq!(desired(&external, true, Some(&names())), None);
    }
}
