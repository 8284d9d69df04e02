//! Distribution through the Bake reconciler, against the mocked API server and the in-memory
//! EC2: a Bake whose bake pod succeeded, from a template that copies its image to two regions
//! (one with a KMS key), shares it with two accounts and an organization (snapshots too) and
//! deprecates it after 30 days. Each pass is one reconcile of the Bake as the API server has it
//! after the previous one; time passing is the status's `checkedAt` moved back.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use k8s_openapi::api::core::v1::{ContainerState, ContainerStateTerminated, ContainerStatus, Pod};
use serde_json::Value;

use super::{Rig, UID, bake, pod, reconcile, rig_with, status_writes, template};
use crate::api::bake::{Artifact, ArtifactState};
use crate::api::conditions::{self, DISTRIBUTED, READY, RECONCILING, STALLED};
use crate::api::template::{LaunchPermissions, RegionCopy};
use crate::api::{Bake, BakePhase, BakeStatus, BakeTemplate, Distribution, keys};
use crate::distribution::COPYING_RECHECK;
use crate::ec2_fake::{FakeEc2, FakeError, FakeGrant, FakeImage};
use crate::mock_api::ApiLog;

const BUILD: &str = "eu-west-1";
/// Copied to with a KMS key.
const FRANKFURT: &str = "eu-central-1";
const VIRGINIA: &str = "us-east-1";
const KMS: &str = "alias/baker-copies";
const AMI: &str = "ami-0b1d2e3f4a5b6c7d8";
const NAME: &str = "simple-service-1.0.0-hvm-1764757200";
const SNAPSHOT: &str = "snap-0b1d2e3f4a5b6c7d8";
const ACCOUNT_A: &str = "111111111111";
const ACCOUNT_B: &str = "222222222222";
const ORG: &str = "arn:aws:organizations::123456789012:organization/o-abc1234567";

fn distribution(regions: &[&str]) -> Distribution {
    Distribution {
        regions: regions
            .iter()
            .map(|r| RegionCopy {
                name: r.to_string(),
                kms_key_id: (*r == FRANKFURT).then(|| KMS.to_string()),
            })
            .collect(),
        launch_permissions: Some(LaunchPermissions {
            accounts: vec![ACCOUNT_A.into(), ACCOUNT_B.into()],
            organizations: vec![ORG.into()],
            organizational_units: vec![],
            share_snapshots: true,
        }),
        deprecate_after_days: Some(30),
        maintain_days: None,
    }
}

fn distributing(regions: &[&str]) -> BakeTemplate {
    let mut t = template();
    t.spec.distribution = Some(distribution(regions));
    t
}

/// When the image was made: this minute, so that its deprecation (30 days on) is a whole minute
/// in the future, as EC2 accepts it.
fn created() -> jiff::Timestamp {
    let now = jiff::Timestamp::now().as_second();
    jiff::Timestamp::from_second(now - now.rem_euclid(60)).unwrap_or(jiff::Timestamp::UNIX_EPOCH)
}

fn deprecate_at() -> jiff::Timestamp {
    created()
        .checked_add(jiff::SignedDuration::from_hours(30 * 24))
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
}

/// The image packer made in the build region, tagged as packer tags it.
fn baked_image() -> FakeImage {
    FakeImage::new(
        AMI,
        NAME,
        &created().strftime("%Y-%m-%dT%H:%M:%S.000Z").to_string(),
    )
    .description("simple-service 1.0.0")
    .tag(keys::BAKE_UID, UID)
    .tag(keys::BAKE, "team/b")
    .tag(keys::SERVICE, "simple-service")
    .tag(keys::VERSION, "1.0.0")
    .tag("team", "payments")
    .snapshot(SNAPSHOT)
}

