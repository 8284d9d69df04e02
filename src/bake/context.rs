//! What the Bake reconciler and its cleanup share: the controller's state, the Bake being
//! reconciled, and the few writes both make (status, Events, stopping a pod).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::events::{EventType, Recorder};
use kube::runtime::reflector::ObjectRef;
use kube::{Client, Resource, ResourceExt};

use super::error::{Error, Result};
use super::queue::{self, Expectations};
use super::watch::Stores;
use crate::api::{Bake, BakeStatus};
use crate::aws::Ec2;
use crate::config::OperatorConfig;
use crate::http::Health;
use crate::metrics::Metrics;

/// The finalizer that lets a deleted Bake stop its pod and sweep EC2 before it goes.
pub const FINALIZER: &str = "baker.io/cleanup";

/// Shared state of the Bake controller.
pub struct Context {
    pub client: Client,
    pub ec2: Ec2,
    pub config: OperatorConfig,
    pub recorder: Recorder,
    /// The process's caches of Bakes, bake pods, BakeTemplates and AmiCatalogs.
    pub stores: Stores,
    /// Held while deciding whether a Bake may launch and recording that it did.
    pub launch_lock: tokio::sync::Mutex<()>,
    /// Launches and releases this process made that the Bake cache may not show yet.
    pub(super) expectations: Mutex<Expectations>,
    /// Bakes whose pod this process created, and when: until the pod cache shows the pod, a
    /// reconcile need not create it again.
    pub(super) created: Mutex<HashMap<String, Instant>>,
    /// Refusals of a Bake's children by the API server so far, per Bake UID.
    pub(super) rejections: Mutex<HashMap<String, u32>>,
    /// Bakes (by UID) last seen unfinished: only their end frees a slot. A finished Bake listed
    /// again at a relist wakes nothing, so a relist costs one pass over the cache, not one per Bake.
    pub(super) unfinished: Mutex<HashSet<String>>,
    /// One lock per image being distributed, so two Bakes of one image never copy it at once.
    pub(super) distributing: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Bakes to reconcile now, for wake-ups the watch cannot deliver (a deleted Bake's slot).
    wake: futures::channel::mpsc::UnboundedSender<ObjectRef<Bake>>,
    pub(super) woken: Mutex<Option<futures::channel::mpsc::UnboundedReceiver<ObjectRef<Bake>>>>,
    /// Cache readiness, leadership and the process's metrics.
    pub health: Arc<Health>,
}

/// Locks a mutex whose data stays valid even if a holder panicked (plain maps and sets).
pub(super) fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Context {
    pub fn new(
        client: Client,
        ec2: Ec2,
        config: OperatorConfig,
        stores: Stores,
        health: Arc<Health>,
    ) -> Self {
        let recorder = crate::k8s::recorder(&client);
        let (wake, woken) = futures::channel::mpsc::unbounded();
        Self {
            client,
            ec2,
            config,
            recorder,
            stores,
            launch_lock: tokio::sync::Mutex::new(()),
            expectations: Mutex::new(Expectations::default()),
            created: Mutex::new(HashMap::new()),
            rejections: Mutex::new(HashMap::new()),
            unfinished: Mutex::new(HashSet::new()),
            distributing: Mutex::new(HashMap::new()),
            wake,
            woken: Mutex::new(Some(woken)),
            health,
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.health.metrics
    }

    /// The Bakes the launch gate decides against for a Bake with `key`: every unfinished one, and
    /// the finished ones with that key (the only finished ones that matter), from the cache with
    /// this process's own launches and releases laid over it. No API request; a finished Bake of
    /// another key costs one comparison.
    pub(super) fn bake_views(&self, key: &str) -> Vec<queue::BakeView> {
        let cached = self
            .stores
            .bakes
            .state()
            .iter()
            .filter(|b| {
                !b.phase().is_some_and(|p| p.is_terminal())
                    || b.status.as_ref().and_then(|s| s.bake_key.as_deref()) == Some(key)
            })
            .map(|b| queue::BakeView::from_bake(b))
            .collect();
        locked(&self.expectations).overlay(cached)
    }

    /// Reconciles these Bakes soon (they may be able to start now).
    pub(super) fn wake_all(&self, bakes: Vec<Arc<Bake>>) {
        for b in bakes {
            // Fails only once the controller stopped: nothing left to wake.
            let _ = self.wake.unbounded_send(ObjectRef::from_obj(&*b));
        }
    }

    /// Deletes this very pod (its UID as a precondition, so a newer pod of the same name is never
    /// hit) with `grace` seconds to stop; one already gone or replaced is not an error.
    pub(super) async fn delete_pod(&self, pod: &Pod, grace: i64) -> Result<()> {
        let pods: Api<Pod> = crate::k8s::api_of(&self.client, pod);
        let params = kube::api::DeleteParams {
            grace_period_seconds: u32::try_from(grace.max(0)).ok(),
            preconditions: Some(kube::api::Preconditions {
                uid: pod.uid(),
                resource_version: None,
            }),
            ..Default::default()
        };
        match pods.delete(&pod.name_any(), &params).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
            Err(e) => Err(Error::DeletePod(e)),
        }
    }

    /// An Event about the Bake (best effort).
    pub(super) async fn publish(
        &self,
        b: &BakeRef<'_>,
        type_: EventType,
        reason: &str,
        note: impl AsRef<str>,
    ) {
        self.publish_as(b, type_, reason, "Reconcile", note).await;
    }

    /// An Event with its own action: the recorder folds Events of equal reason and action into
    /// one series that keeps the first note, so Events about different things (regions) need
    /// different actions.
    pub(super) async fn publish_as(
        &self,
        b: &BakeRef<'_>,
        type_: EventType,
        reason: &str,
        action: &str,
        note: impl AsRef<str>,
    ) {
        let regarding = b.bake.object_ref(&());
        crate::k8s::publish(&self.recorder, &regarding, type_, reason, action, note.as_ref()).await;
    }

    /// Writes the Bake's status (the UID is a precondition: a Bake deleted and recreated under
    /// the same name while this reconcile ran never gets the old one's status).
    pub(super) async fn write_status(&self, b: &BakeRef<'_>, status: &BakeStatus) -> Result<()> {
        crate::k8s::apply_status(&self.client, b.bake, status)
            .await
            .map_err(Error::status_write)
    }
}

/// The Bake being reconciled, with the metadata every step needs.
pub(crate) struct BakeRef<'a> {
    pub(crate) bake: &'a Bake,
    pub(crate) name: String,
    pub(crate) namespace: String,
    pub(crate) uid: String,
}

impl<'a> BakeRef<'a> {
    pub(crate) fn new(bake: &'a Bake) -> Result<Self> {
        Ok(Self {
            bake,
            name: bake.name_any(),
            namespace: bake
                .namespace()
                .ok_or(Error::MissingField("metadata.namespace"))?,
            uid: bake.uid().ok_or(Error::MissingField("metadata.uid"))?,
        })
    }

    pub(crate) fn status(&self) -> Option<&'a BakeStatus> {
        self.bake.status.as_ref()
    }
}
