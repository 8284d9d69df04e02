//! Distribution of a Succeeded Bake's image: gathers what EC2 says of the image in each region,
//! lets `crate::distribution` decide, and acts. Regions go on independently: one that EC2
//! refuses is reported in its artifact and tried again later, the others complete.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use tracing::{info, warn};

use super::context::{BakeRef, Context, locked};
use super::error::Result;
use crate::api::bake::{Artifact, ArtifactState};
use crate::api::{BakeStatus, Distribution, keys};
use crate::aws::{Ec2Error, ImageSummary};
use crate::distribution::{self as dist, Check, Desired, Found, Seen, Step};
use crate::failpoint;
use crate::k8s::now;

/// Looks after a Succeeded Bake's distribution when it is due; otherwise says when it is next.
pub(super) async fn maintain(b: &BakeRef<'_>, ctx: &Context) -> Result<Action> {
    let Some(status) = b.status() else {
        return Ok(Action::await_change());
    };
    let template = ctx.stores.template(&b.bake.spec.template);
    let Some(d) = template.as_ref().and_then(|t| t.spec.distribution.clone()) else {
        // The template stopped distributing (or is gone): Ready as the bake left it.
        if status.distribution.is_some() && template.is_some() {
            let next = dist::dropped(status, b.bake.metadata.generation, &now());
            ctx.write_status(b, &next).await?;
        }
        return Ok(Action::await_change());
    };
    let key = dist::key(&d);
    let interval = Duration::from_secs(ctx.config.distribution_check_seconds.max(1));
    match dist::next_check(status, &key, d.maintain_days(), interval, jiff::Timestamp::now()) {
        Check::Never => return Ok(Action::await_change()),
        Check::After(wait) => return Ok(Action::requeue(wait)),
        Check::Now => {}
    }
    let (Some(ami), Some(region)) = (status.ami_id.clone(), status.region.clone()) else {
        return Ok(Action::await_change());
    };
    // Two Bakes with one image (one reused the other's) never copy it at the same time.
    let lock = image_lock(ctx, &ami);
    let _held = lock.lock().await;
    let next = distribute(b, ctx, status, &d, &key, &ami, &region).await;
    drop(_held);
    release_image_lock(ctx, &ami, lock);
    Ok(
        match dist::next_check(&next?, &key, d.maintain_days(), interval, jiff::Timestamp::now()) {
            Check::After(wait) => Action::requeue(wait),
            Check::Now => Action::requeue(dist::COPYING_RECHECK),
            Check::Never => Action::await_change(),
        },
    )
}

fn image_lock(ctx: &Context, ami: &str) -> Arc<tokio::sync::Mutex<()>> {
    locked(&ctx.distributing)
        .entry(ami.to_string())
        .or_default()
        .clone()
}

/// Forgets an image's lock once no one else holds or waits for it.
fn release_image_lock(ctx: &Context, ami: &str, lock: Arc<tokio::sync::Mutex<()>>) {
    let mut locks = locked(&ctx.distributing);
    // Ours and the map's: nobody else has it.
    if Arc::strong_count(&lock) <= 2 {
        locks.remove(ami);
    }
}

/// One pass over every region; writes the status it leads to (if it changed) and returns it.
async fn distribute(
    b: &BakeRef<'_>,
    ctx: &Context,
    status: &BakeStatus,
    d: &Distribution,
    key: &str,
    ami: &str,
    region: &str,
) -> Result<BakeStatus> {
    let generation = b.bake.metadata.generation;
    let Some(image) = ctx.ec2.image(region, ami).await? else {
        let artifact = Artifact {
            region: region.to_string(),
            image_id: Some(ami.to_string()),
            state: ArtifactState::Failed,
            message: Some(format!(
                "{ami} no longer exists in {region}; nothing to distribute"
            )),
            ..Default::default()
        };
        let next = dist::apply(status, vec![artifact], key, generation, &now());
        write(b, ctx, status, &next).await?;
        return Ok(next);
    };
    let desired = dist::desired(region, d, &image);
    // Named on the image before any copy is asked for: whoever looks for copies later (a
    // restarted operator, retention, a deleted Bake) knows every region to look in.
    if let Some(value) = dist::copied_to(&image, &desired) {
        let tags = BTreeMap::from([(keys::COPIED_TO.to_string(), value)]);
        ctx.ec2.tag(region, &[ami.to_string()], &tags).await?;
    }
    let copy_tags = dist::copy_tags(&image);
    let no_tags = BTreeMap::new();
    let was_available = |r: &str| {
        status
            .artifacts
            .iter()
            .any(|a| a.region == r && a.state == ArtifactState::Available)
    };
    let build = serve_region(ctx, &desired, &image, region, &no_tags, None, true);
    let copies = desired.copies.iter().map(|(r, kms)| {
        serve_region(
            ctx,
            &desired,
            &image,
            r,
            &copy_tags,
            kms.as_deref(),
            was_available(r),
        )
    });
    let mut served = vec![build.await];
    served.extend(join_all(copies).await);
    let (artifacts, done): (Vec<Artifact>, Vec<(String, Vec<Step>)>) = served
        .into_iter()
        .map(|(a, steps)| {
            let region = a.region.clone();
            (a, (region, steps))
        })
        .unzip();
    let next = dist::apply(status, artifacts, key, generation, &now());
    announce(b, ctx, status, &next, key, &done).await;
    write(b, ctx, status, &next).await?;
    Ok(next)
}

