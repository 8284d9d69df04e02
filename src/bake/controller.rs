//! The Bake reconciler: gathers observations (template, source image, pod, EC2), lets the pure
//! functions in `status` and `pod` decide, and writes the result.
//!
//! Restart safety rests on two records: `status.podName` is written *before* the pod is created,
//! and `status.podUid` once the pod is seen. A Bake with a recorded pod UID whose pod is gone is
//! never baked again; its AMI, if any, is found in EC2 by the Bake's UID tag.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{info, instrument, warn};

use super::context::{BakeRef, locked};
pub use super::context::{Context, FINALIZER};
use super::error::{Error, Result};
use super::launch;
use super::pod::{self, PodInput};
use super::queue;
use super::status::{self, PodOutcome, Reason, Transition};
use super::watch::Caches;
use crate::api::bake::ReusedImage;
use crate::api::{Bake, BakeStatus, BakeTemplate, keys};
use crate::failpoint;
use crate::k8s::{FIELD_MANAGER, now};
use crate::packer;

/// Bakes reconciled at once.
const CONCURRENCY: u16 = 32;

/// How long to wait for EC2 to list an AMI that packer reported, before failing the Bake.
const IMAGE_VISIBILITY_GRACE: Duration = Duration::from_secs(300);

/// How long a pod this process created may take to show up in the pod cache before a reconcile
/// that does not see it creates the Bake's children again (create-if-absent, so harmless).
const POD_CACHE_GRACE: Duration = Duration::from_secs(30);

/// Reconciles one Bake.
#[instrument(skip_all, fields(bake = %bake.name_any(), namespace = bake.namespace().unwrap_or_default()))]
pub async fn reconcile(bake: Arc<Bake>, ctx: Arc<Context>) -> Result<Action> {
    // Until every cache has synced, a pod missing from the cache may just not be listed yet.
    ctx.stores.synced.wait().await;
    crate::k8s::measured(ctx.metrics(), "bake", reconcile_inner(&bake, &ctx)).await
}

async fn reconcile_inner(bake: &Bake, ctx: &Context) -> Result<Action> {
    let has_finalizer = bake.finalizers().iter().any(|f| f == FINALIZER);
    if bake.metadata.deletion_timestamp.is_some() {
        if !has_finalizer {
            return Ok(Action::await_change());
        }
        return match super::cleanup::cleanup(bake, ctx).await? {
            super::cleanup::Cleanup::Done => {
                set_finalizer(bake, ctx, false).await?;
                // Its slot (or the image others waited for) is free: the watch delivers no event
                // for a Bake that is gone, so wake the waiting Bakes from here.
                if let Some(uid) = bake.uid() {
                    locked(&ctx.expectations).released(&uid);
                    locked(&ctx.created).remove(&uid);
                    // A Bake deleted while its children were being refused: forget the count.
                    locked(&ctx.rejections).remove(&uid);
                    locked(&ctx.unfinished).remove(&uid);
                }
                ctx.wake_all(queue::wake_on_end(bake, &ctx.stores.bakes.state()));
                Ok(Action::await_change())
            }
            super::cleanup::Cleanup::Pending(action) => Ok(action),
        };
    }
    if !has_finalizer {
        // The write's own watch event brings the Bake back with the finalizer: going on from this
        // copy would do the work twice (the next pass would not see this one's status yet).
        set_finalizer(bake, ctx, true).await?;
        return Ok(Action::await_change());
    }
    apply(bake, ctx).await
}

/// Adds or removes Baker's finalizer, guarded by the resourceVersion so a concurrent change to
/// the list is never overwritten.
async fn set_finalizer(bake: &Bake, ctx: &Context, present: bool) -> Result<()> {
    let mut finalizers: Vec<String> = bake
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    if present {
        finalizers.push(FINALIZER.to_string());
    }
    let namespace = bake
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let api: Api<Bake> = Api::namespaced(ctx.client.clone(), &namespace);
    let patch =
        json!({ "metadata": { "finalizers": finalizers, "resourceVersion": bake.resource_version() } });
    match api
        .patch(&bake.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        // Already gone: nothing left to hold.
        Err(kube::Error::Api(s)) if s.code == 404 && !present => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Err(Error::Conflict("finalizers")),
        Err(e) => Err(Error::PatchFinalizers(e)),
    }
}

