//! Kubernetes plumbing both controllers share: the name Baker writes under, its Event recorder,
//! status writes by server-side apply, and `Api`s scoped to a namespace or the whole cluster.

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::error::{Category, ReconcileError};

/// The field manager of every write Baker makes.
pub const FIELD_MANAGER: &str = "baker";

/// The Events API refuses notes over 1 KiB.
const MAX_NOTE: usize = 1000;

/// The Event recorder of the process: controller `baker`, instance the pod's name, so Events say
/// which replica acted.
pub fn recorder(client: &Client) -> Recorder {
    let reporter = Reporter {
        controller: "baker".into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    Recorder::new(client.clone(), reporter)
}

/// Now, as Kubernetes writes times.
pub fn now() -> Time {
    Time(jiff::Timestamp::now())
}

/// Cuts text to at most `max` bytes on a char boundary, marking the cut.
pub fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let marker = "…";
    let mut end = max.saturating_sub(marker.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{marker}", &text[..end])
}

/// An `Api` for one namespace, or for every namespace when `namespace` is `None` (an operator
/// watching the whole cluster).
pub fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// The `Api` of the namespace `obj` lives in.
pub fn api_of<K>(client: &Client, obj: &K) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
{
    Api::namespaced(client.clone(), &obj.namespace().unwrap_or_default())
}

/// Why a status write did not land.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The name now belongs to another object (deleted and recreated meanwhile): not a failure,
    /// the next reconcile sees the new one.
    #[error("the object was replaced by another of the same name")]
    Replaced,
    #[error("the API server refused the write")]
    Api(#[source] kube::Error),
}

impl WriteError {
    /// A write refused because the object of that name is another incarnation (its UID is not
    /// the one in the patch).
    pub fn from_kube(e: kube::Error) -> Self {
        match e {
            kube::Error::Api(s) if (s.code == 422 || s.code == 409) && s.message.contains("metadata.uid") => {
                WriteError::Replaced
            }
            e => WriteError::Api(e),
        }
    }
}

/// Writes `status` onto `obj` by server-side apply under [`FIELD_MANAGER`], with the object's UID
/// as a precondition: a status meant for one object never lands on a successor of the same name.
pub async fn apply_status<K, S>(client: &Client, obj: &K, status: &S) -> Result<(), WriteError>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
    S: Serialize,
{
    let patch = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": { "uid": obj.uid() },
        "status": status,
    });
    api_of(client, obj)
        .patch_status(
            &obj.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map(|_| ())
        .map_err(WriteError::from_kube)
}

/// [`apply_status`] only when `next` differs from `previous`; `true` when it wrote.
pub async fn apply_status_if_changed<K, S>(
    client: &Client,
    obj: &K,
    previous: Option<&S>,
    next: &S,
) -> Result<bool, WriteError>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
    S: Serialize + PartialEq,
{
    if previous == Some(next) {
        return Ok(false);
    }
    apply_status(client, obj, next).await?;
    Ok(true)
}

/// Runs one reconcile of `controller`, counting it, its duration and its error's category (a
/// stale cache is not counted as an error: the reconcile runs again on the newer copy).
pub async fn measured<E: ReconcileError>(
    metrics: &crate::metrics::Metrics,
    controller: &'static str,
    reconcile: impl Future<Output = Result<Action, E>>,
) -> Result<Action, E> {
    let started = std::time::Instant::now();
    let result = reconcile.await;
    let category = result
        .as_ref()
        .err()
        .filter(|e| !e.is_conflict())
        .map(|e| e.category());
    metrics.reconciled(controller, started.elapsed().as_secs_f64(), category);
    result
}

/// When a failed reconcile runs again: a stale cache at once (the newer copy's event is on its
/// way), an object that cannot be acted on as it is only when it changes, anything else after a
/// pause. Logged here, once for both controllers; the metrics count it where the reconcile ends.
pub fn retry_after(error: &impl ReconcileError) -> Action {
    let category = error.category();
    if error.is_conflict() {
        tracing::debug!(error = %crate::error::chain(error), "stale cache");
        return Action::requeue(Duration::from_secs(1));
    }
    tracing::warn!(category = category.as_str(), error = %crate::error::chain(error), "reconcile failed");
    match category {
        Category::InvalidObject => Action::await_change(),
        Category::KubeRead | Category::KubeWrite | Category::Ec2 => Action::requeue(Duration::from_secs(15)),
    }
}

/// [`publish`] about one of Baker's objects.
pub async fn publish_about<K: Resource<DynamicType = ()>>(
    recorder: &Recorder,
    obj: &K,
    type_: EventType,
    reason: &str,
    action: &str,
    note: &str,
) {
    publish(recorder, &obj.object_ref(&()), type_, reason, action, note).await;
}

/// Publishes an Event about `regarding`, best effort: a failure to record one is logged and must
/// never fail the reconcile. kube's recorder folds Events with equal reason and action into one
/// series (keeping the first note), so callers that need one Event per thing put it in `action`.
pub async fn publish(
    recorder: &Recorder,
    regarding: &ObjectReference,
    type_: EventType,
    reason: &str,
    action: &str,
    note: &str,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(truncate(note, MAX_NOTE)),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, regarding).await {
        tracing::warn!(error = %e, "could not publish event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_cuts_on_a_char_boundary_and_marks_the_cut() {
        let s = "ééééé";
        let cut = truncate(s, 7);
        assert!(cut.len() <= 7, "{cut}");
        assert!(cut.ends_with('…'));
        assert_eq!(truncate("short", 10), "short");
    }

    #[test]
    fn a_uid_precondition_failure_is_a_replaced_object_and_other_refusals_are_api_errors() {
        let status = |code, message: &str| {
            kube::Error::Api(
                kube::core::Status::failure(message, "Conflict")
                    .with_code(code)
                    .boxed(),
            )
        };
        assert!(matches!(
            WriteError::from_kube(status(
                409,
                "Precondition failed: UID in precondition: x, UID in object meta: y; metadata.uid"
            )),
            WriteError::Replaced
        ));
        assert!(matches!(
            WriteError::from_kube(status(409, "the object has been modified")),
            WriteError::Api(_)
        ));
    }
}
