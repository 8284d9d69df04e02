//! BakeSchedules end to end on the rig: a base schedule follows an upstream catalog, a service
//! schedule follows the base catalog, and a new upstream image cascades into one new base image
//! and one new service image built on it. New upstream images are copies of the rig's seeded
//! source image (the rig's moto makes copies EBS-rooted, so packer accepts them as a source).

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use baker::api::schedule::BakeSchedule;
use baker::api::{Bake, BakePhase, keys};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};

use crate::channel::{apply_channel, wait_channel_condition};
use crate::support::bake::*;
use crate::support::{Rig, TestNamespace, random_suffix, try_wait_until};

async fn apply_schedule(ns: &TestNamespace, name: &str, template: &str, service: &str) -> Result<()> {
    let yaml = format!(
        "apiVersion: baker.io/v1alpha1
kind: BakeSchedule
metadata:
  name: {name}
spec:
  bake:
    template: {template}
    service: {service}
    version: \"1.0.0\"
    virtualizationType: hvm
  onSourceChange: true
  minIntervalSeconds: 0
"
    );
    let schedule: BakeSchedule = serde_yaml::from_str(&yaml)?;
    ns.api::<BakeSchedule>()
        .patch(
            name,
            &PatchParams::apply("baker-tests").force(),
            &Patch::Apply(&schedule),
        )
        .await?;
    Ok(())
}

/// The schedule's Bakes, by its label.
async fn bakes_of(bakes: &Api<Bake>, schedule: &str) -> Result<Vec<Bake>> {
    Ok(bakes
        .list(&ListParams::default().labels(&format!("baker.io/schedule={schedule}")))
        .await?
        .items)
}

/// Waits until the schedule has `n` Bakes, all Succeeded, and returns them oldest first.
async fn succeeded(bakes: &Api<Bake>, schedule: &str, n: usize) -> Result<Vec<Bake>> {
    try_wait_until(
        Duration::from_secs(180),
        &format!("{n} succeeded Bakes of schedule {schedule}"),
        || async {
            let mut all = bakes_of(bakes, schedule).await?;
            if let Some(b) = all.iter().find(|b| b.phase() == Some(BakePhase::Failed)) {
                anyhow::bail!(
                    "Bake {} failed: {:?}",
                    b.name_any(),
                    b.status.as_ref().and_then(|s| s.message.clone())
                );
            }
            all.sort_by_key(|b| b.metadata.creation_timestamp.clone().map(|t| t.0));
            let done = all.len() == n && all.iter().all(|b| b.phase() == Some(BakePhase::Succeeded));
            Ok(done.then_some(all))
        },
    )
    .await
}

fn ami(bake: &Bake) -> String {
    bake.status
        .as_ref()
        .and_then(|s| s.ami_id.clone())
        .unwrap_or_default()
}

fn source(bake: &Bake) -> String {
    bake.status
        .as_ref()
        .and_then(|s| s.source_ami_id.clone())
        .unwrap_or_default()
}

async fn templates(client: &Client, ns: &TestNamespace) -> Result<()> {
    let base = rig_template(
        &format!("{}-base", ns.name()),
        &format!(
            "  source:\n    catalog:\n      name: up\n  amiName: \"{}-base-{{version}}-{{timestamp}}\"",
            ns.name()
        ),
    );
    apply_template(client, &base).await?;
    let service = rig_template(
        &format!("{}-svc", ns.name()),
        &format!(
            "  source:\n    catalog:\n      name: base\n  amiName: \"{}-svc-{{version}}-{{timestamp}}\"",
            ns.name()
        ),
    );
    apply_template(client, &service).await?;
    Ok(())
}

/// A namespace with the two-pass chain on the rig and its operator: upstream catalog `up`
/// (images named `<ns>-up-*`), base catalog `base`, a base schedule on `up` and a service schedule
/// `app` on `base`; returns once the first base and the first service image exist.
struct TwoPass {
    rig: &'static Rig,
    ns: TestNamespace,
    bakes: Api<Bake>,
    base_service: String,
    _operator: Operator,
}

