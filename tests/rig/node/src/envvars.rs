//! Container environment resolution, following kubelet's
//! `makeEnvironmentVariables`: `envFrom` first, then `env` in order (with
//! `$(VAR)` expansion of literal values against what came before), then the
//! `kubernetes` service variables where not already defined.
//!
//! Everything here is pure: the ConfigMaps and Secrets a container refers to
//! are fetched beforehand into [`EnvSources`].

use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::api::core::v1::{Container, Pod};

use crate::expand::expand;

/// The IP the rig reports for every pod and for the node itself.
pub const LOOPBACK_IP: &str = "127.0.0.1";

/// ConfigMaps and Secrets of the pod's namespace, by name. An absent name
/// means the object does not exist.
#[derive(Debug, Default, Clone)]
pub struct EnvSources {
    pub configmaps: HashMap<String, BTreeMap<String, String>>,
    pub secrets: HashMap<String, BTreeMap<String, Vec<u8>>>,
}

/// The pod fields the downward API can expose.
#[derive(Debug, Default, Clone)]
pub struct PodFields {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub node_name: String,
    pub service_account_name: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

impl PodFields {
    pub fn from_pod(pod: &Pod) -> Self {
        let spec = pod.spec.as_ref();
        Self {
            name: pod.metadata.name.clone().unwrap_or_default(),
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            node_name: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
            service_account_name: spec
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_default(),
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            annotations: pod.metadata.annotations.clone().unwrap_or_default(),
        }
    }
}

/// Why a container's environment cannot be built (yet). Kubelet reports these
/// as `CreateContainerConfigError` and retries, since the missing object may
/// appear later.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    #[error("configmap \"{0}\" not found")]
    ConfigMapNotFound(String),
    #[error("couldn't find key {key} in ConfigMap {namespace}/{name}")]
    ConfigMapKeyNotFound {
        namespace: String,
        name: String,
        key: String,
    },
    #[error("secret \"{0}\" not found")]
    SecretNotFound(String),
    #[error("couldn't find key {key} in Secret {namespace}/{name}")]
    SecretKeyNotFound {
        namespace: String,
        name: String,
        key: String,
    },
    #[error("unsupported fieldPath: {0}")]
    UnsupportedFieldPath(String),
}

/// A resolved environment, in definition order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ResolvedEnv {
    pub vars: Vec<(String, String)>,
    /// Fields of the spec that were ignored, for `Unsupported` events.
    pub unsupported: Vec<String>,
    /// `envFrom` keys skipped because they are not valid variable names.
    pub invalid_keys: Vec<String>,
}

impl ResolvedEnv {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// Sets `name`, keeping the position of an earlier definition.
    fn set(&mut self, name: String, value: String) {
        match self.vars.iter_mut().find(|(k, _)| *k == name) {
            Some(slot) => slot.1 = value,
            None => self.vars.push((name, value)),
        }
    }
}

/// Relaxed environment variable name rule (GA since Kubernetes 1.34): any
/// printable ASCII except `=`.
pub fn is_env_var_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| (0x20..=0x7e).contains(&b) && b != b'=')
}

/// ConfigMap and Secret names the container's environment refers to.
pub fn referenced_objects(container: &Container) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut configmaps = BTreeSet::new();
    let mut secrets = BTreeSet::new();
    for from in container.env_from.iter().flatten() {
        if let Some(cm) = &from.config_map_ref {
            configmaps.insert(cm.name.clone());
        }
        if let Some(s) = &from.secret_ref {
            secrets.insert(s.name.clone());
        }
    }
    for var in container.env.iter().flatten() {
        let Some(src) = &var.value_from else { continue };
        if let Some(r) = &src.config_map_key_ref {
            configmaps.insert(r.name.clone());
        }
        if let Some(r) = &src.secret_key_ref {
            secrets.insert(r.name.clone());
        }
    }
    (configmaps, secrets)
}

