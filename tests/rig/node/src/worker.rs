//! One pod's life on the node: prepare volumes and environments, start the
//! containers, watch them, enforce `activeDeadlineSeconds`, handle deletion,
//! report status, and finally delete the pod object and its files.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use k8s_openapi::api::core::v1::{
    Container, ContainerStatus, Pod, PodSecurityContext, SecurityContext, VolumeMount,
};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use serde_json::Value;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::context::NodeContext;
use crate::envvars::{self, PodFields, ResolvedEnv};
use crate::events::{NORMAL, WARNING};
use crate::expand::expand;
use crate::logs::{ContainerLogState, LogFiles, LogWriter};
use crate::retry::{Backoff, is_permanent};
use crate::spawn::{self, BindMount, ProcessSpec, describe_spawn_error, exit_info, signal_group};
use crate::status::{
    self, ContainerView, PHASE_FAILED, RunState, StatusReport, exit_reason, is_terminal_phase,
};
use crate::termination::{self, MAX_MESSAGE_BYTES};
use crate::unsupported::{self, unsupported_fields};
use crate::{objects, volumes};

pub const DEFAULT_TERMINATION_MESSAGE_PATH: &str = "/dev/termination-log";
pub const DEFAULT_GRACE_SECONDS: i64 = 30;
pub const DEADLINE_REASON: &str = "DeadlineExceeded";
pub const DEADLINE_MESSAGE: &str = "Pod was active on the node longer than the specified deadline";
pub const NO_COMMAND_MESSAGE: &str = "baker-rig-node cannot run the image's entrypoint (images are \
                                      not pulled): the container needs an explicit command";
/// How long to wait for a container's output to drain after it exited.
const LOG_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether the worker may start the pod's containers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Run,
    /// The pod was running before this node process started (or was seen
    /// before): never start it, only handle its deletion.
    Adopt,
}

// ---------------------------------------------------------------------------
// Pure helpers

/// `command` + `args` with `$(VAR)` expanded; `None` when there is no
/// command (the image entrypoint is unknown to the rig).
pub fn container_argv(c: &Container, env: &ResolvedEnv) -> Option<Vec<String>> {
    let command = c.command.as_deref().unwrap_or_default();
    if command.is_empty() {
        return None;
    }
    let args = c.args.as_deref().unwrap_or_default();
    Some(
        command
            .iter()
            .chain(args)
            .map(|s| expand(s, |n| env.get(n)))
            .collect(),
    )
}

/// The process environment: a minimal host base, overridden by the
/// container's resolved variables.
pub fn process_env(host_path: &str, hostname: &str, resolved: &ResolvedEnv) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), host_path.into()),
        ("HOME".into(), "/root".into()),
        ("HOSTNAME".into(), hostname.into()),
    ];
    for (k, v) in &resolved.vars {
        match env.iter_mut().find(|(name, _)| name == k) {
            Some(slot) => slot.1 = v.clone(),
            None => env.push((k.clone(), v.clone())),
        }
    }
    env
}

/// uid, gid and supplementary groups (container settings win over the
/// pod's; `fsGroup` joins the supplementary groups, as in kubelet).
pub fn credentials(
    pod_sc: Option<&PodSecurityContext>,
    c_sc: Option<&SecurityContext>,
) -> (Option<u32>, Option<u32>, Vec<u32>) {
    let to_u32 = |v: Option<i64>| v.and_then(|v| u32::try_from(v).ok());
    let uid = to_u32(
        c_sc.and_then(|s| s.run_as_user)
            .or_else(|| pod_sc.and_then(|s| s.run_as_user)),
    );
    let gid = to_u32(
        c_sc.and_then(|s| s.run_as_group)
            .or_else(|| pod_sc.and_then(|s| s.run_as_group)),
    );
    let mut groups: Vec<u32> = pod_sc
        .and_then(|s| s.supplemental_groups.clone())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|g| u32::try_from(g).ok())
        .collect();
    if let Some(fs) = to_u32(pod_sc.and_then(|s| s.fs_group))
        && !groups.contains(&fs)
    {
        groups.push(fs);
    }
    (uid, gid, groups)
}

/// Host path to bind for a volume mount, honouring `subPath` and
/// `subPathExpr` (expanded against the container environment).
pub fn mount_source(volume_path: &Path, vm: &VolumeMount, env: &ResolvedEnv) -> Result<PathBuf, String> {
    let sub = match (&vm.sub_path, &vm.sub_path_expr) {
        (Some(s), _) if !s.is_empty() => s.clone(),
        (_, Some(e)) if !e.is_empty() => expand(e, |n| env.get(n)),
        _ => return Ok(volume_path.to_path_buf()),
    };
    volumes::validate_rel_path(&sub).map_err(|e| format!("invalid subPath: {e}"))?;
    Ok(volume_path.join(sub))
}

