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
///
/// With a record file, the groups (and their leaders' start times) are also
/// written there: a node process that was killed cannot stop its containers,
/// so the next one kills what the record names before it marks those pods
/// `NodeRestarted` (their processes are then really gone, as on a node that
/// died).
#[derive(Debug, Clone, Default)]
pub struct ProcessGroups {
    inner: Arc<Mutex<HashMap<i32, Duration>>>,
    record: Option<PathBuf>,
}

/// The start time of process `pid` (field 22 of /proc/<pid>/stat), which
/// tells a recorded process from a later one that reused its pid.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields after it do not.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

impl ProcessGroups {
    /// Groups recorded in `record` as they start and end.
    pub fn recorded(record: PathBuf) -> ProcessGroups {
        ProcessGroups {
            inner: Default::default(),
            record: Some(record),
        }
    }

    /// SIGKILLs every group a previous node process recorded in `record` whose
    /// leader is still the process that was recorded, and empties the record.
    /// Returns how many groups it killed.
    pub fn kill_recorded(record: &Path) -> usize {
        let Ok(text) = std::fs::read_to_string(record) else {
            return 0;
        };
        let mut killed = 0;
        for line in text.lines() {
            let mut parts = line.split_whitespace();
            let (Some(Ok(pgid)), Some(Ok(started))) = (
                parts.next().map(str::parse::<i32>),
                parts.next().map(str::parse::<u64>),
            ) else {
                continue;
            };
            if start_time(pgid) == Some(started) && signal_group(pgid, libc::SIGKILL) {
                killed += 1;
            }
        }
        let _ = std::fs::remove_file(record);
        killed
    }

    fn with<R>(&self, f: impl FnOnce(&mut HashMap<i32, Duration>) -> R) -> R {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    /// Applies a change, then rewrites the record (under the lock, so writes never interleave).
    fn change(&self, f: impl FnOnce(&mut HashMap<i32, Duration>)) {
        self.with(|groups| {
            f(groups);
            let Some(record) = &self.record else { return };
            let text: String = groups
                .keys()
                .filter_map(|g| start_time(*g).map(|t| format!("{g} {t}\n")))
                .collect();
            // Best effort: without the record a killed node leaves orphans, as before.
            let tmp = record.with_extension("tmp");
            if std::fs::write(&tmp, text).is_ok() {
                let _ = std::fs::rename(&tmp, record);
            }
        })
    }

    pub fn add(&self, pgid: i32, grace: Duration) {
        self.change(|s| {
            s.insert(pgid, grace);
        });
    }

    pub fn remove(&self, pgid: i32) {
        self.change(|s| {
            s.remove(&pgid);
        });
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

#[cfg(test)]
mod tests {
    use std::os::unix::process::CommandExt;

    use super::*;

    fn sleeper() -> std::process::Child {
        std::process::Command::new("sleep")
            .arg("60")
            .process_group(0)
            .spawn()
            .expect("spawning sleep")
    }

    fn record_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("baker-rig-node-{name}-{}", std::process::id()))
    }

    #[test]
    fn a_recorded_group_is_killed_by_the_next_node_process_and_the_record_emptied() {
        let record = record_path("kill");
        let mut child = sleeper();
        let pgid = child.id() as i32;
        ProcessGroups::recorded(record.clone()).add(pgid, Duration::from_secs(1));
        assert_eq!(ProcessGroups::kill_recorded(&record), 1);
        assert!(
            child.wait().is_ok_and(|s| !s.success()),
            "the group was not killed"
        );
        assert!(!record.exists(), "the record was not emptied");
    }

    #[test]
    fn a_recorded_pid_now_held_by_another_process_is_left_alone() {
        let record = record_path("reuse");
        let mut child = sleeper();
        let pgid = child.id() as i32;
        let started = start_time(pgid).expect("a start time");
        std::fs::write(&record, format!("{pgid} {}\n", started + 1)).expect("writing the record");
        assert_eq!(ProcessGroups::kill_recorded(&record), 0);
        assert!(
            child.try_wait().is_ok_and(|s| s.is_none()),
            "a process not recorded was killed"
        );
        let _ = child.kill();
        let _ = child.wait();
    }
}
