use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::*;
use crate::api::template::{LaunchPermissions, RegionCopy};

fn t(secs: i64) -> Time {
    Time(jiff::Timestamp::from_second(secs).unwrap_or(jiff::Timestamp::UNIX_EPOCH))
}

fn distribution() -> Distribution {
    Distribution {
        regions: vec![
            RegionCopy {
                name: "us-west-2".into(),
                kms_key_id: None,
            },
            RegionCopy {
                name: "ap-south-1".into(),
                kms_key_id: Some("alias/images".into()),
            },
        ],
        launch_permissions: Some(LaunchPermissions {
            accounts: vec!["111111111111".into(), "222222222222".into()],
            organizations: vec!["arn:aws:organizations::123456789012:organization/o-abc1234567".into()],
            organizational_units: vec![],
            share_snapshots: true,
        }),
        deprecate_after_days: Some(90),
        maintain_days: None,
    }
}

fn image() -> ImageSummary {
    ImageSummary {
        image_id: "ami-0source".into(),
        name: Some("svc-1.0-hvm-1700000000".into()),
        creation_date: Some("2026-12-01T00:00:00.000Z".into()),
        state: Some("available".into()),
        description: Some("svc 1.0".into()),
        tags: BTreeMap::from([
            (keys::BAKE_UID.to_string(), "uid-1".to_string()),
            (keys::SERVICE.to_string(), "svc".to_string()),
            ("team".to_string(), "payments".to_string()),
        ]),
        snapshot_ids: vec!["snap-1".into()],
        ..Default::default()
    }
}

fn desired_now() -> Desired {
    desired("us-east-1", &distribution(), &image())
}

fn now() -> jiff::Timestamp {
    "2026-12-02T00:00:00Z"
        .parse()
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
}

#[test]
fn the_key_changes_with_what_is_asked_but_not_with_how_long_it_is_maintained() {
    let d = distribution();
    let longer = Distribution {
        maintain_days: Some(90),
        ..d.clone()
    };
    assert_eq!(key(&d), key(&longer));
    let mut more = d.clone();
    more.regions.push(RegionCopy {
        name: "eu-west-1".into(),
        kms_key_id: None,
    });
    assert_ne!(key(&d), key(&more));
}

#[test]
fn desired_counts_deprecation_from_the_images_creation_and_shares_snapshots_with_accounts_only() {
    let d = desired_now();
    assert_eq!(
        d.deprecate_at.map(|t| t.to_string()),
        Some("2027-03-01T00:00:00Z".to_string())
    );
    assert_eq!(d.copies.len(), 2);
    assert_eq!(d.grantees.len(), 3);
    assert_eq!(
        d.snapshot_accounts,
        BTreeSet::from(["111111111111".to_string(), "222222222222".to_string()])
    );
}

#[test]
fn the_copied_to_tag_grows_with_new_regions_and_is_left_alone_otherwise() {
    let d = desired_now();
    let mut img = image();
    assert_eq!(copied_to(&img, &d).as_deref(), Some("ap-south-1,us-west-2"));
    img.tags
        .insert(keys::COPIED_TO.into(), "ap-south-1,eu-west-1,us-west-2".into());
    assert_eq!(
        copied_to(&img, &d),
        None,
        "a region removed from the template stays listed"
    );
    assert_eq!(copy_regions(&img).len(), 3);
}

#[test]
fn copies_carry_the_images_tags_and_name_it_but_not_its_copy_list() {
    let mut img = image();
    img.tags.insert(keys::COPIED_TO.into(), "us-west-2".into());
    let tags = copy_tags(&img);
    assert_eq!(tags.get(keys::COPY_OF).map(String::as_str), Some("ami-0source"));
    assert_eq!(tags.get("team").map(String::as_str), Some("payments"));
    assert!(!tags.contains_key(keys::COPIED_TO));
    let description = copy_description(&ImageSummary {
        description: Some("x".repeat(300)),
        ..img
    });
    assert!(description.len() <= 255 && description.ends_with(&copy_marker("ami-0source")));
}