async fn apply(bake: &Bake, ctx: &Context) -> Result<Action> {
    let b = BakeRef::new(bake)?;
    // A finished Bake whose status is current needs nothing: no reads, no writes.
    if let Some(s) = b.status()
        && s.phase.is_some_and(|p| p.is_terminal())
        && s.observed_generation == bake.metadata.generation
    {
        // A finished Bake's pod that never started must never start later (a crash came between
        // the final status and stopping it). Read from the cache: finished Bakes cost nothing.
        if let Some(pod) = ctx
            .stores
            .pod(&b.namespace, &pod::pod_name(&b.name))
            .filter(|p| p.owner_references().iter().any(|o| o.uid == b.uid))
            .filter(|p| status::pod_outcome(p) == PodOutcome::Pending)
        {
            stop_unstarted_pod(ctx, &pod).await?;
        }
        tracing::debug!("finished and up to date");
        // Its image may still need to reach (or be kept in) the template's regions.
        return super::distribute::maintain(&b, ctx).await;
    }
    // Our own final status is not in the cache yet: a decision from this copy would undo it.
    if locked(&ctx.expectations).finished_unseen(&b.uid) {
        return Ok(Action::await_change());
    }
    let pod_name = pod::pod_name(&b.name);
    let pod = ctx
        .stores
        .pod(&b.namespace, &pod_name)
        .filter(|p| p.owner_references().iter().any(|o| o.uid == b.uid));
    // The launch is recorded before the pod is created, so a pod of this Bake with no record in
    // status means the cache has not caught up with our own write yet (the pod's event came
    // first). A status computed from that copy would drop the record (region, key, source), so
    // go on with the Bake as the API server has it.
    let fresh;
    let b = if pod.is_some() && !launch_recorded(b.status()) {
        tracing::debug!("cached Bake predates its launch record: reading it from the API server");
        let bakes: Api<Bake> = Api::namespaced(ctx.client.clone(), &b.namespace);
        match bakes.get_opt(&b.name).await.map_err(Error::GetBake)? {
            Some(latest) if latest.uid().as_deref() == Some(b.uid.as_str()) => {
                fresh = latest;
                BakeRef::new(&fresh)?
            }
            _ => return Ok(Action::await_change()),
        }
    } else {
        b
    };
    let seen_uid = b.status().and_then(|s| s.pod_uid.clone());
    match pod {
        Some(p) if seen_uid.is_none() || seen_uid == p.uid() => observe_pod(&b, ctx, &p).await,
        // Seen once, gone (or replaced) now: never run packer twice for one Bake.
        _ if seen_uid.is_some() => pod_vanished(&b, ctx, None).await,
        // Launched, pod not seen yet: the slot is held already, so only create what is missing.
        _ if launch_recorded(b.status()) => resume(&b, ctx).await,
        _ => launch(&b, ctx).await,
    }
}

/// Requeue for a Bake, depending on what it waits for.
fn requeue_for(reason: Reason) -> Action {
    match reason {
        Reason::TemplateNotFound | Reason::SourceImageNotFound => Action::requeue(Duration::from_secs(60)),
        Reason::Ec2Unavailable => Action::requeue(Duration::from_secs(20)),
        // A catalog fills when its own sync (or a Bake of the base image) lists an image.
        Reason::SourceCatalogEmpty => Action::requeue(Duration::from_secs(10)),
        Reason::AwaitingImage => Action::requeue(Duration::from_secs(2)),
        // Woken when another Bake ends (or a deleted one releases its slot); a waiting Bake costs
        // nothing, and this is only the safety net.
        Reason::Queued | Reason::WaitingForIdenticalBake => Action::requeue(Duration::from_secs(300)),
        r if r.phase().is_terminal() => Action::await_change(),
        // The pod watch wakes us on progress; this is only a safety net.
        _ => Action::requeue(Duration::from_secs(300)),
    }
}

/// Launching or resuming: what the plan is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// No launch recorded: decide everything.
    Launch,
    /// A launch is recorded: only rebuild what the pod needs, from the recorded source.
    Resume,
}

/// Most rounds of gather and decide for one reconcile: each fact is fetched at most once, and the
/// Bakes again after each fetch, so four suffice; the bound only guards against a loop.
const MAX_ROUNDS: usize = 6;

/// Gathers the facts the launch decision asks for and returns its plan, holding the launch lock
/// if the plan was made on Bakes read under it (EC2 is asked only while the lock is not held).
async fn plan<'c>(
    b: &BakeRef<'_>,
    ctx: &'c Context,
    stage: Stage,
) -> Result<(launch::Plan, Option<tokio::sync::MutexGuard<'c, ()>>)> {
    let spec = &b.bake.spec;
    let template = ctx.stores.template(&spec.template);
    let catalog = template
        .as_ref()
        .and_then(|t| t.spec.source.catalog.as_ref())
        .and_then(|c| ctx.stores.catalog(&b.namespace, &c.name));
    let mut filter = None;
    let mut keyed_images: Option<Vec<crate::aws::ImageSummary>> = None;
    let mut bakes: Option<Vec<queue::BakeView>> = None;
    let mut guard = None;
    for _ in 0..MAX_ROUNDS {
        let facts = launch::Facts {
            bake: b.bake,
            config: &ctx.config,
            template: template.as_deref(),
            catalog: catalog.as_deref(),
            filter: filter.clone(),
            keyed_images: keyed_images.as_deref(),
            bakes: bakes.as_deref(),
            now: jiff::Timestamp::now(),
        };
        let plan = match stage {
            Stage::Launch => launch::decide(&facts),
            Stage::Resume => launch::prepare(&facts).map_or_else(launch::Plan::from, launch::Plan::Launch),
        };
        match plan {
            launch::Plan::Ask(need) => {
                if !matches!(need, launch::Need::Bakes { .. }) {
                    // Bakes read under a lock no longer held are no basis for a decision.
                    (guard, bakes) = (None, None);
                }
                match need {
                    launch::Need::SourceFilter { region, filter: f } => {
                        filter = Some(
                            match ctx
                                .ec2
                                .resolve_source(&region, &f, spec.virtualization_type)
                                .await
                            {
                                Ok(Some(image)) => launch::FilterAnswer::Found(image.image_id),
                                Ok(None) => launch::FilterAnswer::NotFound,
                                Err(e) => launch::FilterAnswer::Failed(e.to_string()),
                            },
                        );
                    }
                    launch::Need::ImagesWithKey { region, key } => {
                        keyed_images = Some(ctx.ec2.images_tagged(&region, keys::BAKE_KEY, &key).await?);
                    }
                    launch::Need::Bakes { key } => {
                        guard = Some(ctx.launch_lock.lock().await);
                        bakes = Some(ctx.bake_views(&key));
                    }
                }
            }
            plan => return Ok((plan, guard)),
        }
    }
    Err(Error::Undecided)
}

