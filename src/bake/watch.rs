//! One list-and-watch of Bakes for the whole process. The Bake controller, its queue wake-ups, the
//! AmiCatalog controller's refresh trigger, readiness and the phase gauges all read this one cache
//! and its event stream, instead of each opening a watch (and a full LIST on every start) of its
//! own.

use std::sync::Arc;

use futures::stream::BoxStream;
use futures::{StreamExt, future};
use kube::Api;
use kube::runtime::reflector::{self, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use tracing::error;

use crate::api::Bake;
use crate::http::Health;

/// Events a subscriber may lag behind before the watch waits for it. Every subscriber is a
/// controller's trigger stream, polled continuously, so this only absorbs bursts such as the
/// replay of the whole cache at start.
const SUBSCRIBER_BUFFER: usize = 1024;

/// The shared Bake cache. Subscribe every consumer first, then [`SharedBakes::run`] the watch.
pub struct SharedBakes {
    reader: Store<Bake>,
    writer: Writer<Bake>,
}

impl Default for SharedBakes {
    fn default() -> Self {
        let (reader, writer) = reflector::store_shared(SUBSCRIBER_BUFFER);
        Self { reader, writer }
    }
}

impl SharedBakes {
    /// The cache, filled by [`SharedBakes::run`].
    pub fn store(&self) -> Store<Bake> {
        self.reader.clone()
    }

    /// Every Bake the watch applies (created, changed, or listed at a (re)start).
    pub fn subscribe(&self) -> BoxStream<'static, Arc<Bake>> {
        match self.writer.subscribe() {
            Some(handle) => handle.boxed(),
            // A store made by `store_shared` always has subscribers; never reached.
            None => {
                error!("the shared Bake store cannot be subscribed to");
                futures::stream::empty().boxed()
            }
        }
    }

    /// Lists and watches Bakes through `api` until dropped; marks `health` synced once the first
    /// list is in the cache.
    pub async fn run(self, api: Api<Bake>, health: Arc<Health>) {
        let reader = self.reader;
        let lag = crate::failpoint::is_active(crate::failpoint::BAKE_CACHE_LAG)
            .then_some(std::time::Duration::from_secs(1));
        watcher(api, watcher::Config::default().any_semantic())
            .default_backoff()
            .then(move |event| async move {
                if let Some(lag) = lag {
                    tokio::time::sleep(lag).await;
                }
                event
            })
            .reflect_shared(self.writer)
            .for_each(move |event| {
                if let Ok(watcher::Event::InitDone) = event {
                    health.caches_synced(reader.clone());
                }
                future::ready(())
            })
            .await;
    }
}