fn named(id: &str, created: &str, tags: &[(&str, &str)], description: Option<&str>) -> ImageSummary {
    ImageSummary {
        image_id: id.into(),
        creation_date: Some(created.into()),
        state: Some("available".into()),
        description: description.map(str::to_string),
        tags: tags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    }
}

#[test]
fn a_copy_is_found_by_its_tag_or_its_description_and_anything_else_holding_the_name_is_foreign() {
    let tagged = named(
        "ami-b",
        "2026-12-01T01:00:00Z",
        &[(keys::COPY_OF, "ami-0source")],
        None,
    );
    let untagged = named(
        "ami-a",
        "2026-12-01T00:30:00Z",
        &[],
        Some("svc [baker: copy of ami-0source]"),
    );
    let other = named("ami-z", "2026-11-01T00:00:00Z", &[], Some("hand made"));
    assert_eq!(
        find_copy("ami-0source", vec![tagged.clone()]),
        Ok(Some(tagged.clone()))
    );
    // The operator stopped before tagging its copy: still found, and the oldest of ours wins.
    assert_eq!(
        find_copy("ami-0source", vec![tagged, untagged.clone(), other.clone()]),
        Ok(Some(untagged))
    );
    assert_eq!(find_copy("ami-0source", vec![other]), Err("ami-z".to_string()));
    assert_eq!(find_copy("ami-0source", vec![]), Ok(None));
}

#[test]
fn an_absent_region_is_copied_with_its_key_and_tagged_at_once() {
    let d = desired_now();
    let tags = copy_tags(&image());
    let plan = plan_region(
        &d,
        "ap-south-1",
        &tags,
        Some("alias/images"),
        &Found::Absent,
        now(),
    );
    assert_eq!(
        plan.steps,
        vec![
            Step::Copy {
                kms_key_id: Some("alias/images".into())
            },
            Step::Tag(tags)
        ]
    );
    assert_eq!(plan.artifact.state, ArtifactState::Copying);
    assert_eq!(plan.artifact.kms_key_id.as_deref(), Some("alias/images"));
}

fn seen(image: ImageSummary, grantees: &[Grantee], snapshot_accounts: &[&str]) -> Found {
    let snapshots = image
        .snapshot_ids
        .iter()
        .map(|s| {
            (
                s.clone(),
                snapshot_accounts.iter().map(|a| a.to_string()).collect(),
            )
        })
        .collect();
    Found::Image(Box::new(Seen {
        image,
        grantees: grantees.iter().cloned().collect(),
        snapshot_accounts: snapshots,
    }))
}

#[test]
fn an_available_image_gets_only_what_it_lacks() {
    let d = desired_now();
    let mut img = image();
    img.deprecation_time = Some("2027-03-01T00:00:30.000Z".into());
    let found = seen(
        img.clone(),
        &[Grantee::Account("111111111111".into())],
        &["111111111111", "222222222222"],
    );
    let plan = plan_region(&d, "us-east-1", &BTreeMap::new(), None, &found, now());
    assert_eq!(
        plan.steps,
        vec![Step::Share(vec![
            Grantee::Account("222222222222".into()),
            Grantee::Organization("arn:aws:organizations::123456789012:organization/o-abc1234567".into()),
        ])],
        "deprecation within the minute EC2 rounds to is left alone"
    );
    assert_eq!(plan.artifact.state, ArtifactState::Available);
    assert_eq!(plan.artifact.shared_with.len(), 3);

    img.deprecation_time = None;
    let everything = seen(img, &[], &[]);
    let plan = plan_region(&d, "us-east-1", &BTreeMap::new(), None, &everything, now());
    assert!(matches!(plan.steps.as_slice(), [
        Step::Share(g),
        Step::ShareSnapshots(s),
        Step::Deprecate(_)
    ] if g.len() == 3 && s == &vec![("snap-1".to_string(), vec!["111111111111".to_string(), "222222222222".to_string()])]));
}