fn grace_seconds(pod: &Pod, for_deletion: bool) -> i64 {
    let spec_grace = pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds);
    let grace = if for_deletion {
        pod.metadata.deletion_grace_period_seconds.or(spec_grace)
    } else {
        spec_grace
    };
    grace.unwrap_or(DEFAULT_GRACE_SECONDS).max(0)
}

/// State of a container found in the status of a pod whose processes were
/// lost with a previous node process.
pub fn restarted_state(cs: Option<&ContainerStatus>, now: Timestamp) -> RunState {
    let state = cs.and_then(|c| c.state.as_ref());
    if let Some(t) = state.and_then(|s| s.terminated.as_ref()) {
        return RunState::Terminated {
            exit_code: t.exit_code,
            signal: t.signal,
            reason: t
                .reason
                .clone()
                .unwrap_or_else(|| exit_reason(t.exit_code).into()),
            message: t.message.clone(),
            started_at: t.started_at.as_ref().map(|t| t.0),
            finished_at: t.finished_at.as_ref().map(|t| t.0).unwrap_or(now),
        };
    }
    let started_at = state
        .and_then(|s| s.running.as_ref())
        .and_then(|r| r.started_at.as_ref())
        .map(|t| t.0);
    RunState::Terminated {
        exit_code: 137,
        signal: None,
        reason: status::UNKNOWN_REASON.into(),
        message: Some(status::UNKNOWN_MESSAGE.into()),
        started_at,
        finished_at: now,
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(10 * 365 * 24 * 3600)
}

/// Converts a deadline on the wall clock into a monotonic instant.
fn instant_at(t: Timestamp) -> Instant {
    let now = Timestamp::now();
    match now.duration_until(t).try_into() {
        Ok(d) => Instant::now() + d,
        // In the past (negative duration).
        Err(_) => Instant::now(),
    }
}

// ---------------------------------------------------------------------------
// The worker

struct Slot {
    name: String,
    image: String,
    state: RunState,
    pgid: Option<i32>,
    log: Option<LogWriter>,
    dir: PathBuf,
    fallback_to_logs: bool,
}

impl Slot {
    fn files(&self) -> LogFiles {
        LogFiles::in_dir(&self.dir)
    }
    fn termination_log(&self) -> PathBuf {
        self.dir.join("termination-log")
    }
}

struct Prepared {
    slot: usize,
    spec: Option<ProcessSpec>,
}

#[derive(Debug)]
enum PrepareError {
    /// Kubelet would retry (missing ConfigMap/Secret, API error...).
    Retry {
        event_reason: &'static str,
        container: Option<String>,
        waiting_reason: &'static str,
        message: String,
    },
    /// Cannot ever work here: the pod fails.
    Fatal { reason: &'static str, message: String },
}

enum Update {
    Changed,
    Gone,
}

enum Outcome {
    Done,
    Gone,
}

struct Worker {
    ctx: Arc<NodeContext>,
    rx: watch::Receiver<Option<Pod>>,
    pod: Pod,
    uid: String,
    namespace: String,
    name: String,
    pod_dir: PathBuf,
    slots: Vec<Slot>,
    start_time: Timestamp,
    reported_unsupported: HashSet<String>,
}

/// Runs a pod worker until the pod disappears from the watch.
pub async fn run_pod(ctx: Arc<NodeContext>, rx: watch::Receiver<Option<Pod>>, mode: Mode) {
    let Some(pod) = rx.borrow().clone() else {
        return;
    };
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let pod_dir = ctx.pod_dir(&uid);
    let slots = pod
        .spec
        .as_ref()
        .map(|s| s.containers.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|c| Slot {
            name: c.name.clone(),
            image: c.image.clone().unwrap_or_default(),
            state: RunState::creating(),
            pgid: None,
            log: None,
            dir: pod_dir.join(&c.name),
            fallback_to_logs: c.termination_message_policy.as_deref() == Some("FallbackToLogsOnError"),
        })
        .collect();
    let mut w = Worker {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        start_time: pod
            .status
            .as_ref()
            .and_then(|s| s.start_time.as_ref())
            .map(|t| t.0)
            .unwrap_or_else(Timestamp::now),
        ctx,
        rx,
        pod,
        uid,
        pod_dir,
        slots,
        reported_unsupported: HashSet::new(),
    };
    let phase = w.pod.status.as_ref().and_then(|s| s.phase.clone());
    if mode == Mode::Adopt || is_terminal_phase(phase.as_deref()) {
        w.adopt_logs();
    } else if w.deleting() {
        // Deleted before it ever ran: nothing to stop.
        tracing::info!(pod = %w.name, namespace = %w.namespace, "pod deleted before start");
    } else if let Outcome::Gone = w.run().await {
        w.cleanup();
        return;
    }
    w.linger().await;
}

impl Worker {
    fn deleting(&self) -> bool {
        self.pod.metadata.deletion_timestamp.is_some()
    }

    fn api(&self) -> Api<Pod> {
        Api::namespaced(self.ctx.client.clone(), &self.namespace)
    }

    fn event(&self, container: Option<&str>, type_: &str, reason: &str, message: &str) {
        if self.ctx.is_shutting_down() {
            return;
        }
        self.ctx
            .recorder
            .pod(&self.pod, container, type_, reason, message);
    }

    /// One `Unsupported` event per distinct message.
    fn unsupported_event(&mut self, container: Option<&str>, message: String) {
        if self.reported_unsupported.insert(message.clone()) {
            self.event(container, WARNING, "Unsupported", &message);
        }
    }

    /// When `activeDeadlineSeconds` (which may change while the pod runs)
    /// runs out, counted from the pod's start time.
    fn deadline(&self) -> Option<Instant> {
        let secs = self.pod.spec.as_ref()?.active_deadline_seconds?;
        let at = self
            .start_time
            .checked_add(k8s_openapi::jiff::SignedDuration::from_secs(secs))
            .unwrap_or(self.start_time);
        Some(instant_at(at))
    }

    /// Waits for the next version of the pod.
    async fn updated(&mut self) -> Update {
        if self.rx.changed().await.is_err() {
            return Update::Gone;
        }
        match self.rx.borrow_and_update().clone() {
            Some(p) => {
                self.pod = p;
                Update::Changed
            }
            None => Update::Gone,
        }
    }

    /// Registers whatever logs a previous run left, so `kubectl logs`
    /// still works for pods this process did not start.
    fn adopt_logs(&self) {
        let names: Vec<String> = self
            .slots
            .iter()
            .filter(|s| s.files().log.exists())
            .map(|s| s.name.clone())
            .collect();
        if names.is_empty() {
            return;
        }
        self.ctx
            .logs
            .add_pod(&self.namespace, &self.name, &self.uid, &names);
        for s in self.slots.iter().filter(|s| names.contains(&s.name)) {
            let (_tx, done) = watch::channel(true);
            self.ctx.logs.set_container(
                &self.namespace,
                &self.name,
                &self.uid,
                &s.name,
                ContainerLogState::Available {
                    files: s.files(),
                    done,
                },
            );
        }
    }

    async fn run(&mut self) -> Outcome {
        let names: Vec<String> = self.slots.iter().map(|s| s.name.clone()).collect();
        self.ctx
            .logs
            .add_pod(&self.namespace, &self.name, &self.uid, &names);
        tracing::info!(pod = %self.name, namespace = %self.namespace, uid = %self.uid, "starting pod");
        for u in unsupported_fields(&self.pod) {
            self.unsupported_event(u.container.as_deref(), u.message());
        }
        self.report(None, None).await;

        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
        let mut last_problem: Option<String> = None;
        let prepared = loop {
            match self.prepare().await {
                Ok(p) => break p,
                Err(PrepareError::Fatal { reason, message }) => {
                    tracing::warn!(pod = %self.name, %message, "pod cannot run");
                    self.event(None, WARNING, "Failed", &message);
                    let now = Timestamp::now();
                    for s in &mut self.slots {
                        s.state = RunState::Terminated {
                            exit_code: 128,
                            signal: None,
                            reason: "ContainerCannotRun".into(),
                            message: Some(message.clone()),
                            started_at: None,
                            finished_at: now,
                        };
                    }
                    self.report_final(Some(reason), Some(&message)).await;
                    return Outcome::Done;
                }
                Err(PrepareError::Retry {
                    event_reason,
                    container,
                    waiting_reason,
                    message,
                }) => {
                    if last_problem.as_deref() != Some(message.as_str()) {
                        tracing::info!(pod = %self.name, %message, "pod not ready to start; will retry");
                        let event_msg = if event_reason == "Failed" {
                            format!("Error: {message}")
                        } else {
                            message.clone()
                        };
                        self.event(container.as_deref(), WARNING, event_reason, &event_msg);
                        for s in &mut self.slots {
                            let mine = container.as_deref().is_none_or(|c| c == s.name);
                            s.state = if mine && container.is_some() {
                                RunState::Waiting {
                                    reason: waiting_reason.into(),
                                    message: Some(message.clone()),
                                }
                            } else {
                                RunState::creating()
                            };
                        }
                        self.report(None, None).await;
                        last_problem = Some(message);
                    }
                    let delay = backoff.next_delay();
                    let deadline = self.deadline();
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        u = self.updated() => match u {
                            Update::Gone => return Outcome::Gone,
                            Update::Changed if self.deleting() => return Outcome::Done,
                            Update::Changed => {}
                        },
                        _ = tokio::time::sleep_until(deadline.unwrap_or_else(far_future)), if deadline.is_some() => {
                            self.event(None, NORMAL, DEADLINE_REASON, DEADLINE_MESSAGE);
                            self.report_final(Some(DEADLINE_REASON), Some(DEADLINE_MESSAGE)).await;
                            return Outcome::Done;
                        }
                    }
                }
            }
        };

        let children = self.start(prepared);
        self.report(None, None).await;
        self.supervise(children).await
    }

    async fn prepare(&mut self) -> Result<Vec<Prepared>, PrepareError> {
        let fields = PodFields::from_pod(&self.pod);
        let client = self.ctx.client.clone();
        let vols = match volumes::materialize(&client, &self.pod, &fields, &self.pod_dir).await {
            Ok(v) => v,
            Err(e @ volumes::VolumeError::Retry { .. }) => {
                return Err(PrepareError::Retry {
                    event_reason: "FailedMount",
                    container: None,
                    waiting_reason: "ContainerCreating",
                    message: e.to_string(),
                });
            }
            Err(e @ volumes::VolumeError::Unsupported { .. }) => {
                return Err(PrepareError::Fatal {
                    reason: "UnsupportedVolume",
                    message: e.to_string(),
                });
            }
        };
        for field in &vols.unsupported {
            self.unsupported_event(None, unsupported::message(field, None));
        }
        let spec = self.pod.spec.clone().unwrap_or_default();
        let sources = objects::env_sources(&client, &self.namespace, &spec.containers)
            .await
            .map_err(|e| PrepareError::Retry {
                event_reason: "Failed",
                container: None,
                waiting_reason: "CreateContainerConfigError",
                message: e.to_string(),
            })?;
        let hostname = spec.hostname.clone().unwrap_or_else(|| self.name.clone());

        let mut out = Vec::with_capacity(spec.containers.len());
        for (i, c) in spec.containers.iter().enumerate() {
            let config_err = |message: String| PrepareError::Retry {
                event_reason: "Failed",
                container: Some(c.name.clone()),
                waiting_reason: "CreateContainerConfigError",
                message,
            };
            let env = envvars::resolve(c, &fields, &sources, &self.ctx.service_env)
                .map_err(|e| config_err(e.to_string()))?;
            for field in &env.unsupported {
                let field = format!("spec.containers{{{}}}.{field}", c.name);
                self.unsupported_event(Some(&c.name), unsupported::message(&field, None));
            }
            if !env.invalid_keys.is_empty() {
                let key = format!("invalid-env:{}", c.name);
                if self.reported_unsupported.insert(key) {
                    self.event(
                        Some(&c.name),
                        WARNING,
                        "InvalidEnvironmentVariableNames",
                        &format!(
                            "Keys [{}] from envFrom were skipped since they are invalid \
                             environment variable names.",
                            env.invalid_keys.join(", ")
                        ),
                    );
                }
            }

            let Some(argv) = container_argv(c, &env) else {
                out.push(Prepared { slot: i, spec: None });
                continue;
            };

            let mut mounts = Vec::new();
            for vm in c.volume_mounts.iter().flatten() {
                let Some(vol_path) = vols.paths.get(&vm.name) else {
                    return Err(PrepareError::Fatal {
                        reason: "InvalidVolumeMount",
                        message: format!(
                            "container \"{}\" mounts volume \"{}\" that the pod does not define",
                            c.name, vm.name
                        ),
                    });
                };
                let source = mount_source(vol_path, vm, &env).map_err(config_err)?;
                if !source.exists() {
                    // kubelet creates missing subPath directories.
                    std::fs::create_dir_all(&source)
                        .map_err(|e| config_err(format!("creating subPath {source:?}: {e}")))?;
                }
                mounts.push(BindMount {
                    source,
                    target: PathBuf::from(&vm.mount_path),
                    read_only: vm.read_only.unwrap_or(false),
                });
            }

            let slot = &self.slots[i];
            std::fs::create_dir_all(&slot.dir)
                .map_err(|e| config_err(format!("creating {:?}: {e}", slot.dir)))?;
            let tlog_target = c
                .termination_message_path
                .clone()
                .unwrap_or_else(|| DEFAULT_TERMINATION_MESSAGE_PATH.into());
            if !tlog_target.is_empty() {
                let tlog = slot.termination_log();
                write_world_writable(&tlog)
                    .map_err(|e| config_err(format!("creating termination log: {e}")))?;
                mounts.push(BindMount {
                    source: tlog,
                    target: PathBuf::from(tlog_target),
                    read_only: false,
                });
            }

            let (uid, gid, groups) = credentials(spec.security_context.as_ref(), c.security_context.as_ref());
            if c.security_context
                .as_ref()
                .and_then(|s| s.privileged)
                .unwrap_or(false)
            {
                tracing::info!(pod = %self.name, container = %c.name, "privileged container (runs as a host process anyway)");
            }
            out.push(Prepared {
                slot: i,
                spec: Some(ProcessSpec {
                    argv,
                    env: process_env(&self.ctx.host_path, &hostname, &env),
                    working_dir: c.working_dir.clone().filter(|w| !w.is_empty()).map(PathBuf::from),
                    mounts,
                    uid,
                    gid,
                    supplementary_groups: groups,
                }),
            });
        }
        Ok(out)
    }

    /// Starts every prepared container; returns the children to wait for.
    fn start(&mut self, prepared: Vec<Prepared>) -> Vec<(usize, tokio::process::Child)> {
        let mut children = Vec::new();
        for p in prepared {
            let (name, image) = {
                let s = &self.slots[p.slot];
                (s.name.clone(), s.image.clone())
            };
            self.event(
                Some(&name),
                NORMAL,
                "Pulled",
                &format!("Container image \"{image}\" is not pulled; the rig runs the command on the host"),
            );
            let Some(spec) = p.spec else {
                self.event(
                    Some(&name),
                    WARNING,
                    "Failed",
                    &format!("Error: {NO_COMMAND_MESSAGE}"),
                );
                self.fail_start(p.slot, 127, NO_COMMAND_MESSAGE.into());
                continue;
            };
            self.event(
                Some(&name),
                NORMAL,
                "Created",
                &format!("Created container: {name}"),
            );
            match self.spawn(p.slot, &spec) {
                Ok(child) => {
                    self.event(
                        Some(&name),
                        NORMAL,
                        "Started",
                        &format!("Started container {name}"),
                    );
                    children.push((p.slot, child));
                }
                Err((code, message)) => {
                    tracing::warn!(pod = %self.name, container = %name, %message, "container failed to start");
                    self.event(Some(&name), WARNING, "Failed", &format!("Error: {message}"));
                    self.fail_start(p.slot, code, message);
                }
            }
        }
        children
    }

    fn fail_start(&mut self, slot: usize, exit_code: i32, message: String) {
        let now = Timestamp::now();
        let s = &mut self.slots[slot];
        s.state = RunState::Terminated {
            exit_code,
            signal: None,
            reason: "ContainerCannotRun".into(),
            message: Some(message),
            started_at: Some(now),
            finished_at: now,
        };
        // `kubectl logs` on it returns an empty log rather than "waiting".
        let (_tx, done) = watch::channel(true);
        let files = s.files();
        let name = s.name.clone();
        self.ctx.logs.set_container(
            &self.namespace,
            &self.name,
            &self.uid,
            &name,
            ContainerLogState::Available { files, done },
        );
    }

    fn spawn(&mut self, slot: usize, spec: &ProcessSpec) -> Result<tokio::process::Child, (i32, String)> {
        let s = &mut self.slots[slot];
        let program = spec.argv.first().cloned().unwrap_or_default();
        let setup = |e: std::io::Error| (128, format!("setting up container: {e}"));
        std::fs::create_dir_all(&s.dir).map_err(setup)?;
        let files = s.files();
        let cmd = spawn::build_command(spec).map_err(|e| (128, e.to_string()))?;
        let (reader, writer) = std::io::pipe().map_err(setup)?;
        let log = LogWriter::start(reader, &files).map_err(setup)?;
        let mut cmd = cmd;
        cmd.stdin(Stdio::null());
        cmd.stdout(writer.try_clone().map_err(setup)?);
        cmd.stderr(writer);
        let mut cmd = tokio::process::Command::from(cmd);
        let spawned = cmd.spawn();
        // Drop our copies of the pipe's write end, so the log copier sees
        // EOF once the container's processes are gone.
        drop(cmd);
        let done = log.done();
        self.ctx.logs.set_container(
            &self.namespace,
            &self.name,
            &self.uid,
            &s.name,
            ContainerLogState::Available { files, done },
        );
        s.log = Some(log);
        let child = spawned.map_err(|e| {
            let code = match e.kind() {
                std::io::ErrorKind::NotFound => 127,
                std::io::ErrorKind::PermissionDenied => 126,
                _ => 128,
            };
            (code, describe_spawn_error(&program, &e))
        })?;
        let pgid = child.id().and_then(|id| i32::try_from(id).ok());
        if let Some(pgid) = pgid {
            let grace = grace_seconds(&self.pod, false).unsigned_abs();
            self.ctx.groups.add(pgid, Duration::from_secs(grace));
        }
        s.pgid = pgid;
        s.state = RunState::Running {
            started_at: Timestamp::now(),
        };
        tracing::info!(pod = %self.name, container = %s.name, pid = ?pgid, "container started");
        Ok(child)
    }

    /// SIGTERM to every running container; returns when to SIGKILL.
    fn stop_all(&self, grace_secs: i64) -> Option<Instant> {
        for s in &self.slots {
            if let (RunState::Running { .. }, Some(pgid)) = (&s.state, s.pgid) {
                self.event(
                    Some(&s.name),
                    NORMAL,
                    "Killing",
                    &format!("Stopping container {}", s.name),
                );
                signal_group(pgid, libc::SIGTERM);
            }
        }
        if grace_secs == 0 {
            self.kill_all();
            return None;
        }
        Some(Instant::now() + Duration::from_secs(grace_secs.unsigned_abs()))
    }

    fn kill_all(&self) {
        for s in &self.slots {
            if let (RunState::Running { .. }, Some(pgid)) = (&s.state, s.pgid) {
                signal_group(pgid, libc::SIGKILL);
            }
        }
    }

    async fn on_exit(&mut self, slot: usize, result: std::io::Result<std::process::ExitStatus>) {
        let (exit_code, signal) = match result {
            Ok(status) => exit_info(status),
            Err(e) => {
                tracing::warn!(error = %e, "waiting for container");
                (128 + libc::SIGKILL, None)
            }
        };
        let s = &mut self.slots[slot];
        if let Some(pgid) = s.pgid.take() {
            // Like a PID namespace going away with its init: leftovers die.
            signal_group(pgid, libc::SIGKILL);
            self.ctx.groups.remove(pgid);
        }
        if let Some(log) = s.log.take() {
            log.finish(LOG_DRAIN_TIMEOUT).await;
        }
        let file = termination::read_file_tail(&s.termination_log(), MAX_MESSAGE_BYTES).unwrap_or_default();
        let log_path = s.files().log;
        let message = termination::select_message(&file, s.fallback_to_logs, exit_code, || {
            std::fs::read(&log_path).unwrap_or_default()
        });
        let started_at = match &s.state {
            RunState::Running { started_at } => Some(*started_at),
            _ => None,
        };
        tracing::info!(pod = %self.name, container = %s.name, exit_code, ?signal, "container exited");
        s.state = RunState::Terminated {
            exit_code,
            signal,
            reason: exit_reason(exit_code).into(),
            message: Some(message).filter(|m| !m.is_empty()),
            started_at,
            finished_at: Timestamp::now(),
        };
    }

    async fn supervise(&mut self, children: Vec<(usize, tokio::process::Child)>) -> Outcome {
        let mut waits: FuturesUnordered<_> = children
            .into_iter()
            .map(|(slot, mut child)| async move { (slot, child.wait().await) })
            .collect();
        let mut kill_at: Option<Instant> = None;
        let mut stopping = false;
        let mut gone = false;
        let mut pod_reason: Option<(&str, &str)> = None;
        if self.deleting() {
            stopping = true;
            kill_at = self.stop_all(grace_seconds(&self.pod, true));
        }
        while !waits.is_empty() {
            let deadline = self.deadline();
            tokio::select! {
                Some((slot, result)) = waits.next() => {
                    self.on_exit(slot, result).await;
                    if !waits.is_empty() && !gone {
                        self.report(None, None).await;
                    }
                }
                u = self.updated(), if !gone => match u {
                    Update::Gone => {
                        // Force-deleted: nobody will read a status any more.
                        gone = true;
                        self.kill_all();
                    }
                    Update::Changed => {
                        if self.deleting() && !stopping {
                            stopping = true;
                            kill_at = self.stop_all(grace_seconds(&self.pod, true));
                        }
                    }
                },
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(far_future)), if deadline.is_some() && !stopping => {
                    stopping = true;
                    pod_reason = Some((DEADLINE_REASON, DEADLINE_MESSAGE));
                    self.event(None, NORMAL, DEADLINE_REASON, DEADLINE_MESSAGE);
                    kill_at = self.stop_all(grace_seconds(&self.pod, false));
                }
                _ = tokio::time::sleep_until(kill_at.unwrap_or_else(far_future)), if kill_at.is_some() => {
                    kill_at = None;
                    self.kill_all();
                }
            }
        }
        if gone {
            return Outcome::Gone;
        }
        let (reason, message) = pod_reason.unzip();
        self.report_final(reason, message).await;
        Outcome::Done
    }

    fn views(&self) -> Vec<ContainerView<'_>> {
        self.slots
            .iter()
            .map(|s| ContainerView {
                name: &s.name,
                image: &s.image,
                pod_uid: &self.uid,
                state: &s.state,
            })
            .collect()
    }

    /// Patches the status from the containers' current states.
    async fn report(&mut self, reason: Option<&str>, message: Option<&str>) {
        let views = self.views();
        let states: Vec<&RunState> = views.iter().map(|v| v.state).collect();
        let phase = status::pod_phase(&states);
        let patch = status::status_patch(
            &self.pod,
            &StatusReport {
                phase,
                reason,
                message,
                start_time: self.start_time,
                containers: views,
                now: Timestamp::now(),
            },
        );
        self.send_status(patch, Duration::from_secs(30)).await;
    }

    /// Terminal status: containers that never ran are reported as kubelet
    /// does; with a pod-level `reason` the phase is Failed.
    async fn report_final(&mut self, reason: Option<&str>, message: Option<&str>) {
        let now = Timestamp::now();
        for s in &mut self.slots {
            if !s.state.is_terminated() {
                s.state = RunState::never_ran(now);
            }
        }
        let views = self.views();
        let states: Vec<&RunState> = views.iter().map(|v| v.state).collect();
        let phase = if reason.is_some() {
            PHASE_FAILED
        } else {
            status::pod_phase(&states)
        };
        tracing::info!(pod = %self.name, namespace = %self.namespace, phase, ?reason, "pod finished");
        let patch = status::status_patch(
            &self.pod,
            &StatusReport {
                phase,
                reason,
                message,
                start_time: self.start_time,
                containers: views,
                now,
            },
        );
        // The final status matters most: keep trying for a while.
        self.send_status(patch, Duration::from_secs(300)).await;
    }

    async fn send_status(&mut self, patch: Value, give_up_after: Duration) {
        if self.ctx.is_shutting_down() {
            // The containers die with the node; the next node process
            // reports them (NodeRestarted).
            return;
        }
        let api = self.api();
        let give_up = Instant::now() + give_up_after;
        let mut backoff = Backoff::default();
        loop {
            match api
                .patch_status(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(p) => {
                    self.pod = p;
                    return;
                }
                Err(e) if is_permanent(&e) => {
                    tracing::warn!(pod = %self.name, error = %e, "status patch rejected");
                    return;
                }
                Err(e) => {
                    if Instant::now() >= give_up {
                        tracing::error!(pod = %self.name, error = %e, "giving up on status patch");
                        return;
                    }
                    tracing::warn!(pod = %self.name, error = %e, "status patch failed; retrying");
                    backoff.wait().await;
                }
            }
        }
    }

    /// Deletes the pod object for good, like kubelet once it has stopped
    /// everything: grace period 0, precondition on the UID.
    async fn delete_pod(&self) {
        let api = self.api();
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(self.uid.clone()),
                resource_version: None,
            }),
            ..Default::default()
        };
        let mut backoff = Backoff::default();
        for _ in 0..30 {
            match api.delete(&self.name, &params).await {
                Ok(_) => {
                    tracing::info!(pod = %self.name, namespace = %self.namespace, "pod deleted");
                    return;
                }
                Err(e) if is_permanent(&e) => {
                    tracing::debug!(pod = %self.name, error = %e, "pod already gone or replaced");
                    return;
                }
                Err(e) => {
                    tracing::warn!(pod = %self.name, error = %e, "deleting pod; retrying");
                    backoff.wait().await;
                }
            }
        }
    }

    /// Waits (after the containers ended) for the deletion request, deletes
    /// the object, and cleans up once it is gone.
    async fn linger(&mut self) {
        let mut delete_sent = false;
        loop {
            if self.deleting() && !delete_sent {
                self.delete_pod().await;
                delete_sent = true;
            }
            if let Update::Gone = self.updated().await {
                break;
            }
        }
        self.cleanup();
    }

    fn cleanup(&mut self) {
        self.kill_all();
        for s in &self.slots {
            if let Some(pgid) = s.pgid {
                self.ctx.groups.remove(pgid);
            }
        }
        self.ctx.logs.remove_pod(&self.namespace, &self.name, &self.uid);
        // Mounts only ever existed in the containers' own namespaces, so a
        // plain recursive delete is safe.
        if let Err(e) = std::fs::remove_dir_all(&self.pod_dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %self.pod_dir.display(), error = %e, "removing pod state");
        }
        tracing::info!(pod = %self.name, namespace = %self.namespace, "pod forgotten");
    }
}

