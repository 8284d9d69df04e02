//! Distribution as desired state: after a bake, the image is copied to the template's regions,
//! shared, tagged and deprecated, and kept that way. The decisions are pure functions here; the
//! Bake reconciler gathers what EC2 says, calls them, and acts (`bake::distribute`).
//!
//! Restart safety rests on what Baker writes on EC2 itself: the image's `baker.io/copied-to`
//! tag names every region before a copy is asked for there, and a copy keeps its image's name
//! (unique per region in an account), carries `baker.io/copy-of` and a description naming its
//! image. A copy made just before a crash, before its tags, is still found by name and
//! description, so a region never gets a second copy.

pub mod ec2;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use sha2::{Digest, Sha256};

use crate::api::bake::{Artifact, ArtifactState, DistributionStatus};
use crate::api::conditions::{self, DISTRIBUTED, Desired as Condition, READY, RECONCILING, STALLED};
use crate::api::{BakePhase, BakeStatus, Distribution, keys};
use crate::aws::ImageSummary;
use crate::k8s::truncate;

/// Who may launch an image besides its owner.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Grantee {
    Account(String),
    Organization(String),
    Unit(String),
}

impl Grantee {
    pub fn as_str(&self) -> &str {
        match self {
            Grantee::Account(s) | Grantee::Organization(s) | Grantee::Unit(s) => s,
        }
    }
}

/// How often a region's copy that is still being made is looked at again.
pub const COPYING_RECHECK: Duration = Duration::from_secs(15);
/// How often a region that failed is tried again.
pub const FAILED_RECHECK: Duration = Duration::from_secs(300);
/// A copy EC2 still reports pending after this long is reported failed (and left to EC2).
pub const COPY_TIMEOUT: Duration = Duration::from_secs(6 * 3600);
/// Longest message kept per region.
const MAX_REGION_MESSAGE: usize = 300;