/// Decides, from the caches (and EC2 when the decision asks), whether a Bake without a pod
/// launches, waits, reuses an image or cannot start; then does it. Deciding and recording a
/// launch happen under one lock, against the cache with this process's unseen launches laid over
/// it, so two identical Bakes, or two Bakes racing for the last slot, never both start.
async fn launch(b: &BakeRef<'_>, ctx: &Context) -> Result<Action> {
    let (plan, guard) = plan(b, ctx, Stage::Launch).await?;
    let (prepared, transition) = match plan {
        launch::Plan::Launch(prepared) => (prepared, None),
        launch::Plan::Wait { prepared, transition } => (prepared, Some(transition)),
        launch::Plan::Stop(t) => {
            drop(guard);
            return finish(b, ctx, t, None).await;
        }
        launch::Plan::Reuse {
            prepared,
            ami_id,
            from,
        } => {
            drop(guard);
            return reuse(b, ctx, &prepared, ami_id, from).await;
        }
        launch::Plan::Ask(_) => return Err(Error::Undecided),
    };
    if let Some(t) = transition {
        drop(guard);
        // The key and the source are recorded, so the Bake waits without asking EC2 again.
        let mut next = status::apply(b.status(), b.bake.metadata.generation, &t, &now());
        next.bake_key = Some(prepared.keyed.key.clone());
        next.source_ami_id = Some(prepared.source_ami.clone());
        next.region = Some(prepared.region.clone());
        return write_if_changed(b, ctx, next, &t).await;
    }

    // Record the launch before creating anything: a restart from here on finds the pod by name.
    let pod_name = pod::pod_name(&b.name);
    let mut launched = status::apply(
        b.status(),
        b.bake.metadata.generation,
        &Transition::new(Reason::Launching, format!("launching bake pod {pod_name}")),
        &now(),
    );
    launched.pod_name = Some(pod_name.clone());
    launched.source_ami_id = Some(prepared.source_ami.clone());
    launched.region = Some(prepared.region.clone());
    launched.bake_key = Some(prepared.keyed.key.clone());
    launched.started_at = launched.started_at.or_else(|| Some(now()));
    ctx.write_status(b, &launched).await?;
    let mut me = queue::BakeView::from_bake(b.bake);
    me.key = Some(prepared.keyed.key.clone());
    me.launched = true;
    me.phase = launched.phase;
    locked(&ctx.expectations).launched(me);
    drop(guard);
    failpoint::hit(failpoint::LAUNCH_RECORDED);

    if let Some(t) = create_children(b, ctx, &prepared).await? {
        return finish(b, ctx, t, None).await;
    }
    info!(pod = %pod_name, key = %prepared.keyed.key, "launched bake pod");
    ctx.publish(
        b,
        EventType::Normal,
        "Launched",
        format!(
            "launched bake pod {pod_name} with BakeTemplate {}",
            b.bake.spec.template
        ),
    )
    .await;
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// A launch is recorded but its pod is not in the cache: this process created it a moment ago (its
/// watch event is on the way), or a restart came between the record and the pod. Creates what is
/// missing, from the recorded source, without deciding again: the slot was taken by the record.
async fn resume(b: &BakeRef<'_>, ctx: &Context) -> Result<Action> {
    let recent = locked(&ctx.created)
        .get(&b.uid)
        .is_some_and(|at| at.elapsed() < POD_CACHE_GRACE);
    if recent {
        return Ok(Action::requeue(POD_CACHE_GRACE));
    }
    let prepared = match plan(b, ctx, Stage::Resume).await?.0 {
        launch::Plan::Launch(prepared) => prepared,
        launch::Plan::Stop(t) => return finish(b, ctx, t, None).await,
        _ => return Err(Error::Undecided),
    };
    if let Some(t) = create_children(b, ctx, &prepared).await? {
        return finish(b, ctx, t, None).await;
    }
    info!(key = %prepared.keyed.key, "resumed the launch of the bake pod");
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// Creates the template ConfigMap and the bake pod, unless they exist as the Bake's own. Returns
/// the transition that fails the Bake if a name is taken by an object that is not.
async fn create_children(b: &BakeRef<'_>, ctx: &Context, p: &launch::Prepared) -> Result<Option<Transition>> {
    // Decided on this template a moment ago; gone since, the Bake waits for it again.
    let Some(template) = ctx.stores.template(&b.bake.spec.template) else {
        return Ok(Some(Transition::new(
            Reason::TemplateNotFound,
            format!(
                "BakeTemplate {:?} was deleted while the Bake launched; it starts once it exists again",
                b.bake.spec.template
            ),
        )));
    };
    let owner = b
        .bake
        .controller_owner_ref(&())
        .ok_or(Error::MissingField("metadata.uid"))?;
    let pod_input = PodInput {
        bake_name: &b.name,
        namespace: &b.namespace,
        owner,
        service: &b.bake.spec.service,
        template: &template.spec,
        config: &ctx.config,
    };
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &b.namespace);
    let config_map = pod::template_config_map(&pod_input, &p.keyed.rendered);
    let conflict = |kind: &str, name: String| {
        Transition::new(
            Reason::NameConflict,
            format!(
                "{kind} {name} exists and was not made by Baker for this Bake; Baker runs only templates it wrote. Delete it, or create the Bake under another name"
            ),
        )
    };
    // The content must match too: a ConfigMap is editable by anyone who may edit the namespace's.
    let same_data = |existing: &ConfigMap| existing.data == config_map.data;
    let created = create_owned(&config_maps, &config_map, &pod_input.owner, same_data).await;
    match refused(b, ctx, "ConfigMap", created).await {
        Ok(Created::Ours) => {}
        Ok(Created::Foreign) => return Ok(Some(conflict("ConfigMap", config_map.name_any()))),
        Ok(Created::Previous) => return previous_child(b, ctx, "ConfigMap", config_map.name_any()),
        Err(Refusal::Final(t)) => return Ok(Some(t)),
        Err(Refusal::Retry(e)) => return Err(Error::CreateConfigMap(e)),
    }
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &b.namespace);
    let bake_pod = pod::bake_pod(&pod_input);
    let created = create_owned(&pods, &bake_pod, &pod_input.owner, |_| true).await;
    match refused(b, ctx, "Pod", created).await {
        Ok(Created::Ours) => {}
        Ok(Created::Foreign) => return Ok(Some(conflict("Pod", bake_pod.name_any()))),
        Ok(Created::Previous) => return previous_child(b, ctx, "Pod", bake_pod.name_any()),
        Err(Refusal::Final(t)) => return Ok(Some(t)),
        Err(Refusal::Retry(e)) => return Err(Error::CreatePod(e)),
    }
    locked(&ctx.rejections).remove(&b.uid);
    locked(&ctx.created).insert(b.uid.clone(), Instant::now());
    Ok(None)
}

