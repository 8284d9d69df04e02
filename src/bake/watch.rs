//! The process's caches: one list-and-watch per kind, shared by both controllers, readiness,
//! metrics and the HTTP API. Bakes, bake pods (by Baker's label) and BakeTemplates are each listed
//! once at start and then watched; reconcilers read these stores instead of sending GETs or LISTs.
//!
//! Reconciles wait until every store has synced (see [`Stores::synced`]): before that, a pod
//! missing from the pod cache could be taken for a deleted one.

use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;
use futures::{SinkExt, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::{self, ObjectRef, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;

use crate::api::{Bake, BakeTemplate, keys};
use crate::http::Health;

/// Events a subscriber may lag behind before the watch waits for it. Every subscriber is a
/// controller's trigger stream, polled continuously, so this only absorbs bursts such as the
/// replay of the whole cache at start.
const SUBSCRIBER_BUFFER: usize = 1024;

/// One shared list-and-watch of `K`. Subscribe every consumer first, then [`Shared::run`] it.
///
/// Subscribers get the objects of the watch events themselves, over a bounded channel each. kube's
/// own shared-store subscription hands out object references and looks each one up in the store
/// when it is polled; an object deleted in between (a bake pod removed right after its last
/// update) makes that subscription return `Pending` without a waker, and the controller never
/// polls it again: every later pod event was lost until a restart.
pub struct Shared<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    reader: Store<K>,
    writer: Writer<K>,
    subscribers: std::sync::Mutex<Vec<futures::channel::mpsc::Sender<Arc<K>>>>,
}

impl<K> Default for Shared<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    fn default() -> Self {
        let (reader, writer) = reflector::store();
        Self {
            reader,
            writer,
            subscribers: std::sync::Mutex::new(Vec::new()),
        }
    }
}

impl<K> Shared<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    /// The cache, filled by [`Shared::run`].
    pub fn store(&self) -> Store<K> {
        self.reader.clone()
    }

    /// Every object the watch applies (created, changed, or listed at a (re)start). Deletions are
    /// not delivered.
    pub fn subscribe(&self) -> BoxStream<'static, Arc<K>> {
        let (tx, rx) = futures::channel::mpsc::channel(SUBSCRIBER_BUFFER);
        self.subscribers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(tx);
        rx.boxed()
    }

    /// Lists and watches through `api` until dropped; calls `synced` once, when the first list
    /// is in the cache. `lag` delays every event (a failpoint for tests).
    pub async fn run(self, api: Api<K>, config: watcher::Config, lag: Option<Duration>, synced: impl Fn()) {
        let mut subscribers = std::mem::take(
            &mut *self
                .subscribers
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        let reader = self.reader.clone();
        let mut first = true;
        let events = watcher(api, config)
            .default_backoff()
            .then(move |event| async move {
                if let Some(lag) = lag {
                    tokio::time::sleep(lag).await;
                }
                event
            })
            .reflect(self.writer);
        futures::pin_mut!(events);
        while let Some(event) = events.next().await {
            let objects: Vec<Arc<K>> = match event {
                Ok(watcher::Event::Apply(obj)) => vec![Arc::new(obj)],
                // A (re)list is complete: every object is delivered once, as the cache has it.
                Ok(watcher::Event::InitDone) => {
                    if first {
                        first = false;
                        synced();
                    }
                    reader.state()
                }
                _ => Vec::new(),
            };
            for obj in objects {
                for tx in &mut subscribers {
                    // A subscriber that is gone (its controller stopped) is no reason to stop.
                    let _ = tx.send(obj.clone()).await;
                }
            }
        }
    }
}

/// Counts the caches that have synced; reconciles wait for all of them.
#[derive(Clone, Debug)]
pub struct SyncGate {
    synced: Arc<tokio::sync::watch::Sender<usize>>,
    needed: usize,
}

impl SyncGate {
    pub fn new(needed: usize) -> Self {
        Self {
            synced: Arc::new(tokio::sync::watch::Sender::new(0)),
            needed,
        }
    }

