//! BakeSchedules: what a schedule does next, as one pure decision (which Bake to create, which
//! old ones to delete, its status, when to look again); the controller gathers from the caches and
//! acts.
//!
//! A trigger's Bake has a name derived from the trigger alone (the cron time, or the source
//! image), so a restart that decides again creates the same name and the API server refuses the
//! second: no trigger ever bakes twice.

pub mod controller;
pub mod cron;

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::conditions::{self, Desired as Condition, READY};
use crate::api::schedule::{
    BakeScheduleSpec, BakeScheduleStatus, ConcurrencyPolicy, LatestImage, ScheduleMode, ScheduleTrigger,
};
use crate::api::{BakePhase, BakeSpec};

/// The condition that says whether the newest image is built on the newest source.
pub const OUTDATED: &str = "Outdated";
/// Trigger kinds.
pub const SCHEDULE: &str = "Schedule";
pub const SOURCE_CHANGE: &str = "SourceChange";

const DEFAULT_MIN_INTERVAL: i64 = 600;
const DEFAULT_SUCCEEDED_KEPT: i32 = 3;
const DEFAULT_FAILED_KEPT: i32 = 1;

/// One of the schedule's Bakes, as the cache shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct Owned {
    pub name: String,
    pub created: jiff::Timestamp,
    pub phase: Option<BakePhase>,
    pub ami_id: Option<String>,
    pub source_ami_id: Option<String>,
    pub finished: Option<jiff::Timestamp>,
}

impl Owned {
    fn finished(&self) -> bool {
        self.phase.is_some_and(|p| p.is_terminal())
    }
}

/// What the template's source resolves to.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    /// The image Bakes start from now.
    Image(String),
    /// Unknown, and why (no template, no catalog, an empty catalog, a filter source).
    Unknown { reason: &'static str, message: String },
}

/// Everything a decision reads.
pub struct Facts<'a> {
    pub name: &'a str,
    pub spec: &'a BakeScheduleSpec,
    pub status: Option<&'a BakeScheduleStatus>,
    pub generation: Option<i64>,
    pub created: jiff::Timestamp,
    pub bakes: &'a [Owned],
    pub source: Source,
    /// The operator's floor under `minIntervalSeconds`.
    pub min_interval_floor: i64,
    pub now: jiff::Timestamp,
}

/// A Bake to create.
#[derive(Clone, Debug, PartialEq)]
pub struct NewBake {
    pub name: String,
    pub spec: BakeSpec,
    pub trigger: ScheduleTrigger,
}

/// What to do.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub create: Option<NewBake>,
    /// Finished Bakes past the history limits.
    pub delete: Vec<String>,
    pub status: BakeScheduleStatus,
    /// When to look again even if nothing changes (the next cron time, the end of a rate limit).
    pub requeue: Option<Duration>,
}

/// The Bake name of a cron trigger: the schedule's name and the time, to the second, UTC.
pub fn cron_bake_name(schedule: &str, at: jiff::Timestamp) -> String {
    format!("{schedule}-{}", at.strftime("%Y%m%d%H%M%S"))
}

/// The Bake name of the `n`th source trigger: the schedule's name, the source image and `n` (a
/// source seen again later, after a revocation, is a new trigger).
pub fn source_bake_name(schedule: &str, source: &str, n: i64) -> String {
    format!("{schedule}-{source}-{n}")
}

fn spec_of(spec: &BakeScheduleSpec) -> BakeSpec {
    BakeSpec {
        template: spec.bake.template.clone(),
        service: spec.bake.service.clone(),
        version: spec.bake.version.clone(),
        virtualization_type: spec.bake.virtualization_type,
        rebake: spec.mode.unwrap_or_default() == ScheduleMode::Always,
        deregister_image_on_delete: spec.bake.deregister_image_on_delete,
    }
}

fn time(t: jiff::Timestamp) -> Time {
    Time(t)
}

fn until(now: jiff::Timestamp, at: jiff::Timestamp) -> Duration {
    let d = at.duration_since(now);
    if d.is_negative() {
        Duration::ZERO
    } else {
        d.unsigned_abs()
    }
}