/// A child of a deleted Bake of the same name holds the name: retried (garbage collection
/// removes it within seconds) as often as a refusal, then the Bake fails with `NameConflict`.
fn previous_child(
    b: &BakeRef<'_>,
    ctx: &Context,
    kind: &'static str,
    name: String,
) -> Result<Option<Transition>> {
    let (attempt, attempts) = count_attempt(b, ctx);
    if attempt < attempts {
        return Err(Error::ChildOfPreviousBake { kind, name });
    }
    locked(&ctx.rejections).remove(&b.uid);
    Ok(Some(Transition::new(
        Reason::NameConflict,
        format!(
            "{kind} {name} still belongs to a deleted Bake of the same name and was not removed by garbage collection; delete it, or create the Bake under another name"
        ),
    )))
}

/// Counts one more failed attempt at a Bake's children: (this attempt, the limit).
fn count_attempt(b: &BakeRef<'_>, ctx: &Context) -> (u32, u32) {
    let mut rejections = locked(&ctx.rejections);
    let n = rejections.entry(b.uid.clone()).or_insert(0);
    *n += 1;
    (*n, ctx.config.pod_create_attempts.max(1))
}

/// Why a child was not created.
enum Refusal {
    /// Try again later (the error policy's backoff): a transient error, or a refusal under the
    /// attempt limit.
    Retry(kube::Error),
    /// Refused too often: the Bake fails with this.
    Final(Transition),
}

