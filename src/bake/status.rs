//! Bake status transitions, as pure functions: what the status becomes given what was observed.
//! The reconciler only gathers observations and writes the result.

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::conditions::{self, Desired, READY, RECONCILING, STALLED};
use crate::api::{BakePhase, BakeStatus};
use crate::k8s::truncate;

/// Why a Bake is where it is: a bounded set, used as condition reasons and Event reasons.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, strum::IntoStaticStr, strum::EnumString, strum::VariantArray,
)]
pub enum Reason {
    TemplateNotFound,
    InvalidTemplate,
    SourceImageNotFound,
    SourceCatalogEmpty,
    Ec2Unavailable,
    Launching,
    Queued,
    WaitingForIdenticalBake,
    PodPending,
    Running,
    AwaitingImage,
    Succeeded,
    Adopted,
    Reused,
    PackerFailed,
    Timeout,
    PodDeleted,
    ImageNotFound,
    NamespaceNotAllowed,
    /// No node would take the bake pod within the pod start timeout.
    Unschedulable,
    /// The node could not start the bake pod's container within the pod start timeout (a missing
    /// Secret or ConfigMap, an image that cannot be pulled, ...).
    PodStartFailed,
    /// An object Baker would create for the Bake (its template ConfigMap or its pod) exists and
    /// is not the Bake's own.
    NameConflict,
    /// The API server refused to create the bake pod or its ConfigMap (a ResourceQuota, Pod
    /// Security admission, a webhook) as many times as the operator allows.
    PodRejected,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    /// The phase a Bake is in for this reason.
    pub fn phase(self) -> BakePhase {
        match self {
            Reason::TemplateNotFound
            | Reason::SourceImageNotFound
            | Reason::SourceCatalogEmpty
            | Reason::Ec2Unavailable
            | Reason::Launching
            | Reason::PodPending => BakePhase::Pending,
            Reason::Queued | Reason::WaitingForIdenticalBake => BakePhase::Queued,
            Reason::Running | Reason::AwaitingImage => BakePhase::Running,
            Reason::Succeeded | Reason::Adopted | Reason::Reused => BakePhase::Succeeded,
            Reason::InvalidTemplate
            | Reason::PackerFailed
            | Reason::Timeout
            | Reason::PodDeleted
            | Reason::ImageNotFound
            | Reason::NamespaceNotAllowed
            | Reason::Unschedulable
            | Reason::PodStartFailed
            | Reason::NameConflict
            | Reason::PodRejected => BakePhase::Failed,
        }
    }

    /// Waiting on something only a person can fix (kstatus `Stalled`), even though the operator
    /// keeps checking.
    pub fn stalled(self) -> bool {
        matches!(
            self,
            Reason::TemplateNotFound | Reason::SourceImageNotFound | Reason::SourceCatalogEmpty
        ) || self.phase() == BakePhase::Failed
    }
}

/// The next state of a Bake, as decided by the reconciler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub reason: Reason,
    pub message: String,
    pub ami_id: Option<String>,
}

impl Transition {
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
            ami_id: None,
        }
    }

    pub fn with_ami(mut self, ami_id: impl Into<String>) -> Self {
        self.ami_id = Some(ami_id.into());
        self
    }
}

/// Longest `message` kept in status: enough for packer's last error lines.
pub const MAX_MESSAGE: usize = 2048;

/// Keeps the end of text (where packer's error is) within `max` bytes.
pub fn tail(text: &str, max: usize) -> String {
    let text = text.trim();
    if text.len() <= max {
        return text.to_string();
    }
    let marker = "…";
    let mut start = text.len() - max.saturating_sub(marker.len());
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("{marker}{}", &text[start..])
}

