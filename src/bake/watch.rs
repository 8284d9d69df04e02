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
use kube::core::error_boundary::{DeserializeGuard, InvalidObject};
use kube::runtime::events::EventType;
use kube::runtime::reflector::{self, ObjectRef, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;

use crate::api::channel::AmiChannel;
use crate::api::schedule::BakeSchedule;
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
    /// is in the cache. `lag` delays every event (a failpoint for tests). An object that does not
    /// deserialize is left out of the cache (a cached copy of it goes) and handed to `invalid`,
    /// instead of failing the whole watch. Runs once: a second call returns at once.
    pub async fn run(
        &self,
        api: Api<DeserializeGuard<K>>,
        config: watcher::Config,
        lag: Option<Duration>,
        synced: impl Fn(),
        invalid: impl Fn(&InvalidObject),
    ) {
        let Some(writer) = locked(&self.writer).take() else {
            tracing::error!("a shared watch was started twice");
            return;
        };
        let reader = self.reader.clone();
        let cached = self.reader.clone();
        let mut first = true;
        let events = watcher(api, config)
            .default_backoff()
            .then(move |event| async move {
                if let Some(lag) = lag {
                    tokio::time::sleep(lag).await;
                }
                event
            })
            .filter_map(move |event| {
                let sifted = match event {
                    Ok(event) => sift(event, &cached, &invalid).map(Ok),
                    Err(e) => Some(Err(e)),
                };
                futures::future::ready(sifted)
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

/// The event the cache gets for a watch event of objects that may not deserialize: valid objects
/// pass (without their managedFields: nothing reads who wrote which field); an invalid one is
/// reported, and if the cache holds an older valid copy, that copy is removed, so no decision is
/// made on an object that no longer says that.
fn sift<K>(
    event: watcher::Event<DeserializeGuard<K>>,
    cached: &Store<K>,
    invalid: &impl Fn(&InvalidObject),
) -> Option<watcher::Event<K>>
where
    K: Resource<DynamicType = ()> + Clone,
{
    use watcher::Event as E;
    let valid = |guard: DeserializeGuard<K>| {
        guard
            .0
            .map(|mut obj| {
                obj.meta_mut().managed_fields = None;
                obj
            })
            .map_err(Box::new)
    };
    let cached_copy = |bad: &InvalidObject| {
        let name = bad.metadata.name.as_deref()?;
        let key = match bad.metadata.namespace.as_deref() {
            Some(ns) => ObjectRef::new(name).within(ns),
            None => ObjectRef::new(name),
        };
        cached.get(&key).map(|obj| E::Delete((*obj).clone()))
    };
    match event {
        E::Apply(guard) => match valid(guard) {
            Ok(obj) => Some(E::Apply(obj)),
            Err(bad) => {
                invalid(&bad);
                cached_copy(&bad)
            }
        },
        E::InitApply(guard) => match valid(guard) {
            Ok(obj) => Some(E::InitApply(obj)),
            Err(bad) => {
                invalid(&bad);
                None
            }
        },
        E::Delete(guard) => match valid(guard) {
            Ok(obj) => Some(E::Delete(obj)),
            Err(bad) => cached_copy(&bad),
        },
        E::Init => Some(E::Init),
        E::InitDone => Some(E::InitDone),
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
    pub schedules: Shared<BakeSchedule>,
    pub channels: Shared<AmiChannel>,
    gate: SyncGate,
}

/// The resources the caches list and watch: a restarted operator lists each once.
pub const WATCHED: [&str; 6] = [
    "bakes",
    "pods",
    "baketemplates",
    "amicatalogs",
    "bakeschedules",
    "amichannels",
];

/// How many caches [`Caches::run`] fills.
const CACHES: usize = WATCHED.len();

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
            schedules: Shared::default(),
            channels: Shared::default(),
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

    /// Runs every watch until dropped. Bakes, pods, AmiCatalogs, BakeSchedules and AmiChannels are watched in
    /// `namespace` (or everywhere); BakeTemplates are cluster-scoped. Marks `health` synced once every cache is.
    /// An object that cannot be read is reported (log, metric and a Warning Event on it).
    pub async fn run(&self, client: Client, namespace: Option<&str>, health: Arc<Health>) {
        use crate::k8s::scoped;
        let gate = self.gate.clone();
        let bakes_store = self.bakes.store();
        health.catalogs_watched(self.catalogs.store());
        let templates: Api<DeserializeGuard<BakeTemplate>> = Api::all(client.clone());
        let bake_lag =
            crate::failpoint::is_active(crate::failpoint::BAKE_CACHE_LAG).then_some(Duration::from_secs(1));
        let managed = format!("{}={}", keys::MANAGED_BY, keys::MANAGED_BY_VALUE);
        let mark = || {
            gate.mark();
            if gate.is_open() {
                health.caches_synced(bakes_store.clone());
            }
        };
        let recorder = crate::k8s::recorder(&client);
        let report = |kind: &'static str, api_version: String| {
            let recorder = recorder.clone();
            let metrics = health.metrics.clone();
            move |bad: &InvalidObject| report_invalid(&recorder, &metrics, kind, &api_version, bad)
        };
        let any = || watcher::Config::default().any_semantic();
        // A cluster upgraded without the newer CRDs (Helm never adds CRDs on upgrade) must still
        // bake: such a cache counts as synced and empty, and the operator says what to do.
        let served = |resource: &'static str| {
            let client = client.clone();
            let mark = &mark;
            async move {
                let served = serves(&client, resource).await;
                if !served {
                    tracing::error!(
                        "the API server does not serve {resource}.baker.io: they are off until the CRD is applied (kubectl apply -f crds/)"
                    );
                    mark();
                }
                served
            }
        };
        let schedules_served = served("bakeschedules").await;
        let channels_served = served("amichannels").await;
        tokio::join!(
            self.bakes.run(
                scoped(&client, namespace),
                any(),
                bake_lag,
                mark,
                report("Bake", Bake::api_version(&()).into())
            ),
            self.pods.run(
                scoped(&client, namespace),
                any().labels(&managed),
                None,
                mark,
                report("Pod", Pod::api_version(&()).into())
            ),
            self.templates.run(
                templates,
                any(),
                None,
                mark,
                report("BakeTemplate", BakeTemplate::api_version(&()).into())
            ),
            self.catalogs.run(
                scoped(&client, namespace),
                any(),
                None,
                mark,
                report("AmiCatalog", AmiCatalog::api_version(&()).into())
            ),
            optional(
                schedules_served,
                &self.schedules,
                scoped(&client, namespace),
                any(),
                mark,
                report("BakeSchedule", BakeSchedule::api_version(&()).into()),
            ),
            optional(
                channels_served,
                &self.channels,
                scoped(&client, namespace),
                any(),
                mark,
                report("AmiChannel", AmiChannel::api_version(&()).into()),
            ),
        );
    }
}

/// The watch of a kind whose CRD may be missing: nothing when the API server does not serve it
/// (its cache counts as synced already).
async fn optional<K>(
    served: bool,
    shared: &Shared<K>,
    api: Api<DeserializeGuard<K>>,
    config: watcher::Config,
    synced: impl Fn(),
    invalid: impl Fn(&InvalidObject),
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    if served {
        shared.run(api, config, None, synced, invalid).await;
    }
}

/// Whether the API server serves `resource` of Baker's group. Unsure (the API server cannot be
/// asked) counts as served: the watch then waits and retries as for any other kind.
async fn serves(client: &Client, resource: &str) -> bool {
    let version = format!("{}/v1alpha1", crate::api::GROUP);
    match client.list_api_group_resources(&version).await {
        Ok(list) => list.resources.iter().any(|r| r.name == resource),
        Err(kube::Error::Api(s)) if s.code == 404 => false,
        Err(_) => true,
    }
}

#[cfg(test)]
impl Caches {
    /// Caches holding these objects and synced, as if every watch had just listed them: the
    /// reconcilers' tests start from here.
    pub(crate) fn filled(
        bakes: Vec<Bake>,
        pods: Vec<Pod>,
        templates: Vec<BakeTemplate>,
        catalogs: Vec<AmiCatalog>,
    ) -> Self {
        fn fill<K: Resource<DynamicType = ()> + Clone + 'static>(shared: &Shared<K>, objects: Vec<K>) {
            let Some(mut writer) = locked(&shared.writer).take() else {
                panic!("a cache is filled once");
            };
            writer.apply_watcher_event(&watcher::Event::Init);
            for obj in objects {
                writer.apply_watcher_event(&watcher::Event::InitApply(obj));
            }
            writer.apply_watcher_event(&watcher::Event::InitDone);
        }
        let caches = Caches::new();
        fill(&caches.bakes, bakes);
        fill(&caches.pods, pods);
        fill(&caches.templates, templates);
        fill(&caches.catalogs, catalogs);
        fill(&caches.schedules, Vec::new());
        fill(&caches.channels, Vec::new());
        for _ in 0..CACHES {
            caches.gate.mark();
        }
        caches
    }
}

/// Tells the object's owner, and the operator's admin, that an object cannot be read: a log line,
/// a count in `baker_invalid_objects_total`, and a Warning Event on the object (best effort).
fn report_invalid(
    recorder: &kube::runtime::events::Recorder,
    metrics: &crate::metrics::Metrics,
    kind: &'static str,
    api_version: &str,
    bad: &InvalidObject,
) {
    let name = bad.metadata.name.clone().unwrap_or_default();
    let namespace = bad.metadata.namespace.clone();
    tracing::warn!(kind, name = %name, namespace = namespace.as_deref().unwrap_or(""), error = %bad.error, "an object cannot be read and is left out of the cache");
    metrics.invalid_object(kind);
    let regarding = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some(api_version.to_string()),
        kind: Some(kind.to_string()),
        name: Some(name),
        namespace,
        uid: bad.metadata.uid.clone(),
        ..Default::default()
    };
    let note = format!(
        "Baker cannot read this {kind} and ignores it until it changes: {}",
        bad.error
    );
    let recorder = recorder.clone();
    tokio::spawn(async move {
        crate::k8s::publish(
            &recorder,
            &regarding,
            EventType::Warning,
            "InvalidObject",
            "Read",
            &note,
        )
        .await;
    });
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

    fn bake(name: &str) -> Bake {
        let mut b = Bake::new(
            name,
            serde_json::from_value(serde_json::json!({
                "template": "t", "service": "s", "version": "1", "virtualizationType": "hvm"
            }))
            .expect("a valid spec"),
        );
        b.metadata.namespace = Some("team".into());
        b
    }

    fn invalid(name: &str) -> DeserializeGuard<Bake> {
        let guard: DeserializeGuard<Bake> = serde_json::from_value(serde_json::json!({
            "apiVersion": "baker.io/v1alpha1", "kind": "Bake",
            "metadata": { "name": name, "namespace": "team" },
            "spec": { "template": 7 }
        }))
        .expect("a guard reads any object with metadata");
        assert!(guard.0.is_err(), "the object is invalid");
        guard
    }

    #[test]
    fn an_object_that_turns_invalid_is_reported_and_its_cached_copy_removed() {
        let (reader, mut writer) = reflector::store::<Bake>();
        writer.apply_watcher_event(&watcher::Event::Apply(bake("a")));
        let reported = std::cell::RefCell::new(Vec::new());
        let report = |bad: &InvalidObject| reported.borrow_mut().push(bad.metadata.name.clone());
        let out = sift(watcher::Event::Apply(invalid("a")), &reader, &report);
        assert!(matches!(out, Some(watcher::Event::Delete(b)) if b.metadata.name.as_deref() == Some("a")));
        assert_eq!(reported.borrow().as_slice(), [Some("a".to_string())]);
        // Never cached: reported, and nothing for the cache.
        assert!(sift(watcher::Event::InitApply(invalid("b")), &reader, &report).is_none());
        assert!(sift(watcher::Event::Apply(invalid("c")), &reader, &report).is_none());
        assert_eq!(reported.borrow().len(), 3);
    }

    #[test]
    fn valid_objects_pass_without_their_managed_fields() {
        let (reader, _writer) = reflector::store::<Bake>();
        let mut b = bake("a");
        b.metadata.managed_fields = Some(vec![Default::default()]);
        let out = sift(
            watcher::Event::Apply(DeserializeGuard(Ok(b))),
            &reader,
            &|_: &InvalidObject| panic!("nothing is invalid"),
        );
        assert!(matches!(out, Some(watcher::Event::Apply(b)) if b.metadata.managed_fields.is_none()));
    }

    #[test]
    fn an_open_gate_needs_nothing() {
        assert!(SyncGate::open().is_open());
    }
}