/// Counts an API server's refusal of a Bake's child (a ResourceQuota, Pod Security admission, a
/// webhook: a 4xx other than conflict and throttling) against the attempt limit, with a Warning
/// Event for each; at the limit the Bake fails with reason `PodRejected` and the server's message,
/// which frees its slot at once.
async fn refused(
    b: &BakeRef<'_>,
    ctx: &Context,
    kind: &str,
    created: std::result::Result<Created, kube::Error>,
) -> std::result::Result<Created, Refusal> {
    let e = match created {
        Ok(c) => return Ok(c),
        Err(e) => e,
    };
    let message = match &e {
        kube::Error::Api(s) if (400..500).contains(&s.code) && s.code != 409 && s.code != 429 => {
            s.message.clone()
        }
        _ => return Err(Refusal::Retry(e)),
    };
    let (attempt, attempts) = count_attempt(b, ctx);
    let text = crate::k8s::truncate(&message, 600);
    if attempt < attempts {
        warn!(kind, attempt, error = %text, "the API server refused a child of the Bake; retrying");
        ctx.publish(
            b,
            EventType::Warning,
            Reason::PodRejected.as_str(),
            format!("the API server refused the bake {kind} (attempt {attempt} of {attempts}): {text}"),
        )
        .await;
        return Err(Refusal::Retry(e));
    }
    locked(&ctx.rejections).remove(&b.uid);
    Err(Refusal::Final(Transition::new(
        Reason::PodRejected,
        format!("the API server refused the bake {kind} {attempts} time(s): {text}"),
    )))
}

/// Succeeds a Bake with an image it did not bake itself.
async fn reuse(
    b: &BakeRef<'_>,
    ctx: &Context,
    prepared: &launch::Prepared,
    ami_id: String,
    from: Option<String>,
) -> Result<Action> {
    let (bake_key, region) = (prepared.keyed.key.as_str(), prepared.region.as_str());
    let origin = from
        .as_deref()
        .map(|f| format!(" baked by Bake {f}"))
        .unwrap_or_default();
    let t = Transition::new(
        Reason::Reused,
        format!("reused {ami_id}{origin}: it has this Bake's key {bake_key}; set spec.rebake to bake anew"),
    )
    .with_ami(&ami_id);
    let mut next = status::apply(b.status(), b.bake.metadata.generation, &t, &now());
    next.bake_key = Some(bake_key.to_string());
    next.region = Some(region.to_string());
    // The key covers the source: the image reused was built on the same one (lineage for
    // schedules and `status.sourceAmiId` readers).
    next.source_ami_id = Some(prepared.source_ami.clone());
    next.reused_from = Some(ReusedImage {
        image_id: ami_id,
        bake: from,
    });
    write_if_changed(b, ctx, next, &t).await
}

/// What creating one of a Bake's children found.
enum Created {
    /// Created now, or it already existed and is the Bake's own.
    Ours,
    /// It is the child of an earlier Bake of the same name (deleted and recreated), which garbage
    /// collection has not removed yet.
    Previous,
    /// An object of that name exists and is not controlled by this Bake.
    Foreign,
}

/// Creates `object` unless it exists. An existing one counts only if this Bake (`owner`) controls
/// it and `same` holds for it; otherwise someone else owns the name, and Baker never runs what it
/// did not write.
async fn create_owned<K>(
    api: &Api<K>,
    object: &K,
    owner: &OwnerReference,
    same: impl Fn(&K) -> bool,
) -> std::result::Result<Created, kube::Error>
where
    K: Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    match api.create(&params, object).await {
        Ok(_) => Ok(Created::Ours),
        Err(kube::Error::Api(status)) if status.code == 409 => {
            let existing = api.get_opt(&object.name_any()).await?;
            let controller = existing.as_ref().and_then(|e| {
                e.meta()
                    .owner_references
                    .iter()
                    .flatten()
                    .find(|o| o.controller == Some(true))
                    .cloned()
            });
            Ok(match (existing, controller) {
                (Some(e), Some(c)) if c.uid == owner.uid && same(&e) => Created::Ours,
                (Some(_), Some(c)) if c.uid != owner.uid && c.kind == owner.kind && c.name == owner.name => {
                    Created::Previous
                }
                // Gone since the conflict: the next attempt creates it.
                (None, _) => Created::Previous,
                _ => Created::Foreign,
            })
        }
        Err(e) => Err(e),
    }
}

