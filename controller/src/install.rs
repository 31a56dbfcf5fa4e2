//! The manifests that install sidemesh into a cluster (`sidemesh install`, and `deploy/`):
//! namespace, CRDs, ServiceAccount with least-privilege RBAC, the controller Deployment, its
//! Services and the MutatingWebhookConfiguration.
//!
//! The webhook needs a serving certificate the API server trusts. By default `install`
//! generates a fresh CA and certificate and puts them into a Secret and the webhook's
//! `caBundle` (like `linkerd install`); with `cert_manager` it asks cert-manager for them
//! instead, which is what `deploy/sidemesh.yaml` uses, so no private key is ever committed.

use kube::CustomResourceExt;
use serde_json::{Value, json};

use crate::crd::{MeshConfig, Plugin};

/// The namespace sidemesh runs in.
pub const NAMESPACE: &str = "sidemesh";
/// The webhook Service's name.
pub const WEBHOOK_SERVICE: &str = "sidemesh-webhook";
/// The discover Service's name.
pub const DISCOVER_SERVICE: &str = "sidemesh-discover";
/// The port the controller serves the webhook on, in the pod.
pub const WEBHOOK_PORT: u16 = 9443;
/// The port the controller serves discover on.
pub const DISCOVER_PORT: u16 = 8080;
/// The controller's admin port (`/ready`, `/metrics`).
pub const ADMIN_PORT: u16 = 9990;
/// The webhook's path.
pub const WEBHOOK_PATH: &str = "/inject";
/// The Lease the controller replicas elect their leader with (in [`NAMESPACE`]).
pub const LEASE_NAME: &str = "sidemesh-controller";

/// What to install.
#[derive(Clone, Debug)]
pub struct InstallOptions {
    /// The sidemesh image (controller and proxy).
    pub image: String,
    /// Use cert-manager for the webhook certificate instead of generating one.
    pub cert_manager: bool,
}

/// A generated webhook CA and serving certificate, PEM.
#[derive(Clone, Debug)]
pub struct WebhookCerts {
    /// The CA certificate (the webhook's `caBundle`).
    pub ca_pem: String,
    /// The serving certificate.
    pub cert_pem: String,
    /// The serving key.
    pub key_pem: String,
}

/// Generates a CA and a serving certificate for `dns_names`.
pub fn generate_certs(dns_names: &[String]) -> Result<WebhookCerts, rcgen::Error> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "sidemesh webhook CA");
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let mut leaf = CertificateParams::new(dns_names.to_vec())?;
    leaf.distinguished_name.push(
        DnType::CommonName,
        dns_names.first().cloned().unwrap_or_default(),
    );
    let leaf_key = KeyPair::generate()?;
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer)?;
    Ok(WebhookCerts {
        ca_pem: ca_cert.pem(),
        cert_pem: leaf_cert.pem(),
        key_pem: leaf_key.serialize_pem(),
    })
}

/// The webhook Service's DNS names, as its certificate must carry them.
pub fn webhook_dns_names() -> Vec<String> {
    vec![
        format!("{WEBHOOK_SERVICE}.{NAMESPACE}.svc"),
        format!("{WEBHOOK_SERVICE}.{NAMESPACE}.svc.cluster.local"),
    ]
}

