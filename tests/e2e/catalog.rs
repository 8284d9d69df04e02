//! AmiCatalog end to end on the rig: the operator lists images from moto through a proxy that
//! counts EC2 calls and can be switched off. Each test has its own namespace, operator process and
//! images whose names and tags carry a suffix of their own, so parallel tests never see each
//! other's images.

use std::collections::HashMap;

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use aws_sdk_ec2::types::{Filter, Tag};
use baker::api::catalog::AmiCatalogStatus;
use baker::api::{AmiCatalog, Bake, BakePhase, keys};
use kube::ResourceExt;

use crate::support::bake::*;
use crate::support::{TestNamespace, random_suffix, rig, try_wait_until, wait_for_object, wait_until};

/// Image ids of this account matching one filter, newest first by the operator's own rule
/// (creation date, then id: moto's dates have one-second resolution).
async fn expected_newest(ec2: &aws_sdk_ec2::Client, filter: Filter, limit: usize) -> Result<Vec<String>> {
    let out = ec2
        .describe_images()
        .owners("self")
        .filters(filter)
        .send()
        .await?;
    let mut images: Vec<_> = out.images().iter().map(baker::aws::ImageSummary::from).collect();
    baker::aws::sort_newest_first(&mut images);
    Ok(images.into_iter().take(limit).map(|i| i.image_id).collect())
}

/// A fresh namespace whose operator reaches EC2 only through a [`CountingProxy`].
async fn behind_a_counting_proxy(prefix: &str) -> Result<(TestNamespace, CountingProxy, Operator)> {
    let (rig, _, ns) = namespace(prefix).await?;
    let proxy = CountingProxy::start(rig.ec2_endpoint()).await?;
    let url = proxy.url();
    let operator = Operator::start_with(rig, ns.name(), &[], &[("AWS_ENDPOINT_URL_EC2", &url)]).await?;
    Ok((ns, proxy, operator))
}

fn ready(status: &AmiCatalogStatus) -> Option<(String, String)> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| (c.status.clone(), c.reason.clone()))
}