async fn observe_pod(b: &BakeRef<'_>, ctx: &Context, pod: &Pod) -> Result<Action> {
    // The pod is in the cache now: no need to remember creating it.
    locked(&ctx.created).remove(&b.uid);
    let name = pod.name_any();
    let pod_uid = pod.uid();
    let outcome = status::pod_outcome(pod);
    if outcome == PodOutcome::Pending {
        return observe_pending(b, ctx, pod).await;
    }
    // Someone deleted the pod (the Bake itself is not being deleted): packer was stopped.
    if pod.metadata.deletion_timestamp.is_some() && !matches!(outcome, PodOutcome::Succeeded { .. }) {
        return pod_vanished(b, ctx, pod_uid).await;
    }
    let transition = match outcome {
        // Handled above.
        PodOutcome::Pending => return Ok(Action::await_change()),
        PodOutcome::Running => Transition::new(
            Reason::Running,
            format!(
                "packer is running; follow it with: kubectl logs -f -n {} pod/{name}",
                b.namespace
            ),
        ),
        PodOutcome::Succeeded { manifest } => {
            let finished = pod_finished_at(pod);
            confirm_image(b, ctx, &manifest, finished).await?
        }
        PodOutcome::DeadlineExceeded => match sweep_then_adopt(b, ctx).await? {
            Some(ami) => Transition::new(
                Reason::Adopted,
                format!(
                    "the bake timed out after the AMI was created; using {ami} found by the Bake's UID tag"
                ),
            )
            .with_ami(ami),
            None => Transition::new(
                Reason::Timeout,
                format!(
                    "the bake exceeded its BakeTemplate's timeout ({}s) and packer was stopped",
                    pod_deadline(pod)
                ),
            ),
        },
        PodOutcome::Failed { message } => match sweep_then_adopt(b, ctx).await? {
            Some(ami) => Transition::new(
                Reason::Adopted,
                format!("packer failed after the AMI was created; using {ami} found by the Bake's UID tag"),
            )
            .with_ami(ami),
            None => Transition::new(
                Reason::PackerFailed,
                status::tail(&message, status::MAX_MESSAGE - 64),
            ),
        },
    };
    finish(b, ctx, transition, pod_uid).await
}

/// A bake pod that has not started: say at once what holds it up, and stop it (failing the Bake)
/// once that has lasted the pod start timeout. Judged from the pod alone, so a second look (at a
/// pod already being stopped) comes to the same transition.
async fn observe_pending(b: &BakeRef<'_>, ctx: &Context, pod: &Pod) -> Result<Action> {
    let name = pod.name_any();
    let holdup = status::pod_holdup(pod);
    let timeout = Duration::from_secs(ctx.config.pod_start_timeout_seconds);
    let waited = pod.metadata.creation_timestamp.as_ref().map(|c| {
        let d = jiff::Timestamp::now().duration_since(c.0);
        if d.is_negative() {
            Duration::ZERO
        } else {
            d.unsigned_abs()
        }
    });
    let t = status::pending_transition(&name, holdup.as_ref(), waited, timeout);
    if t.reason.phase().is_terminal() {
        // The status first: a pod stopped before it would read as "deleted by someone else".
        finish(b, ctx, t, pod.uid()).await?;
        stop_unstarted_pod(ctx, pod).await?;
        return Ok(Action::await_change());
    }
    // Someone deleted the pod before it started.
    if pod.metadata.deletion_timestamp.is_some() {
        return pod_vanished(b, ctx, pod.uid()).await;
    }
    // Nothing holds the pod up: it is starting, and the Bake still says "launching". Its next
    // event (running, or held up) brings the next write; one per bake saved. Should the pod vanish
    // before it runs, the recorded launch recreates it: packer has not run.
    if holdup.is_none() {
        return Ok(requeue_for(Reason::PodPending));
    }
    let action = finish(b, ctx, t, pod.uid()).await?;
    Ok(match (&holdup, waited) {
        // Look again when the timeout is up, even if the pod never changes.
        (Some(_), Some(w)) => Action::requeue(timeout.saturating_sub(w) + Duration::from_secs(1)),
        _ => action,
    })
}

/// Deletes a bake pod that never started (nothing to give a grace period to), unless it is
/// already going.
async fn stop_unstarted_pod(ctx: &Context, pod: &Pod) -> Result<()> {
    if pod.metadata.deletion_timestamp.is_some() {
        return Ok(());
    }
    ctx.delete_pod(pod, 0).await
}

fn pod_finished_at(pod: &Pod) -> Option<jiff::Timestamp> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find_map(|c| {
            c.state
                .as_ref()?
                .terminated
                .as_ref()?
                .finished_at
                .as_ref()
                .map(|t| t.0)
        })
}

fn pod_deadline(pod: &Pod) -> i64 {
    pod.spec
        .as_ref()
        .and_then(|s| s.active_deadline_seconds)
        .unwrap_or_default()
}

/// Whether status holds the launch record (written before the bake pod is created).
fn launch_recorded(status: Option<&BakeStatus>) -> bool {
    status.is_some_and(|s| s.pod_name.is_some())
}

/// The region the Bake was launched in: the launch record, else (a status that lost its record)
/// the region of its BakeTemplate now.
fn region_of(b: &BakeRef<'_>, ctx: &Context) -> Option<String> {
    if let Some(region) = b.status().and_then(|s| s.region.clone()) {
        return Some(region);
    }
    ctx.stores
        .template(&b.bake.spec.template)
        .map(|t| t.spec.region.clone())
}

/// An available image tagged with this Bake's UID: proof the bake produced its AMI.
async fn adoptable_image(b: &BakeRef<'_>, ctx: &Context) -> Result<Option<String>> {
    let Some(region) = region_of(b, ctx) else {
        return Ok(None);
    };
    let images = ctx.ec2.images_tagged(&region, keys::BAKE_UID, &b.uid).await?;
    Ok(images
        .into_iter()
        .find(|i| i.state.as_deref() == Some("available"))
        .map(|i| i.image_id))
}