/// Every install manifest, in apply order. `certs` is required unless `cert_manager`.
pub fn manifests(opts: &InstallOptions, certs: Option<&WebhookCerts>) -> Vec<Value> {
    let labels = json!({"app.kubernetes.io/name": "sidemesh-controller", "app.kubernetes.io/part-of": "sidemesh"});
    let mut out = vec![json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": NAMESPACE, "labels": {"sidemesh.io/inject": "disabled"}}
    })];
    out.push(serde_json::to_value(Plugin::crd()).unwrap_or_default());
    out.push(serde_json::to_value(MeshConfig::crd()).unwrap_or_default());
    out.push(json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "sidemesh-controller", "namespace": NAMESPACE, "labels": labels}
    }));
    // Least privilege: read what the index needs, write only sidemesh objects' status and
    // (for the opt-in numeric targetPort rewrite) patch Services.
    out.push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": "sidemesh-controller", "labels": labels},
        "rules": [
            {"apiGroups": [""], "resources": ["services", "pods", "namespaces"],
             "verbs": ["get", "list", "watch"]},
            // Only for Services that opt in to numeric targetPort rewriting.
            {"apiGroups": [""], "resources": ["services"], "verbs": ["patch"]},
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
             "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["sidemesh.io"], "resources": ["plugins", "meshconfigs"],
             "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["sidemesh.io"], "resources": ["plugins/status", "meshconfigs/status"],
             "verbs": ["get", "patch", "update"]}
        ]
    }));
    out.push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": "sidemesh-controller", "labels": labels},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "sidemesh-controller"},
        "subjects": [{"kind": "ServiceAccount", "name": "sidemesh-controller", "namespace": NAMESPACE}]
    }));
    // Leader election: one Lease in sidemesh's own namespace. `create` cannot be limited by
    // name (the object does not exist yet); reading and renewing are limited to that Lease.
    out.push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "sidemesh-controller-lease", "namespace": NAMESPACE, "labels": labels},
        "rules": [
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
             "verbs": ["create"]},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
             "resourceNames": [LEASE_NAME], "verbs": ["get", "update"]}
        ]
    }));
    out.push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "sidemesh-controller-lease", "namespace": NAMESPACE, "labels": labels},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "sidemesh-controller-lease"},
        "subjects": [{"kind": "ServiceAccount", "name": "sidemesh-controller", "namespace": NAMESPACE}]
    }));
    let dns = webhook_dns_names();
    let mut webhook_meta = json!({"name": "sidemesh-injector", "labels": labels});
    let mut client_config = json!({
        "service": {"name": WEBHOOK_SERVICE, "namespace": NAMESPACE, "path": WEBHOOK_PATH, "port": 443}
    });
    if opts.cert_manager {
        out.push(json!({
            "apiVersion": "cert-manager.io/v1", "kind": "Issuer",
            "metadata": {"name": "sidemesh-selfsigned", "namespace": NAMESPACE},
            "spec": {"selfSigned": {}}
        }));
        out.push(json!({
            "apiVersion": "cert-manager.io/v1", "kind": "Certificate",
            "metadata": {"name": "sidemesh-webhook", "namespace": NAMESPACE},
            "spec": {"secretName": "sidemesh-webhook-tls", "dnsNames": dns,
                     "issuerRef": {"name": "sidemesh-selfsigned", "kind": "Issuer"}}
        }));
        webhook_meta["annotations"] =
            json!({"cert-manager.io/inject-ca-from": format!("{NAMESPACE}/sidemesh-webhook")});
    } else if let Some(c) = certs {
        out.push(json!({
            "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": "sidemesh-webhook-tls", "namespace": NAMESPACE, "labels": labels},
            "stringData": {"tls.crt": c.cert_pem, "tls.key": c.key_pem, "ca.crt": c.ca_pem}
        }));
        client_config["caBundle"] = json!(base64(c.ca_pem.as_bytes()));
    }
    out.push(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "sidemesh-controller", "namespace": NAMESPACE, "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app.kubernetes.io/name": "sidemesh-controller"}},
            "template": {
                "metadata": {"labels": labels,
                             "annotations": {"prometheus.io/scrape": "true",
                                             "prometheus.io/port": ADMIN_PORT.to_string(),
                                             "prometheus.io/path": "/metrics"}},
                "spec": {
                    "serviceAccountName": "sidemesh-controller",
                    "securityContext": {"runAsNonRoot": true, "runAsUser": 65532,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{
                        "name": "controller",
                        "image": opts.image,
                        "args": ["controller"],
                        "env": [
                            {"name": "SIDEMESH_WEBHOOK_LISTEN", "value": format!("0.0.0.0:{WEBHOOK_PORT}")},
                            {"name": "SIDEMESH_DISCOVER_LISTEN", "value": format!("0.0.0.0:{DISCOVER_PORT}")},
                            {"name": "SIDEMESH_ADMIN_LISTEN", "value": format!("0.0.0.0:{ADMIN_PORT}")},
                            {"name": "SIDEMESH_TLS_CERT", "value": "/var/run/sidemesh/tls/tls.crt"},
                            {"name": "SIDEMESH_TLS_KEY", "value": "/var/run/sidemesh/tls/tls.key"},
                            {"name": "SIDEMESH_PROXY_IMAGE", "value": opts.image},
                            {"name": "SIDEMESH_DISCOVER_BASE",
                             "value": format!("http://{DISCOVER_SERVICE}.{NAMESPACE}.svc:{DISCOVER_PORT}")},
                            {"name": "SIDEMESH_LOG_FORMAT", "value": "json"},
                            {"name": "SIDEMESH_LEASE", "value": format!("{NAMESPACE}/{LEASE_NAME}")},
                            {"name": "SIDEMESH_POD_NAME",
                             "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
                        ],
                        "ports": [
                            {"name": "webhook", "containerPort": WEBHOOK_PORT},
                            {"name": "http-discover", "containerPort": DISCOVER_PORT},
                            {"name": "admin", "containerPort": ADMIN_PORT}
                        ],
                        "readinessProbe": {"httpGet": {"path": "/ready", "port": "admin"}, "periodSeconds": 5},
                        "livenessProbe": {"httpGet": {"path": "/live", "port": "admin"}, "periodSeconds": 10},
                        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                                      "limits": {"memory": "512Mi"}},
                        "securityContext": {"allowPrivilegeEscalation": false,
                                            "readOnlyRootFilesystem": true,
                                            "capabilities": {"drop": ["ALL"]}},
                        "volumeMounts": [{"name": "tls", "mountPath": "/var/run/sidemesh/tls", "readOnly": true}]
                    }],
                    "volumes": [{"name": "tls", "secret": {"secretName": "sidemesh-webhook-tls"}}]
                }
            }
        }
    }));
    let selector = json!({"app.kubernetes.io/name": "sidemesh-controller"});
    out.push(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": DISCOVER_SERVICE, "namespace": NAMESPACE, "labels": labels},
        "spec": {"selector": selector,
                 "ports": [{"name": "http-discover", "port": DISCOVER_PORT, "targetPort": "http-discover", "appProtocol": "http"}]}
    }));
    out.push(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": WEBHOOK_SERVICE, "namespace": NAMESPACE, "labels": labels},
        "spec": {"selector": selector,
                 "ports": [{"name": "https-webhook", "port": 443, "targetPort": "webhook"}]}
    }));
    out.push(json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": webhook_meta,
        "webhooks": [{
            "name": "inject.sidemesh.io",
            "clientConfig": client_config,
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                       "resources": ["pods"], "scope": "Namespaced"}],
            // Every namespace but the system's and sidemesh's own: pods opt in by annotation
            // too, so the webhook cannot select on the namespace label alone.
            "namespaceSelector": {"matchExpressions": [
                {"key": "kubernetes.io/metadata.name", "operator": "NotIn",
                 "values": ["kube-system", "kube-node-lease", "kube-public", NAMESPACE]},
                {"key": "sidemesh.io/inject", "operator": "NotIn", "values": ["disabled"]}
            ]},
            // Ignore: if the controller is down, pods start without the mesh rather than not
            // at all. Injection errors are still denials (see docs/controller.md).
            "failurePolicy": "Ignore",
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "timeoutSeconds": 10,
            "reinvocationPolicy": "IfNeeded"
        }]
    }));
    out
}

