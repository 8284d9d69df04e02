//! core/v1 Events about pods, shaped like kubelet's.

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};

pub const NORMAL: &str = "Normal";
pub const WARNING: &str = "Warning";

/// Creates Events; failures are logged, never fatal (events are best
/// effort in kubelet too).
#[derive(Clone)]
pub struct Recorder {
    client: Client,
    node_name: String,
}

/// `spec.containers{name}`, the fieldPath kubelet uses.
pub fn container_field_path(container: &str) -> String {
    format!("spec.containers{{{container}}}")
}

pub fn build_event(
    pod: &Pod,
    field_path: Option<String>,
    type_: &str,
    reason: &str,
    message: &str,
    node_name: &str,
    now: Timestamp,
) -> Event {
    let pod_name = pod.metadata.name.clone().unwrap_or_default();
    Event {
        metadata: ObjectMeta {
            // client-go's recorder names events `<object>.<hex unix nanos>`.
            name: Some(format!("{pod_name}.{:x}", now.as_nanosecond())),
            namespace: pod.metadata.namespace.clone(),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(pod_name),
            namespace: pod.metadata.namespace.clone(),
            uid: pod.metadata.uid.clone(),
            resource_version: pod.metadata.resource_version.clone(),
            field_path,
        },
        type_: Some(type_.into()),
        reason: Some(reason.into()),
        message: Some(message.into()),
        source: Some(EventSource {
            component: Some("kubelet".into()),
            host: Some(node_name.into()),
        }),
        reporting_component: Some("baker-rig-node".into()),
        reporting_instance: Some(node_name.into()),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        count: Some(1),
        ..Default::default()
    }
}

impl Recorder {
    pub fn new(client: Client, node_name: String) -> Self {
        Self { client, node_name }
    }

    /// Emits an event about `pod` (or one of its containers) in the
    /// background.
    pub fn pod(&self, pod: &Pod, container: Option<&str>, type_: &str, reason: &str, message: &str) {
        let event = build_event(
            pod,
            container.map(container_field_path),
            type_,
            reason,
            message,
            &self.node_name,
            Timestamp::now(),
        );
        let Some(ns) = event.metadata.namespace.clone() else {
            return;
        };
        let api: Api<Event> = Api::namespaced(self.client.clone(), &ns);
        tracing::info!(
            pod = %event.involved_object.name.as_deref().unwrap_or(""),
            namespace = %ns,
            r#type = type_,
            reason,
            message,
            "event"
        );
        tokio::spawn(async move {
            if let Err(e) = api.create(&PostParams::default(), &event).await {
                tracing::warn!(error = %e, reason = ?event.reason, "creating event");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_shape() {
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("ns".into()),
                uid: Some("u".into()),
                resource_version: Some("7".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let now = Timestamp::from_second(1).unwrap();
        let e = build_event(
            &pod,
            Some(container_field_path("c")),
            WARNING,
            "Unsupported",
            "m",
            "rig",
            now,
        );
        assert_eq!(e.metadata.name.as_deref(), Some("p.3b9aca00"));
        assert_eq!(
            e.involved_object.field_path.as_deref(),
            Some("spec.containers{c}")
        );
        assert_eq!(e.involved_object.uid.as_deref(), Some("u"));
        assert_eq!(e.source.unwrap().component.as_deref(), Some("kubelet"));
        assert_eq!(e.reporting_component.as_deref(), Some("baker-rig-node"));
    }
}
