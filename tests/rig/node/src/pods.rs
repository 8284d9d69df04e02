//! Watches the pods bound to this node and runs one worker per pod UID.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;

use crate::context::{NodeContext, pods_root};
use crate::events::WARNING;
use crate::retry::Backoff;
use crate::status::{self, ContainerView, PHASE_FAILED, RunState, StatusReport, is_terminal_phase};
use crate::worker::{self, Mode, restarted_state};

pub const NODE_RESTARTED_REASON: &str = "NodeRestarted";
pub const NODE_RESTARTED_MESSAGE: &str =
    "baker-rig-node restarted; the pod's processes were lost with the previous node process";

fn uid_of(pod: &Pod) -> Option<String> {
    pod.metadata.uid.clone()
}

/// Whether a previous node process had started this pod: it cannot be
/// resumed, only failed.
fn was_started(pod: &Pod) -> bool {
    let Some(status) = &pod.status else {
        return false;
    };
    status.start_time.is_some()
        || status.phase.as_deref() == Some(status::PHASE_RUNNING)
        || status.container_statuses.as_ref().is_some_and(|cs| {
            cs.iter().any(|c| {
                c.state
                    .as_ref()
                    .is_some_and(|s| s.running.is_some() || s.terminated.is_some())
            })
        })
}

/// Marks pods a previous node process had started as Failed
/// (`NodeRestarted`) and removes state of pods that no longer exist.
/// Returns the UIDs never to start.
async fn startup_sweep(ctx: &NodeContext, api: &Api<Pod>, selector: &str) -> HashSet<String> {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(5));
    let pods = loop {
        match api.list(&ListParams::default().fields(selector)).await {
            Ok(list) => break list.items,
            Err(e) => {
                tracing::warn!(error = %e, "listing this node's pods; retrying");
                backoff.wait().await;
            }
        }
    };
    let live: HashSet<String> = pods.iter().filter_map(uid_of).collect();
    let mut adopted = HashSet::new();
    for pod in &pods {
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        let Some(uid) = uid_of(pod) else { continue };
        if is_terminal_phase(phase) || !was_started(pod) {
            continue;
        }
        adopted.insert(uid.clone());
        mark_node_restarted(ctx, pod, &uid).await;
    }
    if let Ok(entries) = std::fs::read_dir(pods_root(&ctx.state_dir)) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !live.contains(&name)
                && let Err(e) = std::fs::remove_dir_all(entry.path())
            {
                tracing::warn!(dir = %entry.path().display(), error = %e, "removing stale pod state");
            }
        }
    }
    adopted
}

async fn mark_node_restarted(ctx: &NodeContext, pod: &Pod, uid: &str) {
    let now = Timestamp::now();
    let spec_containers = pod
        .spec
        .as_ref()
        .map(|s| s.containers.clone())
        .unwrap_or_default();
    let statuses = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.clone())
        .unwrap_or_default();
    let states: Vec<RunState> = spec_containers
        .iter()
        .map(|c| restarted_state(statuses.iter().find(|s| s.name == c.name), now))
        .collect();
    let images: Vec<String> = spec_containers
        .iter()
        .map(|c| c.image.clone().unwrap_or_default())
        .collect();
    let views: Vec<ContainerView<'_>> = spec_containers
        .iter()
        .zip(states.iter().zip(images.iter()))
        .map(|(c, (state, image))| ContainerView {
            name: &c.name,
            image,
            pod_uid: uid,
            state,
        })
        .collect();
    let start_time = pod
        .status
        .as_ref()
        .and_then(|s| s.start_time.as_ref())
        .map(|t| t.0)
        .unwrap_or(now);
    let patch = status::status_patch(
        pod,
        &StatusReport {
            phase: PHASE_FAILED,
            reason: Some(NODE_RESTARTED_REASON),
            message: Some(NODE_RESTARTED_MESSAGE),
            start_time,
            containers: views,
            now,
        },
    );
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let mut backoff = Backoff::default();
    for _ in 0..20 {
        match api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                tracing::info!(pod = %name, namespace = %ns, "marked Failed: node restarted");
                ctx.recorder
                    .pod(pod, None, WARNING, NODE_RESTARTED_REASON, NODE_RESTARTED_MESSAGE);
                return;
            }
            Err(e) if crate::retry::is_permanent(&e) => {
                tracing::warn!(pod = %name, error = %e, "cannot mark pod failed");
                return;
            }
            Err(e) => {
                tracing::warn!(pod = %name, error = %e, "marking pod failed; retrying");
                backoff.wait().await;
            }
        }
    }
}