async fn two_pass(prefix: &str) -> Result<TwoPass> {
    let (rig, client, ns) = namespace(prefix).await?;
    let suffix = random_suffix();
    let (base_service, app_service) = (format!("base-{suffix}"), format!("app-{suffix}"));
    source_copy(rig, &format!("{}-up-1", ns.name())).await?;
    let catalogs = ns.api();
    apply_catalog(
        &catalogs,
        "up",
        &format!(
            "owners: [self]\nnamePattern: \"{}-up-*\"\nrefreshIntervalSeconds: 10",
            ns.name()
        ),
    )
    .await?;
    apply_catalog(
        &catalogs,
        "base",
        &format!("service: {base_service}\nrefreshIntervalSeconds: 10"),
    )
    .await?;
    templates(&client, &ns).await?;
    apply_schedule(&ns, "base", &format!("{}-base", ns.name()), &base_service).await?;
    apply_schedule(&ns, "app", &format!("{}-svc", ns.name()), &app_service).await?;
    // The operator's floor under minIntervalSeconds is lifted, so the cascade runs at once.
    let operator =
        Operator::start_with(rig, ns.name(), &["--schedule-min-interval-seconds", "0"], &[]).await?;
    let bakes: Api<Bake> = ns.api();
    let base = succeeded(&bakes, "base", 1).await?;
    let app = succeeded(&bakes, "app", 1).await?;
    ensure!(
        source(&app[0]) == ami(&base[0]),
        "the service is built on the base"
    );
    Ok(TwoPass {
        rig,
        ns,
        bakes,
        base_service,
        _operator: operator,
    })
}

/// A new upstream image, and the new base and service images it leads to: (bases, apps).
async fn new_upstream(t: &TwoPass) -> Result<(Vec<Bake>, Vec<Bake>)> {
    let up2 = source_copy(t.rig, &format!("{}-up-2", t.ns.name())).await?;
    let base = succeeded(&t.bakes, "base", 2).await?;
    ensure!(
        source(&base[1]) == up2,
        "the new base is built on the new upstream image"
    );
    let app = succeeded(&t.bakes, "app", 2).await?;
    ensure!(
        source(&app[1]) == ami(&base[1]),
        "the new service is built on the new base"
    );
    Ok((base, app))
}

#[tokio::test]
#[ignore = "needs the rig: make test"]
async fn a_new_upstream_image_leads_to_one_new_base_image_then_one_new_service_image_built_on_it()
-> Result<()> {
    let t = two_pass("sched").await?;
    let (base, app) = new_upstream(&t).await?;
    let (rig, ns, bakes) = (t.rig, &t.ns, &t.bakes);
    let image = rig.ec2().describe_images().image_ids(ami(&app[1])).send().await?;
    let lineage = image
        .images()
        .first()
        .and_then(|i| tag(i, keys::SOURCE_AMI))
        .map(str::to_string);
    ensure!(
        lineage.as_deref() == Some(ami(&base[1]).as_str()),
        "lineage tag {lineage:?}"
    );

    // Settled: both up to date, and no further Bake appears.
    let schedules: Api<BakeSchedule> = ns.api();
    for name in ["base", "app"] {
        let s = try_wait_until(Duration::from_secs(30), "the schedule up to date", || async {
            let s = schedules.get(name).await?;
            let outdated = s
                .status
                .as_ref()
                .and_then(|st| baker::api::conditions::find(&st.conditions, "Outdated").cloned());
            Ok(outdated.filter(|c| c.status == "False").map(|_| s))
        })
        .await?;
        ensure!(s.status.as_ref().and_then(|st| st.latest.clone()).is_some());
    }
    // Up to date, a schedule has no trigger left: these counts are final.
    ensure!(bakes_of(bakes, "base").await?.len() == 2 && bakes_of(bakes, "app").await?.len() == 2);
    let get = rig
        .kubectl(["get", "bakeschedules", "-n", ns.name()])
        .await?
        .ok()?;
    ensure!(
        get.stdout.contains("OUTDATED") && get.stdout.contains("UpToDate"),
        "{}",
        get.stdout
    );
    finish(t.ns).await
}