fn write_world_writable(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, b"")?;
    // Writable by whatever user the container runs as, like kubelet's.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerState, ContainerStateRunning, ContainerStateTerminated};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn env(vars: &[(&str, &str)]) -> ResolvedEnv {
        ResolvedEnv {
            vars: vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn argv_expansion() {
        let c = Container {
            command: Some(vec!["sh".into(), "-c".into()]),
            args: Some(vec!["echo $(MSG) $$(MSG) $(NOPE)".into()]),
            ..Default::default()
        };
        assert_eq!(
            container_argv(&c, &env(&[("MSG", "hi")])).unwrap(),
            vec!["sh", "-c", "echo hi $(MSG) $(NOPE)"]
        );
        let no_cmd = Container {
            args: Some(vec!["x".into()]),
            ..Default::default()
        };
        assert!(container_argv(&no_cmd, &env(&[])).is_none());
    }

    #[test]
    fn env_base_is_overridden() {
        let e = process_env("/usr/bin:/bin", "p", &env(&[("HOME", "/h"), ("A", "1")]));
        assert_eq!(
            e,
            vec![
                ("PATH".to_string(), "/usr/bin:/bin".to_string()),
                ("HOME".into(), "/h".into()),
                ("HOSTNAME".into(), "p".into()),
                ("A".into(), "1".into()),
            ]
        );
    }

    #[test]
    fn credentials_merge() {
        let pod_sc = PodSecurityContext {
            run_as_user: Some(1000),
            run_as_group: Some(1000),
            fs_group: Some(2000),
            supplemental_groups: Some(vec![3000]),
            ..Default::default()
        };
        let c_sc = SecurityContext {
            run_as_user: Some(65534),
            ..Default::default()
        };
        assert_eq!(
            credentials(Some(&pod_sc), Some(&c_sc)),
            (Some(65534), Some(1000), vec![3000, 2000])
        );
        assert_eq!(credentials(None, None), (None, None, vec![]));
    }

    #[test]
    fn subpaths() {
        let base = Path::new("/v");
        let vm = |sub: Option<&str>, expr: Option<&str>| VolumeMount {
            name: "v".into(),
            mount_path: "/m".into(),
            sub_path: sub.map(Into::into),
            sub_path_expr: expr.map(Into::into),
            ..Default::default()
        };
        let e = env(&[("POD", "p1")]);
        assert_eq!(
            mount_source(base, &vm(None, None), &e).unwrap(),
            PathBuf::from("/v")
        );
        assert_eq!(
            mount_source(base, &vm(Some("a/b"), None), &e).unwrap(),
            PathBuf::from("/v/a/b")
        );
        assert_eq!(
            mount_source(base, &vm(None, Some("logs/$(POD)")), &e).unwrap(),
            PathBuf::from("/v/logs/p1")
        );
        assert!(mount_source(base, &vm(Some("../x"), None), &e).is_err());
    }

    #[test]
    fn grace_periods() {
        let mut pod = Pod::default();
        assert_eq!(grace_seconds(&pod, true), 30);
        pod.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            termination_grace_period_seconds: Some(5),
            ..Default::default()
        });
        assert_eq!(grace_seconds(&pod, true), 5);
        pod.metadata.deletion_grace_period_seconds = Some(0);
        assert_eq!(grace_seconds(&pod, true), 0);
        assert_eq!(grace_seconds(&pod, false), 5);
    }

    #[test]
    fn restarted_states() {
        let now = Timestamp::from_second(10).unwrap();
        let running = ContainerStatus {
            state: Some(ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(Time(Timestamp::from_second(1).unwrap())),
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        match restarted_state(Some(&running), now) {
            RunState::Terminated {
                exit_code,
                reason,
                started_at,
                ..
            } => {
                assert_eq!(exit_code, 137);
                assert_eq!(reason, status::UNKNOWN_REASON);
                assert!(started_at.is_some());
            }
            other => panic!("unexpected {other:?}"),
        }
        let done = ContainerStatus {
            state: Some(ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: 0,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(matches!(
            restarted_state(Some(&done), now),
            RunState::Terminated { exit_code: 0, ref reason, .. } if reason == "Completed"
        ));
        assert!(matches!(
            restarted_state(None, now),
            RunState::Terminated { exit_code: 137, .. }
        ));
    }
}
