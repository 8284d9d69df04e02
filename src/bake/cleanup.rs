//! What happens when a Bake is deleted: its pod is stopped with a grace period long enough for
//! packer to clean up after itself, then EC2 is swept for anything still tagged with the Bake's
//! UID. If EC2 stays unreachable, the Bake is released after a bounded time with a Warning Event
//! that says what may have leaked: a deleted Bake never hangs forever.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use tracing::{info, warn};

use super::context::{BakeRef, Context};
use super::error::Result;
use super::pod;
use crate::api::{Bake, keys};
use crate::k8s::now;
use crate::usage;

fn pod_is_done(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// Where the cleanup of a deleted Bake stands.
#[derive(Debug)]
pub enum Cleanup {
    /// Nothing is left to do: the finalizer can go.
    Done,
    /// Still stopping the pod or retrying EC2; look again after this.
    Pending(Action),
}

/// Seconds past the pod's grace period that the finalizer waits for a bake pod to stop before it
/// goes on without it (a node that is gone never reports the pod stopped).
pub const POD_STOP_SLACK_SECONDS: i64 = 30;

pub async fn cleanup(bake: &Bake, ctx: &Context) -> Result<Cleanup> {
    let b = BakeRef::new(bake)?;
    let pod_name = pod::pod_name(&b.name);
    let deleted_at = bake
        .metadata
        .deletion_timestamp
        .as_ref()
        .map(|t| t.0)
        .unwrap_or_else(|| now().0);
    let waited = now().0.duration_since(deleted_at).as_secs();
    if let Some(pod) = ctx
        .stores
        .pod(&b.namespace, &pod_name)
        .filter(|p| p.owner_references().iter().any(|o| o.uid == b.uid))
        && !pod_is_done(&pod)
    {
        let grace = ctx.config.bake_grace_seconds.max(0);
        let bound = grace + POD_STOP_SLACK_SECONDS;
        if waited < bound {
            if pod.metadata.deletion_timestamp.is_none() {
                // A refused delete is retried until the bound, then reported below.
                match ctx.delete_pod(&pod, grace).await {
                    Ok(()) => {
                        info!(pod = %pod_name, grace, "stopping bake pod of deleted Bake");
                        ctx.publish(
                            &b,
                            EventType::Normal,
                            "Cancelling",
                            format!("stopping bake pod {pod_name}; packer has {grace}s to clean up"),
                        )
                        .await;
                    }
                    Err(e) => warn!(pod = %pod_name, error = %e, "could not stop the bake pod; retrying"),
                }
            }
            return Ok(Cleanup::Pending(Action::requeue(Duration::from_secs(2))));
        }
        warn!(pod = %pod_name, waited, "bake pod did not stop; releasing the Bake without it");
        ctx.publish(&b, EventType::Warning,
            "PodStopIncomplete",
            format!(
                "bake pod {pod_name} did not stop within {bound}s of the Bake's deletion (a delete refused, a finalizer on the pod, or a node that is gone); the Bake is released and EC2 is swept now. Check the pod: packer may still be running"
            ),
        )
        .await;
    }

    // Never launched: nothing can be in EC2.
    let Some(region) = b
        .status()
        .and_then(|s| s.region.clone())
        .filter(|_| b.status().is_some_and(|s| s.pod_name.is_some()))
    else {
        return Ok(Cleanup::Done);
    };
    let ami = b
        .status()
        .filter(|s| s.reused_from.is_none())
        .and_then(|s| s.ami_id.clone())
        .filter(|_| bake.spec.deregister_image_on_delete);
    let swept = async {
        // The same rule as retention: an image another Bake (in any namespace), another image,
        // an instance or a launch template uses is kept.
        // ... and its copies in other regions go with it, unless one of them is used there.
        let mut copies = Vec::new();
        let kept = match &ami {
            Some(ami) => {
                let bakes = ctx.stores.bakes.state();
                let others = usage::bake_uses(&bakes, Some(&b.uid));
                let image = ctx.ec2.image(&region, ami).await?;
                let (copy_uses, mut found) = match &image {
                    Some(image) => {
                        usage::copies_in_use(&ctx.ec2, std::slice::from_ref(image), &others).await?
                    }
                    None => Default::default(),
                };
                copies = found.remove(ami).unwrap_or_default();
                usage::in_use(&ctx.ec2, &region, std::slice::from_ref(ami), others)
                    .await?
                    .remove(ami)
                    .or_else(|| copy_uses.get(ami).cloned())
                    .map(|reason| (ami.clone(), reason))
            }
            None => None,
        };
        let remove = ami.is_some() && kept.is_none();
        if remove {
            for (copy_region, copy) in &copies {
                ctx.ec2.remove_image(copy_region, copy).await?;
            }
        }
        let mut report = ctx.ec2.sweep(&region, &b.uid, remove).await?;
        if remove {
            report
                .images
                .extend(copies.iter().map(|(r, c)| format!("{} in {r}", c.image_id)));
        }
        Ok::<_, crate::aws::Ec2Error>((report, kept))
    };
    match swept.await {
        Ok((report, kept)) => {
            if let Some((ami, reason)) = kept {
                info!(image = %ami, reason = %reason, "kept the deleted Bake's image: still used");
                ctx.publish(
                    &b,
                    EventType::Normal,
                    "ImageKept",
                    format!("deregisterImageOnDelete: kept {ami}, still {reason}"),
                )
                .await;
            }
            if !report.is_empty() {
                info!(removed = %report.describe(), "swept EC2 for deleted Bake");
                ctx.publish(
                    &b,
                    EventType::Normal,
                    "Cleaned",
                    format!("removed {}", report.describe()),
                )
                .await;
            }
            Ok(Cleanup::Done)
        }
        Err(e) => {
            if waited < ctx.config.cleanup_timeout_seconds {
                warn!(error = %e, waited, "EC2 cleanup failed; retrying");
                ctx.publish(
                    &b,
                    EventType::Warning,
                    "CleanupRetrying",
                    format!("EC2 cleanup failed, retrying: {e}"),
                )
                .await;
                return Ok(Cleanup::Pending(Action::requeue(Duration::from_secs(10))));
            }
            warn!(error = %e, waited, "giving up EC2 cleanup; releasing the Bake");
            ctx.publish(&b, EventType::Warning,
                "CleanupIncomplete",
                format!(
                    "gave up after {waited}s ({e}); instances, security groups, key pairs and volumes tagged {}={} in {region} may have leaked",
                    keys::BAKE_UID,
                    b.uid
                ),
            )
            .await;
            Ok(Cleanup::Done)
        }
    }
}