fn ids(status: &AmiCatalogStatus) -> Vec<String> {
    status.images.iter().map(|i| i.image_id.clone()).collect()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn catalogs_list_the_newest_images_of_a_service_or_name_pattern_among_250_with_one_call_per_sync()
-> Result<()> {
    let (ns, proxy, _operator) = behind_a_counting_proxy("cat-250").await?;
    let ec2 = rig().ec2();
    let sfx = random_suffix();
    // 250 images of three services, this test's own.
    let services = [
        (format!("alpha-{sfx}"), 110),
        (format!("beta-{sfx}"), 90),
        (format!("gamma-{sfx}"), 50),
    ];
    for (service, count) in &services {
        register_images(
            &ec2,
            &format!("cat-{sfx}-{service}"),
            *count,
            &[(keys::SERVICE, service), (keys::VERSION, "1.0.0")],
        )
        .await?;
    }

    let catalogs = ns.api::<AmiCatalog>();
    let alpha = &services[0].0;
    let beta = &services[1].0;
    let spec = format!("service: {alpha}\nrefreshIntervalSeconds: 10");
    apply_catalog(&catalogs, "alpha", &spec).await?;
    let spec = format!("owners: [self]\nnamePattern: \"cat-{sfx}-{beta}-*\"\nlimit: 100");
    apply_catalog(&catalogs, "beta-by-name", &spec).await?;

    let listed = async |name: &str, count: i32| {
        let what = format!("catalog {name} to list {count} images");
        wait_catalog(&catalogs, name, &what, |s| s.count == Some(count)).await
    };
    let a = listed("alpha", 10).await?;
    let b = listed("beta-by-name", 90).await?;
    let first_syncs = proxy.count("DescribeImages");

    let a_status = a.status.clone().unwrap_or_default();
    let by_service = Filter::builder()
        .name(format!("tag:{}", keys::SERVICE))
        .values(alpha)
        .build();
    assert_eq!(ids(&a_status), expected_newest(&ec2, by_service, 10).await?);
    assert_eq!(
        a_status.latest.as_ref().map(|l| &l.image_id),
        a_status.images.first().map(|i| &i.image_id)
    );
    assert!(
        a_status
            .images
            .windows(2)
            .all(|w| w[0].creation_date >= w[1].creation_date),
        "newest first: {:?}",
        a_status.images
    );
    assert!(
        a_status
            .images
            .iter()
            .all(|i| i.service.as_deref() == Some(alpha.as_str()))
    );
    assert_eq!(ready(&a_status), Some(("True".into(), "Synced".into())));
    assert_eq!(a_status.observed_generation, a.metadata.generation);

    let b_status = b.status.clone().unwrap_or_default();
    let by_name = Filter::builder()
        .name("name")
        .values(format!("cat-{sfx}-{beta}-*"))
        .build();
    assert_eq!(ids(&b_status), expected_newest(&ec2, by_name, 100).await?);

    // One DescribeImages per catalog sync (moto, like EC2, answers 250 images in one page), and
    // nothing else: the operator's status writes do not make it read EC2 again.
    assert_eq!(first_syncs, 2, "EC2 calls: {:?}", proxy.counts);
    assert_eq!(proxy.total(), first_syncs, "EC2 calls: {:?}", proxy.counts);

    // The 10-second catalog syncs again; its images did not change, so its status is not written.
    let written = a.resource_version();
    try_wait_until(Duration::from_secs(30), "catalog alpha to sync again", || async {
        Ok((proxy.count("DescribeImages") > first_syncs).then_some(()))
    })
    .await?;
    let again = catalogs.get("alpha").await?;
    assert_eq!(
        again.resource_version(),
        written,
        "an unchanged sync wrote status"
    );
    eprintln!(
        "EC2 calls for two catalog syncs over 250 images: {:?}",
        proxy.counts
    );

    finish(ns).await
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn catalog_reports_ec2_down_as_ready_false_and_recovers_by_itself() -> Result<()> {
    let (ns, mut proxy, _operator) = behind_a_counting_proxy("cat-down").await?;
    let sfx = random_suffix();
    register_images(
        &rig().ec2(),
        &format!("cat-{sfx}-down"),
        2,
        &[("baker-test", &sfx)],
    )
    .await?;

    let catalogs = ns.api::<AmiCatalog>();
    let spec = format!("tags: {{baker-test: \"{sfx}\"}}\nrefreshIntervalSeconds: 10");
    apply_catalog(&catalogs, "tagged", &spec).await?;
    wait_catalog(&catalogs, "tagged", "catalog to list 2 images", |s| {
        s.count == Some(2) && ready(s).is_some_and(|(st, _)| st == "True")
    })
    .await?;

    proxy.switch_off();
    let down = wait_catalog(&catalogs, "tagged", "Ready=False while EC2 is down", |s| {
        ready(s).is_some_and(|(st, _)| st == "False")
    })
    .await?;
    let status = down.status.clone().unwrap_or_default();
    let condition = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .cloned()
        .context("a Ready condition")?;
    assert_eq!(condition.reason, "Unreachable", "{condition:?}");
    assert!(condition.message.contains("DescribeImages"), "{condition:?}");
    // What was listed stays listed while EC2 cannot be read.
    assert_eq!(status.count, Some(2));

    proxy.switch_on().await?;
    wait_catalog(&catalogs, "tagged", "Ready=True once EC2 is back", |s| {
        ready(s).is_some_and(|(st, _)| st == "True") && s.count == Some(2)
    })
    .await?;

    finish(ns).await
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn a_succeeded_bake_appears_in_its_catalog_within_seconds() -> Result<()> {
    let (rig, _, ns, template) = namespace_with_template("cat-bake", "").await?;
    let _operator = Operator::start(rig, ns.name()).await?;
    let service = format!("svc-{}", random_suffix());

    let catalogs = ns.api::<AmiCatalog>();
    // An hour between syncs: only the Bake's success can bring its image in during the test.
    let spec = format!("service: {service}\nrefreshIntervalSeconds: 3600");
    apply_catalog(&catalogs, "svc", &spec).await?;
    wait_catalog(&catalogs, "svc", "the empty catalog to sync", |s| {
        ready(s).is_some_and(|(st, _)| st == "True")
    })
    .await?;

    create_bake(&ns, &bake_yaml("svc-1", &template, &service, "1.0.4", "hvm")).await?;
    let bake = wait_for_phase(&ns.api::<Bake>(), "svc-1", BakePhase::Succeeded, BAKE_TIMEOUT).await?;
    let seen = Instant::now();
    let ami = ami_of(&bake)?;
    let listed = wait_for_object(
        &catalogs,
        "svc",
        Duration::from_secs(15),
        "the baked AMI in the catalog",
        |c| {
            c.status
                .as_ref()
                .is_some_and(|s| s.latest.as_ref().is_some_and(|l| l.image_id == ami))
        },
    )
    .await?;
    eprintln!(
        "the AMI appeared in its catalog {:.1?} after the Bake succeeded",
        seen.elapsed()
    );
    let latest = listed.status.and_then(|s| s.latest).context("latest")?;
    assert_eq!(latest.service.as_deref(), Some(service.as_str()));
    assert_eq!(latest.version.as_deref(), Some("1.0.4"));
    assert!(latest.source_ami_id.is_some(), "lineage tag read: {latest:?}");

    finish(ns).await
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn a_bake_whose_template_takes_the_latest_image_of_a_catalog_waits_for_it_then_is_baked_from_it()
-> Result<()> {
    let (rig, _, ns, template) =
        namespace_with_template("cat-src", "  source:\n    catalog:\n      name: base").await?;
    let _operator = Operator::start(rig, ns.name()).await?;
    let service = format!("svc-{}", random_suffix());
    let bakes = ns.api::<Bake>();

    // No catalog yet: the Bake waits, Pending, and says why.
    create_bake(&ns, &bake_yaml("svc-1", &template, &service, "1.0.4", "hvm")).await?;
    let waiting = try_wait_until(
        Duration::from_secs(60),
        "the Bake to wait for its catalog",
        || async {
            let bake = bakes.get("svc-1").await?;
            Ok((ready_reason(&bake).as_deref() == Some("SourceCatalogEmpty")).then_some(bake))
        },
    )
    .await?;
    let status = waiting.status.clone().unwrap_or_default();
    assert_eq!(status.phase, Some(BakePhase::Pending));
    assert!(
        status.pod_name.is_none(),
        "no pod before a source image: {status:?}"
    );
    assert!(
        status
            .message
            .as_deref()
            .is_some_and(|m| m.contains("AmiCatalog \"base\"")),
        "{status:?}"
    );

    // The base catalog: the rig's seeded base image. (An AMI that packer baked in moto has root
    // device type `standard`, which amazon-ebs refuses as a source, so the rig's base is seeded.)
    let catalogs = ns.api::<AmiCatalog>();
    let base_spec = "owners: [self]\nnamePattern: \"baker-rig-source-*\"\ntags: {baker.io/rig: source}";
    apply_catalog(&catalogs, "base", base_spec).await?;
    let base = wait_catalog(&catalogs, "base", "the base catalog to list images", |s| {
        s.latest.is_some()
    })
    .await?;
    let base_status = base.status.unwrap_or_default();
    let hvm_base = baker::catalog::source_image(Some(&base_status), "hvm").context("an hvm base image")?;

    let bake = wait_for_phase(&bakes, "svc-1", BakePhase::Succeeded, BAKE_TIMEOUT).await?;
    let status = bake.status.clone().unwrap_or_default();
    assert_eq!(status.source_ami_id.as_deref(), Some(hvm_base.as_str()));
    let ami = status.ami_id.context("amiId")?;
    let image = rig
        .ec2()
        .describe_images()
        .image_ids(&ami)
        .send()
        .await?
        .images()
        .first()
        .cloned()
        .context("the baked image")?;
    assert_eq!(
        tag(&image, keys::SOURCE_AMI),
        Some(hvm_base.as_str()),
        "lineage tag on {ami}"
    );

    finish(ns).await
}

/// Makes an image from a running instance (moto gives it a snapshot) and tags it.
async fn image_from(
    ec2: &aws_sdk_ec2::Client,
    instance: &str,
    name: &str,
    tags: &[(&str, &str)],
) -> Result<String> {
    let id = ec2
        .create_image()
        .instance_id(instance)
        .name(name)
        .send()
        .await?
        .image_id()
        .context("CreateImage returned no id")?
        .to_string();
    let mut request = ec2.create_tags().resources(&id);
    for (k, v) in tags {
        request = request.tags(Tag::builder().key(*k).value(*v).build());
    }
    request.send().await?;
    Ok(id)
}

/// Starts one t3.micro instance of `image` and returns its id.
async fn run_instance(ec2: &aws_sdk_ec2::Client, image: &str) -> Result<String> {
    Ok(ec2
        .run_instances()
        .image_id(image)
        .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
        .min_count(1)
        .max_count(1)
        .send()
        .await?
        .instances()
        .first()
        .and_then(|i| i.instance_id())
        .context("an instance")?
        .to_string())
}

async fn snapshots_of(ec2: &aws_sdk_ec2::Client, id: &str) -> Result<Vec<String>> {
    let out = ec2.describe_images().image_ids(id).send().await?;
    Ok(out
        .images()
        .iter()
        .flat_map(|i| i.block_device_mappings())
        .filter_map(|m| Some(m.ebs()?.snapshot_id()?.to_string()))
        .collect())
}

/// The ids of this account's snapshots.
async fn own_snapshots(ec2: &aws_sdk_ec2::Client) -> Result<Vec<String>> {
    let out = ec2.describe_snapshots().owner_ids("self").send().await?;
    Ok(out
        .snapshots()
        .iter()
        .filter_map(|s| s.snapshot_id().map(str::to_string))
        .collect())
}

/// The images of one service, from oldest to newest, for a catalog keeping the newest three:
/// the AMI of a Bake that still exists; a base image; two plain old ones; one an instance runs and
/// one a launch template names; then (a second later, so strictly newer) three new ones, the
/// newest recording the base as its source. All but the Bake's are made here, tagged as Baker
/// tags what it bakes for the namespace (retention considers nothing else). Retention should
/// remove exactly the two plain old ones.
struct Retention {
    ns: TestNamespace,
    ec2: aws_sdk_ec2::Client,
    service: String,
    by_bake: String,
    base: String,
    old: [String; 2],
    in_use: String,
    in_template: String,
    newest: Vec<String>,
    /// The instance running `in_use`.
    user: String,
    /// The launch template naming `in_template`.
    launch_template: String,
    _operator: Operator,
}

impl Retention {
    async fn set_up(prefix: &str) -> Result<Retention> {
        let (rig, _, ns, template) = namespace_with_template(prefix, "").await?;
        let operator = Operator::start(rig, ns.name()).await?;
        let ec2 = rig.ec2();
        let sfx = random_suffix();
        let service = format!("ret-{sfx}");

        create_bake(&ns, &bake_yaml("old", &template, &service, "1.0.0", "hvm")).await?;
        let bake = wait_for_phase(&ns.api(), "old", BakePhase::Succeeded, BAKE_TIMEOUT).await?;
        let by_bake = ami_of(&bake)?;

        let seed = ec2
            .describe_images()
            .owners("self")
            .filters(
                Filter::builder()
                    .name("name")
                    .values("baker-rig-source-hvm-*")
                    .build(),
            )
            .send()
            .await?
            .images()
            .first()
            .and_then(|i| i.image_id().map(str::to_string))
            .context("the rig's seeded source image")?;
        let instance = run_instance(&ec2, &seed).await?;
        let uid = format!("retention-{sfx}");
        let svc: &[(&str, &str)] = &[
            (keys::SERVICE, &service),
            (keys::BAKE_UID, &uid),
            (keys::NAMESPACE, ns.name()),
        ];
        let image = async |name: &str| image_from(&ec2, &instance, &format!("ret-{sfx}-{name}"), svc).await;
        let base = image("base").await?;
        let old = [image("old1").await?, image("old2").await?];
        let in_use = image("running").await?;
        let in_template = image("templated").await?;
        let second = jiff::Timestamp::now().as_second();
        wait_until(Duration::from_secs(3), "the next second", || async {
            (jiff::Timestamp::now().as_second() > second).then_some(())
        })
        .await?;
        let mut newest = vec![image("new1").await?, image("new2").await?];
        let from_base = [svc, &[(keys::SOURCE_AMI, base.as_str())]].concat();
        newest.push(image_from(&ec2, &instance, &format!("ret-{sfx}-new3"), &from_base).await?);
        ec2.terminate_instances().instance_ids(&instance).send().await?;

        let user = run_instance(&ec2, &in_use).await?;
        let launch_template = format!("ret-{sfx}");
        ec2.create_launch_template()
            .launch_template_name(&launch_template)
            .launch_template_data(
                aws_sdk_ec2::types::RequestLaunchTemplateData::builder()
                    .image_id(&in_template)
                    .build(),
            )
            .send()
            .await?;
        Ok(Retention {
            ns,
            ec2,
            service,
            by_bake,
            base,
            old,
            in_use,
            in_template,
            newest,
            user,
            launch_template,
            _operator: operator,
        })
    }

    /// Applies the catalog `svc` keeping the newest three, and returns its status once it reports
    /// a retention pass of that mode (a real one that removed something).
    async fn apply(&self, dry_run: bool) -> Result<AmiCatalogStatus> {
        let catalogs = self.ns.api::<AmiCatalog>();
        let spec = format!(
            "service: {}\nretention: {{keepNewest: 3, dryRun: {dry_run}}}",
            self.service
        );
        apply_catalog(&catalogs, "svc", &spec).await?;
        let catalog = wait_catalog(&catalogs, "svc", "a retention pass", |s| {
            s.retention
                .as_ref()
                .is_some_and(|r| r.dry_run == dry_run && (dry_run || !r.removed.is_empty()))
        })
        .await?;
        Ok(catalog.status.unwrap_or_default())
    }

    /// The two plain old images, sorted, as the removed lists are compared.
    fn old_sorted(&self) -> Vec<String> {
        let mut old = self.old.to_vec();
        old.sort();
        old
    }

    async fn finish(self) -> Result<()> {
        self.ec2
            .terminate_instances()
            .instance_ids(&self.user)
            .send()
            .await?;
        self.ec2
            .delete_launch_template()
            .launch_template_name(&self.launch_template)
            .send()
            .await?;
        finish(self.ns).await
    }
}

/// The images a retention pass removed (or, dry, would remove), sorted.
fn removed_ids(status: &AmiCatalogStatus) -> Vec<String> {
    let mut ids: Vec<String> = status
        .retention
        .iter()
        .flat_map(|r| r.removed.iter().map(|i| i.image_id.clone()))
        .collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn retention_dry_run_lists_the_images_it_would_remove_and_removes_none() -> Result<()> {
    let r = Retention::set_up("ret-dry").await?;
    let dry = r.apply(true).await?;
    assert_eq!(removed_ids(&dry), r.old_sorted(), "{:#?}", dry.retention);
    for id in &r.old {
        assert!(image_exists(&r.ec2, id).await?, "dry run removed {id}");
    }
    assert_eq!(dry.count, Some(9));
    r.finish().await
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn retention_keeps_old_images_a_bake_a_newer_image_an_instance_or_a_launch_template_uses_naming_the_user()
-> Result<()> {
    let r = Retention::set_up("ret-used").await?;
    let done = r.apply(false).await?;
    let protected: HashMap<String, String> = done
        .retention
        .iter()
        .flat_map(|r| r.protected.iter().map(|p| (p.image_id.clone(), p.reason.clone())))
        .collect();
    let newest_image = &r.newest[2];
    for (id, user) in [
        (&r.by_bake, "Bake"),
        (&r.base, newest_image.as_str()),
        (&r.in_use, r.user.as_str()),
        (&r.in_template, r.launch_template.as_str()),
    ] {
        assert!(
            protected.get(id).is_some_and(|reason| reason.contains(user)),
            "{id} not protected for {user}: {protected:?}"
        );
        assert!(image_exists(&r.ec2, id).await?, "{id}, in use, was removed");
    }
    assert_eq!(protected.len(), 4, "{protected:?}");
    r.finish().await
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn retention_removes_the_old_images_beyond_the_newest_with_their_snapshots() -> Result<()> {
    let r = Retention::set_up("ret-remove").await?;
    let mut snapshots = Vec::new();
    for id in &r.old {
        snapshots.extend(snapshots_of(&r.ec2, id).await?);
    }
    assert!(!snapshots.is_empty(), "moto's CreateImage made snapshots");

    let done = r.apply(false).await?;
    assert_eq!(removed_ids(&done), r.old_sorted(), "{:#?}", done.retention);
    for id in &r.old {
        assert!(!image_exists(&r.ec2, id).await?, "{id} still registered");
        assert!(!ids(&done).contains(id), "{id} still listed");
    }
    let left = own_snapshots(&r.ec2).await?;
    for snap in &snapshots {
        assert!(!left.contains(snap), "snapshot {snap} of a removed image remains");
    }
    for id in &r.newest {
        assert!(
            image_exists(&r.ec2, id).await?,
            "{id}, among the newest, was removed"
        );
    }
    assert_eq!(done.count, Some(7));
    r.finish().await
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn retention_records_an_event_naming_each_image_it_removes() -> Result<()> {
    let r = Retention::set_up("ret-events").await?;
    r.apply(false).await?;
    let notes = event_notes(&r.ns, "ImageRemoved").await?;
    for id in &r.old {
        assert!(
            notes.iter().any(|n| n.contains(id.as_str())),
            "no Event for {id}: {notes:?}"
        );
    }
    assert_eq!(notes.len(), 2, "{notes:?}");
    r.finish().await
}
