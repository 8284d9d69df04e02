//! Pod status as kubelet reports it, for pods whose containers all run once
//! (restartPolicy Never semantics).

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus,
    HostIP, Pod, PodCondition, PodIP,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

use crate::envvars::LOOPBACK_IP;

pub const PHASE_PENDING: &str = "Pending";
pub const PHASE_RUNNING: &str = "Running";
pub const PHASE_SUCCEEDED: &str = "Succeeded";
pub const PHASE_FAILED: &str = "Failed";

/// What kubelet reports for a container that never ran in a terminated pod.
pub const UNKNOWN_REASON: &str = "ContainerStatusUnknown";
pub const UNKNOWN_MESSAGE: &str = "The container could not be located when the pod was terminated";

/// The rig's view of one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunState {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        started_at: Timestamp,
    },
    Terminated {
        exit_code: i32,
        signal: Option<i32>,
        reason: String,
        message: Option<String>,
        started_at: Option<Timestamp>,
        finished_at: Timestamp,
    },
}

impl RunState {
    pub fn creating() -> Self {
        RunState::Waiting {
            reason: "ContainerCreating".into(),
            message: None,
        }
    }

    pub fn is_terminated(&self) -> bool {
        matches!(self, RunState::Terminated { .. })
    }

    /// Terminal form for a container that never ran (kubelet's convention).
    pub fn never_ran(now: Timestamp) -> Self {
        RunState::Terminated {
            exit_code: 137,
            signal: None,
            reason: UNKNOWN_REASON.into(),
            message: Some(UNKNOWN_MESSAGE.into()),
            started_at: None,
            finished_at: now,
        }
    }
}

/// `Completed` for exit 0, `Error` otherwise, as containerd reports.
pub fn exit_reason(exit_code: i32) -> &'static str {
    if exit_code == 0 { "Completed" } else { "Error" }
}

/// kubelet's `getPhase` for containers that are never restarted.
pub fn pod_phase(states: &[&RunState]) -> &'static str {
    if states.is_empty() {
        return PHASE_PENDING;
    }
    let waiting = states
        .iter()
        .filter(|s| matches!(s, RunState::Waiting { .. }))
        .count();
    let running = states
        .iter()
        .filter(|s| matches!(s, RunState::Running { .. }))
        .count();
    if waiting > 0 {
        return PHASE_PENDING;
    }
    if running > 0 {
        return PHASE_RUNNING;
    }
    let all_ok = states
        .iter()
        .all(|s| matches!(s, RunState::Terminated { exit_code: 0, .. }));
    if all_ok { PHASE_SUCCEEDED } else { PHASE_FAILED }
}

pub fn is_terminal_phase(phase: Option<&str>) -> bool {
    matches!(phase, Some(PHASE_SUCCEEDED) | Some(PHASE_FAILED))
}

/// One container's entry of `status.containerStatuses`.
#[derive(Debug, Clone)]
pub struct ContainerView<'a> {
    pub name: &'a str,
    pub image: &'a str,
    pub pod_uid: &'a str,
    pub state: &'a RunState,
}

fn container_id(pod_uid: &str, name: &str) -> String {
    format!("rig://{pod_uid}/{name}")
}

pub fn container_status(c: &ContainerView<'_>) -> ContainerStatus {
    let id = container_id(c.pod_uid, c.name);
    let (state, ready, started, cid) = match c.state {
        RunState::Waiting { reason, message } => (
            ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some(reason.clone()),
                    message: message.clone(),
                }),
                ..Default::default()
            },
            false,
            false,
            None,
        ),
        RunState::Running { started_at } => (
            ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(Time(*started_at)),
                }),
                ..Default::default()
            },
            true,
            true,
            Some(id.clone()),
        ),
        RunState::Terminated {
            exit_code,
            signal,
            reason,
            message,
            started_at,
            finished_at,
        } => (
            ContainerState {
                terminated: Some(ContainerStateTerminated {
                    container_id: started_at.map(|_| id.clone()),
                    exit_code: *exit_code,
                    signal: *signal,
                    reason: Some(reason.clone()),
                    message: message.clone().filter(|m| !m.is_empty()),
                    started_at: started_at.map(Time),
                    finished_at: Some(Time(*finished_at)),
                }),
                ..Default::default()
            },
            false,
            false,
            started_at.map(|_| id.clone()),
        ),
    };
    ContainerStatus {
        name: c.name.to_string(),
        image: c.image.to_string(),
        image_id: String::new(),
        container_id: cid,
        ready,
        started: Some(started),
        restart_count: 0,
        state: Some(state),
        ..Default::default()
    }
}

