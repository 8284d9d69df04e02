//! The AmiCatalog reconciler: reads EC2 at each catalog's refresh interval (or at once when a Bake
//! that may match it succeeds) and writes status only when it changed.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::StreamExt;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{EventType, Recorder};
use kube::runtime::reflector::ObjectRef;
use kube::{Client, Resource, ResourceExt};
use tracing::{info, instrument, warn};

use super::error::{Error, Result};
use super::{retention, revocation};
use crate::api::catalog::{Retention, RetentionStatus};
use crate::api::{AmiCatalog, Bake};
use crate::aws::{Ec2, Ec2Error, ImageSummary};
use crate::bake::watch::{Caches, Stores};
use crate::config::{OperatorConfig, Scope};
use crate::metrics::Metrics;
use crate::usage;

/// Catalogs synced at once.
const CONCURRENCY: u16 = 4;

/// When a catalog last read EC2, and at which generation of its spec.
type LastSync = (Instant, Option<i64>);

/// Shared state of the AmiCatalog controller.
pub struct Context {
    pub client: Client,
    pub ec2: Ec2,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Whose images retention may remove.
    pub retention_scope: Scope,
    /// Most images one sync removes.
    pub max_removals: usize,
    /// Most images one sync reads from EC2.
    pub max_images: usize,
    /// Per catalog UID. In memory only: after a restart every catalog syncs once at start.
    last_sync: Mutex<HashMap<String, LastSync>>,
    /// Catalogs (by UID) a succeeded Bake asked to refresh before their interval.
    forced: Mutex<HashSet<String>>,
    /// The process's caches (retention's "still used" check reads the Bakes); set by [`run`].
    stores: std::sync::OnceLock<Stores>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere while holding the lock leaves usable data.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Context {
    pub fn new(client: Client, ec2: Ec2, config: &OperatorConfig, metrics: Arc<Metrics>) -> Self {
        let recorder = crate::k8s::recorder(&client);
        Self {
            client,
            ec2,
            recorder,
            metrics,
            retention_scope: config.retention_scope,
            max_removals: config.retention_max_removals,
            max_images: config.catalog_max_images.max(1),
            last_sync: Mutex::new(HashMap::new()),
            forced: Mutex::new(HashSet::new()),
            stores: std::sync::OnceLock::new(),
        }
    }

    fn force(&self, uid: String) {
        lock(&self.forced).insert(uid);
    }
}

/// Reconciles one catalog: syncs it with EC2 if it is due, and comes back when it next is.
#[instrument(skip_all, fields(catalog = %catalog.name_any(), namespace = catalog.namespace().unwrap_or_default()))]
pub async fn reconcile(catalog: Arc<AmiCatalog>, ctx: Arc<Context>) -> Result<Action> {
    // Retention reads the Bake cache: before it has synced, no image may look unused.
    if let Some(stores) = ctx.stores.get() {
        stores.synced.wait().await;
    }
    crate::k8s::measured(&ctx.metrics, "catalog", sync(&catalog, &ctx)).await
}

/// Syncs the catalog with EC2 if it is due.
async fn sync(catalog: &AmiCatalog, ctx: &Context) -> Result<Action> {
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
    let listing = ctx
        .ec2
        .images_capped(
            &spec.region,
            &super::owners(spec),
            super::filters(spec),
            ctx.max_images,
        )
        .await;
    lock(&ctx.last_sync).insert(uid, (Instant::now(), generation));
    let cut = listing.as_ref().is_ok_and(|(_, cut)| *cut);
    if cut {
        warn!(
            max = ctx.max_images,
            "catalog query matches more images than one sync reads"
        );
    }
    let mut outcome = listing.map(|(images, _)| images);
    let mut retention = catalog.status.as_ref().and_then(|s| s.retention.clone());
    // Retention on a cut listing could misjudge which images are newest: it waits for a query
    // that fits.
    if let (Some(policy), Ok(images), false) = (&spec.retention, &outcome, cut) {
        match retain(catalog, ctx, &namespace, policy, images).await? {
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
    let mut revoked = catalog
        .status
        .as_ref()
        .map(|s| s.revoked.clone())
        .unwrap_or_default();
    let mut marks = Vec::new();
    if let Ok(images) = &outcome {
        (marks, revoked) = revoke(catalog, ctx, &namespace, images).await;
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
        cut.then_some(ctx.max_images),
        &crate::k8s::now(),
    );
    next.retention = retention;
    if !failed {
        revocation::mark(&mut next, &marks);
        next.revoked = revoked;
    }
    if super::changed(previous, &next) {
        crate::k8s::apply_status(&ctx.client, catalog, &next).await?;
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
/// next sync). Only images in the operator's retention scope for this namespace are considered,
/// at most `max_removals` go per sync, and removal needs proof that nothing uses an image.
async fn retain(
    catalog: &AmiCatalog,
    ctx: &Context,
    namespace: &str,
    policy: &Retention,
    images: &[ImageSummary],
) -> Result<std::result::Result<(RetentionStatus, Vec<String>), Ec2Error>> {
    let previous = catalog.status.as_ref().and_then(|s| s.retention.as_ref());
    let scoped = retention::in_scope(images, ctx.retention_scope, namespace);
    let past = retention::past_policy(&scoped, policy, jiff::Timestamp::now());
    if past.is_empty() {
        return Ok(Ok((
            retention::next_status(previous, policy.dry_run, &[], Vec::new(), 0),
            Vec::new(),
        )));
    }
    let region = &catalog.spec.region;
    let ids: Vec<String> = past.iter().map(|i| i.image_id.clone()).collect();
    let bakes = ctx
        .stores
        .get()
        .ok_or(Error::CacheNotReady("Bakes"))?
        .bakes
        .state();
    let bake_uses = usage::bake_uses(&bakes, None);
    let uses = match usage::in_use(&ctx.ec2, region, &ids, bake_uses.clone()).await {
        Ok(uses) => uses,
        Err(e) => return Ok(Err(e)),
    };
    // Copies in other regions count: an image goes with its copies, and stays while one is used.
    // Only for images nothing in their own region uses: the others stay anyway.
    let unused: Vec<ImageSummary> = past
        .iter()
        .filter(|i| !uses.contains_key(&i.image_id))
        .cloned()
        .collect();
    let (copy_uses, copies) = match usage::copies_in_use(&ctx.ec2, &unused, &bake_uses).await {
        Ok(found) => found,
        Err(e) => return Ok(Err(e)),
    };
    let plan = retention::plan(past, &[&uses, &copy_uses], ctx.max_removals);
    if policy.dry_run {
        return Ok(Ok((
            retention::next_status(previous, true, &plan.remove, plan.protected, plan.deferred),
            Vec::new(),
        )));
    }
    let mut removed = Vec::new();
    for image in &plan.remove {
        let image_copies = copies.get(&image.image_id).map(Vec::as_slice).unwrap_or_default();
        if let Err(e) = usage::remove_with_copies(&ctx.ec2, region, image, image_copies).await {
            warn!(image = %image.image_id, error = %e, "removing an image failed");
            return Ok(Err(e));
        }
        info!(image = %image.image_id, "retention removed an image");
        let snapshots = if image.snapshot_ids.is_empty() {
            String::new()
        } else {
            format!(" and deleted snapshot(s) {}", image.snapshot_ids.join(", "))
        };
        let copied = if image_copies.is_empty() {
            String::new()
        } else {
            let list: Vec<String> = image_copies
                .iter()
                .map(|(r, c)| format!("{} in {r}", c.image_id))
                .collect();
            format!(", with its copies {}", list.join(", "))
        };
        publish(
            catalog,
            ctx,
            "ImageRemoved",
            format!("Deregister:{}", image.image_id),
            format!(
                "retention deregistered {} ({}){snapshots}{copied}",
                image.image_id,
                image.name.as_deref().unwrap_or("unnamed")
            ),
        )
        .await;
        removed.push(image.clone());
    }
    let ids = removed.iter().map(|i| i.image_id.clone()).collect();
    Ok(Ok((
        retention::next_status(previous, false, &removed, plan.protected, plan.deferred),
        ids,
    )))
}

/// Applies the catalog's revocations: the revoked images (with their descendants) and what was
/// done to each. An image Baker baked for this namespace is deprecated now (or disabled) in every
/// region its copies are in, then in its own (so a revocation cut short is finished at the next
/// sync: the image itself is the last done); one done in an earlier sync is not asked again. EC2
/// refusing an action fails that image's entry, never the exclusion: a revoked image is marked
/// whatever EC2 says.
async fn revoke(
    catalog: &AmiCatalog,
    ctx: &Context,
    namespace: &str,
    images: &[ImageSummary],
) -> (Vec<revocation::Revoked>, Vec<crate::api::catalog::RevokedImage>) {
    let spec = &catalog.spec;
    if spec.revoked.is_empty() {
        return Default::default();
    }
    let region = &spec.region;
    let mut children: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let mut frontier: Vec<String> = spec
        .revoked
        .iter()
        .filter(|r| r.descendants)
        .map(|r| r.image_id.clone())
        .collect();
    for _ in 0..revocation::MAX_GENERATIONS {
        if frontier.is_empty() {
            break;
        }
        let found = match ctx.ec2.children_of(region, &frontier).await {
            Ok(found) => found,
            Err(e) => {
                // The images named stay revoked; their descendants are looked for again next sync.
                warn!(error = %e, "listing the descendants of revoked images failed");
                break;
            }
        };
        frontier = found
            .values()
            .flatten()
            .filter(|c| !children.contains_key(*c))
            .cloned()
            .collect();
        children.extend(found);
    }
    let revoked = revocation::expand(&spec.revoked, &children);
    let before: Vec<crate::api::catalog::RevokedImage> = catalog
        .status
        .as_ref()
        .map(|s| s.revoked.clone())
        .unwrap_or_default();
    let mut entries = Vec::new();
    for r in &revoked {
        let done = revocation::outcome(r, revocation::Act::Done);
        if let Some(p) = before
            .iter()
            .find(|p| p.image_id == r.image_id && p.outcome == done)
        {
            entries.push(p.clone());
            continue;
        }
        match revoke_one(catalog, ctx, namespace, images, r).await {
            Ok(entry) => entries.push(entry),
            Err(e) => {
                warn!(image = %r.image_id, error = %e, "revoking an image in EC2 failed");
                publish_as(
                    catalog,
                    ctx,
                    EventType::Warning,
                    "RevocationFailed",
                    format!("Revoke:{}", r.image_id),
                    format!(
                        "{}: {e}; it is excluded as a source, and EC2 is asked again at the next sync",
                        r.image_id
                    ),
                )
                .await;
                let mut entry =
                    revocation::status_entry(r, revocation::Act::Done, Vec::new(), Some(e.to_string()));
                entry.outcome = "Failed".to_string();
                entries.push(entry);
            }
        }
    }
    (revoked, entries)
}

/// Revokes one image in EC2 (its copies first, then the image) and says what was done.
async fn revoke_one(
    catalog: &AmiCatalog,
    ctx: &Context,
    namespace: &str,
    images: &[ImageSummary],
    r: &revocation::Revoked,
) -> std::result::Result<crate::api::catalog::RevokedImage, Ec2Error> {
    let region = &catalog.spec.region;
    let image = match images.iter().find(|i| i.image_id == r.image_id) {
        Some(i) => Some(i.clone()),
        None => ctx.ec2.image(region, &r.image_id).await?,
    };
    let Some(image) = image else {
        let message = format!("EC2 lists no image {} in {region}", r.image_id);
        return Ok(revocation::status_entry(
            r,
            revocation::Act::NotOurs,
            Vec::new(),
            Some(message),
        ));
    };
    let act = revocation::act(&image, r, ctx.retention_scope, namespace, jiff::Timestamp::now());
    let mut copies = Vec::new();
    if matches!(act, revocation::Act::Deprecate(_) | revocation::Act::Disable) {
        let mut targets = Vec::new();
        for copy_region in crate::distribution::copy_regions(&image) {
            for copy in ctx.ec2.copies_of(&copy_region, &image.image_id).await? {
                copies.push(format!("{} in {copy_region}", copy.image_id));
                targets.push((copy_region.clone(), copy.image_id));
            }
        }
        targets.push((region.clone(), image.image_id.clone()));
        for (target_region, id) in &targets {
            match act {
                revocation::Act::Deprecate(at) => ctx.ec2.deprecate(target_region, id, at).await?,
                _ => ctx.ec2.disable_image(target_region, id).await?,
            }
        }
        let what = revocation::outcome(r, act).to_lowercase();
        let copied = if copies.is_empty() {
            String::new()
        } else {
            format!(" with its copies {}", copies.join(", "))
        };
        publish(
            catalog,
            ctx,
            "Revoked",
            format!("Revoke:{}", r.image_id),
            format!("{} {what}{copied}: {}", r.image_id, r.reason),
        )
        .await;
    }
    Ok(revocation::status_entry(r, act, copies, None))
}

/// An Event of a given type about the catalog (best effort).
async fn publish_as(
    catalog: &AmiCatalog,
    ctx: &Context,
    type_: EventType,
    reason: &str,
    action: String,
    note: String,
) {
    let regarding = catalog.object_ref(&());
    crate::k8s::publish(&ctx.recorder, &regarding, type_, reason, &action, &note).await;
}

/// An Event about the catalog (best effort). kube's recorder folds Events with equal reason and
/// action into one series (keeping the first note), so the action names the image: one Event per
/// removed image.
async fn publish(catalog: &AmiCatalog, ctx: &Context, reason: &str, action: String, note: String) {
    publish_as(catalog, ctx, EventType::Normal, reason, action, note).await;
}

fn error_policy(_catalog: Arc<AmiCatalog>, error: &Error, _ctx: Arc<Context>) -> Action {
    crate::k8s::retry_after(error)
}

/// The AmiCatalog controller on the process's caches, subscribed at once; the future runs it
/// until a shutdown signal. A Bake that succeeds refreshes the catalogs its image may belong to.
pub fn run(ctx: Arc<Context>, caches: &Caches) -> impl Future<Output = ()> + use<> {
    let _ = ctx.stores.set(caches.stores());
    let store = caches.catalogs.store();
    let trigger = ctx.clone();
    Controller::for_shared_stream(caches.catalogs.subscribe(), caches.catalogs.store())
        // A sync pages through EC2: a few at once keep a burst of catalogs from throttling the
        // account's DescribeImages rate.
        .with_config(kube::runtime::controller::Config::default().concurrency(CONCURRENCY))
        // A Bake that succeeds refreshes the catalogs its image may belong to, without waiting
        // for their interval.
        .watches_shared_stream(caches.bakes.subscribe(), move |bake: Arc<Bake>| {
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
}

#[cfg(test)]
mod tests;