/// Value of a downward API `fieldPath` usable in `env`.
pub fn field_value(pod: &PodFields, path: &str) -> Result<String, EnvError> {
    if let Some(key) = subscript(path, "metadata.labels") {
        return Ok(pod.labels.get(key).cloned().unwrap_or_default());
    }
    if let Some(key) = subscript(path, "metadata.annotations") {
        return Ok(pod.annotations.get(key).cloned().unwrap_or_default());
    }
    Ok(match path {
        "metadata.name" => pod.name.clone(),
        "metadata.namespace" => pod.namespace.clone(),
        "metadata.uid" => pod.uid.clone(),
        "spec.nodeName" => pod.node_name.clone(),
        "spec.serviceAccountName" => pod.service_account_name.clone(),
        "status.podIP" | "status.podIPs" | "status.hostIP" | "status.hostIPs" => LOOPBACK_IP.to_string(),
        other => return Err(EnvError::UnsupportedFieldPath(other.to_string())),
    })
}

/// Parses `prefix['key']` (or `prefix["key"]`) and returns `key`.
fn subscript<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    let inner = path.strip_prefix(prefix)?.strip_prefix('[')?.strip_suffix(']')?;
    inner
        .strip_prefix('\'')
        .and_then(|s| s.strip_suffix('\''))
        .or_else(|| inner.strip_prefix('"').and_then(|s| s.strip_suffix('"')))
}

/// Builds the container's environment as kubelet would.
pub fn resolve(
    container: &Container,
    pod: &PodFields,
    sources: &EnvSources,
    service_env: &[(String, String)],
) -> Result<ResolvedEnv, EnvError> {
    let mut env = ResolvedEnv::default();

    for (i, from) in container.env_from.iter().flatten().enumerate() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let add = |env: &mut ResolvedEnv, key: &str, value: String| {
            let name = format!("{prefix}{key}");
            if is_env_var_name(&name) {
                env.set(name, value);
            } else {
                env.invalid_keys.push(name);
            }
        };
        if let Some(cm_ref) = &from.config_map_ref {
            match sources.configmaps.get(&cm_ref.name) {
                Some(data) => {
                    for (k, v) in data {
                        add(&mut env, k, v.clone());
                    }
                }
                None if cm_ref.optional.unwrap_or(false) => {}
                None => return Err(EnvError::ConfigMapNotFound(cm_ref.name.clone())),
            }
        } else if let Some(s_ref) = &from.secret_ref {
            match sources.secrets.get(&s_ref.name) {
                Some(data) => {
                    for (k, v) in data {
                        add(&mut env, k, String::from_utf8_lossy(v).into_owned());
                    }
                }
                None if s_ref.optional.unwrap_or(false) => {}
                None => return Err(EnvError::SecretNotFound(s_ref.name.clone())),
            }
        } else {
            env.unsupported.push(format!("envFrom[{i}]"));
        }
    }

    for var in container.env.iter().flatten() {
        let value = if let Some(src) = &var.value_from {
            if let Some(r) = &src.config_map_key_ref {
                let optional = r.optional.unwrap_or(false);
                match sources.configmaps.get(&r.name) {
                    Some(data) => match data.get(&r.key) {
                        Some(v) => v.clone(),
                        None if optional => continue,
                        None => {
                            return Err(EnvError::ConfigMapKeyNotFound {
                                namespace: pod.namespace.clone(),
                                name: r.name.clone(),
                                key: r.key.clone(),
                            });
                        }
                    },
                    None if optional => continue,
                    None => return Err(EnvError::ConfigMapNotFound(r.name.clone())),
                }
            } else if let Some(r) = &src.secret_key_ref {
                let optional = r.optional.unwrap_or(false);
                match sources.secrets.get(&r.name) {
                    Some(data) => match data.get(&r.key) {
                        Some(v) => String::from_utf8_lossy(v).into_owned(),
                        None if optional => continue,
                        None => {
                            return Err(EnvError::SecretKeyNotFound {
                                namespace: pod.namespace.clone(),
                                name: r.name.clone(),
                                key: r.key.clone(),
                            });
                        }
                    },
                    None if optional => continue,
                    None => return Err(EnvError::SecretNotFound(r.name.clone())),
                }
            } else if let Some(r) = &src.field_ref {
                field_value(pod, &r.field_path)?
            } else if src.resource_field_ref.is_some() {
                env.unsupported
                    .push(format!("env[{}].valueFrom.resourceFieldRef", var.name));
                continue;
            } else if src.file_key_ref.is_some() {
                env.unsupported
                    .push(format!("env[{}].valueFrom.fileKeyRef", var.name));
                continue;
            } else {
                env.unsupported.push(format!("env[{}].valueFrom", var.name));
                continue;
            }
        } else {
            let raw = var.value.as_deref().unwrap_or_default();
            expand(raw, |name| {
                env.get(name).or_else(|| {
                    service_env
                        .iter()
                        .find(|(k, _)| k == name)
                        .map(|(_, v)| v.as_str())
                })
            })
        };
        env.set(var.name.clone(), value);
    }

    for (k, v) in service_env {
        if env.get(k).is_none() {
            env.vars.push((k.clone(), v.clone()));
        }
    }
    Ok(env)
}