/// The image `install` uses by default: this build's version.
pub fn default_image() -> String {
    format!("ghcr.io/sidemesh/sidemesh:{}", env!("CARGO_PKG_VERSION"))
}

/// Renders manifests as one multi-document YAML stream.
pub fn to_yaml(docs: &[Value]) -> String {
    let mut s = String::from("# sidemesh install manifests, printed by `sidemesh install`.\n");
    for d in docs {
        s.push_str("---\n");
        s.push_str(&serde_norway::to_string(d).unwrap_or_default());
    }
    s
}

/// Standard base64 with padding (RFC 4648 section 4), as Kubernetes carries `[]byte` in JSON.
pub(crate) fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::{Namespace, Secret, Service, ServiceAccount};
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use serde::Deserialize;

    fn opts(cert_manager: bool) -> InstallOptions {
        InstallOptions {
            image: "ghcr.io/sidemesh/sidemesh:test".into(),
            cert_manager,
        }
    }

    /// Parses every printed document into its typed Kubernetes object (strictly: unknown
    /// fields are an error) and returns the kinds.
    fn parse_all(yaml: &str) -> Vec<String> {
        let mut kinds = Vec::new();
        for de in serde_norway::Deserializer::from_str(yaml) {
            let v = Value::deserialize(de).unwrap();
            if v.is_null() {
                continue;
            }
            let kind = v["kind"].as_str().unwrap().to_owned();
            fn strict<T: serde::de::DeserializeOwned + serde::Serialize>(v: &Value) {
                let t: T = serde_json::from_value(v.clone()).unwrap();
                // Round-tripping through the typed object loses nothing: no unknown fields.
                let mut back = serde_json::to_value(&t).unwrap();
                let mut orig = v.clone();
                if let Some(s) = orig.get_mut("stringData") {
                    // Secret's stringData is write-only in the typed object too.
                    back["stringData"] = s.clone();
                }
                normalize(&mut orig);
                normalize(&mut back);
                assert_eq!(orig, back, "{}", v["kind"]);
            }
            match kind.as_str() {
                "Namespace" => strict::<Namespace>(&v),
                "CustomResourceDefinition" => strict::<CustomResourceDefinition>(&v),
                "ServiceAccount" => strict::<ServiceAccount>(&v),
                "ClusterRole" => strict::<ClusterRole>(&v),
                "ClusterRoleBinding" => strict::<ClusterRoleBinding>(&v),
                "Role" => strict::<Role>(&v),
                "RoleBinding" => strict::<RoleBinding>(&v),
                "Secret" => strict::<Secret>(&v),
                "Deployment" => strict::<Deployment>(&v),
                "Service" => strict::<Service>(&v),
                "MutatingWebhookConfiguration" => strict::<MutatingWebhookConfiguration>(&v),
                "Issuer" | "Certificate" => assert_eq!(v["apiVersion"], "cert-manager.io/v1"),
                other => panic!("unexpected kind {other}"),
            }
            kinds.push(kind);
        }
        kinds
    }

    /// Numbers that k8s-openapi turns into IntOrString and back compare equal as JSON.
    fn normalize(v: &mut Value) {
        match v {
            Value::Object(m) => {
                m.retain(|_, x| !x.is_null());
                m.values_mut().for_each(normalize);
            }
            Value::Array(a) => a.iter_mut().for_each(normalize),
            _ => {}
        }
    }

    #[test]
    fn printed_manifests_parse_as_kubernetes_objects() {
        let certs = generate_certs(&webhook_dns_names()).unwrap();
        let yaml = to_yaml(&manifests(&opts(false), Some(&certs)));
        let kinds = parse_all(&yaml);
        assert_eq!(
            kinds,
            [
                "Namespace",
                "CustomResourceDefinition",
                "CustomResourceDefinition",
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "Role",
                "RoleBinding",
                "Secret",
                "Deployment",
                "Service",
                "Service",
                "MutatingWebhookConfiguration"
            ]
        );
        let kinds = parse_all(&to_yaml(&manifests(&opts(true), None)));
        assert!(kinds.contains(&"Certificate".to_owned()) && !kinds.contains(&"Secret".to_owned()));
    }

    #[test]
    fn crds_match_the_rust_types() {
        let docs = manifests(&opts(true), None);
        let crds: Vec<CustomResourceDefinition> = docs
            .iter()
            .filter(|d| d["kind"] == "CustomResourceDefinition")
            .map(|d| serde_json::from_value(d.clone()).unwrap())
            .collect();
        assert_eq!(crds, [Plugin::crd(), MeshConfig::crd()]);
        // And the committed deploy/ copy is what `install --cert-manager` prints.
        let committed = include_str!("../../deploy/sidemesh.yaml");
        let printed = to_yaml(&manifests(
            &InstallOptions {
                image: default_image(),
                cert_manager: true,
            },
            None,
        ));
        assert_eq!(
            committed, printed,
            "regenerate deploy/ with `sidemesh install --cert-manager > deploy/sidemesh.yaml`"
        );
    }

    #[test]
    fn rbac_writes_only_status_and_service_patches() {
        let docs = manifests(&opts(true), None);
        let role: ClusterRole = serde_json::from_value(
            docs.iter()
                .find(|d| d["kind"] == "ClusterRole")
                .unwrap()
                .clone(),
        )
        .unwrap();
        for rule in role.rules.unwrap() {
            let writes = rule
                .verbs
                .iter()
                .any(|v| !["get", "list", "watch"].contains(&v.as_str()));
            if writes {
                let resources = rule.resources.unwrap();
                // Status subresources, and `patch` on Services (the opt-in targetPort
                // rewrite); nothing else, no create or delete anywhere.
                let status = resources.iter().all(|r| r.ends_with("/status"));
                let services = resources == ["services"] && rule.verbs == ["patch"];
                assert!(status || services, "{resources:?} {:?}", rule.verbs);
            }
        }
    }

    #[test]
    fn lease_rbac_is_one_namespace_and_one_lease() {
        let docs = manifests(&opts(true), None);
        let role: Role =
            serde_json::from_value(docs.iter().find(|d| d["kind"] == "Role").unwrap().clone())
                .unwrap();
        assert_eq!(role.metadata.namespace.as_deref(), Some(NAMESPACE));
        for rule in role.rules.unwrap() {
            assert_eq!(rule.resources.unwrap(), ["leases"]);
            let names = rule.resource_names.unwrap_or_default();
            for verb in &rule.verbs {
                match verb.as_str() {
                    // Cannot be limited by name; the only verb that is not.
                    "create" => assert!(names.is_empty()),
                    "get" | "update" => assert_eq!(names, [LEASE_NAME]),
                    other => panic!("unexpected verb {other}"),
                }
            }
        }
        let deploy = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
        let env = deploy["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .unwrap();
        assert!(env.iter().any(|e| e["name"] == "SIDEMESH_POD_NAME"
            && e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"));
    }

    #[test]
    fn generated_ca_bundle_is_the_ca() {
        let certs = generate_certs(&webhook_dns_names()).unwrap();
        let docs = manifests(&opts(false), Some(&certs));
        let hook = docs
            .iter()
            .find(|d| d["kind"] == "MutatingWebhookConfiguration")
            .unwrap();
        let typed: MutatingWebhookConfiguration = serde_json::from_value(hook.clone()).unwrap();
        let bundle = typed.webhooks.unwrap()[0]
            .client_config
            .ca_bundle
            .clone()
            .unwrap();
        assert_eq!(bundle.0, certs.ca_pem.as_bytes());
    }

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }
}