/// Packer did not end on its own terms (it failed, timed out, or its pod is gone), so what it
/// cleans up on the way out may still be in EC2, costing money: an instance, its volumes, its
/// temporary security group and key pair. Sweep them now (never images), not only when the Bake
/// is deleted; then look for the AMI the bake may have made before it ended. A sweep EC2 refuses
/// does not hold the Bake: a Warning Event says so, and the deletion sweeps again.
async fn sweep_then_adopt(b: &BakeRef<'_>, ctx: &Context) -> Result<Option<String>> {
    if let Some(region) = region_of(b, ctx) {
        match ctx.ec2.sweep(&region, &b.uid, false).await {
            Ok(report) if !report.is_empty() => {
                info!(removed = %report.describe(), "swept what packer left behind");
                ctx.publish(
                    b,
                    EventType::Normal,
                    "Cleaned",
                    format!(
                        "packer did not finish; removed what it left: {}",
                        report.describe()
                    ),
                )
                .await;
            }
            Ok(_) => {}
            Err(e) => {
                warn!(error = %crate::error::chain(&e), "could not sweep what packer left behind");
                ctx.publish(
                    b,
                    EventType::Warning,
                    "CleanupIncomplete",
                    format!(
                        "packer did not finish and EC2 refused the sweep of what it may have left ({e}); deleting the Bake sweeps again"
                    ),
                )
                .await;
            }
        }
    }
    adoptable_image(b, ctx).await
}

/// Packer said it made an AMI: believe it once EC2 lists it with the Bake's UID tag.
async fn confirm_image(
    b: &BakeRef<'_>,
    ctx: &Context,
    manifest: &str,
    finished: Option<jiff::Timestamp>,
) -> Result<Transition> {
    let region = region_of(b, ctx).unwrap_or_default();
    let reported = packer::artifacts(manifest, &b.uid);
    let tagged = ctx.ec2.images_tagged(&region, keys::BAKE_UID, &b.uid).await?;
    let available = |id: &str| {
        tagged
            .iter()
            .any(|i| i.image_id == id && i.state.as_deref() == Some("available"))
    };
    match &reported {
        Ok(artifacts) => {
            if let Some(a) = artifacts
                .iter()
                .find(|a| a.region == region)
                .or(artifacts.first())
                && available(&a.ami_id)
            {
                return Ok(
                    Transition::new(Reason::Succeeded, format!("baked {} in {}", a.ami_id, a.region))
                        .with_ami(&a.ami_id),
                );
            }
        }
        Err(e) => {
            // The tag is the source of truth; a lost manifest does not lose the AMI.
            if let Some(image) = tagged.iter().find(|i| i.state.as_deref() == Some("available")) {
                return Ok(Transition::new(
                    Reason::Succeeded,
                    format!(
                        "baked {} in {region} (found by the Bake's UID tag; {e})",
                        image.image_id
                    ),
                )
                .with_ami(&image.image_id));
            }
        }
    }
    let waited = finished
        .map(|f| jiff::Timestamp::now().duration_since(f).unsigned_abs())
        .unwrap_or_default();
    let what = match &reported {
        Ok(a) => format!(
            "packer reported {}",
            a.iter().map(|a| a.ami_id.as_str()).collect::<Vec<_>>().join(", ")
        ),
        Err(e) => e.to_string(),
    };
    if waited < IMAGE_VISIBILITY_GRACE {
        Ok(Transition::new(
            Reason::AwaitingImage,
            format!("{what}; waiting for EC2 to list it as available"),
        ))
    } else {
        Ok(Transition::new(
            Reason::ImageNotFound,
            format!(
                "{what}, but EC2 lists no available image tagged {}={} in {region}",
                keys::BAKE_UID,
                b.uid
            ),
        ))
    }
}

async fn pod_vanished(b: &BakeRef<'_>, ctx: &Context, pod_uid: Option<String>) -> Result<Action> {
    let pod_name = b.status().and_then(|s| s.pod_name.clone()).unwrap_or_default();
    let t = match sweep_then_adopt(b, ctx).await? {
        Some(ami) => Transition::new(
            Reason::Adopted,
            format!("bake pod {pod_name} is gone, but the AMI it made exists: {ami}"),
        )
        .with_ami(ami),
        None => Transition::new(
            Reason::PodDeleted,
            format!(
                "bake pod {pod_name} was deleted before the bake finished; create a new Bake to bake again"
            ),
        ),
    };
    finish(b, ctx, t, pod_uid).await
}

/// Applies a transition: writes status if it changed, and an Event if the phase or reason did.
async fn finish(b: &BakeRef<'_>, ctx: &Context, t: Transition, pod_uid: Option<String>) -> Result<Action> {
    let mut next = status::apply(b.status(), b.bake.metadata.generation, &t, &now());
    if pod_uid.is_some() {
        next.pod_uid = pod_uid;
    }
    if t.reason.phase().is_terminal() {
        failpoint::hit(failpoint::BEFORE_FINAL_STATUS);
    }
    write_if_changed(b, ctx, next, &t).await
}