/// The status after a transition. Fields recorded earlier (pod, source image, start time) are
/// kept; `finishedAt` is stamped on entering a terminal phase; conditions move their
/// `lastTransitionTime` only when their status flips.
pub fn apply(
    previous: Option<&BakeStatus>,
    generation: Option<i64>,
    t: &Transition,
    now: &Time,
) -> BakeStatus {
    let prev = previous.cloned().unwrap_or_default();
    let phase = t.reason.phase();
    let terminal = phase.is_terminal();
    let message = truncate(&t.message, MAX_MESSAGE);
    let desired = [
        Desired::new(
            READY,
            phase == BakePhase::Succeeded,
            t.reason.as_str(),
            message.clone(),
        ),
        Desired::new(
            RECONCILING,
            !terminal,
            t.reason.as_str(),
            if terminal { String::new() } else { message.clone() },
        ),
        Desired::new(
            STALLED,
            t.reason.stalled(),
            t.reason.as_str(),
            if t.reason.stalled() {
                message.clone()
            } else {
                String::new()
            },
        ),
    ];
    let finished_at = match (terminal, prev.finished_at.clone()) {
        (true, Some(at)) if prev.phase == Some(phase) => Some(at),
        (true, _) => Some(now.clone()),
        (false, _) => None,
    };
    BakeStatus {
        phase: Some(phase),
        ami_id: t.ami_id.clone().or(if phase == BakePhase::Succeeded {
            prev.ami_id.clone()
        } else {
            None
        }),
        message: Some(message),
        observed_generation: generation,
        finished_at,
        conditions: conditions::merge(&prev.conditions, &desired, generation, now),
        ..prev
    }
}

/// Why a bake pod that has not started is held up, from what the scheduler and the node report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Holdup {
    /// The scheduler found no node for it.
    Unschedulable { message: String },
    /// The node cannot start a container: a missing Secret or ConfigMap, an image that cannot be
    /// pulled, a bad command.
    CannotStart { reason: String, message: String },
}

impl Holdup {
    /// The reason a Bake fails with when the holdup outlasts the pod start timeout.
    pub fn reason(&self) -> Reason {
        match self {
            Holdup::Unschedulable { .. } => Reason::Unschedulable,
            Holdup::CannotStart { .. } => Reason::PodStartFailed,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Holdup::Unschedulable { message } => format!("no node can take it: {message}"),
            Holdup::CannotStart { reason, message } => format!("{reason}: {message}"),
        }
    }
}

/// Waiting reasons a container passes through on its way to running: not a holdup.
const STARTING: [&str; 2] = ["ContainerCreating", "PodInitializing"];

/// What holds a pending bake pod up, if anything is reported.
pub fn pod_holdup(pod: &Pod) -> Option<Holdup> {
    let status = pod.status.as_ref()?;
    if let Some(c) = status.conditions.iter().flatten().find(|c| {
        c.type_ == "PodScheduled" && c.status == "False" && c.reason.as_deref() == Some("Unschedulable")
    }) {
        return Some(Holdup::Unschedulable {
            message: c.message.clone().unwrap_or_default(),
        });
    }
    let waiting = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten())
        .filter_map(|c| c.state.as_ref()?.waiting.as_ref())
        .find(|w| w.reason.as_deref().is_some_and(|r| !STARTING.contains(&r)))?;
    Some(Holdup::CannotStart {
        reason: waiting.reason.clone().unwrap_or_default(),
        message: waiting.message.clone().unwrap_or_default(),
    })
}

/// What a pending bake pod means for its Bake: still waiting (with what holds it up, at once), or
/// failed once a holdup has lasted `timeout` since the pod was created. `None` for `waited` when
/// the creation time is unknown: never fails then.
pub fn pending_transition(
    pod_name: &str,
    holdup: Option<&Holdup>,
    waited: Option<std::time::Duration>,
    timeout: std::time::Duration,
) -> Transition {
    match holdup {
        Some(h) if waited.is_some_and(|w| w >= timeout) => Transition::new(
            h.reason(),
            format!(
                "bake pod {pod_name} did not start within {}s, so it was stopped: {}",
                timeout.as_secs(),
                h.describe()
            ),
        ),
        Some(h) => Transition::new(
            Reason::PodPending,
            format!(
                "bake pod {pod_name} cannot start yet: {}; the Bake fails if this lasts {}s",
                h.describe(),
                timeout.as_secs()
            ),
        ),
        None => Transition::new(
            Reason::PodPending,
            format!("waiting for bake pod {pod_name} to start"),
        ),
    }
}

/// What the bake pod says about the bake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodOutcome {
    /// Not started yet (scheduling, pulling the image).
    Pending,
    Running,
    /// Packer exited 0; the termination message holds the manifest.
    Succeeded {
        manifest: String,
    },
    /// The pod's deadline (the template's timeout) passed.
    DeadlineExceeded,
    /// Packer failed; the termination message holds the end of its output.
    Failed {
        message: String,
    },
}