/// The `kubernetes` service variables every container gets, pointing at the
/// rig's apiserver (the real ClusterIP is unroutable without kube-proxy).
pub fn kubernetes_service_env(host: &str, port: u16) -> Vec<(String, String)> {
    let addr = format!("tcp://{host}:{port}");
    vec![
        ("KUBERNETES_SERVICE_HOST".into(), host.into()),
        ("KUBERNETES_SERVICE_PORT".into(), port.to_string()),
        ("KUBERNETES_SERVICE_PORT_HTTPS".into(), port.to_string()),
        ("KUBERNETES_PORT".into(), addr.clone()),
        (format!("KUBERNETES_PORT_{port}_TCP"), addr),
        (format!("KUBERNETES_PORT_{port}_TCP_PROTO"), "tcp".into()),
        (format!("KUBERNETES_PORT_{port}_TCP_PORT"), port.to_string()),
        (format!("KUBERNETES_PORT_{port}_TCP_ADDR"), host.into()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ConfigMapEnvSource, ConfigMapKeySelector, EnvFromSource, EnvVar, EnvVarSource, ObjectFieldSelector,
        SecretEnvSource, SecretKeySelector,
    };

    fn lit(name: &str, value: &str) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: Some(value.into()),
            ..Default::default()
        }
    }

    fn from(name: &str, src: EnvVarSource) -> EnvVar {
        EnvVar {
            name: name.into(),
            value_from: Some(src),
            ..Default::default()
        }
    }

    fn cm_key(name: &str, key: &str, optional: Option<bool>) -> EnvVarSource {
        EnvVarSource {
            config_map_key_ref: Some(ConfigMapKeySelector {
                name: name.into(),
                key: key.into(),
                optional,
            }),
            ..Default::default()
        }
    }

    fn secret_key(name: &str, key: &str, optional: Option<bool>) -> EnvVarSource {
        EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: name.into(),
                key: key.into(),
                optional,
            }),
            ..Default::default()
        }
    }

    fn field(path: &str) -> EnvVarSource {
        EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                api_version: None,
            }),
            ..Default::default()
        }
    }

    fn sources() -> EnvSources {
        let mut s = EnvSources::default();
        s.configmaps.insert(
            "cfg".into(),
            [
                ("region".to_string(), "eu-west-1".to_string()),
                ("bad=key".into(), "x".into()),
            ]
            .into_iter()
            .collect(),
        );
        s.secrets.insert(
            "creds".into(),
            [
                ("AWS_ACCESS_KEY_ID".to_string(), b"AKIA".to_vec()),
                ("AWS_SECRET_ACCESS_KEY".to_string(), b"s3cr3t".to_vec()),
            ]
            .into_iter()
            .collect(),
        );
        s
    }

    fn pod() -> PodFields {
        PodFields {
            name: "p".into(),
            namespace: "ns".into(),
            uid: "u-1".into(),
            node_name: "rig".into(),
            service_account_name: "sa".into(),
            labels: [("app".to_string(), "baker".to_string())].into_iter().collect(),
            annotations: BTreeMap::new(),
        }
    }

    fn container(env: Vec<EnvVar>, env_from: Vec<EnvFromSource>) -> Container {
        Container {
            name: "c".into(),
            env: Some(env),
            env_from: Some(env_from),
            ..Default::default()
        }
    }

    #[test]
    fn literal_values_expand_against_earlier_entries_only() {
        let c = container(
            vec![
                lit("A", "a"),
                lit("B", "$(A)-b"),
                lit("C", "$(D)"),
                lit("D", "d"),
                lit("E", "$$(A)"),
            ],
            vec![],
        );
        let env = resolve(&c, &pod(), &sources(), &[]).unwrap();
        assert_eq!(env.get("B"), Some("a-b"));
        assert_eq!(env.get("C"), Some("$(D)"));
        assert_eq!(env.get("E"), Some("$(A)"));
    }

    #[test]
    fn value_from_sources() {
        let c = container(
            vec![
                from("REGION", cm_key("cfg", "region", None)),
                from("KEY", secret_key("creds", "AWS_ACCESS_KEY_ID", None)),
                from("OPT", secret_key("missing", "x", Some(true))),
                from("OPT_KEY", cm_key("cfg", "nope", Some(true))),
                from("POD", field("metadata.name")),
                from("NS", field("metadata.namespace")),
                from("UID", field("metadata.uid")),
                from("NODE", field("spec.nodeName")),
                from("SA", field("spec.serviceAccountName")),
                from("IP", field("status.podIP")),
                from("HOST", field("status.hostIP")),
                from("APP", field("metadata.labels['app']")),
                from("NOANN", field("metadata.annotations['x']")),
                lit("DERIVED", "$(REGION)/$(POD)"),
            ],
            vec![],
        );
        let env = resolve(&c, &pod(), &sources(), &[]).unwrap();
        assert_eq!(env.get("REGION"), Some("eu-west-1"));
        assert_eq!(env.get("KEY"), Some("AKIA"));
        assert_eq!(env.get("OPT"), None);
        assert_eq!(env.get("OPT_KEY"), None);
        assert_eq!(env.get("POD"), Some("p"));
        assert_eq!(env.get("NS"), Some("ns"));
        assert_eq!(env.get("UID"), Some("u-1"));
        assert_eq!(env.get("NODE"), Some("rig"));
        assert_eq!(env.get("SA"), Some("sa"));
        assert_eq!(env.get("IP"), Some(LOOPBACK_IP));
        assert_eq!(env.get("HOST"), Some(LOOPBACK_IP));
        assert_eq!(env.get("APP"), Some("baker"));
        assert_eq!(env.get("NOANN"), Some(""));
        assert_eq!(env.get("DERIVED"), Some("eu-west-1/p"));
    }

    #[test]
    fn missing_required_references_fail() {
        let cases = [
            (
                cm_key("nope", "k", None),
                EnvError::ConfigMapNotFound("nope".into()),
            ),
            (
                cm_key("cfg", "nope", Some(false)),
                EnvError::ConfigMapKeyNotFound {
                    namespace: "ns".into(),
                    name: "cfg".into(),
                    key: "nope".into(),
                },
            ),
            (
                secret_key("nope", "k", None),
                EnvError::SecretNotFound("nope".into()),
            ),
            (
                secret_key("creds", "nope", None),
                EnvError::SecretKeyNotFound {
                    namespace: "ns".into(),
                    name: "creds".into(),
                    key: "nope".into(),
                },
            ),
            (
                field("spec.bogus"),
                EnvError::UnsupportedFieldPath("spec.bogus".into()),
            ),
        ];
        for (src, want) in cases {
            let c = container(vec![from("X", src)], vec![]);
            assert_eq!(resolve(&c, &pod(), &sources(), &[]), Err(want));
        }
    }

    #[test]
    fn env_from_with_prefix_and_override_order() {
        let c = container(
            vec![
                lit("CFG_region", "override"),
                lit("USE", "$(AWS_SECRET_ACCESS_KEY)"),
            ],
            vec![
                EnvFromSource {
                    config_map_ref: Some(ConfigMapEnvSource {
                        name: "cfg".into(),
                        optional: None,
                    }),
                    prefix: Some("CFG_".into()),
                    secret_ref: None,
                },
                EnvFromSource {
                    secret_ref: Some(SecretEnvSource {
                        name: "creds".into(),
                        optional: None,
                    }),
                    ..Default::default()
                },
                EnvFromSource {
                    secret_ref: Some(SecretEnvSource {
                        name: "absent".into(),
                        optional: Some(true),
                    }),
                    ..Default::default()
                },
            ],
        );
        let env = resolve(&c, &pod(), &sources(), &[]).unwrap();
        assert_eq!(env.get("CFG_region"), Some("override"));
        assert_eq!(env.get("AWS_ACCESS_KEY_ID"), Some("AKIA"));
        assert_eq!(env.get("USE"), Some("s3cr3t"));
        assert_eq!(env.invalid_keys, vec!["CFG_bad=key".to_string()]);
        // envFrom entries keep their position when env overrides them.
        assert_eq!(env.vars[0].0, "CFG_region");

        let missing = container(
            vec![],
            vec![EnvFromSource {
                config_map_ref: Some(ConfigMapEnvSource {
                    name: "absent".into(),
                    optional: Some(false),
                }),
                ..Default::default()
            }],
        );
        assert_eq!(
            resolve(&missing, &pod(), &sources(), &[]),
            Err(EnvError::ConfigMapNotFound("absent".into()))
        );
    }

    #[test]
    fn service_env_fills_gaps_and_feeds_expansion() {
        let svc = kubernetes_service_env("127.0.0.1", 6443);
        let c = container(
            vec![
                lit("KUBERNETES_SERVICE_PORT", "1"),
                lit("URL", "https://$(KUBERNETES_SERVICE_HOST)"),
            ],
            vec![],
        );
        let env = resolve(&c, &pod(), &sources(), &svc).unwrap();
        assert_eq!(env.get("KUBERNETES_SERVICE_PORT"), Some("1"));
        assert_eq!(env.get("KUBERNETES_SERVICE_HOST"), Some("127.0.0.1"));
        assert_eq!(env.get("URL"), Some("https://127.0.0.1"));
        assert_eq!(env.get("KUBERNETES_PORT_6443_TCP_PORT"), Some("6443"));
    }

    #[test]
    fn unsupported_sources_are_reported_not_fatal() {
        let c = container(
            vec![from(
                "CPU",
                EnvVarSource {
                    resource_field_ref: Some(Default::default()),
                    ..Default::default()
                },
            )],
            vec![],
        );
        let env = resolve(&c, &pod(), &sources(), &[]).unwrap();
        assert_eq!(env.get("CPU"), None);
        assert_eq!(env.unsupported, vec!["env[CPU].valueFrom.resourceFieldRef"]);
    }

    #[test]
    fn env_var_names() {
        assert!(is_env_var_name("A_b-1.x"));
        assert!(!is_env_var_name(""));
        assert!(!is_env_var_name("A=B"));
        assert!(!is_env_var_name("tab\there"));
    }

    #[test]
    fn referenced_objects_are_collected() {
        let c = container(
            vec![
                from("A", cm_key("cm1", "k", None)),
                from("B", secret_key("s1", "k", None)),
            ],
            vec![EnvFromSource {
                config_map_ref: Some(ConfigMapEnvSource {
                    name: "cm2".into(),
                    optional: None,
                }),
                ..Default::default()
            }],
        );
        let (cms, secrets) = referenced_objects(&c);
        assert_eq!(cms.into_iter().collect::<Vec<_>>(), vec!["cm1", "cm2"]);
        assert_eq!(secrets.into_iter().collect::<Vec<_>>(), vec!["s1"]);
    }
}
