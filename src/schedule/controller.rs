//! The BakeSchedule reconciler: gathers the schedule's Bakes, its template and the template's
//! source catalog from the process's caches (no EC2 call), lets [`super::decide`] choose, then
//! creates the trigger's Bake, deletes Bakes past the history limits and writes status.

use std::sync::Arc;

use futures::StreamExt;
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{EventType, Recorder};
use kube::runtime::reflector::ObjectRef;
use kube::{Client, Resource, ResourceExt};
use tracing::{info, instrument};

use super::{Facts, Owned, Source};
use crate::api::schedule::BakeSchedule;
use crate::api::{Bake, BakeTemplate, keys};
use crate::bake::watch::{Caches, Stores};
use crate::error::{Category, ReconcileError};
use crate::k8s::{FIELD_MANAGER, WriteError};
use crate::metrics::Metrics;

/// The label on a schedule's Bakes naming the schedule.
pub const SCHEDULE_LABEL: &str = "baker.io/schedule";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the object has no {0}")]
    MissingField(&'static str),

    #[error("creating Bake {0} failed")]
    CreateBake(String, #[source] kube::Error),

    #[error("deleting Bake {0} past the history limit failed")]
    DeleteBake(String, #[source] kube::Error),

    #[error("writing BakeSchedule status failed")]
    PatchStatus(#[source] kube::Error),

    #[error("the BakeSchedule was replaced while it was reconciled")]
    Replaced,
}

impl From<WriteError> for Error {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Replaced => Error::Replaced,
            WriteError::Api(e) => Error::PatchStatus(e),
        }
    }
}

impl ReconcileError for Error {
    fn category(&self) -> Category {
        match self {
            Error::MissingField(_) => Category::InvalidObject,
            Error::CreateBake(..) | Error::DeleteBake(..) | Error::PatchStatus(_) | Error::Replaced => {
                Category::KubeWrite
            }
        }
    }

    fn is_conflict(&self) -> bool {
        matches!(self, Error::Replaced)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Shared state of the BakeSchedule controller.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub stores: Stores,
    /// The operator's floor under a schedule's `minIntervalSeconds`.
    pub min_interval_floor: i64,
}

impl Context {
    pub fn new(client: Client, metrics: Arc<Metrics>, stores: Stores, min_interval_floor: i64) -> Self {
        let recorder = crate::k8s::recorder(&client);
        Self {
            client,
            recorder,
            metrics,
            stores,
            min_interval_floor,
        }
    }
}

/// What the template's source resolves to, from the caches.
fn source_of(ctx: &Context, namespace: &str, schedule: &BakeSchedule) -> Source {
    let Some(template) = ctx.stores.template(&schedule.spec.bake.template) else {
        return Source::Unknown {
            reason: "TemplateNotFound",
            message: format!("BakeTemplate {:?} does not exist", schedule.spec.bake.template),
        };
    };
    let source = &template.spec.source;
    if let Some(id) = &source.ami_id {
        return Source::Image(id.clone());
    }
    let Some(catalog) = &source.catalog else {
        return Source::Unknown {
            reason: "FilterSource",
            message: "the template's source is an EC2 filter, which a schedule does not poll: point the template at an AmiCatalog with that query to follow it".to_string(),
        };
    };
    let Some(found) = ctx.stores.catalog(namespace, &catalog.name) else {
        return Source::Unknown {
            reason: "SourceCatalogNotFound",
            message: format!(
                "AmiCatalog {:?} (the template's source) does not exist in {namespace}",
                catalog.name
            ),
        };
    };
    match crate::catalog::source_image(
        found.status.as_ref(),
        schedule.spec.bake.virtualization_type.as_str(),
    ) {
        Some(id) => Source::Image(id),
        None => Source::Unknown {
            reason: "SourceCatalogEmpty",
            message: format!("AmiCatalog {:?} lists no image to start from yet", catalog.name),
        },
    }
}

/// The schedule's Bakes in the cache: those it controls.
fn owned(ctx: &Context, namespace: &str, uid: &str) -> Vec<Owned> {
    ctx.stores
        .bakes
        .state()
        .iter()
        .filter(|b| b.namespace().as_deref() == Some(namespace))
        // Being deleted (history, or by hand): no longer the schedule's to count or delete.
        .filter(|b| b.metadata.deletion_timestamp.is_none())
        .filter(|b| {
            b.owner_references()
                .iter()
                .any(|o| o.uid == uid && o.controller == Some(true))
        })
        .map(|b| {
            let status = b.status.as_ref();
            Owned {
                name: b.name_any(),
                created: b
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .map_or(jiff::Timestamp::UNIX_EPOCH, |t| t.0),
                phase: status.and_then(|s| s.phase),
                ami_id: status.and_then(|s| s.ami_id.clone()),
                source_ami_id: status.and_then(|s| s.source_ami_id.clone()),
                finished: status.and_then(|s| s.finished_at.as_ref()).map(|t| t.0),
            }
        })
        .collect()
}

#[instrument(skip_all, fields(schedule = %schedule.name_any(), namespace = schedule.namespace().unwrap_or_default()))]
async fn reconcile(schedule: Arc<BakeSchedule>, ctx: Arc<Context>) -> Result<Action> {
    ctx.stores.synced.wait().await;
    crate::k8s::measured(&ctx.metrics, "schedule", reconcile_inner(&schedule, &ctx)).await
}

async fn reconcile_inner(schedule: &BakeSchedule, ctx: &Context) -> Result<Action> {
    if schedule.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let namespace = schedule
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let uid = schedule.uid().ok_or(Error::MissingField("metadata.uid"))?;
    let name = schedule.name_any();
    let bakes = owned(ctx, &namespace, &uid);
    let decision = super::decide(&Facts {
        name: &name,
        spec: &schedule.spec,
        status: schedule.status.as_ref(),
        generation: schedule.metadata.generation,
        created: schedule
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or(jiff::Timestamp::now(), |t| t.0),
        bakes: &bakes,
        source: source_of(ctx, &namespace, schedule),
        min_interval_floor: ctx.min_interval_floor,
        now: jiff::Timestamp::now(),
    });
    let api: Api<Bake> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut status = decision.status;
    if let Some(new) = &decision.create {
        let owner = schedule
            .controller_owner_ref(&())
            .ok_or(Error::MissingField("metadata.uid"))?;
        let mut bake = Bake::new(&new.name, new.spec.clone());
        bake.metadata.namespace = Some(namespace.clone());
        bake.metadata.owner_references = Some(vec![owner]);
        bake.metadata.labels = Some(
            [
                (SCHEDULE_LABEL.to_string(), name.clone()),
                (keys::MANAGED_BY.to_string(), keys::MANAGED_BY_VALUE.to_string()),
            ]
            .into(),
        );
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        match api.create(&params, &bake).await {
            Ok(_) => {
                info!(bake = %new.name, kind = %new.trigger.kind, "the schedule made a Bake");
                crate::k8s::publish_about(
                    &ctx.recorder,
                    schedule,
                    EventType::Normal,
                    "Triggered",
                    &new.trigger.kind,
                    &format!("{}: created Bake {}", new.trigger.message, new.name),
                )
                .await;
            }
            // Made by an earlier pass whose status did not land: the trigger is done.
            Err(kube::Error::Api(s)) if s.code == 409 && bakes.iter().any(|b| b.name == new.name) => {}
            // Ours, made by an earlier pass, the cache not showing it yet: the trigger is done.
            Err(kube::Error::Api(s)) if s.code == 409 && made_by(&api, &new.name, &uid).await => {}
            // Not ours: never adopt it.
            Err(kube::Error::Api(s)) if s.code == 409 => not_made(
                &mut status,
                schedule,
                format!(
                    "Bake {} exists and was not made by this schedule; delete it so the trigger can bake",
                    new.name
                ),
            ),
            // RBAC: the operator creates Bakes only where bakes may run (the chart's bakeNamespaces).
            Err(kube::Error::Api(s)) if s.code == 403 => not_made(
                &mut status,
                schedule,
                format!(
                    "the operator may not create Bakes in {namespace}: schedules work in the namespaces where bakes may run ({})",
                    s.message
                ),
            ),
            Err(e) => return Err(Error::CreateBake(new.name.clone(), e)),
        }
    }
    for old in &decision.delete {
        match api.delete(old, &DeleteParams::default()).await {
            Ok(_) => info!(bake = %old, "deleted a Bake past the schedule's history limit"),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(Error::DeleteBake(old.clone(), e)),
        }
    }
    crate::k8s::apply_status_if_changed(&ctx.client, schedule, schedule.status.as_ref(), &status).await?;
    Ok(decision
        .requeue
        .map_or_else(Action::await_change, Action::requeue))
}

/// Whether Bake `name` exists and the schedule with `uid` controls it.
async fn made_by(api: &Api<Bake>, name: &str, uid: &str) -> bool {
    matches!(api.get_opt(name).await, Ok(Some(b)) if b.owner_references().iter().any(|o| o.uid == uid && o.controller == Some(true)))
}

/// The trigger's Bake was not made: the status says why and keeps the trigger pending.
fn not_made(status: &mut crate::api::schedule::BakeScheduleStatus, schedule: &BakeSchedule, why: String) {
    let previous = schedule.status.as_ref();
    status.message = Some(why);
    status.last_trigger = previous.and_then(|s| s.last_trigger.clone());
    status.last_schedule_time = previous.and_then(|s| s.last_schedule_time.clone());
    status.source_triggers = previous.and_then(|s| s.source_triggers);
    status.last_source_trigger = previous.and_then(|s| s.last_source_trigger.clone());
}

fn error_policy(_s: Arc<BakeSchedule>, error: &Error, _ctx: Arc<Context>) -> Action {
    crate::k8s::retry_after(error)
}

/// The BakeSchedule controller on the process's caches (a standby keeps them warm too). A
/// schedule looks again when one of its Bakes changes, its template changes, or the catalog its
/// template starts from lists something new.
pub fn run(ctx: Arc<Context>, caches: &Caches) -> impl Future<Output = ()> + use<> {
    let controller = Controller::for_shared_stream(caches.schedules.subscribe(), caches.schedules.store());
    let schedules = caches.schedules.store();
    let by_template = schedules.clone();
    let templates = caches.templates.store();
    controller
        .owns_shared_stream(caches.bakes.subscribe())
        .watches_shared_stream(caches.templates.subscribe(), move |t: Arc<BakeTemplate>| {
            let name = t.name_any();
            by_template
                .state()
                .into_iter()
                .filter(|s| s.spec.bake.template == name)
                .map(|s| ObjectRef::from_obj(&*s))
                .collect::<Vec<_>>()
        })
        .watches_shared_stream(
            caches.catalogs.subscribe(),
            move |c: Arc<crate::api::AmiCatalog>| {
                let (name, namespace) = (c.name_any(), c.namespace());
                schedules
                    .state()
                    .into_iter()
                    .filter(|s| s.namespace() == namespace)
                    .filter(|s| {
                        templates
                            .get(&ObjectRef::new(&s.spec.bake.template))
                            .and_then(|t| t.spec.source.catalog.as_ref().map(|c| c.name == name))
                            .unwrap_or(false)
                    })
                    .map(|s| ObjectRef::from_obj(&*s))
                    .collect::<Vec<_>>()
            },
        )
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "schedule reconcile loop");
            }
        })
}