/// A hash of what a distribution asks for (how long it is maintained does not count): when it
/// changes, images distributed before are distributed again.
pub fn key(d: &Distribution) -> String {
    let asked = Distribution {
        maintain_days: None,
        ..d.clone()
    };
    let text = serde_json::to_string(&asked).unwrap_or_default();
    let digest = Sha256::digest(text.as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// What a template's distribution asks for one image.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    pub key: String,
    pub build_region: String,
    /// Regions to copy to, each with the KMS key of its copy.
    pub copies: Vec<(String, Option<String>)>,
    pub grantees: BTreeSet<Grantee>,
    /// Accounts that get create-volume permission on the snapshots.
    pub snapshot_accounts: BTreeSet<String>,
    pub deprecate_at: Option<jiff::Timestamp>,
}

/// The distribution of `image` (as EC2 lists it in `build_region`) under `d`. The deprecation
/// time counts from the image's creation, so a copy made later is deprecated with it.
pub fn desired(build_region: &str, d: &Distribution, image: &ImageSummary) -> Desired {
    let perms = d.launch_permissions.clone().unwrap_or_default();
    let mut grantees = BTreeSet::new();
    grantees.extend(perms.accounts.iter().cloned().map(Grantee::Account));
    grantees.extend(perms.organizations.iter().cloned().map(Grantee::Organization));
    grantees.extend(perms.organizational_units.iter().cloned().map(Grantee::Unit));
    let created = image
        .creation_date
        .as_deref()
        .and_then(|c| c.parse::<jiff::Timestamp>().ok());
    Desired {
        key: key(d),
        build_region: build_region.to_string(),
        copies: d
            .regions
            .iter()
            .filter(|r| r.name != build_region)
            .map(|r| (r.name.clone(), r.kms_key_id.clone()))
            .collect(),
        grantees,
        snapshot_accounts: if perms.share_snapshots {
            perms.accounts.iter().cloned().collect()
        } else {
            BTreeSet::new()
        },
        deprecate_at: match (d.deprecate_after_days, created) {
            (Some(days), Some(c)) => c
                .checked_add(jiff::SignedDuration::from_hours(i64::from(days) * 24))
                .ok(),
            _ => None,
        },
    }
}

/// The new value of the image's `baker.io/copied-to` tag, if it lacks a region to copy to: the
/// regions it named, with the new ones, sorted.
pub fn copied_to(image: &ImageSummary, desired: &Desired) -> Option<String> {
    let have: BTreeSet<&str> = image
        .tags
        .get(keys::COPIED_TO)
        .map(|v| v.split(',').filter(|r| !r.is_empty()).collect())
        .unwrap_or_default();
    let mut all = have.clone();
    all.extend(desired.copies.iter().map(|(r, _)| r.as_str()));
    (all.len() > have.len()).then(|| all.into_iter().collect::<Vec<_>>().join(","))
}

/// The regions an image's `baker.io/copied-to` tag names.
pub fn copy_regions(image: &ImageSummary) -> Vec<String> {
    image
        .tags
        .get(keys::COPIED_TO)
        .map(|v| {
            v.split(',')
                .filter(|r| !r.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// The tags every copy carries: its image's (Baker's own and the template's), and the image it
/// was copied from.
pub fn copy_tags(image: &ImageSummary) -> BTreeMap<String, String> {
    let mut tags: BTreeMap<String, String> = image
        .tags
        .iter()
        .filter(|(k, _)| k.as_str() != keys::COPIED_TO)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    tags.insert(keys::COPY_OF.to_string(), image.image_id.clone());
    tags
}

/// What marks a copy as Baker's in its description, which CopyImage sets atomically: found
/// again even if the operator stopped between the copy and its tags.
pub fn copy_marker(image_id: &str) -> String {
    format!("[baker: copy of {image_id}]")
}

/// The description of a copy: its image's, then the marker, within EC2's 255 characters.
pub fn copy_description(image: &ImageSummary) -> String {
    let marker = copy_marker(&image.image_id);
    let own = image.description.as_deref().unwrap_or_default();
    let room = 255usize.saturating_sub(marker.len() + 1);
    let own = truncate(own, room);
    if own.is_empty() {
        marker
    } else {
        format!("{own} {marker}")
    }
}

/// What holds an image's name in a region.
#[derive(Clone, Debug, PartialEq)]
pub enum Found {
    /// The image itself (in the build region) or Baker's copy of it, with what EC2 says of it.
    Image(Box<Seen>),
    /// Nothing: the region needs a copy.
    Absent,
    /// An image Baker did not copy from this one holds the name.
    Foreign(String),
}

/// An image and its permissions, as EC2 lists them.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Seen {
    pub image: ImageSummary,
    pub grantees: BTreeSet<Grantee>,
    /// Accounts with create-volume permission, per snapshot (read only when snapshots are shared).
    pub snapshot_accounts: BTreeMap<String, BTreeSet<String>>,
}

/// Which of the images named like `source` in a region is Baker's copy of it: tagged as such,
/// or marked in its description (a copy not tagged yet). With several (an endpoint that does
/// not enforce unique names), the oldest.
pub fn find_copy(source_id: &str, mut named: Vec<ImageSummary>) -> Result<Option<ImageSummary>, String> {
    named.sort_by(|a, b| {
        a.creation_date
            .cmp(&b.creation_date)
            .then_with(|| a.image_id.cmp(&b.image_id))
    });
    let marker = copy_marker(source_id);
    let ours = |i: &ImageSummary| {
        i.tags.get(keys::COPY_OF).map(String::as_str) == Some(source_id)
            || i.description.as_deref().is_some_and(|d| d.contains(&marker))
    };
    if let Some(copy) = named.iter().find(|i| ours(i)) {
        return Ok(Some(copy.clone()));
    }
    match named.first() {
        Some(other) => Err(other.image_id.clone()),
        None => Ok(None),
    }
}

/// One thing to do in a region, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    Copy {
        kms_key_id: Option<String>,
    },
    /// Tags missing or different on the image and its snapshots.
    Tag(BTreeMap<String, String>),
    Share(Vec<Grantee>),
    /// Accounts to add, per snapshot.
    ShareSnapshots(Vec<(String, Vec<String>)>),
    Deprecate(jiff::Timestamp),
}

/// A region's steps, and its artifact once they are done.
#[derive(Clone, Debug, PartialEq)]
pub struct RegionPlan {
    pub region: String,
    pub steps: Vec<Step>,
    pub artifact: Artifact,
}

/// EC2 rounds deprecation times to the minute.
fn same_minute(a: jiff::Timestamp, b: &str) -> bool {
    b.parse::<jiff::Timestamp>()
        .is_ok_and(|b| (a.as_second() - b.as_second()).abs() < 60)
}

fn format_time(t: jiff::Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// What to do in `region` given what holds the image's name there. `tags` are what the image
/// in that region must carry (none for the image itself: packer tagged it), `kms_key_id` the key
/// its copy is made with, `now` for the copy timeout.
pub fn plan_region(
    desired: &Desired,
    region: &str,
    tags: &BTreeMap<String, String>,
    kms_key_id: Option<&str>,
    found: &Found,
    now: jiff::Timestamp,
) -> RegionPlan {
    let mut artifact = Artifact {
        region: region.to_string(),
        kms_key_id: kms_key_id.map(str::to_string),
        deprecation_time: desired.deprecate_at.map(format_time),
        shared_with: desired.grantees.iter().map(|g| g.as_str().to_string()).collect(),
        ..Default::default()
    };
    let mut steps = Vec::new();
    let seen = match found {
        Found::Absent => {
            artifact.state = ArtifactState::Copying;
            steps.push(Step::Copy {
                kms_key_id: kms_key_id.map(str::to_string),
            });
            steps.push(Step::Tag(tags.clone()));
            return RegionPlan {
                region: region.to_string(),
                steps,
                artifact,
            };
        }
        Found::Foreign(id) => {
            artifact.state = ArtifactState::Failed;
            artifact.shared_with.clear();
            artifact.deprecation_time = None;
            artifact.message = Some(format!(
                "{id} in {region} has this image's name and is not Baker's copy of it; EC2 allows one image of a name per region: rename or remove {id}"
            ));
            return RegionPlan {
                region: region.to_string(),
                steps,
                artifact,
            };
        }
        Found::Image(seen) => seen,
    };
    let image = &seen.image;
    artifact.image_id = Some(image.image_id.clone());
    artifact.encrypted = image.encrypted;
    let missing: BTreeMap<String, String> = tags
        .iter()
        .filter(|(k, v)| image.tags.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if !missing.is_empty() {
        steps.push(Step::Tag(missing));
    }
    match image.state.as_deref() {
        Some("available") => {}
        Some("pending") => {
            let age = image
                .creation_date
                .as_deref()
                .and_then(|c| c.parse::<jiff::Timestamp>().ok())
                .map(|c| now.duration_since(c).unsigned_abs());
            if age.is_some_and(|a| a > COPY_TIMEOUT) {
                artifact.state = ArtifactState::Failed;
                artifact.message = Some(format!(
                    "{} has been copying for more than {} hours; see it in the EC2 console",
                    image.image_id,
                    COPY_TIMEOUT.as_secs() / 3600
                ));
            } else {
                artifact.state = ArtifactState::Copying;
            }
            artifact.shared_with.clear();
            artifact.deprecation_time = None;
            return RegionPlan {
                region: region.to_string(),
                steps,
                artifact,
            };
        }
        other => {
            artifact.state = ArtifactState::Failed;
            artifact.shared_with.clear();
            artifact.deprecation_time = None;
            artifact.message = Some(format!(
                "{} is {}{}; deregister it and Baker copies again",
                image.image_id,
                other.unwrap_or("in no state"),
                image
                    .state_reason
                    .as_deref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            ));
            return RegionPlan {
                region: region.to_string(),
                steps,
                artifact,
            };
        }
    }
    let share: Vec<Grantee> = desired.grantees.difference(&seen.grantees).cloned().collect();
    if !share.is_empty() {
        steps.push(Step::Share(share));
    }
    // Everyone it is shared with, not only those the template names now.
    artifact.shared_with = desired
        .grantees
        .union(&seen.grantees)
        .map(|g| g.as_str().to_string())
        .collect();
    if !desired.snapshot_accounts.is_empty() {
        let add: Vec<(String, Vec<String>)> = image
            .snapshot_ids
            .iter()
            .filter_map(|s| {
                let have = seen.snapshot_accounts.get(s).cloned().unwrap_or_default();
                let missing: Vec<String> = desired.snapshot_accounts.difference(&have).cloned().collect();
                (!missing.is_empty()).then(|| (s.clone(), missing))
            })
            .collect();
        if !add.is_empty() {
            steps.push(Step::ShareSnapshots(add));
        }
    }
    let have = image
        .deprecation_time
        .as_deref()
        .and_then(|h| h.parse::<jiff::Timestamp>().ok());
    match (desired.deprecate_at, image.deprecation_time.as_deref()) {
        (Some(at), Some(h)) if same_minute(at, h) => {}
        // An earlier date stands (a revocation deprecated it, or another template sharing the
        // image asks for less time): distribution never moves a deprecation later.
        (Some(at), _) if have.is_some_and(|h| h < at) => {
            artifact.deprecation_time = have.map(format_time);
        }
        // The date has passed (an old image, a region added late): EC2 refuses a time in the
        // past, so one that is not in the future stands, and otherwise the next minute does.
        (Some(at), have) if at <= now => {
            let passed = have
                .and_then(|h| h.parse::<jiff::Timestamp>().ok())
                .filter(|h| *h <= now + jiff::SignedDuration::from_secs(60));
            match passed {
                Some(h) => artifact.deprecation_time = Some(format_time(h)),
                None => {
                    let next = jiff::Timestamp::from_second((now.as_second() / 60 + 2) * 60).unwrap_or(now);
                    artifact.deprecation_time = Some(format_time(next));
                    steps.push(Step::Deprecate(next));
                }
            }
        }
        (Some(at), _) => steps.push(Step::Deprecate(at)),
        (None, have) => artifact.deprecation_time = have.map(str::to_string),
    }
    artifact.state = ArtifactState::Available;
    RegionPlan {
        region: region.to_string(),
        steps,
        artifact,
    }
}

/// A copy seen available for the first time gets all its tags once more, on the image and now
/// also on its snapshots (unknown when the copy was asked for; EC2 tags them at creation, an
/// endpoint that ignores the copy's tag specifications does not). Later checks compare the
/// image's tags only.
pub fn tag_snapshots_once(plan: &mut RegionPlan, tags: &BTreeMap<String, String>, was_available: bool) {
    if was_available || tags.is_empty() || plan.artifact.state != ArtifactState::Available {
        return;
    }
    plan.steps.retain(|s| !matches!(s, Step::Tag(_)));
    plan.steps.insert(0, Step::Tag(tags.clone()));
}

/// A step EC2 refused: the region's artifact fails with why (the other regions go on).
pub fn failed(mut artifact: Artifact, error: &crate::aws::Ec2Error) -> Artifact {
    artifact.state = ArtifactState::Failed;
    // What the step would have given, EC2 does not have.
    artifact.shared_with.clear();
    artifact.deprecation_time = None;
    artifact.message = Some(truncate(&error.to_string(), MAX_REGION_MESSAGE));
    artifact
}

/// When a Bake's distribution is looked at next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    Now,
    After(Duration),
    Never,
}

/// Whether a Bake's image needs a look at its distribution now: never for a Bake without an
/// image, or one finished longer ago than the template's `maintainDays`; now
/// when the template's distribution changed (or none was done); otherwise once the interval for
/// what the last look found has passed (a copy under way, a failed region, or the periodic check).
pub fn next_check(
    status: &BakeStatus,
    key: &str,
    maintain_days: i32,
    check_interval: Duration,
    now: jiff::Timestamp,
) -> Check {
    if status.phase != Some(BakePhase::Succeeded) || status.ami_id.is_none() {
        return Check::Never;
    }
    let finished = status.finished_at.as_ref().map(|t| t.0).unwrap_or(now);
    let maintained =
        now.duration_since(finished) < jiff::SignedDuration::from_hours(i64::from(maintain_days) * 24);
    if !maintained {
        return Check::Never;
    }
    let Some(done) = status.distribution.as_ref() else {
        return Check::Now;
    };
    if done.key != key {
        return Check::Now;
    }
    let states: Vec<ArtifactState> = status.artifacts.iter().map(|a| a.state).collect();
    let interval = if states.contains(&ArtifactState::Copying) {
        COPYING_RECHECK
    } else if states.contains(&ArtifactState::Failed) {
        FAILED_RECHECK.min(check_interval)
    } else {
        check_interval
    };
    let Some(checked) = done.checked_at.as_ref() else {
        return Check::Now;
    };
    let elapsed = now.duration_since(checked.0);
    if elapsed.is_negative() {
        return Check::After(interval);
    }
    let elapsed = elapsed.unsigned_abs();
    if elapsed >= interval {
        Check::Now
    } else {
        Check::After(interval - elapsed)
    }
}

/// Whether a template's change (to distribution `key`, `None` for none) concerns a finished
/// Bake: it has an image distributed under another key, or none yet.
pub fn template_changed(bake: &crate::api::Bake, key: Option<&str>) -> bool {
    let Some(status) = bake.status.as_ref() else {
        return false;
    };
    if status.phase != Some(BakePhase::Succeeded) || status.ami_id.is_none() {
        return false;
    }
    status.distribution.as_ref().map(|d| d.key.as_str()) != key
}

/// Reasons of the `Distributed` condition (and of `Ready` while it is not True).
pub const DISTRIBUTING: &str = "Distributing";
pub const DISTRIBUTED_REASON: &str = "Distributed";
pub const DISTRIBUTION_FAILED: &str = "DistributionFailed";

fn set_conditions(
    status: &mut BakeStatus,
    generation: Option<i64>,
    now: &Time,
    reason: &str,
    message: &str,
    stalled: bool,
) {
    let done = reason == DISTRIBUTED_REASON;
    let working = reason == DISTRIBUTING;
    let desired = [
        Condition::new(READY, done, reason, message),
        Condition::new(RECONCILING, working, reason, if working { message } else { "" }),
        Condition::new(STALLED, stalled, reason, if stalled { message } else { "" }),
        Condition::new(DISTRIBUTED, done, reason, message),
    ];
    status.conditions = conditions::merge(&status.conditions, &desired, generation, now);
}

/// A Bake that just got its image, from a template that distributes it: not Ready until the
/// image is everywhere the template says.
pub fn pending(mut status: BakeStatus, regions: usize, generation: Option<i64>, now: &Time) -> BakeStatus {
    let ami = status.ami_id.clone().unwrap_or_default();
    let message = format!("{ami} exists in its build region; distributing it to {regions} more region(s)");
    set_conditions(&mut status, generation, now, DISTRIBUTING, &message, false);
    status
}

/// The status after a look at the image in every region: artifacts (the build region first),
/// the `regions` summary, and the conditions. `Ready` is True only when every region is
/// `Available`; a region that failed while none is still copying makes the Bake `Stalled`.
pub fn apply(
    previous: &BakeStatus,
    artifacts: Vec<Artifact>,
    key: &str,
    generation: Option<i64>,
    now: &Time,
) -> BakeStatus {
    let mut next = previous.clone();
    let total = artifacts.len();
    let available: Vec<&str> = artifacts
        .iter()
        .filter(|a| a.state == ArtifactState::Available)
        .map(|a| a.region.as_str())
        .collect();
    let copying: Vec<&str> = artifacts
        .iter()
        .filter(|a| a.state == ArtifactState::Copying)
        .map(|a| a.region.as_str())
        .collect();
    let failed: Vec<String> = artifacts
        .iter()
        .filter(|a| a.state == ArtifactState::Failed)
        .map(|a| format!("{}: {}", a.region, a.message.as_deref().unwrap_or("failed")))
        .collect();
    let ami = previous.ami_id.clone().unwrap_or_default();
    let (reason, message, stalled) = if !failed.is_empty() {
        (
            DISTRIBUTION_FAILED,
            format!(
                "{ami} is available in {} of {total} regions; {}",
                available.len(),
                failed.join("; ")
            ),
            copying.is_empty(),
        )
    } else if !copying.is_empty() {
        (
            DISTRIBUTING,
            format!("{ami}: copying to {}", copying.join(", ")),
            false,
        )
    } else {
        (
            DISTRIBUTED_REASON,
            format!("{ami} is available in {}", available.join(", ")),
            false,
        )
    };
    let message = truncate(&message, crate::bake::status::MAX_MESSAGE);
    next.message = Some(message.clone());
    set_conditions(&mut next, generation, now, reason, &message, stalled);
    next.distribution = Some(DistributionStatus {
        regions: format!("{}/{total}", available.len()),
        key: key.to_string(),
        checked_at: Some(now.clone()),
    });
    next.artifacts = artifacts;
    next
}

/// Whether a pass's status is worth a write: it differs in more than when it was checked, or the
/// recorded check is older than the check interval.
pub fn worth_writing(previous: &BakeStatus, next: &BakeStatus, interval: Duration) -> bool {
    let unchecked = |s: &BakeStatus| {
        let mut s = s.clone();
        if let Some(d) = s.distribution.as_mut() {
            d.checked_at = None;
        }
        s
    };
    if unchecked(previous) != unchecked(next) {
        return true;
    }
    let at = |s: &BakeStatus| {
        s.distribution
            .as_ref()
            .and_then(|d| d.checked_at.as_ref())
            .map(|t| t.0)
    };
    match (at(previous), at(next)) {
        (Some(p), Some(n)) => n.duration_since(p).unsigned_abs() >= interval,
        _ => previous != next,
    }
}

/// A Bake whose template no longer distributes: Ready again as its bake left it, its artifacts
/// kept as the record of where the image went.
pub fn dropped(previous: &BakeStatus, generation: Option<i64>, now: &Time) -> BakeStatus {
    let mut next = previous.clone();
    let ami = previous.ami_id.clone().unwrap_or_default();
    let message = format!("{ami} exists; its template no longer distributes it");
    let desired = [
        Condition::new(READY, true, "Succeeded", &message),
        Condition::new(RECONCILING, false, "Succeeded", ""),
        Condition::new(STALLED, false, "Succeeded", ""),
    ];
    next.conditions = conditions::merge(&previous.conditions, &desired, generation, now)
        .into_iter()
        .filter(|c| c.type_ != DISTRIBUTED)
        .collect();
    next.distribution = None;
    next.message = Some(message);
    next
}

#[cfg(test)]
mod tests;