async fn write_if_changed(
    b: &BakeRef<'_>,
    ctx: &Context,
    mut next: BakeStatus,
    t: &Transition,
) -> Result<Action> {
    // An image its template distributes is Ready once it is everywhere the template says.
    if t.reason.phase() == crate::api::BakePhase::Succeeded
        && next.distribution.is_none()
        && let Some(d) = ctx
            .stores
            .template(&b.bake.spec.template)
            .and_then(|t| t.spec.distribution.clone())
    {
        next = crate::distribution::pending(next, d.regions.len(), b.bake.metadata.generation, &now());
    }
    let previous = b.status();
    if previous != Some(&next) {
        ctx.write_status(b, &next).await?;
        if next.phase.is_some_and(|p| p.is_terminal()) {
            locked(&ctx.expectations).finished(&b.uid);
        }
        let was_terminal = previous.and_then(|s| s.phase).is_some_and(|p| p.is_terminal());
        if t.reason.phase().is_terminal() && !was_terminal {
            let since = next
                .started_at
                .as_ref()
                .or(b.bake.metadata.creation_timestamp.as_ref())
                .map(|t| t.0);
            let seconds = since.map(|s| jiff::Timestamp::now().duration_since(s).as_secs_f64());
            ctx.metrics()
                .bake_finished(t.reason.phase(), t.reason.as_str(), seconds);
        }
        let previous_reason = previous
            .and_then(|s| crate::api::conditions::find(&s.conditions, crate::api::conditions::READY))
            .map(|c| c.reason.as_str());
        if previous_reason != Some(t.reason.as_str()) {
            let type_ = if t.reason.stalled() {
                EventType::Warning
            } else {
                EventType::Normal
            };
            ctx.publish(b, type_, t.reason.as_str(), t.message.clone()).await;
        }
    }
    Ok(requeue_for(t.reason))
}

fn error_policy(_bake: Arc<Bake>, error: &Error, _ctx: Arc<Context>) -> Action {
    crate::k8s::retry_after(error)
}

/// The Bake controller on the process's caches, subscribed at once; the future runs it until a
/// shutdown signal.
pub fn run(ctx: Arc<Context>, caches: &Caches) -> impl Future<Output = ()> + use<> {
    let store = caches.bakes.store();
    let queue_store = caches.bakes.store();
    let ends = ctx.clone();
    let woken = locked(&ctx.woken).take();
    let mut controller = Controller::for_shared_stream(caches.bakes.subscribe(), caches.bakes.store())
        // Reconciles read caches and write only on change, so many can run at once; the bound
        // keeps a burst (every Bake replayed at a start) from opening thousands of requests. No
        // debounce: it would add its delay to every apply -> pod.
        .with_config(kube::runtime::controller::Config::default().concurrency(CONCURRENCY))
        .owns_shared_stream(caches.pods.subscribe())
        // A Bake that ends frees a slot, or an image: the Bakes waiting for it look again at once.
        .watches_shared_stream(caches.bakes.subscribe(), move |bake: Arc<Bake>| {
            let Some(uid) = bake.uid() else {
                return Vec::new();
            };
            let ended = {
                let mut unfinished = locked(&ends.unfinished);
                if !bake.phase().is_some_and(|p| p.is_terminal()) {
                    unfinished.insert(uid);
                    // A Bake deleted before it finished (and before its finalizer was on) leaves
                    // no event here: once the set outgrows the cache, keep only what is cached,
                    // so a tenant creating and deleting Bakes cannot grow it without bound.
                    // The check is O(1); the prune, O(cache), runs once per growth past the bound.
                    if unfinished.len() > 2 * queue_store.len() + 1024 {
                        let live: std::collections::HashSet<String> =
                            queue_store.state().iter().filter_map(|b| b.uid()).collect();
                        unfinished.retain(|u| live.contains(u));
                    }
                    return Vec::new();
                }
                unfinished.remove(&uid)
            };
            if !ended {
                return Vec::new();
            }
            queue::wake_on_end(&bake, &queue_store.state())
                .into_iter()
                .map(|b| ObjectRef::from_obj(&*b))
                .collect::<Vec<_>>()
        })
        // A Bake waiting for its template starts as soon as the template appears; a changed
        // distribution reaches the template's images at once.
        .watches_shared_stream(
            caches.templates.subscribe(),
            move |template: Arc<BakeTemplate>| {
                let name = template.name_any();
                let key = template.spec.distribution.as_ref().map(crate::distribution::key);
                store
                    .state()
                    .into_iter()
                    .filter(|b| {
                        b.spec.template == name
                            && (!b.phase().is_some_and(|p| p.is_terminal())
                                || crate::distribution::template_changed(b, key.as_deref()))
                    })
                    .map(|b| ObjectRef::from_obj(&*b))
                    .collect::<Vec<_>>()
            },
        );
    if let Some(woken) = woken {
        controller = controller.reconcile_on(woken);
    }
    controller
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile loop");
            }
        })
}

#[cfg(test)]
mod tests;
