//! Distribution end to end on the rig: packer bakes in the build region, the operator copies the
//! image to other regions of moto, shares, tags and deprecates it and every copy, keeps that true
//! and removes copies with their image. Each test has its own namespace, template and operator;
//! the operator reaches EC2 through a proxy that records what it sent (moto ignores KMS keys).

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use aws_sdk_ec2::types::{
    Filter, Image, ImageAttributeName, LaunchPermission, LaunchPermissionModifications, SnapshotAttributeName,
};
use baker::api::bake::ArtifactState;
use baker::api::{Bake, BakePhase, BakeTemplate, keys};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};

use crate::support::bake::*;
use crate::support::{Rig, TestNamespace, random_suffix, wait_for_object};

const ACCOUNTS: [&str; 2] = ["111111111111", "222222222222"];
const ORGANIZATION: &str = "arn:aws:organizations::123456789012:organization/o-abc1234567";
const KMS_KEY: &str = "arn:aws:kms:ap-south-1:123456789012:key/rig-copy-key";

/// The distribution lines of a rig template: copies to `regions` (ap-south-1 with a KMS key),
/// shared with two accounts and an organization, deprecated after 30 days.
fn distribution(regions: &[&str]) -> String {
    let mut out = String::from("  distribution:\n    regions:\n");
    for r in regions {
        out.push_str(&format!("      - name: {r}\n"));
        if *r == "ap-south-1" {
            out.push_str(&format!("        kmsKeyId: {KMS_KEY}\n"));
        }
    }
    out.push_str(&format!(
        "    launchPermissions:\n      accounts: [\"{}\", \"{}\"]\n      organizations: [\"{ORGANIZATION}\"]\n      shareSnapshots: true\n    deprecateAfterDays: 30\n",
        ACCOUNTS[0], ACCOUNTS[1]
    ));
    out
}

/// Names images after the namespace, so tests never see each other's copies.
fn template_yaml(ns: &TestNamespace, regions: &[&str], extra: &str) -> String {
    rig_template(
        &format!("{}-t", ns.name()),
        &format!(
            "  amiName: \"{}-{{service}}-{{version}}-{{timestamp}}\"\n  tags:\n    team: payments\n{}{extra}",
            ns.name(),
            distribution(regions)
        ),
    )
}

/// An EC2 client of moto for one region.
fn ec2_in(rig: &Rig, region: &str) -> aws_sdk_ec2::Client {
    let base = rig.ec2();
    let config = base
        .config()
        .to_builder()
        .region(aws_sdk_ec2::config::Region::new(region.to_string()))
        .build();
    aws_sdk_ec2::Client::from_conf(config)
}

