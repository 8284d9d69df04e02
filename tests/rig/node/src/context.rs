//! State shared by the pod workers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::Client;

use crate::events::Recorder;
use crate::logs::LogRegistry;
use crate::spawn::{group_alive, signal_group};

/// Process groups of running containers with their pods' grace periods,
/// so the node can take them down when it is stopped itself.
#[derive(Debug, Clone, Default)]
pub struct ProcessGroups {
    inner: Arc<Mutex<HashMap<i32, Duration>>>,
}

impl ProcessGroups {
    fn with<R>(&self, f: impl FnOnce(&mut HashMap<i32, Duration>) -> R) -> R {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    pub fn add(&self, pgid: i32, grace: Duration) {
        self.with(|s| s.insert(pgid, grace));
    }

    pub fn remove(&self, pgid: i32) {
        self.with(|s| s.remove(&pgid));
    }

    pub fn snapshot(&self) -> Vec<(i32, Duration)> {
        self.with(|s| s.iter().map(|(g, d)| (*g, *d)).collect())
    }

    /// SIGTERM every group, then SIGKILL each one still alive once its
    /// grace period (at most `cap`) has passed.
    pub async fn terminate_all(&self, cap: Duration) {
        let start = tokio::time::Instant::now();
        let mut groups: Vec<(i32, tokio::time::Instant)> = self
            .snapshot()
            .into_iter()
            .map(|(g, grace)| (g, start + grace.min(cap)))
            .collect();
        for (g, _) in &groups {
            signal_group(*g, libc::SIGTERM);
        }
        while !groups.is_empty() {
            let now = tokio::time::Instant::now();
            groups.retain(|(g, kill_at)| {
                if !group_alive(*g) {
                    return false;
                }
                if now >= *kill_at {
                    signal_group(*g, libc::SIGKILL);
                    return false;
                }
                true
            });
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Everything a pod worker needs from the node.
pub struct NodeContext {
    pub client: Client,
    pub node_name: String,
    pub state_dir: PathBuf,
    pub logs: LogRegistry,
    pub recorder: Recorder,
    /// `KUBERNETES_SERVICE_*` variables for every container.
    pub service_env: Vec<(String, String)>,
    /// The node process's own PATH, the default for containers.
    pub host_path: String,
    pub groups: ProcessGroups,
    /// Set when the node process is stopping: workers then report nothing,
    /// so the next node process marks the pods `NodeRestarted`.
    pub shutting_down: AtomicBool,
}

impl NodeContext {
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    pub fn pod_dir(&self, uid: &str) -> PathBuf {
        pod_dir(&self.state_dir, uid)
    }
}

pub fn pods_root(state_dir: &Path) -> PathBuf {
    state_dir.join("pods")
}

pub fn pod_dir(state_dir: &Path, uid: &str) -> PathBuf {
    pods_root(state_dir).join(uid)
}