#[test]
fn a_copy_missing_tags_gets_them_back() {
    let d = desired_now();
    let tags = copy_tags(&image());
    let copy = named(
        "ami-copy",
        "2026-12-01T00:00:00Z",
        &[(keys::COPY_OF, "ami-0source")],
        None,
    );
    let plan = plan_region(&d, "us-west-2", &tags, None, &seen(copy, &[], &[]), now());
    match plan.steps.first() {
        Some(Step::Tag(missing)) => {
            assert!(missing.contains_key("team") && !missing.contains_key(keys::COPY_OF));
        }
        other => panic!("expected tags first, got {other:?}"),
    }
}

#[test]
fn a_pending_copy_waits_a_failed_one_fails_and_a_foreign_name_fails_with_what_to_do() {
    let d = desired_now();
    let mut pending = named(
        "ami-copy",
        "2026-12-01T23:00:00Z",
        &[(keys::COPY_OF, "ami-0source")],
        None,
    );
    pending.state = Some("pending".into());
    let plan = plan_region(
        &d,
        "us-west-2",
        &BTreeMap::new(),
        None,
        &seen(pending.clone(), &[], &[]),
        now(),
    );
    assert_eq!(
        (plan.artifact.state, plan.steps.len()),
        (ArtifactState::Copying, 0)
    );
    // Pending for longer than the copy timeout: reported, not waited on forever.
    pending.creation_date = Some("2026-12-01T00:00:00Z".into());
    let plan = plan_region(
        &d,
        "us-west-2",
        &BTreeMap::new(),
        None,
        &seen(pending.clone(), &[], &[]),
        now(),
    );
    assert_eq!(plan.artifact.state, ArtifactState::Failed);
    let mut failed = pending;
    failed.state = Some("failed".into());
    failed.state_reason = Some("KMS key is not accessible".into());
    let plan = plan_region(
        &d,
        "us-west-2",
        &BTreeMap::new(),
        None,
        &seen(failed, &[], &[]),
        now(),
    );
    assert_eq!(plan.artifact.state, ArtifactState::Failed);
    assert!(
        plan.artifact
            .message
            .as_deref()
            .is_some_and(|m| m.contains("KMS key"))
    );
    let plan = plan_region(
        &d,
        "us-west-2",
        &BTreeMap::new(),
        None,
        &Found::Foreign("ami-z".into()),
        now(),
    );
    assert_eq!(plan.artifact.state, ArtifactState::Failed);
    assert!(plan.steps.is_empty());
    assert!(
        plan.artifact
            .message
            .as_deref()
            .is_some_and(|m| m.contains("ami-z"))
    );
}

fn artifact(region: &str, state: ArtifactState) -> Artifact {
    Artifact {
        region: region.into(),
        image_id: Some(format!("ami-{region}")),
        state,
        message: (state == ArtifactState::Failed).then(|| "EC2 CopyImage failed: OptInRequired".to_string()),
        ..Default::default()
    }
}

fn succeeded() -> BakeStatus {
    BakeStatus {
        phase: Some(BakePhase::Succeeded),
        ami_id: Some("ami-0source".into()),
        finished_at: Some(t(1_000)),
        ..Default::default()
    }
}

fn ready(status: &BakeStatus) -> (String, String) {
    conditions::find(&status.conditions, READY)
        .map(|c| (c.status.clone(), c.reason.clone()))
        .unwrap_or_default()
}