/// The bake pod, succeeded, its manifest naming the image.
fn baked_pod() -> Pod {
    let mut p = pod("Succeeded");
    let manifest = serde_json::json!({
        "builds": [{
            "artifact_id": format!("{BUILD}:{AMI}"),
            "packer_run_uuid": "run-1",
            "custom_data": { "bake_uid": UID },
        }],
        "last_run_uuid": "run-1",
    });
    if let Some(status) = p.status.as_mut() {
        status.container_statuses = Some(vec![ContainerStatus {
            name: crate::bake::pod::CONTAINER.into(),
            state: Some(ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: 0,
                    message: Some(manifest.to_string()),
                    finished_at: Some(crate::k8s::now()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }]);
    }
    p
}

/// The Bake while packer ran in the build region.
fn running() -> Bake {
    let mut b = bake();
    b.status = Some(BakeStatus {
        phase: Some(BakePhase::Running),
        pod_name: Some("bake-b".into()),
        pod_uid: Some("pod-uid".into()),
        region: Some(BUILD.into()),
        started_at: Some(crate::k8s::now()),
        ..Default::default()
    });
    b
}

/// A rig on `ec2` whose template distributes to `regions`, the bake pod succeeded.
fn rig_on(ec2: Arc<FakeEc2>, regions: &[&str], b: &Bake) -> Rig {
    rig_with(
        distributing(regions),
        ec2,
        vec![b.clone()],
        vec![baked_pod()],
        |_| None,
    )
}

/// The Bake right after its bake: Succeeded, not Ready until distributed. The EC2 call log and
/// the API log start empty after it.
async fn baked(regions: &[&str]) -> (Rig, Bake) {
    let ec2 = FakeEc2::new();
    ec2.add_image(BUILD, baked_image());
    let first = rig_on(ec2.clone(), regions, &running());
    let b = pass(&first, &running()).await;
    let s = status(&b);
    assert_eq!(s.phase, Some(BakePhase::Succeeded));
    assert_eq!(s.ami_id.as_deref(), Some(AMI));
    assert_eq!(condition(s, READY), ("False".into(), "Distributing".into()));
    assert!(s.artifacts.is_empty() && s.distribution.is_none(), "{s:?}");
    // A fresh API log (and event recorder) for what distribution does.
    let rig = rig_on(ec2, regions, &b);
    rig.ec2.clear_calls();
    (rig, b)
}

/// One reconcile of `b`; the Bake as the API server has it after (its last status written).
async fn pass(rig: &Rig, b: &Bake) -> Bake {
    let before = status_writes(&rig.api).len();
    reconcile(Arc::new(b.clone()), rig.ctx.clone())
        .await
        .expect("the reconcile succeeds");
    let mut next = b.clone();
    if let Some(written) = status_writes(&rig.api).into_iter().skip(before).last() {
        next.status = Some(written);
    }
    next
}

/// The Bake as if its distribution was last checked `by` earlier.
fn aged(mut b: Bake, by: Duration) -> Bake {
    let checked = b
        .status
        .as_mut()
        .and_then(|s| s.distribution.as_mut())
        .and_then(|d| d.checked_at.as_mut())
        .expect("a distribution checked");
    let by = jiff::SignedDuration::try_from(by).expect("a short duration");
    checked.0 = checked.0.checked_sub(by).expect("a time");
    b
}

fn copying(b: &Bake) -> bool {
    status(b)
        .artifacts
        .iter()
        .any(|a| a.state == ArtifactState::Copying)
}

/// Passes until no region is copying, the copy recheck interval passing between them.
async fn settle(rig: &Rig, b: &Bake) -> Bake {
    let mut b = pass(rig, b).await;
    for _ in 0..4 {
        if !copying(&b) {
            return b;
        }
        b = pass(rig, &aged(b, COPYING_RECHECK)).await;
    }
    panic!("still copying: {:?}", status(&b).artifacts);
}

fn status(b: &Bake) -> &BakeStatus {
    b.status.as_ref().expect("a status")
}

/// A condition's status and reason.
fn condition(s: &BakeStatus, type_: &str) -> (String, String) {
    conditions::find(&s.conditions, type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
        .unwrap_or_default()
}

fn artifact<'s>(s: &'s BakeStatus, region: &str) -> &'s Artifact {
    s.artifacts
        .iter()
        .find(|a| a.region == region)
        .unwrap_or_else(|| panic!("no artifact for {region}: {:?}", s.artifacts))
}

/// The copy in `region`, as the fake EC2 holds it.
fn copy_in(rig: &Rig, b: &Bake, region: &str) -> FakeImage {
    let id = artifact(status(b), region)
        .image_id
        .clone()
        .unwrap_or_else(|| panic!("no image in {region}"));
    rig.ec2
        .image(region, &id)
        .unwrap_or_else(|| panic!("{id} is not in {region}"))
}

/// The tags every copy carries: the image's, and which image it copies.
fn copy_tags() -> BTreeMap<String, String> {
    let mut tags = baked_image().tags;
    tags.insert(keys::COPY_OF.into(), AMI.into());
    tags
}

fn shared() -> BTreeSet<FakeGrant> {
    BTreeSet::from([
        FakeGrant::UserId(ACCOUNT_A.into()),
        FakeGrant::UserId(ACCOUNT_B.into()),
        FakeGrant::OrganizationArn(ORG.into()),
    ])
}

/// Events published, as (type, reason, note): each new one, and each addition to a series.
fn events(api: &ApiLog) -> Vec<(String, String, String)> {
    let text = |e: &Value, k: &str| e.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
    api.all()
        .iter()
        .filter(|r| r.path.contains("/events") && (r.method == Method::POST || r.method == Method::PATCH))
        .map(|r| {
            (
                text(&r.body, "type"),
                text(&r.body, "reason"),
                text(&r.body, "note"),
            )
        })
        .collect()
}

/// The image and each copy are shared, their snapshots shared with the accounts, and deprecated.
fn assert_distributed(rig: &Rig, b: &Bake, regions: &[&str]) {
    let deprecation = deprecate_at().strftime("%Y-%m-%dT%H:%M:%S.000Z").to_string();
    let image = rig.ec2.image(BUILD, AMI).expect("the image");
    let mut images = vec![(BUILD.to_string(), image)];
    images.extend(regions.iter().map(|r| (r.to_string(), copy_in(rig, b, r))));
    for (region, image) in &images {
        assert_eq!(image.launch_permissions, shared(), "{region}");
        assert_eq!(
            image.deprecation_time.as_deref(),
            Some(deprecation.as_str()),
            "{region}"
        );
        assert_eq!(image.snapshot_ids.len(), 1, "{region}");
        let snapshot = rig
            .ec2
            .snapshot(region, &image.snapshot_ids[0])
            .expect("the snapshot");
        assert_eq!(
            snapshot.create_volume_permissions,
            BTreeSet::from([ACCOUNT_A.to_string(), ACCOUNT_B.to_string()]),
            "{region}"
        );
    }
}

#[tokio::test]
async fn a_distributed_bake_is_ready_once_its_image_is_copied_shared_and_deprecated_in_every_region() {
    let (rig, b) = baked(&[FRANKFURT, VIRGINIA]).await;

    // First pass: the image is shared and deprecated where it is, copies are asked for.
    let b = pass(&rig, &b).await;
    let s = status(&b);
    let states: Vec<(&str, ArtifactState)> =
        s.artifacts.iter().map(|a| (a.region.as_str(), a.state)).collect();
    assert_eq!(
        states,
        [
            (BUILD, ArtifactState::Available),
            (FRANKFURT, ArtifactState::Copying),
            (VIRGINIA, ArtifactState::Copying),
        ]
    );
    assert_eq!(condition(s, READY), ("False".into(), "Distributing".into()));
    assert_eq!(condition(s, RECONCILING).0, "True");
    let image = rig.ec2.image(BUILD, AMI).expect("the image");
    assert_eq!(
        image.tags.get(keys::COPIED_TO).map(String::as_str),
        Some("eu-central-1,us-east-1"),
        "every region is named on the image before a copy is asked for"
    );
    for region in [FRANKFURT, VIRGINIA] {
        assert_eq!(copy_in(&rig, &b, region).tags, copy_tags(), "{region}");
    }
    let asked: Vec<(String, Option<String>, bool)> = rig
        .ec2
        .copy_requests()
        .into_iter()
        .map(|c| (c.region, c.kms_key_id, c.encrypted))
        .collect();
    assert!(
        asked.contains(&(FRANKFURT.into(), Some(KMS.into()), true)),
        "{asked:?}"
    );
    assert!(asked.contains(&(VIRGINIA.into(), None, false)), "{asked:?}");
    assert_eq!(asked.len(), 2);
    let reasons: Vec<String> = events(&rig.api).into_iter().map(|e| e.1).collect();
    assert_eq!(reasons, ["Copying", "Copying"]);

    // Once the copy recheck is due: the copies are shared and deprecated.
    let b = pass(&rig, &aged(b, COPYING_RECHECK)).await;
    let s = status(&b);
    assert_eq!(s.phase, Some(BakePhase::Succeeded));
    assert_eq!(condition(s, READY), ("True".into(), "Distributed".into()));
    assert_eq!(condition(s, DISTRIBUTED), ("True".into(), "Distributed".into()));
    assert_eq!(condition(s, RECONCILING).0, "False");
    assert_eq!(condition(s, STALLED).0, "False");
    assert_eq!(s.distribution.as_ref().map(|d| d.regions.as_str()), Some("3/3"));
    let regions: Vec<&str> = s.artifacts.iter().map(|a| a.region.as_str()).collect();
    assert_eq!(regions, [BUILD, FRANKFURT, VIRGINIA], "the build region first");
    let deprecation = deprecate_at().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    for a in &s.artifacts {
        assert_eq!(a.state, ArtifactState::Available, "{a:?}");
        assert_eq!(a.shared_with, [ACCOUNT_A, ACCOUNT_B, ORG], "{a:?}");
        assert_eq!(a.deprecation_time.as_deref(), Some(deprecation.as_str()), "{a:?}");
        assert!(a.message.is_none(), "{a:?}");
    }
    assert_eq!(artifact(s, BUILD).image_id.as_deref(), Some(AMI));
    assert_eq!(artifact(s, FRANKFURT).kms_key_id.as_deref(), Some(KMS));
    assert!(artifact(s, FRANKFURT).encrypted);
    assert_eq!(artifact(s, VIRGINIA).kms_key_id, None);
    assert_distributed(&rig, &b, &[FRANKFURT, VIRGINIA]);
    for region in [FRANKFURT, VIRGINIA] {
        assert_eq!(rig.ec2.images(region).len(), 1, "one copy in {region}");
    }

    // The whole distribution, both passes. First: DescribeImages of the image and by name in
    // each copy region, the copied-to tag, two copies and their tags, the image's attributes
    // read and set. Second: the same reads of all three, the copies tagged again with their
    // snapshots, and the copies' attributes set.
    let expected: BTreeMap<String, usize> = [
        ("DescribeImages", 6),
        ("CreateTags", 5),
        ("CopyImage", 2),
        ("DescribeImageAttribute", 4),
        ("ModifyImageAttribute", 3),
        ("DescribeSnapshotAttribute", 4),
        ("ModifySnapshotAttribute", 3),
        ("EnableImageDeprecation", 3),
    ]
    .into_iter()
    .map(|(a, n)| (a.to_string(), n))
    .collect();
    assert_eq!(rig.ec2.counts(), expected);
    assert_eq!(
        status_writes(&rig.api).len(),
        2,
        "one status write per pass: {:?}",
        rig.api.lines()
    );

    // Before the check interval: nothing to ask EC2, nothing to write.
    rig.ec2.clear_calls();
    let api_before = rig.api.all().len();
    let again = pass(&rig, &b).await;
    assert!(rig.ec2.calls().is_empty(), "{:?}", rig.ec2.calls());
    assert_eq!(rig.api.all().len(), api_before, "{:?}", rig.api.lines());
    assert_eq!(again.status, b.status);
}

#[tokio::test]
async fn a_region_that_refuses_everything_fails_alone_and_stalls_the_bake_once_the_others_are_done() {
    let (rig, b) = baked(&[FRANKFURT, VIRGINIA]).await;
    rig.ec2.fail_region(
        VIRGINIA,
        FakeError::new(
            "OptInRequired",
            "You are not subscribed to this service. Please go to http://aws.amazon.com to subscribe.",
            401,
        ),
    );

    let b = settle(&rig, &b).await;

    let s = status(&b);
    assert_eq!(s.phase, Some(BakePhase::Succeeded));
    let failed = artifact(s, VIRGINIA);
    assert_eq!(failed.state, ArtifactState::Failed);
    let message = failed.message.as_deref().unwrap_or_default();
    assert!(message.contains("OptInRequired"), "{message}");
    assert_eq!(failed.image_id, None);
    assert_eq!(artifact(s, BUILD).state, ArtifactState::Available);
    assert_eq!(artifact(s, FRANKFURT).state, ArtifactState::Available);
    assert_distributed(&rig, &b, &[FRANKFURT]);
    assert_eq!(condition(s, READY), ("False".into(), "DistributionFailed".into()));
    assert_eq!(
        condition(s, STALLED),
        ("True".into(), "DistributionFailed".into())
    );
    assert_eq!(condition(s, DISTRIBUTED).0, "False");
    assert_eq!(s.distribution.as_ref().map(|d| d.regions.as_str()), Some("2/3"));
    assert!(rig.ec2.images(VIRGINIA).is_empty());
    assert_eq!(
        rig.ec2.count_in(VIRGINIA, "CopyImage"),
        0,
        "no copy is asked for where the name cannot be looked up"
    );
    let warnings: Vec<(String, String, String)> = events(&rig.api)
        .into_iter()
        .filter(|e| e.1 == "DistributionFailed")
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0].0, "Warning");
    assert!(
        warnings[0].2.contains(VIRGINIA) && warnings[0].2.contains("OptInRequired"),
        "{warnings:?}"
    );
}

