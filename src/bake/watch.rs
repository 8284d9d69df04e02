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

use crate::api::{AmiCatalog, Bake, BakeTemplate, keys};
use crate::http::Health;

/// Events a subscriber may lag behind before the watch waits for it. Every subscriber is a
/// controller's trigger stream, polled continuously, so this only absorbs bursts such as the
/// replay of the whole cache at start.
const SUBSCRIBER_BUFFER: usize = 1024;

/// One shared list-and-watch of `K`. Consumers may subscribe before or after [`Shared::run`]
/// starts: a late subscriber (a standby that became leader on warm caches) first gets every
/// object already cached, then the events that follow.
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
    writer: std::sync::Mutex<Option<Writer<K>>>,
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
            writer: std::sync::Mutex::new(Some(writer)),
            subscribers: std::sync::Mutex::new(Vec::new()),
        }
    }
}

/// Locks a mutex whose data stays valid even if a holder panicked.
fn locked<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<K> Shared<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    /// The cache, filled by [`Shared::run`].
    pub fn store(&self) -> Store<K> {
        self.reader.clone()
    }

    /// Every object the watch applies (created, changed, or listed at a (re)start), starting with
    /// the objects cached already. Deletions are not delivered.
    pub fn subscribe(&self) -> BoxStream<'static, Arc<K>> {
        let (tx, rx) = futures::channel::mpsc::channel(SUBSCRIBER_BUFFER);
        // Registered before the snapshot is taken: an object changed in between comes twice,
        // which a trigger stream tolerates, and never not at all.
        locked(&self.subscribers).push(tx);
        let cached = self.reader.state();
        futures::stream::iter(cached).chain(rx).boxed()
    }

    /// Lists and watches through `api` until dropped; calls `synced` once, when the first list
    /// is in the cache. `lag` delays every event (a failpoint for tests). Runs once: a second
    /// call returns at once.
    pub async fn run(&self, api: Api<K>, config: watcher::Config, lag: Option<Duration>, synced: impl Fn()) {
        let Some(writer) = locked(&self.writer).take() else {
            tracing::error!("a shared watch was started twice");
            return;
        };
        let reader = self.reader.clone();
        let mut first = true;
        let events = watcher(api, config)
            .default_backoff()
            // Nothing reads who wrote which field: the cache keeps only what Baker reads.
            .modify(|obj: &mut K| obj.meta_mut().managed_fields = None)
            .then(move |event| async move {
                if let Some(lag) = lag {
                    tokio::time::sleep(lag).await;
                }
                event
            })
            .reflect(writer);
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
            if objects.is_empty() {
                continue;
            }
            // Cloned so no lock is held across a send that waits for a slow subscriber.
            let mut subscribers = locked(&self.subscribers).clone();
            let mut gone = false;
            for obj in objects {
                for tx in &mut subscribers {
                    gone |= tx.send(obj.clone()).await.is_err();
                }
            }
            if gone {
                // A subscriber that is gone (its controller stopped) is no reason to stop.
                locked(&self.subscribers).retain(|tx| !tx.is_closed());
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
    pub catalogs: Store<AmiCatalog>,
    pub synced: SyncGate,
}

impl Stores {
    pub fn pod(&self, namespace: &str, name: &str) -> Option<Arc<Pod>> {
        self.pods.get(&ObjectRef::new(name).within(namespace))
    }

    pub fn template(&self, name: &str) -> Option<Arc<BakeTemplate>> {
        self.templates.get(&ObjectRef::new(name))
    }

    pub fn catalog(&self, namespace: &str, name: &str) -> Option<Arc<AmiCatalog>> {
        self.catalogs.get(&ObjectRef::new(name).within(namespace))
    }
}

/// The process's caches. They run from the start, also on a standby replica, so one that takes
/// over has them warm and lists nothing again.
pub struct Caches {
    pub bakes: Shared<Bake>,
    pub pods: Shared<Pod>,
    pub templates: Shared<BakeTemplate>,
    pub catalogs: Shared<AmiCatalog>,
    gate: SyncGate,
}

/// How many caches [`Caches::run`] fills.
const CACHES: usize = 4;

impl Default for Caches {
    fn default() -> Self {
        Self::new()
    }
}

impl Caches {
    pub fn new() -> Self {
        Self {
            bakes: Shared::default(),
            pods: Shared::default(),
            templates: Shared::default(),
            catalogs: Shared::default(),
            gate: SyncGate::new(CACHES),
        }
    }

    pub fn stores(&self) -> Stores {
        Stores {
            bakes: self.bakes.store(),
            pods: self.pods.store(),
            templates: self.templates.store(),
            catalogs: self.catalogs.store(),
            synced: self.gate.clone(),
        }
    }

    /// Runs every watch until dropped. Bakes, pods and AmiCatalogs are watched in `namespace` (or
    /// everywhere); BakeTemplates are cluster-scoped. Marks `health` synced once every cache is.
    pub async fn run(&self, client: Client, namespace: Option<&str>, health: Arc<Health>) {
        fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
        where
            K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
        {
            match namespace {
                Some(ns) => Api::namespaced(client.clone(), ns),
                None => Api::all(client.clone()),
            }
        }
        let gate = self.gate.clone();
        let bakes_store = self.bakes.store();
        health.catalogs_watched(self.catalogs.store());
        let templates: Api<BakeTemplate> = Api::all(client.clone());
        let bake_lag =
            crate::failpoint::is_active(crate::failpoint::BAKE_CACHE_LAG).then_some(Duration::from_secs(1));
        let managed = format!("{}={}", keys::MANAGED_BY, keys::MANAGED_BY_VALUE);
        let mark = || {
            gate.mark();
            if gate.is_open() {
                health.caches_synced(bakes_store.clone());
            }
        };
        let any = || watcher::Config::default().any_semantic();
        tokio::join!(
            self.bakes.run(scoped(&client, namespace), any(), bake_lag, mark),
            self.pods
                .run(scoped(&client, namespace), any().labels(&managed), None, mark),
            self.templates.run(templates, any(), None, mark),
            self.catalogs.run(scoped(&client, namespace), any(), None, mark),
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
