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

use crate::support::bake::*;
use crate::support::{Rig, TestNamespace, random_suffix, try_wait_until};

/// A new upstream image named `name`: a copy of the rig's hvm source image, made now.
async fn upstream_image(rig: &Rig, name: &str) -> Result<String> {
    let ec2 = rig.ec2();
    let sources = ec2
        .describe_images()
        .owners("self")
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("name")
                .values("baker-rig-source-hvm-*")
                .build(),
        )
        .send()
        .await?;
    let source = sources
        .images()
        .first()
        .and_then(|i| i.image_id())
        .context("the rig's hvm source image")?
        .to_string();
    let copy = ec2
        .copy_image()
        .source_image_id(&source)
        .source_region(rig.region())
        .name(name)
        .send()
        .await?;
    Ok(copy.image_id().unwrap_or_default().to_string())
}

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

#[tokio::test]
#[ignore = "needs the rig: make test"]
async fn a_new_upstream_image_leads_to_one_new_base_image_then_one_new_service_image_built_on_it()
-> Result<()> {
    let (rig, client, ns) = namespace("sched").await?;
    let suffix = random_suffix();
    let (base_service, app_service) = (format!("base-{suffix}"), format!("app-{suffix}"));
    upstream_image(rig, &format!("{}-up-1", ns.name())).await?;
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
    let _operator =
        Operator::start_with(rig, ns.name(), &["--schedule-min-interval-seconds", "0"], &[]).await?;
    let bakes: Api<Bake> = ns.api();

    // First: the base on the upstream image, then the service on that base.
    let base = succeeded(&bakes, "base", 1).await?;
    let app = succeeded(&bakes, "app", 1).await?;
    ensure!(
        source(&app[0]) == ami(&base[0]),
        "the service is built on the base"
    );

    // A new upstream image: one new base, then one new service on it, and nothing else.
    let up2 = upstream_image(rig, &format!("{}-up-2", ns.name())).await?;
    let base = succeeded(&bakes, "base", 2).await?;
    ensure!(
        source(&base[1]) == up2,
        "the new base is built on the new upstream image"
    );
    let app = succeeded(&bakes, "app", 2).await?;
    ensure!(
        source(&app[1]) == ami(&base[1]),
        "the new service is built on the new base"
    );
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
    ensure!(bakes_of(&bakes, "base").await?.len() == 2 && bakes_of(&bakes, "app").await?.len() == 2);
    let get = rig
        .kubectl(["get", "bakeschedules", "-n", ns.name()])
        .await?
        .ok()?;
    ensure!(
        get.stdout.contains("OUTDATED") && get.stdout.contains("UpToDate"),
        "{}",
        get.stdout
    );
    finish(ns).await
}