/// Writes the status when it says something new; a pass that found everything as before writes
/// only to record the periodic check (at most once per check interval), so a copy under way or a
/// failed region costs no writes while nothing changes.
async fn write(b: &BakeRef<'_>, ctx: &Context, previous: &BakeStatus, next: &BakeStatus) -> Result<()> {
    let interval = Duration::from_secs(ctx.config.distribution_check_seconds.max(1));
    if dist::worth_writing(previous, next, interval) {
        ctx.write_status(b, next).await?;
    }
    Ok(())
}

/// Events for what changed in a region: a copy made, a region that failed, and repairs of a
/// region that was complete (something removed by hand).
async fn announce(
    b: &BakeRef<'_>,
    ctx: &Context,
    previous: &BakeStatus,
    next: &BakeStatus,
    key: &str,
    served: &[(String, Vec<Step>)],
) {
    for a in &next.artifacts {
        let before = previous.artifacts.iter().find(|p| p.region == a.region);
        let note = match (before.map(|p| p.state), a.state) {
            (Some(ArtifactState::Failed), ArtifactState::Failed) => continue,
            (_, ArtifactState::Failed) => (
                EventType::Warning,
                dist::DISTRIBUTION_FAILED,
                format!("{}: {}", a.region, a.message.as_deref().unwrap_or("failed")),
            ),
            (None | Some(ArtifactState::Failed), ArtifactState::Copying) => (
                EventType::Normal,
                "Copying",
                format!(
                    "copying {} to {} as {}",
                    next.ami_id.as_deref().unwrap_or_default(),
                    a.region,
                    a.image_id.as_deref().unwrap_or("a new image")
                ),
            ),
            (Some(ArtifactState::Available), ArtifactState::Copying) => (
                EventType::Warning,
                "Repaired",
                format!(
                    "the copy in {} was gone; copying again as {}",
                    a.region,
                    a.image_id.as_deref().unwrap_or("a new image")
                ),
            ),
            _ => continue,
        };
        ctx.publish_as(b, note.0, note.1, &format!("Distribute/{}", a.region), note.2)
            .await;
    }
    // A region that was complete under this same distribution needed work: someone changed it.
    let same = previous.distribution.as_ref().map(|d| d.key.as_str()) == Some(key);
    for (region, done) in served.iter().filter(|_| same) {
        let was_available = previous
            .artifacts
            .iter()
            .any(|p| &p.region == region && p.state == ArtifactState::Available);
        if !was_available || done.is_empty() || done.iter().any(|s| matches!(s, Step::Copy { .. })) {
            continue;
        }
        let what: Vec<String> = done.iter().map(describe).collect();
        ctx.publish_as(
            b,
            EventType::Warning,
            "Repaired",
            &format!("Distribute/{region}"),
            format!("{region}: {} (changed outside Baker)", what.join("; ")),
        )
        .await;
    }
}

fn describe(step: &Step) -> String {
    match step {
        Step::Copy { .. } => "copied again".to_string(),
        Step::Tag(tags) => format!(
            "tags put back: {}",
            tags.keys().cloned().collect::<Vec<_>>().join(", ")
        ),
        Step::Share(grantees) => format!(
            "launch permission given back to {}",
            grantees.iter().map(|g| g.as_str()).collect::<Vec<_>>().join(", ")
        ),
        Step::ShareSnapshots(add) => {
            format!("create-volume permission given back on {} snapshot(s)", add.len())
        }
        Step::Deprecate(at) => format!("deprecation time set back to {at}"),
    }
}