#[test]
fn ready_waits_for_every_region_and_a_failed_region_stalls_once_nothing_is_copying() {
    let pending = pending(succeeded(), 2, Some(1), &t(1_000));
    assert_eq!(ready(&pending), ("False".into(), DISTRIBUTING.into()));
    let copying = apply(
        &pending,
        vec![
            artifact("us-east-1", ArtifactState::Available),
            artifact("us-west-2", ArtifactState::Copying),
            artifact("ap-south-1", ArtifactState::Failed),
        ],
        "k",
        Some(1),
        &t(1_010),
    );
    assert_eq!(ready(&copying), ("False".into(), DISTRIBUTION_FAILED.into()));
    assert_eq!(
        copying.distribution.as_ref().map(|d| d.regions.as_str()),
        Some("1/3")
    );
    assert_eq!(
        conditions::find(&copying.conditions, STALLED).map(|c| c.status.as_str()),
        Some("False")
    );
    let stuck = apply(
        &copying,
        vec![
            artifact("us-east-1", ArtifactState::Available),
            artifact("us-west-2", ArtifactState::Available),
            artifact("ap-south-1", ArtifactState::Failed),
        ],
        "k",
        Some(1),
        &t(1_020),
    );
    assert_eq!(
        conditions::find(&stuck.conditions, STALLED).map(|c| c.status.as_str()),
        Some("True")
    );
    let done = apply(
        &stuck,
        ["us-east-1", "us-west-2", "ap-south-1"]
            .iter()
            .map(|r| artifact(r, ArtifactState::Available))
            .collect(),
        "k",
        Some(1),
        &t(1_030),
    );
    assert_eq!(ready(&done), ("True".into(), DISTRIBUTED_REASON.into()));
    assert_eq!(
        done.distribution.as_ref().map(|d| d.regions.as_str()),
        Some("3/3")
    );
    let ready_since = conditions::find(&done.conditions, READY).map(|c| c.last_transition_time.clone());
    // A later check that finds the same: only checkedAt moves.
    let again = apply(&done, done.artifacts.clone(), "k", Some(1), &t(5_000));
    assert_eq!(
        conditions::find(&again.conditions, READY).map(|c| c.last_transition_time.clone()),
        ready_since
    );
    let dropped = dropped(&done, Some(1), &t(6_000));
    assert_eq!(ready(&dropped).0, "True");
    assert!(conditions::find(&dropped.conditions, DISTRIBUTED).is_none());
}

#[test]
fn checks_come_at_once_for_a_new_distribution_soon_while_copying_and_rarely_when_done() {
    let hour = Duration::from_secs(3600);
    let at = |s: i64| jiff::Timestamp::from_second(s).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    let mut s = succeeded();
    assert_eq!(next_check(&s, "k", 30, hour, at(1_000)), Check::Now);
    s.distribution = Some(DistributionStatus {
        regions: "3/3".into(),
        key: "k".into(),
        checked_at: Some(t(1_000)),
    });
    s.artifacts = vec![artifact("us-east-1", ArtifactState::Available)];
    assert_eq!(
        next_check(&s, "k", 30, hour, at(1_600)),
        Check::After(Duration::from_secs(3000))
    );
    assert_eq!(next_check(&s, "k", 30, hour, at(4_600)), Check::Now);
    assert_eq!(next_check(&s, "changed", 30, hour, at(1_001)), Check::Now);
    s.artifacts.push(artifact("us-west-2", ArtifactState::Copying));
    assert_eq!(
        next_check(&s, "k", 30, hour, at(1_005)),
        Check::After(COPYING_RECHECK - Duration::from_secs(5))
    );
    // Past maintainDays: left as it is, even when the template changes.
    let later = at(1_000 + 31 * 86_400);
    assert_eq!(next_check(&s, "changed", 30, hour, later), Check::Never);
    let never_distributed = succeeded();
    assert_eq!(next_check(&never_distributed, "k", 30, hour, later), Check::Never);
    let failed = BakeStatus {
        phase: Some(BakePhase::Failed),
        ..succeeded()
    };
    assert_eq!(next_check(&failed, "k", 30, hour, at(1_000)), Check::Never);
}