fn condition(
    existing: &[PodCondition],
    type_: &str,
    status: bool,
    reason: Option<String>,
    message: Option<String>,
    generation: Option<i64>,
    now: Timestamp,
) -> PodCondition {
    let status = if status { "True" } else { "False" };
    // Transition time only moves when the status changes.
    let last_transition_time = existing
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .and_then(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    PodCondition {
        type_: type_.into(),
        status: status.into(),
        reason,
        message,
        last_transition_time: Some(last_transition_time),
        last_probe_time: None,
        observed_generation: generation,
    }
}

/// The conditions kubelet owns, merged into the pod's existing ones (e.g.
/// the scheduler's `PodScheduled`), which are kept.
pub fn conditions(
    existing: &[PodCondition],
    phase: &str,
    views: &[ContainerView<'_>],
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<PodCondition> {
    let terminal = is_terminal_phase(Some(phase));
    let unready: Vec<&str> = views
        .iter()
        .filter(|v| !matches!(v.state, RunState::Running { .. }))
        .map(|v| v.name)
        .collect();
    let ready = !terminal && unready.is_empty() && !views.is_empty();
    let (reason, message) = if ready {
        (None, None)
    } else if terminal {
        (Some("PodCompleted".to_string()), None)
    } else {
        (
            Some("ContainersNotReady".to_string()),
            Some(format!("containers with unready status: [{}]", unready.join(" "))),
        )
    };
    let ours = [
        condition(
            existing,
            "PodReadyToStartContainers",
            true,
            None,
            None,
            generation,
            now,
        ),
        condition(existing, "Initialized", true, None, None, generation, now),
        condition(
            existing,
            "ContainersReady",
            ready,
            reason.clone(),
            message.clone(),
            generation,
            now,
        ),
        condition(existing, "Ready", ready, reason, message, generation, now),
    ];
    let mut out: Vec<PodCondition> = existing
        .iter()
        .filter(|c| !ours.iter().any(|o| o.type_ == c.type_))
        .cloned()
        .collect();
    if !out.iter().any(|c| c.type_ == "PodScheduled") {
        out.push(condition(
            existing,
            "PodScheduled",
            true,
            None,
            None,
            generation,
            now,
        ));
    }
    out.extend(ours);
    out
}

/// Everything a status patch says about the pod.
#[derive(Debug, Clone)]
pub struct StatusReport<'a> {
    pub phase: &'a str,
    pub reason: Option<&'a str>,
    pub message: Option<&'a str>,
    pub start_time: Timestamp,
    pub containers: Vec<ContainerView<'a>>,
    pub now: Timestamp,
}

/// A JSON merge patch for `pods/<name>/status`. `metadata.uid` makes the
/// apiserver reject it if the name now belongs to another pod.
pub fn status_patch(pod: &Pod, report: &StatusReport<'_>) -> Value {
    let existing = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let generation = pod.metadata.generation;
    let conditions = conditions(
        &existing,
        report.phase,
        &report.containers,
        generation,
        report.now,
    );
    let statuses: Vec<ContainerStatus> = report.containers.iter().map(container_status).collect();
    let mut status = json!({
        "phase": report.phase,
        "hostIP": LOOPBACK_IP,
        "hostIPs": [HostIP { ip: LOOPBACK_IP.into() }],
        "podIP": LOOPBACK_IP,
        "podIPs": [PodIP { ip: LOOPBACK_IP.into() }],
        "startTime": Time(report.start_time),
        "conditions": conditions,
        "containerStatuses": statuses,
    });
    if let Some(g) = generation {
        status["observedGeneration"] = json!(g);
    }
    if let Some(r) = report.reason {
        status["reason"] = json!(r);
    }
    if let Some(m) = report.message {
        status["message"] = json!(m);
    }
    json!({
        "metadata": { "uid": pod.metadata.uid },
        "status": status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    fn term(code: i32) -> RunState {
        RunState::Terminated {
            exit_code: code,
            signal: None,
            reason: exit_reason(code).into(),
            message: None,
            started_at: Some(t(1)),
            finished_at: t(2),
        }
    }

    #[test]
    fn phases() {
        let running = RunState::Running { started_at: t(1) };
        let waiting = RunState::creating();
        assert_eq!(pod_phase(&[]), PHASE_PENDING);
        assert_eq!(pod_phase(&[&waiting, &running]), PHASE_PENDING);
        assert_eq!(pod_phase(&[&running, &term(0)]), PHASE_RUNNING);
        assert_eq!(pod_phase(&[&running, &term(1)]), PHASE_RUNNING);
        assert_eq!(pod_phase(&[&term(0), &term(0)]), PHASE_SUCCEEDED);
        assert_eq!(pod_phase(&[&term(0), &term(3)]), PHASE_FAILED);
        assert_eq!(pod_phase(&[&RunState::never_ran(t(3))]), PHASE_FAILED);
    }

    #[test]
    fn container_status_shapes() {
        let running = RunState::Running { started_at: t(5) };
        let s = container_status(&ContainerView {
            name: "c",
            image: "img:1",
            pod_uid: "u",
            state: &running,
        });
        assert!(s.ready);
        assert_eq!(s.started, Some(true));
        assert_eq!(s.container_id.as_deref(), Some("rig://u/c"));
        assert_eq!(s.image_id, "");
        assert!(s.state.unwrap().running.is_some());

        let killed = RunState::Terminated {
            exit_code: 137,
            signal: Some(9),
            reason: "Error".into(),
            message: Some(String::new()),
            started_at: Some(t(1)),
            finished_at: t(2),
        };
        let s = container_status(&ContainerView {
            name: "c",
            image: "img:1",
            pod_uid: "u",
            state: &killed,
        });
        assert!(!s.ready);
        let term = s.state.unwrap().terminated.unwrap();
        assert_eq!(term.exit_code, 137);
        assert_eq!(term.signal, Some(9));
        assert_eq!(term.message, None);

        let never = RunState::never_ran(t(2));
        let s = container_status(&ContainerView {
            name: "c",
            image: "i",
            pod_uid: "u",
            state: &never,
        });
        assert_eq!(s.container_id, None);
    }

    #[test]
    fn conditions_follow_containers() {
        let existing = vec![PodCondition {
            type_: "PodScheduled".into(),
            status: "True".into(),
            last_transition_time: Some(Time(t(0))),
            ..Default::default()
        }];
        let running = RunState::Running { started_at: t(1) };
        let done = term(0);
        let views = |a: &'static str, s| ContainerView {
            name: a,
            image: "i",
            pod_uid: "u",
            state: s,
        };
        let c = conditions(&existing, PHASE_RUNNING, &[views("a", &running)], None, t(10));
        let get = |c: &[PodCondition], ty: &str| c.iter().find(|x| x.type_ == ty).cloned().unwrap();
        assert_eq!(get(&c, "Ready").status, "True");
        assert_eq!(get(&c, "PodScheduled").last_transition_time, Some(Time(t(0))));
        assert_eq!(c.len(), 5);

        let c2 = conditions(
            &c,
            PHASE_RUNNING,
            &[views("a", &running), views("b", &done)],
            None,
            t(20),
        );
        let ready = get(&c2, "Ready");
        assert_eq!(ready.status, "False");
        assert_eq!(ready.reason.as_deref(), Some("ContainersNotReady"));
        assert_eq!(
            ready.message.as_deref(),
            Some("containers with unready status: [b]")
        );
        assert_eq!(ready.last_transition_time, Some(Time(t(20))));
        assert_eq!(get(&c2, "Initialized").last_transition_time, Some(Time(t(10))));

        let c3 = conditions(&c2, PHASE_SUCCEEDED, &[views("b", &done)], Some(3), t(30));
        let ready = get(&c3, "ContainersReady");
        assert_eq!(ready.status, "False");
        assert_eq!(ready.reason.as_deref(), Some("PodCompleted"));
        assert_eq!(ready.observed_generation, Some(3));
    }

    #[test]
    fn patch_carries_uid_and_reason() {
        let pod = Pod {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                uid: Some("u-1".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let st = term(143);
        let patch = status_patch(
            &pod,
            &StatusReport {
                phase: PHASE_FAILED,
                reason: Some("DeadlineExceeded"),
                message: Some("Pod was active on the node longer than the specified deadline"),
                start_time: t(1),
                containers: vec![ContainerView {
                    name: "c",
                    image: "i",
                    pod_uid: "u-1",
                    state: &st,
                }],
                now: t(5),
            },
        );
        assert_eq!(patch["metadata"]["uid"], "u-1");
        assert_eq!(patch["status"]["phase"], "Failed");
        assert_eq!(patch["status"]["reason"], "DeadlineExceeded");
        assert_eq!(patch["status"]["podIPs"][0]["ip"], LOOPBACK_IP);
        assert_eq!(patch["status"]["startTime"], "1970-01-01T00:00:01Z");
        assert_eq!(
            patch["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"],
            143
        );
    }
}