#[tokio::test]
async fn a_copy_made_before_the_operator_stopped_is_found_by_name_and_marker_tagged_and_not_copied_again() {
    let (rig, b) = baked(&[FRANKFURT, VIRGINIA]).await;
    // The operator stopped after CopyImage to Frankfurt answered and before it tagged the copy;
    // its status never recorded the copy. The copy is there, untagged (as when EC2 does not tag
    // on copy), with the image's name and the marker in its description.
    rig.ec2.add_image(
        FRANKFURT,
        FakeImage::new("ami-0c0ffee0c0ffee000", NAME, "2026-12-03T00:00:00.000Z")
            .description(&format!(
                "simple-service 1.0.0 {}",
                crate::distribution::copy_marker(AMI)
            ))
            .snapshot("snap-0c0ffee0c0ffee000"),
    );

    let next = pass(&rig, &b).await;

    assert_eq!(rig.ec2.count_in(FRANKFURT, "CopyImage"), 0);
    assert_eq!(rig.ec2.images(FRANKFURT).len(), 1, "no second copy");
    let copy = rig
        .ec2
        .image(FRANKFURT, "ami-0c0ffee0c0ffee000")
        .expect("the copy");
    assert_eq!(copy.tags, copy_tags());
    assert_eq!(
        rig.ec2
            .snapshot(FRANKFURT, "snap-0c0ffee0c0ffee000")
            .map(|s| s.tags),
        Some(copy_tags()),
        "its snapshot is tagged with it"
    );
    let s = status(&next);
    assert_eq!(
        artifact(s, FRANKFURT).image_id.as_deref(),
        Some("ami-0c0ffee0c0ffee000")
    );
    // Found available, it is served in the same pass; the other region is copied as usual.
    assert_eq!(artifact(s, FRANKFURT).state, ArtifactState::Available);
    assert_eq!(rig.ec2.count_in(VIRGINIA, "CopyImage"), 1);

    let done = settle(&rig, &next).await;
    assert_eq!(
        condition(status(&done), READY),
        ("True".into(), "Distributed".into())
    );
    assert_distributed(&rig, &done, &[FRANKFURT, VIRGINIA]);
    assert_eq!(rig.ec2.count("CopyImage"), 1);
}