#[test]
fn a_deprecation_date_already_past_is_set_to_the_next_minute_once_and_then_stands() {
    let mut d = desired_now();
    d.deprecate_at = Some(
        "2026-11-01T00:00:00Z"
            .parse()
            .unwrap_or(jiff::Timestamp::UNIX_EPOCH),
    );
    let plan = plan_region(
        &d,
        "us-east-1",
        &BTreeMap::new(),
        None,
        &seen(image(), &[], &[]),
        now(),
    );
    let at = plan.steps.iter().find_map(|s| match s {
        Step::Deprecate(at) => Some(*at),
        _ => None,
    });
    assert!(at.is_some_and(|at| at > now()), "{:?}", plan.steps);
    let mut deprecated = image();
    deprecated.deprecation_time = Some("2026-12-02T00:01:00.000Z".into());
    let later = "2026-12-03T00:00:00Z"
        .parse()
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    let plan = plan_region(
        &d,
        "us-east-1",
        &BTreeMap::new(),
        None,
        &seen(deprecated, &[], &[]),
        later,
    );
    assert!(!plan.steps.iter().any(|s| matches!(s, Step::Deprecate(_))));
    assert_eq!(
        plan.artifact.deprecation_time.as_deref(),
        Some("2026-12-02T00:01:00Z")
    );
}

#[test]
fn a_copy_first_seen_available_is_tagged_whole_once_with_its_snapshots() {
    let d = desired_now();
    let tags = copy_tags(&image());
    let mut copy = named(
        "ami-copy",
        "2026-12-01T00:00:00Z",
        &[],
        Some("[baker: copy of ami-0source]"),
    );
    copy.tags = tags.clone();
    copy.snapshot_ids = vec!["snap-copy".into()];
    let found = seen(copy, &[], &[]);
    let mut plan = plan_region(&d, "us-west-2", &tags, None, &found, now());
    assert!(
        !plan.steps.iter().any(|s| matches!(s, Step::Tag(_))),
        "the image has its tags"
    );
    let before = plan.clone();
    tag_snapshots_once(&mut plan, &tags, true);
    assert_eq!(plan, before, "once only");
    tag_snapshots_once(&mut plan, &tags, false);
    assert_eq!(plan.steps.first(), Some(&Step::Tag(tags)));
}

#[test]
fn an_earlier_deprecation_already_in_ec2_is_never_moved_later() {
    let d = desired_now();
    let mut revoked = image();
    revoked.deprecation_time = Some("2026-12-01T12:00:00.000Z".into());
    let plan = plan_region(
        &d,
        "us-east-1",
        &BTreeMap::new(),
        None,
        &seen(revoked, &[], &[]),
        now(),
    );
    assert!(
        !plan.steps.iter().any(|s| matches!(s, Step::Deprecate(_))),
        "{:?}",
        plan.steps
    );
    assert_eq!(
        plan.artifact.deprecation_time.as_deref(),
        Some("2026-12-01T12:00:00Z")
    );
}

#[test]
fn a_pass_that_finds_nothing_new_writes_only_for_the_periodic_check() {
    let hour = Duration::from_secs(3600);
    let first = apply(
        &succeeded(),
        vec![artifact("us-east-1", ArtifactState::Copying)],
        "k",
        Some(1),
        &t(1_000),
    );
    let again = apply(&first, first.artifacts.clone(), "k", Some(1), &t(1_015));
    assert!(!worth_writing(&first, &again, hour));
    let done = apply(
        &first,
        vec![artifact("us-east-1", ArtifactState::Available)],
        "k",
        Some(1),
        &t(1_030),
    );
    assert!(worth_writing(&first, &done, hour));
    let hourly = apply(&done, done.artifacts.clone(), "k", Some(1), &t(1_030 + 3_600));
    assert!(worth_writing(&done, &hourly, hour));
}
