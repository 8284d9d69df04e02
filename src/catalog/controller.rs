//! The AmiCatalog reconciler: reads EC2 at each catalog's refresh interval (or at once when a Bake
//! that may match it succeeds) and writes status only when it changed.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{info, instrument, warn};

use super::retention;
use crate::api::catalog::{Retention, RetentionStatus};
use crate::api::{AmiCatalog, AmiCatalogStatus, Bake};
use crate::aws::{Ec2, Ec2Error, ImageSummary, Uses};
use crate::bake::controller::FIELD_MANAGER;
use crate::error::{Error, Result};

/// Catalogs synced at once.
const CONCURRENCY: u16 = 4;

/// When a catalog last read EC2, and at which generation of its spec.
type LastSync = (Instant, Option<i64>);

/// Shared state of the AmiCatalog controller.
pub struct Context {
    pub client: Client,
    pub ec2: Ec2,
    pub recorder: Recorder,
    pub watch_namespace: Option<String>,
    /// Per catalog UID. In memory only: after a restart every catalog syncs once at start.
    last_sync: Mutex<HashMap<String, LastSync>>,
    /// Catalogs (by UID) a succeeded Bake asked to refresh before their interval.
    forced: Mutex<HashSet<String>>,
    /// The process's Bake cache, for retention's "still used" check; set by [`run`].
    bakes: std::sync::OnceLock<Store<Bake>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere while holding the lock leaves usable data.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Context {
    pub fn new(client: Client, ec2: Ec2, watch_namespace: Option<String>) -> Self {
        let recorder = crate::bake::controller::recorder(&client);
        Self {
            client,
            ec2,
            recorder,
            watch_namespace,
            last_sync: Mutex::new(HashMap::new()),
            forced: Mutex::new(HashSet::new()),
            bakes: std::sync::OnceLock::new(),
        }
    }

    fn force(&self, uid: String) {
        lock(&self.forced).insert(uid);
    }
}

/// Reconciles one catalog: syncs it with EC2 if it is due, and comes back when it next is.
#[instrument(skip_all, fields(catalog = %catalog.name_any(), namespace = catalog.namespace().unwrap_or_default()))]
pub async fn reconcile(catalog: Arc<AmiCatalog>, ctx: Arc<Context>) -> Result<Action> {
    let uid = catalog.uid().ok_or(Error::MissingField("metadata.uid"))?;
    let namespace = catalog
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let generation = catalog.metadata.generation;
    let interval = super::refresh_interval(&catalog.spec);
    let forced = lock(&ctx.forced).remove(&uid);
    let last = lock(&ctx.last_sync).get(&uid).copied();
    // Our own status writes wake the controller too; they are no reason to read EC2 again.
    if let Some(left) = super::due(last, generation, forced, interval, Instant::now()) {
        return Ok(Action::requeue(left));
    }

    let spec = &catalog.spec;
    let mut outcome = ctx
        .ec2
        .images(&spec.region, &super::owners(spec), super::filters(spec))
        .await;
    lock(&ctx.last_sync).insert(uid, (Instant::now(), generation));
    let mut retention = catalog.status.as_ref().and_then(|s| s.retention.clone());
    if let (Some(policy), Ok(images)) = (&spec.retention, &outcome) {
        match retain(&catalog, &ctx, policy, images).await? {
            Ok((status, removed)) => {
                retention = Some(status);
                if let Ok(images) = &mut outcome {
                    images.retain(|i| !removed.contains(&i.image_id));
                }
            }
            Err(e) => outcome = Err(e),
        }
    } else if spec.retention.is_none() {
        retention = None;
    }
    let failed = outcome.is_err();
    if let Err(e) = &outcome {
        warn!(code = %e.code, error = %e, "catalog sync failed");
    }
    let previous = catalog.status.as_ref();
    let mut next = super::next_status(
        previous,
        spec,
        generation,
        &outcome,
        &crate::bake::controller::now(),
    );
    next.retention = retention;
    if super::changed(previous, &next) {
        write_status(&ctx.client, &namespace, &catalog.name_any(), &next).await?;
        info!(
            count = next.count.unwrap_or_default(),
            latest = next.latest.as_ref().map(|l| l.image_id.as_str()).unwrap_or(""),
            "catalog updated"
        );
    }
    Ok(Action::requeue(if failed {
        interval.min(super::RETRY_AFTER_FAILURE)
    } else {
        interval
    }))
}

/// Applies the retention policy to the images a sync found: returns the new retention status
/// and the ids removed, or the EC2 error that stopped it (then nothing more is removed until the
/// next sync). Removal needs proof that nothing uses an image: every check must succeed first.
async fn retain(
    catalog: &AmiCatalog,
    ctx: &Context,
    policy: &Retention,
    images: &[ImageSummary],
) -> Result<std::result::Result<(RetentionStatus, Vec<String>), Ec2Error>> {
    let previous = catalog.status.as_ref().and_then(|s| s.retention.as_ref());
    let past = retention::past_policy(images, policy, jiff::Timestamp::now());
    if past.is_empty() {
        return Ok(Ok((
            retention::next_status(previous, policy.dry_run, &[], Vec::new()),
            Vec::new(),
        )));
    }
    let region = &catalog.spec.region;
    let ids: Vec<String> = past.iter().map(|i| i.image_id.clone()).collect();
    let bakes = bake_uses(ctx)?;
    let checks = async {
        let bases = ctx.ec2.bases_among(region, &ids).await?;
        let instances = ctx.ec2.instances_using(region, &ids).await?;
        let templates = ctx.ec2.launch_template_images(region).await?;
        Ok::<_, Ec2Error>((bases, instances, templates))
    };
    let (bases, instances, templates) = match checks.await {
        Ok(found) => found,
        Err(e) => return Ok(Err(e)),
    };
    let (remove, protected) = retention::split(past, &[&bakes, &bases, &instances, &templates]);
    if policy.dry_run {
        return Ok(Ok((
            retention::next_status(previous, true, &remove, protected),
            Vec::new(),
        )));
    }
    let mut removed = Vec::new();
    for image in &remove {
        if let Err(e) = ctx.ec2.remove_image(region, image).await {
            warn!(image = %image.image_id, error = %e, "removing an image failed");
            return Ok(Err(e));
        }
        info!(image = %image.image_id, "retention removed an image");
        let snapshots = if image.snapshot_ids.is_empty() {
            String::new()
        } else {
            format!(" and deleted snapshot(s) {}", image.snapshot_ids.join(", "))
        };
        publish(
            catalog,
            ctx,
            "ImageRemoved",
            format!("Deregister:{}", image.image_id),
            format!(
                "retention deregistered {} ({}){snapshots}",
                image.image_id,
                image.name.as_deref().unwrap_or("unnamed")
            ),
        )
        .await;
        removed.push(image.clone());
    }
    let ids = removed.iter().map(|i| i.image_id.clone()).collect();
    Ok(Ok((
        retention::next_status(previous, false, &removed, protected),
        ids,
    )))
}

/// Images Bakes in the operator's scope name: their AMIs, and the sources of Bakes not finished.
/// Read from the Bake cache; without it (never in `run`) retention removes nothing.
fn bake_uses(ctx: &Context) -> Result<Uses> {
    let bakes = ctx.bakes.get().ok_or(Error::CacheNotReady("Bakes"))?.state();
    let mut uses = Uses::new();
    for bake in &bakes {
        let Some(status) = bake.status.as_ref() else {
            continue;
        };
        let who = format!("{}/{}", bake.namespace().unwrap_or_default(), bake.name_any());
        if let Some(ami) = &status.ami_id {
            uses.entry(ami.clone())
                .or_insert_with(|| format!("the amiId of Bake {who}"));
        }
        if let Some(source) = &status.source_ami_id
            && !status.phase.is_some_and(|p| p.is_terminal())
        {
            uses.entry(source.clone())
                .or_insert_with(|| format!("the source of Bake {who}, not finished"));
        }
    }
    Ok(uses)
}

/// Events are best effort: a failure to record one must not fail the sync. kube's recorder folds
/// Events with equal reason and action into one series (keeping the first note), so the action
/// names the image: one Event per removed image.
async fn publish(catalog: &AmiCatalog, ctx: &Context, reason: &str, action: String, note: String) {
    let event = Event {
        type_: EventType::Normal,
        reason: reason.into(),
        note: Some(crate::bake::status::truncate(&note, 1000)),
        action,
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &catalog.object_ref(&())).await {
        warn!(error = %e, "could not publish event");
    }
}

async fn write_status(client: &Client, namespace: &str, name: &str, status: &AmiCatalogStatus) -> Result<()> {
    let api: Api<AmiCatalog> = Api::namespaced(client.clone(), namespace);
    let patch = json!({
        "apiVersion": AmiCatalog::api_version(&()),
        "kind": AmiCatalog::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(Error::PatchCatalogStatus)?;
    Ok(())
}

fn error_policy(_catalog: Arc<AmiCatalog>, error: &Error, _ctx: Arc<Context>) -> Action {
    warn!(category = error.category(), error = %error, "catalog reconcile failed");
    Action::requeue(Duration::from_secs(15))
}

/// Runs the AmiCatalog controller until a shutdown signal. `bakes` is the process's shared
/// stream of Bakes (one that succeeds refreshes the catalogs its image may belong to), and
/// `bake_store` its cache.
pub async fn run(
    ctx: Arc<Context>,
    health: Arc<crate::http::Health>,
    bakes: impl futures::Stream<Item = Arc<Bake>> + Send + 'static,
    bake_store: Store<Bake>,
) {
    let _ = ctx.bakes.set(bake_store);
    let catalogs: Api<AmiCatalog> = match &ctx.watch_namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    // A sync pages through EC2: a few at once keep a burst of catalogs from throttling the
    // account's DescribeImages rate.
    let controller = Controller::new(catalogs, watcher::Config::default().any_semantic())
        .with_config(kube::runtime::controller::Config::default().concurrency(CONCURRENCY));
    let store = controller.store();
    health.catalogs_watched(controller.store());
    let trigger = ctx.clone();
    controller
        // A Bake that succeeds refreshes the catalogs its image may belong to, without waiting
        // for their interval.
        .watches_shared_stream(bakes, move |bake: Arc<Bake>| {
            if !super::refreshes_on(&bake, jiff::Timestamp::now()) {
                return Vec::new();
            }
            store
                .state()
                .into_iter()
                .filter(|c| super::may_list(c, &bake))
                .filter_map(|c| {
                    trigger.force(c.uid()?);
                    Some(ObjectRef::from_obj(&*c))
                })
                .collect::<Vec<_>>()
        })
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "catalog reconcile loop");
            }
        })
        .await;
}
