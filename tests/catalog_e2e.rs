//! AmiCatalog end to end on the rig: the operator lists images from moto through a proxy that
//! counts EC2 calls and can be switched off. Each test has its own namespace, operator process and
//! images whose names and tags carry a suffix of their own, so parallel tests never see each
//! other's images.

mod bake_support;
mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use aws_sdk_ec2::types::{Filter, Tag};
use bake_support::*;
use baker::api::catalog::AmiCatalogStatus;
use baker::api::{AmiCatalog, Bake, BakePhase, keys};
use kube::ResourceExt;
use support::{random_suffix, rig, try_wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A TCP proxy on 127.0.0.1 in front of the rig's EC2 endpoint that counts the EC2 actions sent
/// through it, and can be switched off (connections refused) and on again on the same port.
struct CountingProxy {
    addr: std::net::SocketAddr,
    upstream: String,
    counts: Arc<Mutex<HashMap<String, usize>>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// The actions named in a chunk of AWS query-protocol requests (`Action=DescribeImages&...`).
fn actions(chunk: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(chunk);
    text.split("Action=")
        .skip(1)
        .filter_map(|rest| {
            let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric()).collect();
            (!name.is_empty()).then_some(name)
        })
        .collect()
}

impl CountingProxy {
    async fn start(upstream: &str) -> Result<CountingProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let mut proxy = CountingProxy {
            addr: listener.local_addr()?,
            upstream: upstream
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .to_string(),
            counts: Arc::default(),
            task: None,
        };
        proxy.serve(listener);
        Ok(proxy)
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn serve(&mut self, listener: TcpListener) {
        let upstream = self.upstream.clone();
        let counts = self.counts.clone();
        self.task = Some(tokio::spawn(async move {
            // Connections live in this set, so switching off also cuts kept-alive connections.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let counts = counts.clone();
                connections.spawn(async move {
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        while let Ok(n) = cr.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            for action in actions(&buf[..n]) {
                                let mut counts = counts.lock().unwrap_or_else(|p| p.into_inner());
                                *counts.entry(action).or_default() += 1;
                            }
                            if sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = sw.shutdown().await;
                    };
                    let down = async move {
                        let _ = tokio::io::copy(&mut sr, &mut cw).await;
                        let _ = cw.shutdown().await;
                    };
                    tokio::join!(up, down);
                });
            }
        }));
    }

    /// Stops listening and cuts open connections: EC2 is down.
    fn switch_off(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// Listens again on the same port.
    async fn switch_on(&mut self) -> Result<()> {
        let listener = try_wait_until(Duration::from_secs(10), "the proxy's port to be free", || async {
            Ok(Some(TcpListener::bind(self.addr).await?))
        })
        .await?;
        self.serve(listener);
        Ok(())
    }

    fn count(&self, action: &str) -> usize {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.get(action).copied().unwrap_or_default()
    }

    fn total(&self) -> usize {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.values().sum()
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.switch_off();
    }
}

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
async fn catalogs_list_the_newest_images_of_a_service_or_name_pattern_among_250_with_one_call_per_sync()
-> Result<()> {
    let rig = rig();
    let client = rig.client().await?;
    let ns = namespace(rig, &client, "cat-250").await?;
    let ec2 = rig.ec2();
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
    let proxy = CountingProxy::start(rig.ec2_endpoint()).await?;
    let url = proxy.url();
    let _operator = Operator::start_with(rig, ns.name(), &[], &[("AWS_ENDPOINT_URL_EC2", &url)]).await?;

    let catalogs = ns.api::<AmiCatalog>();
    let region = rig.region();
    let alpha = &services[0].0;
    let beta = &services[1].0;
    apply_catalog(
        &catalogs,
        &format!(
            "apiVersion: baker.io/v1alpha1\nkind: AmiCatalog\nmetadata: {{name: alpha}}\nspec:\n  region: {region}\n  service: {alpha}\n  refreshIntervalSeconds: 10\n"
        ),
    )
    .await?;
    apply_catalog(
        &catalogs,
        &format!(
            "apiVersion: baker.io/v1alpha1\nkind: AmiCatalog\nmetadata: {{name: beta-by-name}}\nspec:\n  region: {region}\n  owners: [self]\n  namePattern: \"cat-{sfx}-{beta}-*\"\n  limit: 100\n"
        ),
    )
    .await?;

    let timeout = Duration::from_secs(60);
    let a = wait_catalog(
        &catalogs,
        "alpha",
        timeout,
        "catalog alpha to list 10 images",
        |s| s.count == Some(10),
    )
    .await?;
    let b = wait_catalog(
        &catalogs,
        "beta-by-name",
        timeout,
        "catalog beta-by-name to list 90 images",
        |s| s.count == Some(90),
    )
    .await?;
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
async fn catalog_reports_ec2_down_as_ready_false_and_recovers_by_itself() -> Result<()> {
    let rig = rig();
    let client = rig.client().await?;
    let ns = namespace(rig, &client, "cat-down").await?;
    let ec2 = rig.ec2();
    let sfx = random_suffix();
    register_images(&ec2, &format!("cat-{sfx}-down"), 2, &[("baker-test", &sfx)]).await?;
    let mut proxy = CountingProxy::start(rig.ec2_endpoint()).await?;
    let url = proxy.url();
    let _operator = Operator::start_with(rig, ns.name(), &[], &[("AWS_ENDPOINT_URL_EC2", &url)]).await?;

    let catalogs = ns.api::<AmiCatalog>();
    let region = rig.region();
    apply_catalog(
        &catalogs,
        &format!(
            "apiVersion: baker.io/v1alpha1\nkind: AmiCatalog\nmetadata: {{name: tagged}}\nspec:\n  region: {region}\n  tags: {{baker-test: \"{sfx}\"}}\n  refreshIntervalSeconds: 10\n"
        ),
    )
    .await?;
    let timeout = Duration::from_secs(60);
    wait_catalog(&catalogs, "tagged", timeout, "catalog to list 2 images", |s| {
        s.count == Some(2) && ready(s).is_some_and(|(st, _)| st == "True")
    })
    .await?;

    proxy.switch_off();
    let down = wait_catalog(
        &catalogs,
        "tagged",
        timeout,
        "Ready=False while EC2 is down",
        |s| ready(s).is_some_and(|(st, _)| st == "False"),
    )
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
    wait_catalog(&catalogs, "tagged", timeout, "Ready=True once EC2 is back", |s| {
        ready(s).is_some_and(|(st, _)| st == "True") && s.count == Some(2)
    })
    .await?;

    finish(ns).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_succeeded_bake_appears_in_its_catalog_within_seconds() -> Result<()> {
    let rig = rig();
    let client = rig.client().await?;
    let ns = namespace(rig, &client, "cat-bake").await?;
    let template = format!("{}-ebs", ns.name());
    apply_template(&client, &rig_template(&template, "")).await?;
    let _operator = Operator::start(rig, ns.name()).await?;
    let service = format!("svc-{}", random_suffix());

    let catalogs = ns.api::<AmiCatalog>();
    let region = rig.region();
    // An hour between syncs: only the Bake's success can bring its image in during the test.
    apply_catalog(
        &catalogs,
        &format!(
            "apiVersion: baker.io/v1alpha1\nkind: AmiCatalog\nmetadata: {{name: svc}}\nspec:\n  region: {region}\n  service: {service}\n  refreshIntervalSeconds: 3600\n"
        ),
    )
    .await?;
    wait_catalog(
        &catalogs,
        "svc",
        Duration::from_secs(60),
        "the empty catalog to sync",
        |s| ready(s).is_some_and(|(st, _)| st == "True"),
    )
    .await?;

    create_bake(&ns, &bake_yaml("svc-1", &template, &service, "1.0.4", "hvm")).await?;
    let bake = wait_for_phase(
        &ns.api::<Bake>(),
        "svc-1",
        BakePhase::Succeeded,
        Duration::from_secs(180),
    )
    .await?;
    let seen = Instant::now();
    let ami = bake
        .status
        .and_then(|s| s.ami_id)
        .context("a Succeeded Bake has an amiId")?;
    let listed = wait_catalog(
        &catalogs,
        "svc",
        Duration::from_secs(15),
        "the baked AMI in the catalog",
        |s| s.latest.as_ref().is_some_and(|l| l.image_id == ami),
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
async fn a_bake_whose_template_takes_the_latest_image_of_a_catalog_waits_for_it_then_is_baked_from_it()
-> Result<()> {
    let rig = rig();
    let client = rig.client().await?;
    let ns = namespace(rig, &client, "cat-src").await?;
    let template = format!("{}-from-catalog", ns.name());
    apply_template(
        &client,
        &rig_template(&template, "  source:\n    catalog:\n      name: base"),
    )
    .await?;
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
    let region = rig.region();
    apply_catalog(
        &catalogs,
        &format!(
            "apiVersion: baker.io/v1alpha1\nkind: AmiCatalog\nmetadata: {{name: base}}\nspec:\n  region: {region}\n  owners: [self]\n  namePattern: \"baker-rig-source-*\"\n  tags: {{baker.io/rig: source}}\n"
        ),
    )
    .await?;
    let base = wait_catalog(
        &catalogs,
        "base",
        Duration::from_secs(60),
        "the base catalog to list images",
        |s| s.latest.is_some(),
    )
    .await?;
    let base_status = base.status.unwrap_or_default();
    let hvm_base = baker::catalog::source_image(Some(&base_status), "hvm").context("an hvm base image")?;

    let bake = wait_for_phase(&bakes, "svc-1", BakePhase::Succeeded, Duration::from_secs(180)).await?;
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
    let source_tag = image
        .tags()
        .iter()
        .find(|t| t.key() == Some(keys::SOURCE_AMI))
        .and_then(|t| t.value());
    assert_eq!(source_tag, Some(hvm_base.as_str()), "lineage tag on {ami}");

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

async fn image_exists(ec2: &aws_sdk_ec2::Client, id: &str) -> Result<bool> {
    let out = ec2
        .describe_images()
        .owners("self")
        .filters(Filter::builder().name("image-id").values(id).build())
        .send()
        .await?;
    Ok(!out.images().is_empty())
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

async fn snapshot_exists(ec2: &aws_sdk_ec2::Client, id: &str) -> Result<bool> {
    let out = ec2
        .describe_snapshots()
        .owner_ids("self")
        .filters(Filter::builder().name("snapshot-id").values(id).build())
        .send()
        .await?;
    Ok(!out.snapshots().is_empty())
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_keeps_the_newest_and_used_images_removes_the_rest_with_snapshots_and_dry_run_removes_nothing()
-> Result<()> {
    let rig = rig();
    let client = rig.client().await?;
    let ns = namespace(rig, &client, "cat-ret").await?;
    let template = format!("{}-ebs", ns.name());
    apply_template(&client, &rig_template(&template, "")).await?;
    let _operator = Operator::start(rig, ns.name()).await?;
    let ec2 = rig.ec2();
    let sfx = random_suffix();
    let service = format!("ret-{sfx}");

    // The oldest image: the AMI of a Bake that still exists.
    create_bake(&ns, &bake_yaml("old", &template, &service, "1.0.0", "hvm")).await?;
    let bake = wait_for_phase(
        &ns.api::<Bake>(),
        "old",
        BakePhase::Succeeded,
        Duration::from_secs(180),
    )
    .await?;
    let by_bake = bake.status.and_then(|s| s.ami_id).context("amiId")?;

    // Then a base image, two plain old images, and (a second later, so they are strictly newer)
    // three new ones, the newest recording the base as its source.
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
    let run = ec2
        .run_instances()
        .image_id(&seed)
        .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
        .min_count(1)
        .max_count(1)
        .send()
        .await?;
    let instance = run
        .instances()
        .first()
        .and_then(|i| i.instance_id())
        .context("an instance")?
        .to_string();
    // Tagged as Baker tags what it bakes for this namespace: retention considers nothing else.
    let uid = format!("retention-{sfx}");
    let svc: &[(&str, &str)] = &[
        (keys::SERVICE, &service),
        (keys::BAKE_UID, &uid),
        (keys::NAMESPACE, ns.name()),
    ];
    let base = image_from(&ec2, &instance, &format!("ret-{sfx}-base"), svc).await?;
    let old1 = image_from(&ec2, &instance, &format!("ret-{sfx}-old1"), svc).await?;
    let old2 = image_from(&ec2, &instance, &format!("ret-{sfx}-old2"), svc).await?;
    // Two more old ones, in use: one runs an instance, one is named by a launch template.
    let in_use = image_from(&ec2, &instance, &format!("ret-{sfx}-running"), svc).await?;
    let in_template = image_from(&ec2, &instance, &format!("ret-{sfx}-templated"), svc).await?;
    let second = jiff::Timestamp::now().as_second();
    support::wait_until(Duration::from_secs(3), "the next second", || async {
        (jiff::Timestamp::now().as_second() > second).then_some(())
    })
    .await?;
    let mut newest = Vec::new();
    for i in 1..=2 {
        newest.push(image_from(&ec2, &instance, &format!("ret-{sfx}-new{i}"), svc).await?);
    }
    newest.push(
        image_from(
            &ec2,
            &instance,
            &format!("ret-{sfx}-new3"),
            &[
                (keys::SERVICE, &service),
                (keys::BAKE_UID, &uid),
                (keys::NAMESPACE, ns.name()),
                (keys::SOURCE_AMI, &base),
            ],
        )
        .await?,
    );
    ec2.terminate_instances().instance_ids(&instance).send().await?;
    let user = ec2
        .run_instances()
        .image_id(&in_use)
        .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
        .min_count(1)
        .max_count(1)
        .send()
        .await?
        .instances()
        .first()
        .and_then(|i| i.instance_id())
        .context("an instance")?
        .to_string();
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
    let old_snapshots = [snapshots_of(&ec2, &old1).await?, snapshots_of(&ec2, &old2).await?].concat();
    assert!(!old_snapshots.is_empty(), "moto's CreateImage made snapshots");

    let catalogs = ns.api::<AmiCatalog>();
    let region = rig.region();
    let catalog = |dry_run: bool| {
        format!(
            "apiVersion: baker.io/v1alpha1\nkind: AmiCatalog\nmetadata: {{name: svc}}\nspec:\n  region: {region}\n  service: {service}\n  retention: {{keepNewest: 3, dryRun: {dry_run}}}\n"
        )
    };
    let mut expected_removed = vec![old2.clone(), old1.clone()];
    expected_removed.sort();
    let removed_ids = |s: &AmiCatalogStatus| {
        let mut ids: Vec<String> = s
            .retention
            .iter()
            .flat_map(|r| r.removed.iter().map(|i| i.image_id.clone()))
            .collect();
        ids.sort();
        ids
    };

    // Dry run: lists what would go, removes nothing.
    apply_catalog(&catalogs, &catalog(true)).await?;
    let dry = wait_catalog(
        &catalogs,
        "svc",
        Duration::from_secs(60),
        "a dry-run retention status",
        |s| s.retention.as_ref().is_some_and(|r| r.dry_run),
    )
    .await?
    .status
    .unwrap_or_default();
    assert_eq!(removed_ids(&dry), expected_removed, "{:#?}", dry.retention);
    let protected: HashMap<String, String> = dry
        .retention
        .iter()
        .flat_map(|r| r.protected.iter().map(|p| (p.image_id.clone(), p.reason.clone())))
        .collect();
    assert!(
        protected.get(&by_bake).is_some_and(|r| r.contains("Bake")),
        "{protected:?}"
    );
    assert!(
        protected.get(&base).is_some_and(|r| r.contains(&newest[2])),
        "{protected:?}"
    );
    assert!(
        protected.get(&in_use).is_some_and(|r| r.contains(&user)),
        "{protected:?}"
    );
    assert!(
        protected
            .get(&in_template)
            .is_some_and(|r| r.contains(&launch_template)),
        "{protected:?}"
    );
    assert_eq!(protected.len(), 4, "{protected:?}");
    for id in [&old1, &old2] {
        assert!(image_exists(&ec2, id).await?, "dry run removed {id}");
    }
    assert_eq!(dry.count, Some(9));

    // For real: the same set goes, with its snapshots; everything else stays.
    apply_catalog(&catalogs, &catalog(false)).await?;
    let done = wait_catalog(
        &catalogs,
        "svc",
        Duration::from_secs(60),
        "retention to remove images",
        |s| {
            s.retention
                .as_ref()
                .is_some_and(|r| !r.dry_run && !r.removed.is_empty())
        },
    )
    .await?
    .status
    .unwrap_or_default();
    assert_eq!(removed_ids(&done), expected_removed, "{:#?}", done.retention);
    for id in [&old1, &old2] {
        assert!(!image_exists(&ec2, id).await?, "{id} still registered");
    }
    for snap in &old_snapshots {
        assert!(
            !snapshot_exists(&ec2, snap).await?,
            "snapshot {snap} of a removed image remains"
        );
    }
    for id in newest.iter().chain([&by_bake, &base, &in_use, &in_template]) {
        assert!(image_exists(&ec2, id).await?, "{id} was removed");
    }
    assert_eq!(done.count, Some(7));
    assert!(!ids(&done).contains(&old1));

    // Every removal is an Event naming the image.
    let events = ns.api::<k8s_openapi::api::events::v1::Event>();
    let notes: Vec<String> = events
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("ImageRemoved"))
        .filter_map(|e| e.note)
        .collect();
    for id in [&old1, &old2] {
        assert!(
            notes.iter().any(|n| n.contains(id.as_str())),
            "no Event for {id}: {notes:?}"
        );
    }
    assert_eq!(notes.len(), 2, "{notes:?}");

    ec2.terminate_instances().instance_ids(&user).send().await?;
    ec2.delete_launch_template()
        .launch_template_name(&launch_template)
        .send()
        .await?;

    finish(ns).await
}
