//! "Ship it" on the rig: the operator's HTTP endpoints (`/healthz`, `/readyz`, `/metrics`) and
//! leader election between two `baker run` processes.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::Result;
use baker::api::{AmiCatalog, Bake, BakePhase};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;

use crate::support::bake::*;
use crate::support::ship::*;
use crate::support::{rig, try_wait_until};

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn metrics_after_a_bake_expose_phases_results_duration_and_ec2_calls_with_bounded_labels() -> Result<()>
{
    let (rig, _, ns, template) = namespace_with_template("ship-metrics", "").await?;
    let operator = Operator::start(rig, ns.name()).await?;

    wait_for_status(&operator.http, "/healthz", 200, Duration::from_secs(30)).await?;
    wait_for_status(&operator.http, "/readyz", 200, Duration::from_secs(60)).await?;

    create_bake(
        &ns,
        &bake_yaml("metrics-1.0.0", &template, "metrics", "1.0.0", "hvm"),
    )
    .await?;
    let bakes = ns.api::<Bake>();
    let bake = wait_for_phase(&bakes, "metrics-1.0.0", BakePhase::Succeeded, BAKE_TIMEOUT).await?;
    let ami = ami_of(&bake)?;

    // The phase gauges come from the controller's cache: wait for it to see the final phase.
    let reply = try_wait_until(
        Duration::from_secs(30),
        "/metrics to count the Succeeded Bake",
        || async {
            let r = get(&operator.http, "/metrics").await?;
            Ok((sample(&r.body, "baker_bakes{phase=\"Succeeded\"}") == Some(1.0)).then_some(r))
        },
    )
    .await?;
    let text = reply.body;
    assert_eq!(reply.status, 200);
    assert_eq!(
        sample(&text, "baker_bakes{phase=\"Running\"}"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(sample(&text, "baker_queue_depth"), Some(0.0), "{text}");
    assert_eq!(
        sample(
            &text,
            "baker_bakes_finished_total{phase=\"Succeeded\",reason=\"Succeeded\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "baker_bake_duration_seconds_count{phase=\"Succeeded\",reason=\"Succeeded\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert!(
        sample(&text, "baker_ec2_calls_total{action=\"DescribeImages\"}").unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    assert!(
        sample(&text, "baker_reconciles_total{controller=\"bake\"}").unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    assert!(
        sample(
            &text,
            "baker_reconcile_duration_seconds_count{controller=\"bake\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{text}"
    );
    assert!(
        sample(
            &text,
            "baker_reconcile_errors_total{controller=\"bake\",category=\"ec2\"}"
        )
        .is_some(),
        "{text}"
    );
    assert!(text.contains("# TYPE baker_reconcile_errors"), "{text}");
    assert_eq!(sample(&text, "baker_leader"), Some(1.0), "{text}");

    // Catalog size: a catalog of the service lists the baked image, and the gauge follows it.
    let catalogs = ns.api::<AmiCatalog>();
    apply_catalog(&catalogs, "metrics", "service: metrics").await?;
    let count = try_wait_until(BAKE_TIMEOUT, "the catalog to list the baked image", || async {
        let status = catalogs.get("metrics").await?.status.unwrap_or_default();
        let listed = status.images.iter().any(|i| i.image_id == ami);
        Ok(listed.then_some(status.count.unwrap_or_default()))
    })
    .await?;
    try_wait_until(
        Duration::from_secs(30),
        "baker_catalog_images to equal the catalog's count",
        || async {
            let r = get(&operator.http, "/metrics").await?;
            Ok((sample(&r.body, "baker_catalog_images") == Some(f64::from(count))).then_some(()))
        },
    )
    .await?;
    // Bounded labels: no object name, namespace or image id anywhere.
    for unbounded in [ns.name(), "metrics-1.0.0", ami.as_str()] {
        assert!(
            !unbounded.is_empty() && !text.contains(unbounded),
            "{unbounded} in:\n{text}"
        );
    }
    finish(ns).await
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn readyz_is_false_while_the_caches_cannot_sync_and_healthz_is_true() -> Result<()> {
    let rig = rig();
    // An "apiserver" that accepts connections and never answers: no list ever completes.
    let black_hole = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let server = format!("https://{}", black_hole.local_addr()?);
    let dir = tempfile::tempdir()?;
    let kubeconfig = kubeconfig_with_server(rig, &server, dir.path())?;
    let operator = Operator::start_as(rig, "op", "ship-unsynced", &kubeconfig, &[], &[]).await?;

    wait_for_status(&operator.http, "/healthz", 200, Duration::from_secs(30)).await?;
    // Observe readiness over a few seconds: never ready.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let r = get(&operator.http, "/readyz").await?;
        assert_eq!(r.status, 503, "ready without caches: {r:?}");
        assert!(r.body.contains("has not synced"), "{r:?}");
        tokio::time::sleep(crate::support::POLL).await;
    }
    drop(black_hole);
    Ok(())
}

async fn lease_holder(leases: &Api<Lease>) -> Result<Option<String>> {
    Ok(leases
        .get_opt("baker")
        .await?
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity))
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn of_two_replicas_one_reconciles_and_the_standby_takes_over_a_running_bake_when_it_dies() -> Result<()>
{
    let (rig, client, ns) = namespace("ship-leader").await?;
    // Every EC2 request of packer takes 400 ms more: the bake runs long enough to kill the leader.
    let (proxy, template) = slow_template(&client, &ns, Delay::All(Duration::from_millis(400)), "").await?;

    let watch = PodWatch::start(ns.api());

    let lease_seconds = "6";
    let args = [
        "--leader-election",
        "--leader-election-namespace",
        ns.name(),
        "--leader-election-lease-seconds",
        lease_seconds,
    ];
    let kubeconfig = rig.kubeconfig_path();
    let mut first = Operator::start_as(rig, "replica-a", ns.name(), &kubeconfig, &args, &[]).await?;
    let leases: Api<Lease> = ns.api();
    try_wait_until(Duration::from_secs(30), "replica-a to hold the lease", || async {
        Ok((lease_holder(&leases).await?.as_deref() == Some("replica-a")).then_some(()))
    })
    .await?;
    let second = Operator::start_as(rig, "replica-b", ns.name(), &kubeconfig, &args, &[]).await?;
    // The standby is ready (it serves HTTP) but does not lead.
    wait_for_status(&second.http, "/readyz", 200, Duration::from_secs(30)).await?;
    wait_for_status(&first.http, "/readyz", 200, Duration::from_secs(30)).await?;
    let standby_metrics = get(&second.http, "/metrics").await?;
    assert_eq!(sample(&standby_metrics.body, "baker_leader"), Some(0.0));

    create_bake(&ns, &bake_yaml("slow-1.0.0", &template, "slow", "1.0.0", "hvm")).await?;
    let bakes = ns.api::<Bake>();
    wait_for_phase(&bakes, "slow-1.0.0", BakePhase::Running, BAKE_TIMEOUT).await?;

    // Only the leader acted: every Event so far was reported by replica-a, and replica-b never
    // launched anything.
    assert_eq!(
        event_reporters(&ns).await?,
        BTreeSet::from(["replica-a".to_string()])
    );
    assert!(first.log().contains("launched bake pod"), "{}", first.log());
    assert!(!second.log().contains("launched bake pod"), "{}", second.log());
    assert!(
        !second.log().contains("starting the controllers"),
        "{}",
        second.log()
    );

    first.kill().await?;
    let killed = Instant::now();
    try_wait_until(Duration::from_secs(60), "replica-b to take the lease", || async {
        Ok((lease_holder(&leases).await?.as_deref() == Some("replica-b")).then_some(()))
    })
    .await?;
    let takeover = killed.elapsed();
    eprintln!("replica-b took the lease {takeover:?} after replica-a was killed (lease {lease_seconds}s)");

    let bake = wait_for_phase(&bakes, "slow-1.0.0", BakePhase::Succeeded, BAKE_TIMEOUT).await?;
    let ami = bake.status.as_ref().and_then(|s| s.ami_id.clone());
    assert!(ami.is_some(), "{:?}", bake.status);
    assert_eq!(images_of(&bake).await?.len(), 1, "one AMI");
    assert_eq!(watch.pods_seen(), 1, "one bake pod ever existed");
    // Created by replica-a, taken over once by replica-b.
    let transitions = leases.get("baker").await?.spec.and_then(|s| s.lease_transitions);
    assert_eq!(transitions, Some(1));
    drop(proxy);
    finish(ns).await
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn a_bake_in_a_namespace_not_allowed_for_bake_pods_fails_without_a_pod() -> Result<()> {
    let (rig, _, ns, template) = namespace_with_template("ship-notallowed", "").await?;
    let _operator = Operator::start_with(
        rig,
        ns.name(),
        &["--bake-namespaces", "somewhere-else,elsewhere"],
        &[],
    )
    .await?;
    create_bake(
        &ns,
        &bake_yaml("refused-1.0.0", &template, "refused", "1.0.0", "hvm"),
    )
    .await?;
    let bake = wait_for_phase(
        &ns.api::<Bake>(),
        "refused-1.0.0",
        BakePhase::Failed,
        BAKE_TIMEOUT,
    )
    .await?;
    let message = expect_reason(&bake, "NamespaceNotAllowed")?;
    assert!(
        message.contains(ns.name()) && message.contains("somewhere-else"),
        "{message}"
    );
    let pods = ns.api::<Pod>().list(&Default::default()).await?;
    assert!(pods.items.is_empty(), "a pod was created");
    finish(ns).await
}