/// Decides what a schedule does now.
pub fn decide(f: &Facts<'_>) -> Decision {
    let spec = f.spec;
    let previous = f.status.cloned().unwrap_or_default();
    let mut status = BakeScheduleStatus {
        observed_generation: f.generation,
        ..previous.clone()
    };
    let mut requeue: Option<Duration> = None;
    let mut soonest = |d: Duration| {
        requeue = Some(requeue.map_or(d, |r: Duration| r.min(d)));
    };

    // The newest image made, and the source it was made from.
    let latest = f
        .bakes
        .iter()
        .filter(|b| b.phase == Some(BakePhase::Succeeded) && b.ami_id.is_some())
        .max_by_key(|b| (b.finished.unwrap_or(b.created), b.created));
    status.latest = latest.map(|b| LatestImage {
        bake: b.name.clone(),
        ami_id: b.ami_id.clone().unwrap_or_default(),
        source_ami_id: b.source_ami_id.clone(),
        finished_at: b.finished.map(time),
    });
    let source = match &f.source {
        Source::Image(id) => Some(id.clone()),
        Source::Unknown { .. } => None,
    };
    status.source_ami_id = source.clone().or(previous.source_ami_id.clone());

    // Cron.
    let cron = spec
        .schedule
        .as_deref()
        .map(|expr| cron::parse(expr, spec.time_zone.as_deref()));
    let mut problem: Option<(&'static str, String)> = None;
    let mut cron_due = None;
    match &cron {
        Some(Ok(c)) => {
            let after = previous
                .last_schedule_time
                .as_ref()
                .map(|t| t.0)
                .unwrap_or(f.created);
            cron_due = c.due(after, f.now);
            status.next_schedule_time = c.next(f.now).map(time);
            if let Some(next) = c.next(f.now) {
                soonest(until(f.now, next) + Duration::from_secs(1));
            }
        }
        Some(Err(e)) => problem = Some(("InvalidSchedule", e.clone())),
        None => status.next_schedule_time = None,
    }
    if spec.on_source_change
        && let Source::Unknown { reason, message } = &f.source
    {
        problem.get_or_insert((reason, message.clone()));
    }

    // The source trigger: the source moved past the newest image, and no trigger for this
    // source was made yet (a failed one waits for the next source or cron time).
    let last_source_trigger = previous.last_source_trigger.clone();
    let source_due = source.as_ref().filter(|s| {
        spec.on_source_change
            && latest.and_then(|l| l.source_ami_id.as_deref()) != Some(s.as_str())
            && last_source_trigger.as_deref() != Some(s.as_str())
    });
    let source_n = previous.source_triggers.unwrap_or(0) + 1;

    let trigger = match (cron_due, source_due) {
        _ if spec.suspend => None,
        (Some(at), _) => Some(NewBake {
            name: cron_bake_name(f.name, at),
            spec: spec_of(spec),
            trigger: ScheduleTrigger {
                kind: SCHEDULE.into(),
                source_ami_id: source.clone(),
                message: format!(
                    "the schedule {:?} came due",
                    spec.schedule.as_deref().unwrap_or_default()
                ),
                bake: cron_bake_name(f.name, at),
                at: Some(time(at)),
            },
        }),
        (None, Some(s)) => Some(NewBake {
            name: source_bake_name(f.name, s, source_n),
            spec: spec_of(spec),
            trigger: ScheduleTrigger {
                kind: SOURCE_CHANGE.into(),
                message: match latest.and_then(|l| l.source_ami_id.clone()) {
                    Some(old) => format!("the source moved from {old} to {s}"),
                    None => format!("no image was made from the source {s} yet"),
                },
                bake: source_bake_name(f.name, s, source_n),
                source_ami_id: Some(s.clone()),
                at: Some(time(f.now)),
            },
        }),
        (None, None) => None,
    };
    if spec.suspend && cron_due.is_some() {
        // Dropped while suspended, not kept for later.
        status.last_schedule_time = cron_due.map(time);
    }

    let mut message = None;
    let mut create = None;
    if let Some(new) = trigger {
        let unfinished = f.bakes.iter().find(|b| !b.finished());
        // From the last trigger Baker recorded as well as the Bakes cached: a Bake deleted since
        // (by the history limit, or by a tenant) does not reopen the interval.
        let newest = f
            .bakes
            .iter()
            .map(|b| b.created)
            .chain(
                previous
                    .last_trigger
                    .as_ref()
                    .and_then(|t| t.at.as_ref())
                    .map(|t| t.0),
            )
            .max();
        let min_interval = spec
            .min_interval_seconds
            .unwrap_or(DEFAULT_MIN_INTERVAL)
            .max(f.min_interval_floor)
            .max(0);
        let open_at = newest.and_then(|n| n.checked_add(jiff::SignedDuration::from_secs(min_interval)).ok());
        if f.bakes.iter().any(|b| b.name == new.name) {
            // Made already (a restart came between the Bake and this status): only record it.
            record(&mut status, &new, cron_due);
        } else if let (Some(b), ConcurrencyPolicy::Forbid) =
            (unfinished, spec.concurrency_policy.unwrap_or_default())
        {
            message = Some(format!(
                "{}: waiting for Bake {} to finish",
                new.trigger.message, b.name
            ));
        } else if let Some(open) = open_at.filter(|o| *o > f.now) {
            message = Some(format!(
                "{}: waiting until {open} (minIntervalSeconds {min_interval} since the last Bake)",
                new.trigger.message
            ));
            soonest(until(f.now, open) + Duration::from_secs(1));
        } else {
            record(&mut status, &new, cron_due);
            create = Some(new);
        }
    }
    status.message = message.or_else(|| problem.as_ref().map(|(_, m)| m.clone()));

    // Outdated: the newest image is not built on the newest source.
    let (outdated, reason, why) = match (&source, latest) {
        (None, _) => (
            false,
            problem.as_ref().map_or("SourceUnknown", |(r, _)| r),
            problem.as_ref().map_or(
                "the template's source is not a catalog: no newer source can be seen".to_string(),
                |(_, m)| m.clone(),
            ),
        ),
        (Some(s), None) => (
            true,
            "NeverBaked",
            format!("no image was made yet; the source is {s}"),
        ),
        (Some(s), Some(l)) if l.source_ami_id.as_deref() != Some(s.as_str()) => (
            true,
            "NewSource",
            format!(
                "{} was built on {}; the source is now {s}",
                l.ami_id.as_deref().unwrap_or_default(),
                l.source_ami_id.as_deref().unwrap_or("an unknown image")
            ),
        ),
        (Some(s), Some(l)) => (
            false,
            "UpToDate",
            format!(
                "{} is built on the newest source {s}",
                l.ami_id.as_deref().unwrap_or_default()
            ),
        ),
    };
    let ready = !matches!(
        problem,
        Some(("InvalidSchedule", _)) | Some(("TemplateNotFound", _))
    );
    let now = time(f.now);
    status.conditions = conditions::merge(
        &previous.conditions,
        &[
            Condition::new(
                READY,
                ready,
                problem
                    .as_ref()
                    .filter(|_| !ready)
                    .map_or("Scheduled", |(r, _)| r),
                if ready {
                    "the schedule is active".to_string()
                } else {
                    status.message.clone().unwrap_or_default()
                },
            ),
            Condition::new(OUTDATED, outdated, reason, why),
        ],
        f.generation,
        &now,
    );

    Decision {
        delete: history(f.bakes, spec, create.as_ref().map(|c| c.name.as_str())),
        create,
        status,
        requeue,
    }
}

/// Records a trigger acted on.
fn record(status: &mut BakeScheduleStatus, new: &NewBake, cron_due: Option<jiff::Timestamp>) {
    if new.trigger.kind == SCHEDULE {
        status.last_schedule_time = cron_due.map(time);
    } else {
        status.source_triggers = Some(status.source_triggers.unwrap_or(0) + 1);
        status.last_source_trigger = new.trigger.source_ami_id.clone();
    }
    status.last_trigger = Some(new.trigger.clone());
}

/// Finished Bakes past the history limits, oldest first: the newest succeeded Bake always stays.
fn history(bakes: &[Owned], spec: &BakeScheduleSpec, _creating: Option<&str>) -> Vec<String> {
    let keep_ok = usize::try_from(
        spec.successful_bakes_history_limit
            .unwrap_or(DEFAULT_SUCCEEDED_KEPT)
            .max(1),
    )
    .unwrap_or(1);
    let keep_failed = usize::try_from(
        spec.failed_bakes_history_limit
            .unwrap_or(DEFAULT_FAILED_KEPT)
            .max(0),
    )
    .unwrap_or(0);
    let mut out = Vec::new();
    for (phase, keep) in [(BakePhase::Succeeded, keep_ok), (BakePhase::Failed, keep_failed)] {
        let mut of: Vec<&Owned> = bakes.iter().filter(|b| b.phase == Some(phase)).collect();
        of.sort_by_key(|b| std::cmp::Reverse((b.finished.unwrap_or(b.created), b.created)));
        out.extend(of.into_iter().skip(keep).map(|b| b.name.clone()));
    }
    out
}

#[cfg(test)]
mod tests;