/// Looks at the image's name in one region, plans, and acts: the region's artifact and the
/// steps done.
async fn serve_region(
    ctx: &Context,
    desired: &Desired,
    image: &ImageSummary,
    region: &str,
    tags: &BTreeMap<String, String>,
    kms_key_id: Option<&str>,
    was_available: bool,
) -> (Artifact, Vec<Step>) {
    let found = match observe(ctx, desired, image, region).await {
        Ok(found) => found,
        Err(e) => {
            let plan = dist::plan_region(
                desired,
                region,
                tags,
                kms_key_id,
                &Found::Absent,
                jiff::Timestamp::now(),
            );
            let mut artifact = dist::failed(plan.artifact, &e);
            artifact.shared_with.clear();
            artifact.deprecation_time = None;
            return (artifact, Vec::new());
        }
    };
    let mut plan = dist::plan_region(desired, region, tags, kms_key_id, &found, jiff::Timestamp::now());
    dist::tag_snapshots_once(&mut plan, tags, was_available);
    let mut artifact = plan.artifact;
    let mut target = artifact.image_id.clone();
    let snapshots = match &found {
        Found::Image(seen) => seen.image.snapshot_ids.clone(),
        _ => Vec::new(),
    };
    let mut done = Vec::new();
    for step in plan.steps {
        let source = Source {
            region: &desired.build_region,
            image,
            tags,
        };
        let result = act(ctx, &source, region, &step, &mut target, &snapshots).await;
        artifact.image_id.clone_from(&target);
        if let Err(e) = result {
            warn!(region, error = %e, "a distribution step failed");
            return (dist::failed(artifact, &e), done);
        }
        done.push(step);
    }
    (artifact, done)
}

/// What holds the image's name in `region`, with its permissions when they matter.
async fn observe(
    ctx: &Context,
    desired: &Desired,
    image: &ImageSummary,
    region: &str,
) -> std::result::Result<Found, Ec2Error> {
    let found = if region == desired.build_region {
        image.clone()
    } else {
        let named = match &image.name {
            Some(name) => ctx.ec2.images_named(region, name).await?,
            None => ctx.ec2.copies_of(region, &image.image_id).await?,
        };
        match dist::find_copy(&image.image_id, named) {
            Ok(Some(copy)) => copy,
            Ok(None) => return Ok(Found::Absent),
            Err(foreign) => return Ok(Found::Foreign(foreign)),
        }
    };
    if found.state.as_deref() != Some("available") {
        return Ok(Found::Image(Box::new(Seen {
            image: found,
            ..Default::default()
        })));
    }
    let grantees = if desired.grantees.is_empty() {
        Default::default()
    } else {
        ctx.ec2.launch_grantees(region, &found.image_id).await?
    };
    let mut snapshot_accounts = BTreeMap::new();
    if !desired.snapshot_accounts.is_empty() {
        for s in &found.snapshot_ids {
            snapshot_accounts.insert(s.clone(), ctx.ec2.snapshot_accounts(region, s).await?);
        }
    }
    Ok(Found::Image(Box::new(Seen {
        image: found,
        grantees,
        snapshot_accounts,
    })))
}

/// The image being distributed, where it is, and the tags its copies carry.
struct Source<'a> {
    region: &'a str,
    image: &'a ImageSummary,
    tags: &'a BTreeMap<String, String>,
}

async fn act(
    ctx: &Context,
    source: &Source<'_>,
    region: &str,
    step: &Step,
    target: &mut Option<String>,
    snapshots: &[String],
) -> std::result::Result<(), Ec2Error> {
    match step {
        Step::Copy { kms_key_id } => {
            let image = source.image;
            let description = dist::copy_description(image);
            let request = dist::ec2::CopyRequest {
                tags: source.tags,
                description: &description,
                kms_key_id: kms_key_id.as_deref(),
            };
            let id = ctx.ec2.copy_image(region, source.region, image, &request).await?;
            info!(image = %image.image_id, copy = %id, region, "copying the image");
            failpoint::hit(failpoint::COPY_REQUESTED);
            *target = Some(id);
        }
        Step::Tag(tags) => {
            let mut ids: Vec<String> = target.iter().cloned().collect();
            ids.extend(snapshots.iter().cloned());
            ctx.ec2.tag(region, &ids, tags).await?;
        }
        Step::Share(grantees) => {
            if let Some(id) = target {
                ctx.ec2.share(region, id, grantees).await?;
            }
        }
        Step::ShareSnapshots(add) => {
            for (snapshot, accounts) in add {
                ctx.ec2.share_snapshot(region, snapshot, accounts).await?;
            }
        }
        Step::Deprecate(at) => {
            if let Some(id) = target {
                ctx.ec2.deprecate(region, id, *at).await?;
            }
        }
    }
    Ok(())
}