#[tokio::test]
#[ignore = "needs the rig: make test"]
async fn revoking_a_base_image_deprecates_it_and_the_service_rebakes_on_the_newest_base_not_revoked()
-> Result<()> {
    let t = two_pass("revoke").await?;
    let (base, _) = new_upstream(&t).await?;
    let (good, bad) = (ami(&base[0]), ami(&base[1]));
    // Two channels on the base catalog: one pinned to the base about to be revoked, one
    // following the newest base.
    let channels: Api<baker::api::channel::AmiChannel> = t.ns.api();
    apply_channel(&channels, "prod", &format!("catalog: base\nimageId: {bad}")).await?;
    apply_channel(&channels, "edge", "catalog: base\nfollow: Latest").await?;
    for name in ["prod", "edge"] {
        let c = wait_channel_condition(&channels, name, "Ready", "True", "Published").await?;
        ensure!(
            c.status.and_then(|s| s.image_id) == Some(bad.clone()),
            "{name} on {bad}"
        );
    }
    let catalogs = t.ns.api();
    apply_catalog(
        &catalogs,
        "base",
        &format!(
            "service: {}\nrefreshIntervalSeconds: 10\nrevoked:\n  - imageId: {bad}\n    reason: CVE-2026-0001 in openssl",
            t.base_service
        ),
    )
    .await?;
    let catalog = wait_catalog(&catalogs, "base", "the revoked base deprecated", |s| {
        s.revoked
            .iter()
            .any(|r| r.image_id == bad && r.outcome == "Deprecated")
            && s.latest.as_ref().is_some_and(|l| l.image_id == good)
    })
    .await?;
    let listed = catalog.status.map(|s| s.images).unwrap_or_default();
    ensure!(
        listed
            .iter()
            .any(|i| i.image_id == bad && i.revoked.as_deref() == Some("CVE-2026-0001 in openssl"))
    );
    let image = t.rig.ec2().describe_images().image_ids(&bad).send().await?;
    let deprecation = image
        .images()
        .first()
        .and_then(|i| i.deprecation_time())
        .map(str::to_string);
    ensure!(deprecation.is_some(), "EC2 deprecates the revoked base");

    // The pinned channel stays and says why; the following one moves back to the good base.
    let prod = wait_channel_condition(&channels, "prod", "Degraded", "True", "Revoked").await?;
    ensure!(
        prod.status.and_then(|s| s.image_id) == Some(bad.clone()),
        "a pinned channel never moves on its own"
    );
    let edge = wait_channel_condition(&channels, "edge", "Ready", "True", "Published").await?;
    let edge = edge.status.context("status")?;
    ensure!(
        edge.image_id == Some(good.clone()),
        "the following channel moved to {good}: {:?}",
        edge.image_id
    );
    ensure!(
        edge.history.first().is_some_and(|m| m.reason.contains("revoked")),
        "{:?}",
        edge.history
    );
    let degraded = event_notes(&t.ns, "Degraded").await?;
    ensure!(degraded.iter().any(|n| n.contains(&bad)), "{degraded:?}");

    // The service built on it is outdated, and rebakes on the newest base not revoked (reusing
    // the service image already built on that base: nothing else changed).
    let app = succeeded(&t.bakes, "app", 3).await?;
    let sources: Vec<(String, String)> = app.iter().map(|b| (b.name_any(), source(b))).collect();
    let rebuilt = app.iter().find(|b| b.name_any().ends_with("-3")).map(source);
    ensure!(
        rebuilt.as_deref() == Some(good.as_str()),
        "the service rebakes on {good}, not on the revoked {bad}: {sources:?}"
    );
    let events = event_notes(&t.ns, "Revoked").await?;
    ensure!(events.iter().any(|n| n.contains(&bad)), "{events:?}");
    finish(t.ns).await
}
