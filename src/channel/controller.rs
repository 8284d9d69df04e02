//! The AmiChannel reconciler: gathers the channel's catalog and Bakes from the process's caches,
//! lets [`super::choose`] pick the image, publishes it when something changed (or the check
//! interval passed), and writes status.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{EventType, Recorder};
use kube::runtime::reflector::ObjectRef;
use kube::{Client, ResourceExt};
use tracing::{info, instrument};

use super::publish::{self, Held, Ssm};
use super::{Catalog, Facts, Outcome, Target};
use crate::api::Bake;
use crate::api::channel::{AmiChannel, Publication, RegionImage};
use crate::api::conditions;
use crate::aws::{Ec2, Ec2Error};
use crate::bake::watch::{Caches, Stores};
use crate::error::{Category, ReconcileError};
use crate::k8s::{WriteError, publish_about};
use crate::metrics::Metrics;

/// Targets published at once.
const PUBLISH_CONCURRENCY: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the object has no {0}")]
    MissingField(&'static str),

    #[error("finding the regions of {0} failed")]
    Regions(String, #[source] Ec2Error),

    #[error("writing AmiChannel status failed")]
    PatchStatus(#[from] WriteError),
}

impl ReconcileError for Error {
    fn category(&self) -> Category {
        match self {
            Error::MissingField(_) => Category::InvalidObject,
            Error::Regions(..) => Category::Ec2,
            Error::PatchStatus(_) => Category::KubeWrite,
        }
    }

    fn is_conflict(&self) -> bool {
        matches!(self, Error::PatchStatus(WriteError::Replaced))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Shared state of the AmiChannel controller.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub stores: Stores,
    pub ec2: Ec2,
    pub ssm: Ssm,
    /// Where a namespace may publish SSM parameters: a path with `{namespace}` in it.
    pub ssm_prefix: String,
    /// How often published targets are checked against AWS.
    pub check_interval: Duration,
}

/// A Bake of the namespace whose image is `image`, from the cache.
fn bake_of(stores: &Stores, namespace: &str, image: &str) -> Option<Arc<Bake>> {
    stores.bakes.find(|b| {
        b.metadata.namespace.as_deref() == Some(namespace)
            && b.status
                .as_ref()
                .is_some_and(|s| s.ami_id.as_deref() == Some(image))
    })
}

#[instrument(skip_all, fields(channel = %channel.name_any(), namespace = channel.namespace().unwrap_or_default()))]
async fn reconcile(channel: Arc<AmiChannel>, ctx: Arc<Context>) -> Result<Action> {
    ctx.stores.synced.wait().await;
    crate::k8s::measured(&ctx.metrics, "channel", reconcile_inner(&channel, &ctx)).await
}

async fn reconcile_inner(channel: &AmiChannel, ctx: &Context) -> Result<Action> {
    if channel.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let namespace = channel
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let spec = &channel.spec;
    let previous = channel.status.as_ref();
    let now = jiff::Timestamp::now();
    let catalog = ctx.stores.catalog(&namespace, &spec.catalog);
    let choice = super::choose(&Facts {
        spec,
        status: previous,
        catalog: catalog.as_ref().map(|c| Catalog {
            name: &spec.catalog,
            region: &c.spec.region,
            status: c.status.as_ref(),
        }),
        pinned_baked: spec
            .image_id
            .as_deref()
            .is_some_and(|id| bake_of(&ctx.stores, &namespace, id).is_some()),
        now,
    });
    let kept_regions = || previous.map(|s| s.regions.clone()).unwrap_or_default();
    let (regions, published) = match (&choice.image, &catalog, &choice.blocked) {
        (Some(image), Some(catalog), None) => {
            let home = catalog.spec.region.as_str();
            let due = |regions: &[RegionImage]| {
                super::due(
                    previous,
                    channel.metadata.generation,
                    image,
                    regions,
                    ctx.check_interval,
                    now,
                )
            };
            // From the Bake's status when its Bake is there; else the regions found before, unless
            // a check is due anyway; else Baker's tags in EC2.
            let regions = match (bake_of(&ctx.stores, &namespace, image), previous) {
                (Some(bake), _) => bake
                    .status
                    .as_ref()
                    .map(|s| super::regions_of_bake(home, image, s))
                    .unwrap_or_default(),
                (None, Some(s)) if s.image_id.as_deref() == Some(image.as_str()) && !due(&s.regions) => {
                    s.regions.clone()
                }
                (None, _) => regions_from_ec2(&ctx.ec2, home, image)
                    .await
                    .map_err(|e| Error::Regions(image.clone(), e))?,
            };
            let published = if due(&regions) {
                Some(publish_all(ctx, channel, &namespace, home, image, &regions).await)
            } else {
                None
            };
            (regions, published)
        }
        _ => (kept_regions(), None),
    };
    let status = super::status(
        spec,
        previous,
        &Outcome {
            choice: &choice,
            regions,
            published,
            generation: channel.metadata.generation,
            now,
        },
    );
    if let (Some(image), Some(why)) = (&choice.image, &choice.moved) {
        let from = previous
            .and_then(|s| s.image_id.clone())
            .map(|old| format!(" from {old}"))
            .unwrap_or_default();
        info!(image = %image, "the channel moved");
        // One Event per move: the recorder folds Events of equal reason and action into one.
        publish_about(
            &ctx.recorder,
            channel,
            EventType::Normal,
            "Moved",
            &format!("Move/{image}"),
            &format!("moved{from} to {image}: {why}"),
        )
        .await;
    }
    let was_degraded = previous
        .and_then(|s| conditions::find(&s.conditions, super::DEGRADED))
        .is_some_and(|c| c.status == "True");
    if let (Some(why), false) = (&choice.degraded, was_degraded) {
        publish_about(
            &ctx.recorder,
            channel,
            EventType::Warning,
            "Degraded",
            &format!("Revoke/{}", choice.image.as_deref().unwrap_or_default()),
            why,
        )
        .await;
    }
    crate::k8s::apply_status_if_changed(&ctx.client, channel, previous, &status).await?;
    Ok(super::requeue(&choice, &status, ctx.check_interval, now)
        .map_or_else(Action::await_change, Action::requeue))
}

/// The regions `image` exists in, by Baker's tags: its own region and the available copies in the
/// regions its `baker.io/copied-to` tag names (for an image whose Bake is gone).
async fn regions_from_ec2(ec2: &Ec2, home: &str, image: &str) -> Result<Vec<RegionImage>, Ec2Error> {
    let mut out = vec![RegionImage {
        region: home.to_string(),
        image_id: image.to_string(),
    }];
    let Some(found) = ec2.image(home, image).await? else {
        return Ok(out);
    };
    let copied_to = found
        .tags
        .get(crate::api::keys::COPIED_TO)
        .map(|t| {
            t.split(',')
                .filter(|r| !r.is_empty())
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    for region in copied_to {
        let available = ec2
            .copies_of(&region, image)
            .await?
            .into_iter()
            .find(|c| c.state.as_deref() == Some("available"));
        if let Some(copy) = available {
            out.push(RegionImage {
                region,
                image_id: copy.image_id,
            });
        }
    }
    out.sort();
    Ok(out)
}

/// Publishes to every target, a few at a time; one that fails or is refused does not stop the
/// others. An Event tells of each change and each failure.
async fn publish_all(
    ctx: &Context,
    channel: &AmiChannel,
    namespace: &str,
    home: &str,
    image: &str,
    regions: &[RegionImage],
) -> Vec<Publication> {
    let prefix = super::ssm_prefix(&ctx.ssm_prefix, namespace);
    let who = format!("{namespace}/{}", channel.name_any());
    let description = format!("Baker: AmiChannel {who} moved to {image}");
    let targets = super::targets(&channel.spec, home, regions);
    futures::stream::iter(targets)
        .map(|target| {
            let (prefix, who, description) = (&prefix, &who, &description);
            async move {
                let id = super::image_in(regions, target.region())
                    .unwrap_or(image)
                    .to_string();
                if let Some(early) = super::precheck(&target, regions, prefix) {
                    // Refused without asking AWS: still worth a Warning; waiting is not.
                    let change = (early.state == super::REFUSED).then(|| {
                        let why = early.message.clone().unwrap_or_default();
                        (
                            EventType::Warning,
                            "PublishRefused",
                            format!("{}: {why}", what(&target)),
                        )
                    });
                    return (target, id, early, change);
                }
                let held = match &target {
                    Target::Ssm { name, region } => ctx.ssm.publish(region, name, &id, who).await,
                    Target::LaunchTemplate(t, region) => {
                        publish::launch_template(&ctx.ec2, region, t, &id, namespace, description).await
                    }
                };
                let (publication, change) = outcome(&target, &id, held);
                (target, id, publication, change)
            }
        })
        .buffered(PUBLISH_CONCURRENCY)
        .then(|(target, id, publication, change)| async move {
            if let Some((type_, reason, note)) = change {
                // Per target and image, so each change is an Event of its own (the recorder
                // folds equal reasons and actions; an action holds at most 128 characters).
                let action = crate::k8s::truncate(
                    &format!("Publish/{}/{id}/{}", target.region(), target.name()),
                    128,
                );
                publish_about(&ctx.recorder, channel, type_, reason, &action, &note).await;
            }
            publication
        })
        .collect()
        .await
}

fn what(target: &Target) -> String {
    format!("{} {} in {}", target.kind(), target.name(), target.region())
}

type Change = Option<(EventType, &'static str, String)>;

/// A target's publication and the Event it is worth.
fn outcome(target: &Target, image: &str, held: Result<Held, Ec2Error>) -> (Publication, Change) {
    let what = what(target);
    match held {
        Ok(Held::Unchanged { version }) => {
            let mut p = target.publication(super::PUBLISHED, Some(image.to_string()), None);
            p.version = version;
            (p, None)
        }
        Ok(Held::Written { version }) => {
            let mut p = target.publication(super::PUBLISHED, Some(image.to_string()), None);
            p.version = version;
            let at = version.map(|v| format!(" (version {v})")).unwrap_or_default();
            (
                p,
                Some((
                    EventType::Normal,
                    "Published",
                    format!("{what} holds {image}{at}"),
                )),
            )
        }
        Ok(Held::Refused(why)) => (
            target.publication(super::REFUSED, None, Some(why.clone())),
            Some((EventType::Warning, "PublishRefused", format!("{what}: {why}"))),
        ),
        Err(e) => {
            let message = crate::error::chain(&e);
            (
                target.publication(super::FAILED, None, Some(message.clone())),
                Some((EventType::Warning, "PublishFailed", format!("{what}: {message}"))),
            )
        }
    }
}

fn error_policy(_c: Arc<AmiChannel>, error: &Error, _ctx: Arc<Context>) -> Action {
    crate::k8s::retry_after(error)
}

/// The AmiChannel controller on the process's caches. A channel looks again when its catalog
/// changes (a new image, a revocation) and when a Bake of its namespace changes (its copies
/// become available).
pub fn run(ctx: Arc<Context>, caches: &Caches) -> impl Future<Output = ()> + use<> {
    let controller = Controller::for_shared_stream(caches.channels.subscribe(), caches.channels.store());
    let by_catalog = caches.channels.store();
    let by_bake = caches.channels.store();
    controller
        .watches_shared_stream(
            caches.catalogs.subscribe(),
            move |c: Arc<crate::api::AmiCatalog>| {
                let (name, namespace) = (c.name_any(), c.namespace());
                by_catalog
                    .state()
                    .into_iter()
                    .filter(|ch| ch.namespace() == namespace && ch.spec.catalog == name)
                    .map(|ch| ObjectRef::from_obj(&*ch))
                    .collect::<Vec<_>>()
            },
        )
        .watches_shared_stream(caches.bakes.subscribe(), move |b: Arc<Bake>| {
            let Some(image) = b.status.as_ref().and_then(|s| s.ami_id.clone()) else {
                return Vec::new();
            };
            let namespace = b.namespace();
            by_bake
                .state()
                .into_iter()
                .filter(|ch| ch.namespace() == namespace)
                .filter(|ch| {
                    ch.spec.image_id.as_deref() == Some(image.as_str())
                        || ch.status.as_ref().and_then(|s| s.image_id.as_deref()) == Some(image.as_str())
                })
                .map(|ch| ObjectRef::from_obj(&*ch))
                .collect::<Vec<_>>()
        })
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "channel reconcile loop");
            }
        })
}