/// What the SSM parameter `name` holds in `region`, if it exists.
async fn parameter_in(rig: &Rig, region: &str, name: &str) -> Result<Option<String>> {
    let config = rig
        .ssm()
        .config()
        .to_builder()
        .region(aws_sdk_ssm::config::Region::new(region.to_string()))
        .build();
    match aws_sdk_ssm::Client::from_conf(config)
        .get_parameter()
        .name(name)
        .send()
        .await
    {
        Ok(out) => Ok(out.parameter().and_then(|p| p.value()).map(str::to_string)),
        Err(e) if e.as_service_error().is_some_and(|e| e.is_parameter_not_found()) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Waits until the channel has published `param` in every region of the Bake's artifacts, each
/// with that region's image.
async fn wait_published_everywhere(rig: &Rig, ns: &TestNamespace, bake: &Bake, param: &str) -> Result<()> {
    let artifacts = bake
        .status
        .as_ref()
        .map(|s| s.artifacts.clone())
        .unwrap_or_default();
    let channels: Api<baker::api::channel::AmiChannel> = ns.api();
    crate::channel::wait_channel_condition(&channels, "svc", "Ready", "True", "Published").await?;
    crate::support::try_wait_until(
        Duration::from_secs(60),
        &format!("{param} in {} regions", artifacts.len()),
        || async {
            for a in &artifacts {
                if parameter_in(rig, &a.region, param).await? != a.image_id {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )
    .await
}

/// This account's images in `region` named `name`.
async fn named(rig: &Rig, region: &str, name: &str) -> Result<Vec<Image>> {
    let out = ec2_in(rig, region)
        .describe_images()
        .owners("self")
        .filters(Filter::builder().name("name").values(name).build())
        .send()
        .await?;
    Ok(out.images().to_vec())
}

async fn launch_permissions(rig: &Rig, region: &str, id: &str) -> Result<BTreeSet<String>> {
    let out = ec2_in(rig, region)
        .describe_image_attribute()
        .image_id(id)
        .attribute(ImageAttributeName::LaunchPermission)
        .send()
        .await?;
    Ok(out
        .launch_permissions()
        .iter()
        .filter_map(|p| p.user_id().or(p.organization_arn()).map(str::to_string))
        .collect())
}

async fn snapshot_accounts(rig: &Rig, region: &str, snapshot: &str) -> Result<BTreeSet<String>> {
    let out = ec2_in(rig, region)
        .describe_snapshot_attribute()
        .snapshot_id(snapshot)
        .attribute(SnapshotAttributeName::CreateVolumePermission)
        .send()
        .await?;
    Ok(out
        .create_volume_permissions()
        .iter()
        .filter_map(|p| p.user_id().map(str::to_string))
        .collect())
}

/// Waits until the Bake is Ready with `regions` artifacts, all Available.
async fn wait_distributed(bakes: &Api<Bake>, name: &str, regions: usize) -> Result<Bake> {
    wait_for_object(
        bakes,
        name,
        Duration::from_secs(120),
        &format!("Bake {name} Ready with {regions} regions available"),
        |b: &Bake| {
            b.status.as_ref().is_some_and(|s| {
                s.artifacts.len() == regions
                    && s.artifacts.iter().all(|a| a.state == ArtifactState::Available)
            }) && ready_reason(b).as_deref() == Some("Distributed")
        },
    )
    .await
}

/// Checks every artifact in moto: the image there, tagged, shared and deprecated as asked.
async fn check_artifacts(rig: &Rig, bake: &Bake) -> Result<()> {
    let status = bake.status.as_ref().context("status")?;
    let ami = status.ami_id.clone().context("amiId")?;
    let uid = bake.uid().unwrap_or_default();
    for a in &status.artifacts {
        let id = a.image_id.clone().context("artifact image id")?;
        let out = ec2_in(rig, &a.region)
            .describe_images()
            .image_ids(&id)
            .send()
            .await?;
        let image = out.images().first().context("the artifact's image in moto")?;
        ensure!(
            tag(image, keys::BAKE_UID) == Some(uid.as_str()),
            "{}: bake-uid tag",
            a.region
        );
        ensure!(
            tag(image, "team") == Some("payments"),
            "{}: template tag",
            a.region
        );
        if a.region != rig.region() {
            ensure!(
                tag(image, keys::COPY_OF) == Some(ami.as_str()),
                "{}: copy-of tag",
                a.region
            );
            for snapshot in image
                .block_device_mappings()
                .iter()
                .filter_map(|m| m.ebs()?.snapshot_id())
            {
                let out = ec2_in(rig, &a.region)
                    .describe_snapshots()
                    .snapshot_ids(snapshot)
                    .send()
                    .await?;
                let tagged = out.snapshots().first().is_some_and(|s| {
                    s.tags()
                        .iter()
                        .any(|t| t.key() == Some(keys::BAKE_UID) && t.value() == Some(uid.as_str()))
                });
                ensure!(tagged, "{}: the copy's snapshot {snapshot} is tagged", a.region);
            }
        }
        let shared = launch_permissions(rig, &a.region, &id).await?;
        for who in ACCOUNTS.iter().copied().chain([ORGANIZATION]) {
            ensure!(
                shared.contains(who),
                "{} not shared with {who}: {shared:?}",
                a.region
            );
        }
        for snapshot in image
            .block_device_mappings()
            .iter()
            .filter_map(|m| m.ebs()?.snapshot_id())
        {
            let accounts = snapshot_accounts(rig, &a.region, snapshot).await?;
            ensure!(
                ACCOUNTS.iter().all(|x| accounts.contains(*x)),
                "{}: snapshot {snapshot} shared with {accounts:?}",
                a.region
            );
        }
        ensure!(
            image.deprecation_time().is_some() && a.deprecation_time.is_some(),
            "{}: deprecation {:?} / artifact {:?}",
            a.region,
            image.deprecation_time(),
            a.deprecation_time
        );
    }
    Ok(())
}

async fn pods_in(ns: &TestNamespace) -> Result<usize> {
    let pods: Api<Pod> = ns.api();
    Ok(pods.list(&ListParams::default()).await?.items.len())
}

async fn apply_template_yaml(client: &Client, yaml: &str) -> Result<BakeTemplate> {
    apply_template(client, yaml).await
}

#[tokio::test]
#[ignore = "needs the rig: make test"]
async fn a_distributed_bake_is_ready_everywhere_grows_to_a_new_region_without_packer_and_repairs_an_unshared_copy()
-> Result<()> {
    let (rig, client, ns) = namespace("dist").await?;
    let proxy = CountingProxy::start(rig.ec2_endpoint()).await?;
    let url = proxy.url();
    let _operator = Operator::start_with(
        rig,
        ns.name(),
        &["--distribution-check-seconds", "3"],
        &[("AWS_ENDPOINT_URL_EC2", url.as_str())],
    )
    .await?;
    let template = format!("{}-t", ns.name());
    apply_template_yaml(&client, &template_yaml(&ns, &["us-west-2", "ap-south-1"], "")).await?;
    let bakes: Api<Bake> = ns.api();
    create_bake(&ns, &bake_yaml("svc", &template, "svc", "1.0.0", "hvm")).await?;

    // Two extra regions, two accounts, an organization, a KMS key and a deprecation.
    let bake = wait_distributed(&bakes, "svc", 3).await?;
    let status = bake.status.clone().context("status")?;
    ensure!(status.phase == Some(BakePhase::Succeeded));
    let regions: Vec<&str> = status.artifacts.iter().map(|a| a.region.as_str()).collect();
    ensure!(regions == ["us-east-1", "us-west-2", "ap-south-1"], "{regions:?}");
    ensure!(status.distribution.as_ref().map(|d| d.regions.as_str()) == Some("3/3"));
    check_artifacts(rig, &bake).await?;
    let kms = proxy.requests_with("CopyImage", "KmsKeyId=");
    ensure!(
        kms.len() == 1 && kms[0].contains(KMS_KEY) && kms[0].contains("Encrypted=true"),
        "CopyImage requests with a KMS key: {kms:?}"
    );
    ensure!(
        proxy.count("CopyImage") == 2,
        "copies asked: {}",
        proxy.count("CopyImage")
    );
    let get = rig.kubectl(["get", "bakes", "-n", ns.name()]).await?.ok()?;
    ensure!(
        get.stdout.contains("REGIONS") && get.stdout.contains("3/3"),
        "{}",
        get.stdout
    );

    // A channel pinned to the image publishes it in every region it was copied to. (Pinned: the
    // module's other tests bake the same service in other namespaces, so a catalog's newest
    // image may be theirs.)
    apply_catalog(&ns.api(), "svc", "service: svc\nrefreshIntervalSeconds: 10").await?;
    let param = format!("/baker/{}/svc/ami", ns.name());
    let ami = status.ami_id.clone().context("the Bake's image")?;
    crate::channel::apply_channel(
        &ns.api(),
        "svc",
        &format!("catalog: svc\nimageId: {ami}\npublish:\n  ssmParameters: [{param}]"),
    )
    .await?;
    wait_published_everywhere(rig, &ns, &bake, &param).await?;

    // A third region: copied from the existing image, no second packer run.
    let started = status.started_at.clone();
    apply_template_yaml(
        &client,
        &template_yaml(&ns, &["us-west-2", "ap-south-1", "eu-west-1"], ""),
    )
    .await?;
    let grown = wait_distributed(&bakes, "svc", 4).await?;
    ensure!(pods_in(&ns).await? == 1, "a second bake pod ran");
    ensure!(grown.status.as_ref().and_then(|s| s.started_at.clone()) == started);
    ensure!(grown.status.as_ref().and_then(|s| s.ami_id.clone()) == status.ami_id);
    check_artifacts(rig, &grown).await?;
    // The channel follows the image to its new region.
    wait_published_everywhere(rig, &ns, &grown, &param).await?;

    // Unshared by hand in one region: put back at the next check, with an Event.
    let copy = grown
        .status
        .as_ref()
        .and_then(|s| s.artifacts.iter().find(|a| a.region == "us-west-2"))
        .and_then(|a| a.image_id.clone())
        .context("the us-west-2 copy")?;
    ec2_in(rig, "us-west-2")
        .modify_image_attribute()
        .image_id(&copy)
        .launch_permission(
            LaunchPermissionModifications::builder()
                .remove(LaunchPermission::builder().user_id(ACCOUNTS[0]).build())
                .build(),
        )
        .send()
        .await?;
    crate::support::try_wait_until(Duration::from_secs(60), "the copy shared again", || async {
        Ok(launch_permissions(rig, "us-west-2", &copy)
            .await?
            .contains(ACCOUNTS[0])
            .then_some(()))
    })
    .await?;
    let repaired = crate::support::try_wait_until(Duration::from_secs(30), "a Repaired Event", || async {
        let notes = event_notes(&ns, "Repaired").await?;
        Ok((!notes.is_empty()).then_some(notes))
    })
    .await?;
    ensure!(
        repaired
            .iter()
            .any(|n| n.contains("us-west-2") && n.contains(ACCOUNTS[0])),
        "{repaired:?}"
    );
    finish(ns).await
}

#[tokio::test]
#[ignore = "needs the rig: make test"]
async fn an_operator_killed_between_a_copy_and_its_tags_ends_with_one_copy_per_region() -> Result<()> {
    let (rig, client, ns) = namespace("dist-kill").await?;
    let template = format!("{}-t", ns.name());
    apply_template_yaml(&client, &template_yaml(&ns, &["us-west-2", "ap-south-1"], "")).await?;
    let mut first =
        Operator::start_with(rig, ns.name(), &[], &[("BAKER_FAILPOINTS", "copy-requested")]).await?;
    create_bake(&ns, &bake_yaml("svc", &template, "svc", "1.0.0", "hvm")).await?;
    let code = first.wait_exit(Duration::from_secs(120)).await?;
    ensure!(
        code == Some(86),
        "the operator should stop at the failpoint, exited {code:?}"
    );
    let _second = Operator::start(rig, ns.name()).await?;
    let bakes: Api<Bake> = ns.api();
    let bake = wait_distributed(&bakes, "svc", 3).await?;
    let ami = bake
        .status
        .as_ref()
        .and_then(|s| s.ami_id.clone())
        .context("amiId")?;
    let image = ec2_in(rig, rig.region())
        .describe_images()
        .image_ids(&ami)
        .send()
        .await?;
    let name = image
        .images()
        .first()
        .and_then(|i| i.name())
        .context("the image's name")?
        .to_string();
    for region in ["us-west-2", "ap-south-1"] {
        let copies = named(rig, region, &name).await?;
        ensure!(
            copies.len() == 1,
            "{region}: {} copies: {:?}",
            copies.len(),
            image_ids(&copies)
        );
        ensure!(
            tag(&copies[0], keys::COPY_OF) == Some(ami.as_str()),
            "{region}: untagged copy"
        );
    }
    finish(ns).await
}

#[tokio::test]
#[ignore = "needs the rig: make test"]
async fn retention_removes_an_image_with_its_copies_and_keeps_one_whose_copy_runs_an_instance() -> Result<()>
{
    let (rig, client, ns) = namespace("dist-ret").await?;
    let template = format!("{}-t", ns.name());
    apply_template_yaml(&client, &template_yaml(&ns, &["us-west-2"], "")).await?;
    let _operator = Operator::start(rig, ns.name()).await?;
    let bakes: Api<Bake> = ns.api();
    let service = format!("ret-{}", random_suffix());
    let mut made = Vec::new();
    for version in ["1.0.1", "1.0.2", "1.0.3"] {
        let name = format!("v{}", version.replace('.', "-"));
        create_bake(&ns, &bake_yaml(&name, &template, &service, version, "hvm")).await?;
        let bake = wait_distributed(&bakes, &name, 2).await?;
        let status = bake.status.clone().context("status")?;
        let copy = status.artifacts[1].image_id.clone().context("copy id")?;
        made.push((name, status.ami_id.clone().context("amiId")?, copy));
    }
    // The oldest image's copy runs an instance in us-west-2: the image must stay.
    let (_, oldest, oldest_copy) = made[0].clone();
    ec2_in(rig, "us-west-2")
        .run_instances()
        .image_id(&oldest_copy)
        .min_count(1)
        .max_count(1)
        .send()
        .await?;
    let (_, middle, middle_copy) = made[1].clone();
    let middle_snapshots: Vec<String> = ec2_in(rig, "us-west-2")
        .describe_images()
        .image_ids(&middle_copy)
        .send()
        .await?
        .images()
        .iter()
        .flat_map(|i| i.block_device_mappings())
        .filter_map(|m| m.ebs()?.snapshot_id().map(str::to_string))
        .collect();
    ensure!(!middle_snapshots.is_empty(), "the copy has a snapshot");
    // A Bake names its image (and copies), which keeps them: delete the Bakes (not their images).
    bakes
        .delete_collection(&Default::default(), &ListParams::default())
        .await?;
    crate::support::try_wait_until(Duration::from_secs(60), "the Bakes gone", || async {
        Ok(bakes
            .list(&ListParams::default())
            .await?
            .items
            .is_empty()
            .then_some(()))
    })
    .await?;
    let catalogs = ns.api();
    apply_catalog(
        &catalogs,
        "ret",
        &format!("service: {service}\nretention:\n  keepNewest: 1\nrefreshIntervalSeconds: 30"),
    )
    .await?;
    let catalog = wait_catalog(
        &catalogs,
        "ret",
        "retention removed one image and kept one",
        |s| {
            s.retention
                .as_ref()
                .is_some_and(|r| !r.removed.is_empty() && !r.protected.is_empty())
        },
    )
    .await?;
    let retention = catalog.status.and_then(|s| s.retention).context("retention")?;
    let removed: Vec<&str> = retention.removed.iter().map(|r| r.image_id.as_str()).collect();
    ensure!(removed == [middle.as_str()], "removed {removed:?}");
    let kept = retention
        .protected
        .iter()
        .find(|p| p.image_id == oldest)
        .context("the oldest image protected")?;
    ensure!(
        kept.reason.contains("us-west-2") && kept.reason.contains(&oldest_copy),
        "{}",
        kept.reason
    );
    let west = ec2_in(rig, "us-west-2");
    ensure!(
        !image_exists(&west, &middle_copy).await?,
        "the removed image's copy is gone"
    );
    ensure!(image_exists(&west, &oldest_copy).await?, "the used copy stays");
    let left = west
        .describe_snapshots()
        .owner_ids("self")
        .filters(
            Filter::builder()
                .name("snapshot-id")
                .values(middle_snapshots[0].clone())
                .build(),
        )
        .send()
        .await?;
    ensure!(left.snapshots().is_empty(), "the copy's snapshot is deleted");
    finish(ns).await
}

#[tokio::test]
#[ignore = "needs the rig: make test"]
async fn deleting_a_bake_that_deregisters_its_image_removes_the_copies_too() -> Result<()> {
    let (rig, client, ns) = namespace("dist-del").await?;
    let template = format!("{}-t", ns.name());
    apply_template_yaml(&client, &template_yaml(&ns, &["us-west-2"], "")).await?;
    let _operator = Operator::start(rig, ns.name()).await?;
    let bakes: Api<Bake> = ns.api();
    let yaml = format!(
        "{}  deregisterImageOnDelete: true\n",
        bake_yaml("svc", &template, "svc", "1.0.0", "hvm")
    );
    create_bake(&ns, &yaml).await?;
    let bake = wait_distributed(&bakes, "svc", 2).await?;
    let status = bake.status.clone().context("status")?;
    let ami = status.ami_id.clone().context("amiId")?;
    let copy = status.artifacts[1].image_id.clone().context("copy id")?;
    bakes.delete("svc", &Default::default()).await?;
    crate::support::try_wait_until(Duration::from_secs(60), "the Bake gone", || async {
        Ok(bakes.get_opt("svc").await?.is_none().then_some(()))
    })
    .await?;
    ensure!(
        !image_exists(&rig.ec2(), &ami).await?,
        "the image is deregistered"
    );
    ensure!(
        !image_exists(&ec2_in(rig, "us-west-2"), &copy).await?,
        "its copy in us-west-2 is deregistered"
    );
    let events = event_notes(&ns, "Cleaned").await?;
    ensure!(events.iter().any(|n| n.contains(&copy)), "{events:?}");
    finish(ns).await
}