/// Reads the outcome off a pod's status.
pub fn pod_outcome(pod: &Pod) -> PodOutcome {
    let Some(status) = pod.status.as_ref() else {
        return PodOutcome::Pending;
    };
    let terminated = status
        .container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == super::pod::CONTAINER)
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.as_ref());
    let termination_message = terminated.and_then(|t| t.message.clone()).unwrap_or_default();
    match status.phase.as_deref() {
        Some("Running") => PodOutcome::Running,
        Some("Succeeded") => PodOutcome::Succeeded {
            manifest: termination_message,
        },
        Some("Failed") if status.reason.as_deref() == Some("DeadlineExceeded") => {
            PodOutcome::DeadlineExceeded
        }
        Some("Failed") => {
            let mut message = termination_message;
            if message.trim().is_empty() {
                message = match terminated {
                    Some(t) => format!("packer exited with code {}", t.exit_code),
                    None => status
                        .message
                        .clone()
                        .unwrap_or_else(|| "the bake pod failed".into()),
                };
            }
            PodOutcome::Failed { message }
        }
        _ => PodOutcome::Pending,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::conditions::find;
    use k8s_openapi::api::core::v1::{ContainerState, ContainerStateTerminated, ContainerStatus, PodStatus};

    fn t(secs: i64) -> Time {
        Time(jiff::Timestamp::from_second(secs).unwrap_or(jiff::Timestamp::UNIX_EPOCH))
    }

    #[test]
    fn running_bake_is_reconciling_and_not_ready() {
        let s = apply(
            None,
            Some(1),
            &Transition::new(Reason::Running, "packer is running"),
            &t(10),
        );
        assert_eq!(s.phase, Some(BakePhase::Running));
        assert_eq!(find(&s.conditions, READY).unwrap().status, "False");
        assert_eq!(find(&s.conditions, RECONCILING).unwrap().status, "True");
        assert_eq!(find(&s.conditions, STALLED).unwrap().status, "False");
        assert_eq!(s.finished_at, None);
        assert_eq!(s.observed_generation, Some(1));
    }

    #[test]
    fn success_sets_ready_ami_and_finish_time() {
        let running = apply(None, Some(1), &Transition::new(Reason::Running, ""), &t(10));
        let done = apply(
            Some(&running),
            Some(1),
            &Transition::new(Reason::Succeeded, "baked").with_ami("ami-1"),
            &t(20),
        );
        assert_eq!(done.phase, Some(BakePhase::Succeeded));
        assert_eq!(done.ami_id.as_deref(), Some("ami-1"));
        assert_eq!(done.finished_at, Some(t(20)));
        let ready = find(&done.conditions, READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.last_transition_time.clone()),
            ("True", t(20))
        );
        assert_eq!(find(&done.conditions, RECONCILING).unwrap().status, "False");
    }

    #[test]
    fn failure_is_stalled_and_keeps_recorded_pod() {
        let mut launched = apply(None, Some(1), &Transition::new(Reason::Launching, ""), &t(1));
        launched.pod_name = Some("bake-x".into());
        let failed = apply(
            Some(&launched),
            Some(1),
            &Transition::new(Reason::PackerFailed, "boom"),
            &t(5),
        );
        assert_eq!(failed.phase, Some(BakePhase::Failed));
        assert_eq!(failed.pod_name.as_deref(), Some("bake-x"));
        assert_eq!(find(&failed.conditions, STALLED).unwrap().status, "True");
        assert_eq!(failed.message.as_deref(), Some("boom"));
    }

    #[test]
    fn reapplying_the_same_transition_changes_nothing() {
        let a = apply(
            None,
            Some(1),
            &Transition::new(Reason::PackerFailed, "boom"),
            &t(5),
        );
        let b = apply(
            Some(&a),
            Some(1),
            &Transition::new(Reason::PackerFailed, "boom"),
            &t(50),
        );
        assert_eq!(a, b);
    }

    #[test]
    fn tail_keeps_the_end_on_a_char_boundary_and_marks_the_cut() {
        let s = "é".repeat(10);
        let end = tail(&s, 7);
        assert!(end.len() <= 7 && end.starts_with('…'), "{end}");
    }

    fn pod(phase: &str, reason: Option<&str>, exit: i32, message: Option<&str>) -> Pod {
        Pod {
            status: Some(PodStatus {
                phase: Some(phase.into()),
                reason: reason.map(Into::into),
                container_statuses: Some(vec![ContainerStatus {
                    name: "packer".into(),
                    state: Some(ContainerState {
                        terminated: Some(ContainerStateTerminated {
                            exit_code: exit,
                            message: message.map(Into::into),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn pod_outcomes_read_phase_reason_and_termination_message() {
        assert_eq!(pod_outcome(&Pod::default()), PodOutcome::Pending);
        assert_eq!(
            pod_outcome(&pod("Succeeded", None, 0, Some("{}"))),
            PodOutcome::Succeeded {
                manifest: "{}".into()
            }
        );
        assert_eq!(
            pod_outcome(&pod("Failed", Some("DeadlineExceeded"), 143, None)),
            PodOutcome::DeadlineExceeded
        );
        assert_eq!(
            pod_outcome(&pod("Failed", None, 1, Some("Error: InvalidAMIID.NotFound"))),
            PodOutcome::Failed {
                message: "Error: InvalidAMIID.NotFound".into()
            }
        );
        assert_eq!(
            pod_outcome(&pod("Failed", None, 2, None)),
            PodOutcome::Failed {
                message: "packer exited with code 2".into()
            }
        );
    }

    fn pending_pod(
        conditions: Vec<k8s_openapi::api::core::v1::PodCondition>,
        waiting: Option<(&str, &str)>,
    ) -> Pod {
        use k8s_openapi::api::core::v1::ContainerStateWaiting;
        Pod {
            status: Some(PodStatus {
                phase: Some("Pending".into()),
                conditions: Some(conditions),
                container_statuses: waiting.map(|(reason, message)| {
                    vec![ContainerStatus {
                        name: "packer".into(),
                        state: Some(ContainerState {
                            waiting: Some(ContainerStateWaiting {
                                reason: Some(reason.into()),
                                message: Some(message.into()),
                            }),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_pod_that_cannot_start_its_container_says_why_at_once_and_fails_after_the_timeout() {
        let pod = pending_pod(
            vec![],
            Some((
                "CreateContainerConfigError",
                "secret \"aws-credentials\" not found",
            )),
        );
        let holdup = pod_holdup(&pod);
        let timeout = std::time::Duration::from_secs(300);
        let early = pending_transition(
            "bake-a",
            holdup.as_ref(),
            Some(std::time::Duration::from_secs(5)),
            timeout,
        );
        assert_eq!(early.reason, Reason::PodPending);
        assert!(
            early.message.contains("secret \"aws-credentials\" not found"),
            "{}",
            early.message
        );
        let late = pending_transition("bake-a", holdup.as_ref(), Some(timeout), timeout);
        assert_eq!(late.reason, Reason::PodStartFailed);
        assert_eq!(late.reason.phase(), BakePhase::Failed);
        assert!(
            late.message.contains("CreateContainerConfigError"),
            "{}",
            late.message
        );
    }

    #[test]
    fn an_unschedulable_pod_fails_as_unschedulable_after_the_timeout() {
        let pod = pending_pod(
            vec![k8s_openapi::api::core::v1::PodCondition {
                type_: "PodScheduled".into(),
                status: "False".into(),
                reason: Some("Unschedulable".into()),
                message: Some("0/1 nodes are available: 1 node(s) didn't match Pod's node affinity".into()),
                ..Default::default()
            }],
            None,
        );
        let timeout = std::time::Duration::from_secs(60);
        let t = pending_transition("bake-a", pod_holdup(&pod).as_ref(), Some(timeout * 2), timeout);
        assert_eq!(t.reason, Reason::Unschedulable);
        assert!(t.message.contains("node affinity"), "{}", t.message);
    }

    #[test]
    fn a_pod_on_its_way_to_running_is_not_held_up_and_never_fails_for_waiting() {
        let pod = pending_pod(vec![], Some(("ContainerCreating", "")));
        assert_eq!(pod_holdup(&pod), None);
        let t = pending_transition(
            "bake-a",
            None,
            Some(std::time::Duration::from_secs(10_000)),
            std::time::Duration::from_secs(1),
        );
        assert_eq!(t.reason, Reason::PodPending);
    }
}