#[tokio::test]
async fn a_launch_permission_removed_by_hand_is_given_back_at_the_next_check_with_a_warning() {
    let (rig, b) = baked(&[FRANKFURT, VIRGINIA]).await;
    let b = settle(&rig, &b).await;
    assert_eq!(condition(status(&b), READY).0, "True");
    let copy = copy_in(&rig, &b, VIRGINIA);
    assert!(rig.ec2.remove_launch_permission(VIRGINIA, &copy.id, ACCOUNT_B));
    rig.ec2.clear_calls();

    // Not before the check interval.
    let unchanged = pass(&rig, &b).await;
    assert!(rig.ec2.calls().is_empty(), "{:?}", rig.ec2.calls());
    let interval = Duration::from_secs(rig.ctx.config.distribution_check_seconds);
    let checked = pass(&rig, &aged(unchanged, interval)).await;

    assert_eq!(copy_in(&rig, &checked, VIRGINIA).launch_permissions, shared());
    assert_eq!(rig.ec2.count("ModifyImageAttribute"), 1);
    assert_eq!(rig.ec2.count_in(VIRGINIA, "ModifyImageAttribute"), 1);
    assert_eq!(rig.ec2.count("CopyImage"), 0);
    let s = status(&checked);
    assert_eq!(condition(s, READY), ("True".into(), "Distributed".into()));
    assert_eq!(artifact(s, VIRGINIA).state, ArtifactState::Available);
    let repaired: Vec<(String, String, String)> = events(&rig.api)
        .into_iter()
        .filter(|e| e.1 == "Repaired")
        .collect();
    assert_eq!(repaired.len(), 1, "{repaired:?}");
    assert_eq!(repaired[0].0, "Warning");
    assert!(
        repaired[0].2.contains(VIRGINIA) && repaired[0].2.contains(ACCOUNT_B),
        "{repaired:?}"
    );
}