    /// A gate that is open from the start (for code that runs without caches).
    pub fn open() -> Self {
        Self::new(0)
    }

    fn mark(&self) {
        self.synced.send_modify(|n| *n += 1);
    }

    pub fn is_open(&self) -> bool {
        *self.synced.borrow() >= self.needed
    }

    /// Returns once every cache has synced.
    pub async fn wait(&self) {
        let mut rx = self.synced.subscribe();
        // The sender lives as long as `self`, so this cannot fail.
        let _ = rx.wait_for(|n| *n >= self.needed).await;
    }
}

/// Readers of the process's caches, cheap to clone.
#[derive(Clone)]
pub struct Stores {
    pub bakes: Store<Bake>,
    pub pods: Store<Pod>,
    pub templates: Store<BakeTemplate>,
    pub synced: SyncGate,
}

impl Stores {
    pub fn pod(&self, namespace: &str, name: &str) -> Option<Arc<Pod>> {
        self.pods.get(&ObjectRef::new(name).within(namespace))
    }

    pub fn template(&self, name: &str) -> Option<Arc<BakeTemplate>> {
        self.templates.get(&ObjectRef::new(name))
    }
}

/// The process's caches, before they run.
#[derive(Default)]
pub struct Caches {
    pub bakes: Shared<Bake>,
    pub pods: Shared<Pod>,
    pub templates: Shared<BakeTemplate>,
    gate: Option<SyncGate>,
}

/// How many caches [`Caches::run`] fills.
const CACHES: usize = 3;

impl Caches {
    pub fn new() -> Self {
        Self {
            gate: Some(SyncGate::new(CACHES)),
            ..Default::default()
        }
    }

    pub fn stores(&self) -> Stores {
        Stores {
            bakes: self.bakes.store(),
            pods: self.pods.store(),
            templates: self.templates.store(),
            synced: self.gate.clone().unwrap_or_else(|| SyncGate::new(CACHES)),
        }
    }

    /// Runs every watch until dropped. Bakes and pods are watched in `namespace` (or everywhere);
    /// BakeTemplates are cluster-scoped. Marks `health` synced once every cache is.
    pub async fn run(self, client: Client, namespace: Option<&str>, health: Arc<Health>) {
        let gate = self.gate.clone().unwrap_or_else(|| SyncGate::new(CACHES));
        let bakes_store = self.bakes.store();
        let (bakes, pods): (Api<Bake>, Api<Pod>) = match namespace {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
            None => (Api::all(client.clone()), Api::all(client.clone())),
        };
        let templates: Api<BakeTemplate> = Api::all(client);
        let bake_lag =
            crate::failpoint::is_active(crate::failpoint::BAKE_CACHE_LAG).then_some(Duration::from_secs(1));
        let managed = format!("{}={}", keys::MANAGED_BY, keys::MANAGED_BY_VALUE);
        let mark = || {
            gate.mark();
            if gate.is_open() {
                health.caches_synced(bakes_store.clone());
            }
        };
        tokio::join!(
            self.bakes
                .run(bakes, watcher::Config::default().any_semantic(), bake_lag, mark),
            self.pods.run(
                pods,
                watcher::Config::default().labels(&managed).any_semantic(),
                None,
                mark
            ),
            self.templates
                .run(templates, watcher::Config::default().any_semantic(), None, mark),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_sync_gate_opens_only_once_every_cache_has_synced() {
        let gate = SyncGate::new(2);
        assert!(!gate.is_open());
        gate.mark();
        assert!(!gate.is_open());
        let waiter = tokio::spawn({
            let gate = gate.clone();
            async move { gate.wait().await }
        });
        gate.mark();
        assert!(gate.is_open());
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the waiter was woken")
            .expect("the waiter did not panic");
    }

    #[test]
    fn an_open_gate_needs_nothing() {
        assert!(SyncGate::open().is_open());
    }
}
