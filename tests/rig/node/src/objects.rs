//! Reading the ConfigMaps, Secrets and service account tokens a pod uses.

use std::collections::BTreeMap;

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Secret, ServiceAccount};
use kube::api::PostParams;
use kube::{Api, Client};

use crate::envvars::{EnvSources, referenced_objects};

/// A ConfigMap's `data` and `binaryData` as bytes; `None` if it does not
/// exist.
pub async fn configmap_bytes(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Option<BTreeMap<String, Vec<u8>>>, kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    Ok(api.get_opt(name).await?.map(|cm| {
        let mut out: BTreeMap<String, Vec<u8>> = cm
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.into_bytes()))
            .collect();
        for (k, v) in cm.binary_data.unwrap_or_default() {
            out.insert(k, v.0);
        }
        out
    }))
}

/// A Secret's `data`; `None` if it does not exist.
pub async fn secret_bytes(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Option<BTreeMap<String, Vec<u8>>>, kube::Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    Ok(api.get_opt(name).await?.map(|s| {
        s.data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect()
    }))
}

/// Fetches every ConfigMap and Secret the containers' environments use.
pub async fn env_sources(
    client: &Client,
    namespace: &str,
    containers: &[Container],
) -> Result<EnvSources, kube::Error> {
    let mut sources = EnvSources::default();
    for c in containers {
        let (cms, secrets) = referenced_objects(c);
        for name in cms {
            if sources.configmaps.contains_key(&name) {
                continue;
            }
            let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
            // Only `data` feeds environment variables, as in kubelet.
            if let Some(cm) = api.get_opt(&name).await? {
                sources.configmaps.insert(name, cm.data.unwrap_or_default());
            }
        }
        for name in secrets {
            if sources.secrets.contains_key(&name) {
                continue;
            }
            if let Some(data) = secret_bytes(client, namespace, &name).await? {
                sources.secrets.insert(name, data);
            }
        }
    }
    Ok(sources)
}

/// Requests a service account token bound to the pod, as kubelet does for a
/// `serviceAccountToken` projection.
pub async fn service_account_token(
    client: &Client,
    namespace: &str,
    service_account: &str,
    pod_name: &str,
    pod_uid: &str,
    audience: Option<&str>,
    expiration_seconds: Option<i64>,
) -> Result<String, kube::Error> {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: audience.filter(|a| !a.is_empty()).map(|a| vec![a.to_string()]),
            expiration_seconds: Some(expiration_seconds.unwrap_or(3600)),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod_name.into()),
                uid: Some(pod_uid.into()),
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let response = api
        .create_token_request(service_account, &PostParams::default(), &request)
        .await?;
    Ok(response.status.and_then(|s| s.token).unwrap_or_default())
}