#[tokio::test]
async fn a_region_added_to_the_template_later_gets_a_copy_without_a_new_bake_pod() {
    let (rig, b) = baked(&[FRANKFURT, VIRGINIA]).await;
    let b = settle(&rig, &b).await;
    assert_eq!(status(&b).artifacts.len(), 3);

    // The template gains a region; the same EC2, the operator's next look at the Bake.
    const SYDNEY: &str = "ap-southeast-2";
    let rig = rig_on(rig.ec2.clone(), &[FRANKFURT, VIRGINIA, SYDNEY], &b);
    rig.ec2.clear_calls();
    let next = pass(&rig, &b).await;

    assert_eq!(artifact(status(&next), SYDNEY).state, ArtifactState::Copying);
    assert_eq!(rig.ec2.count("CopyImage"), 1);
    assert_eq!(rig.ec2.count_in(SYDNEY, "CopyImage"), 1);
    assert_eq!(
        rig.ec2
            .image(BUILD, AMI)
            .and_then(|i| i.tags.get(keys::COPIED_TO).cloned())
            .as_deref(),
        Some("ap-southeast-2,eu-central-1,us-east-1")
    );

    let done = settle(&rig, &next).await;
    let s = status(&done);
    let regions: Vec<(&str, ArtifactState)> =
        s.artifacts.iter().map(|a| (a.region.as_str(), a.state)).collect();
    assert_eq!(
        regions,
        [
            (BUILD, ArtifactState::Available),
            (FRANKFURT, ArtifactState::Available),
            (VIRGINIA, ArtifactState::Available),
            (SYDNEY, ArtifactState::Available),
        ]
    );
    assert_eq!(condition(s, READY), ("True".into(), "Distributed".into()));
    assert_eq!(s.distribution.as_ref().map(|d| d.regions.as_str()), Some("4/4"));
    assert_eq!(s.pod_name.as_deref(), Some("bake-b"), "the bake's record is kept");
    assert_distributed(&rig, &done, &[FRANKFURT, VIRGINIA, SYDNEY]);
    assert_eq!(
        rig.ec2.count("CopyImage"),
        1,
        "the other regions are not copied again"
    );
    let lines = rig.api.lines();
    assert!(
        !lines.iter().any(|l| l.starts_with("POST")),
        "no pod (nor anything else) is created: {lines:?}"
    );
    assert!(
        lines
            .iter()
            .all(|l| l == &format!("PATCH {}/b/status", super::BAKES)),
        "{lines:?}"
    );
}