struct Manager {
    ctx: Arc<NodeContext>,
    workers: HashMap<String, watch::Sender<Option<Pod>>>,
    /// Every UID ever handed to a worker, or adopted at startup: such a pod
    /// is never started (again) by a new worker.
    no_start: HashSet<String>,
}

impl Manager {
    fn dispatch(&mut self, pod: Pod) {
        let Some(uid) = uid_of(&pod) else { return };
        if pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some(self.ctx.node_name.as_str()) {
            return;
        }
        if let Some(tx) = self.workers.get(&uid) {
            tx.send_replace(Some(pod));
            return;
        }
        let mode = if self.no_start.contains(&uid) {
            Mode::Adopt
        } else {
            Mode::Run
        };
        self.no_start.insert(uid.clone());
        let (tx, rx) = watch::channel(Some(pod));
        tokio::spawn(worker::run_pod(self.ctx.clone(), rx, mode));
        self.workers.insert(uid, tx);
    }

    fn forget(&mut self, uid: &str) {
        if let Some(tx) = self.workers.remove(uid) {
            tx.send_replace(None);
        }
    }
}

/// Runs forever: startup sweep, then the watch loop (restarted with
/// backoff by the watcher itself on errors).
pub async fn run(ctx: Arc<NodeContext>) {
    let api: Api<Pod> = Api::all(ctx.client.clone());
    let selector = format!("spec.nodeName={}", ctx.node_name);
    let no_start = startup_sweep(&ctx, &api, &selector).await;
    let mut mgr = Manager {
        ctx,
        workers: HashMap::new(),
        no_start,
    };
    loop {
        let stream =
            watcher::watcher(api.clone(), watcher::Config::default().fields(&selector)).default_backoff();
        futures::pin_mut!(stream);
        let mut listed: Option<HashSet<String>> = None;
        while let Some(event) = stream.next().await {
            match event {
                Ok(Event::Init) => listed = Some(HashSet::new()),
                Ok(Event::InitApply(pod)) => {
                    if let (Some(l), Some(uid)) = (listed.as_mut(), uid_of(&pod)) {
                        l.insert(uid);
                    }
                    mgr.dispatch(pod);
                }
                Ok(Event::InitDone) => {
                    // Pods deleted while the watch was down get no Delete
                    // event: whatever the relist lacks is gone.
                    if let Some(l) = listed.take() {
                        let stale: Vec<String> = mgr
                            .workers
                            .keys()
                            .filter(|uid| !l.contains(*uid))
                            .cloned()
                            .collect();
                        for uid in stale {
                            mgr.forget(&uid);
                        }
                    }
                }
                Ok(Event::Apply(pod)) => mgr.dispatch(pod),
                Ok(Event::Delete(pod)) => {
                    if let Some(uid) = uid_of(&pod) {
                        mgr.forget(&uid);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "pod watch error"),
            }
            // Workers end once their pod is gone (or if one panicked).
            mgr.workers.retain(|_, tx| !tx.is_closed());
        }
        tracing::warn!("pod watch ended; restarting it");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodStatus;

    #[test]
    fn started_detection() {
        let mut pod = Pod::default();
        assert!(!was_started(&pod));
        pod.status = Some(PodStatus {
            phase: Some("Pending".into()),
            ..Default::default()
        });
        assert!(!was_started(&pod));
        pod.status = Some(PodStatus {
            phase: Some("Running".into()),
            ..Default::default()
        });
        assert!(was_started(&pod));
    }
}
