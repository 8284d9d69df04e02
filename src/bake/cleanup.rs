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

use super::controller::{BakeRef, Context, delete_pod, now, publish};
use super::pod;
use crate::api::{Bake, keys};
use crate::error::Result;

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

pub async fn cleanup(bake: &Bake, ctx: &Context) -> Result<Cleanup> {
    let b = BakeRef::new(bake)?;
    let pod_name = pod::pod_name(&b.name);
    if let Some(pod) = ctx
        .stores
        .pod(&b.namespace, &pod_name)
        .filter(|p| p.owner_references().iter().any(|o| o.uid == b.uid))
        && !pod_is_done(&pod)
    {
        if pod.metadata.deletion_timestamp.is_none() {
            let grace = ctx.config.bake_grace_seconds.max(0);
            delete_pod(ctx, &pod, grace).await?;
            info!(pod = %pod_name, grace, "stopping bake pod of deleted Bake");
            publish(
                &b,
                ctx,
                EventType::Normal,
                "Cancelling",
                format!("stopping bake pod {pod_name}; packer has {grace}s to clean up"),
            )
            .await;
        }
        return Ok(Cleanup::Pending(Action::requeue(Duration::from_secs(2))));
    }

    // Never launched: nothing can be in EC2.
    let Some(region) = b
        .status()
        .and_then(|s| s.region.clone())
        .filter(|_| b.status().is_some_and(|s| s.pod_name.is_some()))
    else {
        return Ok(Cleanup::Done);
    };
    let remove_image =
        bake.spec.deregister_image_on_delete && b.status().is_some_and(|s| s.reused_from.is_none());
    match ctx.ec2.sweep(&region, &b.uid, remove_image).await {
        Ok(report) => {
            if !report.is_empty() {
                info!(removed = %report.describe(), "swept EC2 for deleted Bake");
                publish(
                    &b,
                    ctx,
                    EventType::Normal,
                    "Cleaned",
                    format!("removed {}", report.describe()),
                )
                .await;
            }
            Ok(Cleanup::Done)
        }
        Err(e) => {
            let deleted_at = bake
                .metadata
                .deletion_timestamp
                .as_ref()
                .map(|t| t.0)
                .unwrap_or_else(|| now().0);
            let waited = now().0.duration_since(deleted_at).as_secs();
            if waited < ctx.config.cleanup_timeout_seconds {
                warn!(error = %e, waited, "EC2 cleanup failed; retrying");
                publish(
                    &b,
                    ctx,
                    EventType::Warning,
                    "CleanupRetrying",
                    format!("EC2 cleanup failed, retrying: {e}"),
                )
                .await;
                return Ok(Cleanup::Pending(Action::requeue(Duration::from_secs(10))));
            }
            warn!(error = %e, waited, "giving up EC2 cleanup; releasing the Bake");
            publish(
                &b,
                ctx,
                EventType::Warning,
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
