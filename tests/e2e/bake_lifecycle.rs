//! End to end on the rig: the lifecycle guarantees. No duplicate bakes, bounded concurrency,
//! timeouts, cancellation with cleanup, and crash safety at chosen moments.

use std::time::Duration;

use anyhow::{Result, ensure};
use aws_sdk_ec2::types::Filter;
use baker::api::{Bake, BakePhase, keys};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::DeleteParams;

use crate::support::bake::*;
use crate::support::{Seen, TestNamespace, rig, try_wait_until, wait_deleted, wait_progressing};

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn identical_bakes_share_one_packer_run_and_rebake_makes_a_second_ami() -> Result<()> {
    let (rig, _, ns, template) = namespace_with_template("dedup", "").await?;
    let watch = PodWatch::start(ns.api());
    let _operator = Operator::start(rig, ns.name()).await?;

    create_bake(&ns, &bake_yaml("first", &template, "dedup", "1.2.3", "hvm")).await?;
    create_bake(&ns, &bake_yaml("second", &template, "dedup", "1.2.3", "hvm")).await?;
    let bakes = ns.api::<Bake>();
    let first = wait_for_phase(&bakes, "first", BakePhase::Succeeded, BAKE_TIMEOUT).await?;
    let second = wait_for_phase(&bakes, "second", BakePhase::Succeeded, BAKE_TIMEOUT).await?;
    let ami = |b: &Bake| b.status.as_ref().and_then(|s| s.ami_id.clone());
    assert_eq!(ami(&first), ami(&second), "both Bakes have the same AMI");
    assert_eq!(watch.order().len(), 1, "one packer run: {:?}", watch.order());
    let reused = [&first, &second]
        .iter()
        .filter(|b| ready_reason(b).as_deref() == Some("Reused"))
        .count();
    assert_eq!(reused, 1, "exactly one Bake is marked as reused");
    let marked = if ready_reason(&first).as_deref() == Some("Reused") {
        &first
    } else {
        &second
    };
    let from = marked
        .status
        .as_ref()
        .and_then(|s| s.reused_from.clone())
        .expect("reusedFrom set");
    assert_eq!(Some(from.image_id), ami(marked));
    let key = first
        .status
        .as_ref()
        .and_then(|s| s.bake_key.clone())
        .expect("bake key recorded");
    assert_eq!(
        Some(key.clone()),
        second.status.as_ref().and_then(|s| s.bake_key.clone())
    );

    // The rebake knob bakes anew: a second AMI with the same key.
    let mut yaml = bake_yaml("third", &template, "dedup", "1.2.3", "hvm");
    yaml.push_str("  rebake: true\n");
    create_bake(&ns, &yaml).await?;
    let third = wait_for_phase(&bakes, "third", BakePhase::Succeeded, BAKE_TIMEOUT).await?;
    assert_ne!(ami(&third), ami(&first));
    assert_eq!(ready_reason(&third).as_deref(), Some("Succeeded"));
    let with_key = image_ids(&images_tagged(&rig.ec2(), keys::BAKE_KEY, &key).await?);
    assert_eq!(with_key.len(), 2, "two AMIs carry the key: {with_key:?}");
    finish(ns).await
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn with_a_cap_of_two_six_bakes_never_run_more_than_two_pods_and_are_admitted_in_creation_order()
-> Result<()> {
    let (rig, client, ns) = namespace("cap").await?;
    // Slow EC2 calls make the bakes overlap.
    let (proxy, template) = slow_template(&client, &ns, Delay::All(Duration::from_millis(150)), "").await?;
    let watch = PodWatch::start(ns.api());
    let launches = LaunchOrder::start(ns.api());
    let _operator = Operator::start_with(rig, ns.name(), &["--max-concurrent-bakes", "2"], &[]).await?;

    let names: Vec<String> = (1..=6).map(|i| format!("cap-{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        create_bake(
            &ns,
            &bake_yaml(name, &template, "cap", &format!("1.0.{i}"), "hvm"),
        )
        .await?;
    }
    let bakes = ns.api::<Bake>();
    // Bakes over the cap say why they wait.
    try_wait_until(Duration::from_secs(60), "a Bake to be Queued", || async {
        let list = bakes.list(&Default::default()).await?;
        Ok(list
            .items
            .iter()
            .any(|b| b.phase() == Some(BakePhase::Queued))
            .then_some(()))
    })
    .await?;
    let queued = rig.kubectl(["-n", ns.name(), "get", "bakes"]).await?.ok()?;
    assert!(queued.stdout.contains("Queued"), "{}", queued.stdout);
    for name in &names {
        wait_for_phase(&bakes, name, BakePhase::Succeeded, BAKE_TIMEOUT).await?;
    }
    assert_eq!(launches.order(), names, "Bakes admitted in creation order");
    assert!(
        watch.max_active() <= 2,
        "at most two bake pods at once, saw {}",
        watch.max_active()
    );
    assert_eq!(watch.max_active(), 2, "the cap was used");
    drop(proxy);
    finish(ns).await
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn two_hundred_bakes_applied_at_once_with_a_cap_of_three_never_exceed_it_nor_bake_an_image_twice()
-> Result<()> {
    const BAKES: usize = 200;
    const DISTINCT: usize = 20;
    let (rig, client, ns) = namespace("race200").await?;
    // Slow EC2 calls make the bakes overlap.
    let (proxy, template) = slow_template(&client, &ns, Delay::All(Duration::from_millis(50)), "").await?;
    let watch = PodWatch::start(ns.api());
    let _operator = Operator::start_with(rig, ns.name(), &["--max-concurrent-bakes", "3"], &[]).await?;

    let bakes = ns.api::<Bake>();
    let creates = (0..BAKES).map(|i| {
        let yaml = bake_yaml(
            &format!("r-{i:03}"),
            &template,
            "race",
            &format!("1.0.{}", i % DISTINCT),
            "hvm",
        );
        let ns = &ns;
        async move { create_bake(ns, &yaml).await }
    });
    futures::stream::iter(creates)
        .buffer_unordered(20)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>>>()?;

    let list = wait_progressing(Duration::from_secs(120), "all 200 Bakes to finish", || async {
        let list = bakes.list(&Default::default()).await?.items;
        let finished = list
            .iter()
            .filter(|b| b.phase().is_some_and(|p| p.is_terminal()))
            .count();
        Ok(if finished == BAKES {
            Seen::Done(list)
        } else {
            Seen::Waiting { state: tally(&list) }
        })
    })
    .await?;
    let failed: Vec<String> = list
        .iter()
        .filter(|b| b.phase() != Some(BakePhase::Succeeded))
        .map(|b| format!("{} {:?}", b.name_any(), ready_reason(b)))
        .collect();
    ensure!(failed.is_empty(), "Bakes did not succeed: {failed:?}");
    ensure!(
        watch.max_active() <= 3,
        "at most three bake pods at once, saw {}",
        watch.max_active()
    );
    ensure!(
        watch.pods_seen() == DISTINCT,
        "one packer run per distinct image: {} pods for {DISTINCT} images",
        watch.pods_seen()
    );
    let keys: std::collections::BTreeSet<String> = list
        .iter()
        .filter_map(|b| b.status.as_ref()?.bake_key.clone())
        .collect();
    ensure!(keys.len() == DISTINCT, "{} distinct keys", keys.len());
    for key in &keys {
        let images = image_ids(&images_tagged(&rig.ec2(), keys::BAKE_KEY, key).await?);
        ensure!(
            images.len() == 1,
            "key {key} has {} images: {images:?}",
            images.len()
        );
    }
    eprintln!(
        "{BAKES} Bakes ({DISTINCT} distinct) with a cap of 3: {} pods, at most {} at once",
        watch.pods_seen(),
        watch.max_active()
    );
    drop(proxy);
    finish(ns).await
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn a_bake_whose_pod_cannot_start_says_why_at_once_and_fails_after_the_pod_start_timeout() -> Result<()>
{
    // No credentials Secret in this namespace: the node cannot start the bake container, and says
    // why in the Bake's own message.
    let (_, _, ns, template) = namespace_without_credentials("nosecret").await?;
    let (pending, failed, _operator) =
        pod_never_starts(&ns, &template, "stuck", 8, |m| m.contains("aws-credentials")).await?;
    ensure!(pending.contains("CreateContainerConfigError"), "{pending}");
    expect_reason(&failed, "PodStartFailed")?;
    finish(ns).await
}

/// No process on this machine runs for the Bake (its pod's environment names it).
fn no_process_for(bake: &str) -> Result<()> {
    let needle = format!("BAKER_BAKE={bake}");
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let found = environ.split(|b| *b == 0).any(|var| var == needle.as_bytes());
        ensure!(!found, "process {:?} still runs for {bake}", entry.file_name());
    }
    Ok(())
}

/// One Bake of a test whose packer reaches EC2 through a [`SlowProxy`]: its namespace, the Bake as
/// it was when it reached the phase awaited, and what must outlive `finish` (the operator honours
/// the Bake's finalizer).
struct SlowBake {
    ns: TestNamespace,
    bake: Bake,
    _proxy: SlowProxy,
    _operator: Operator,
}

/// Bakes `name` (service `name` 1.0.0, in a namespace `<name>-<random>`) with a template whose
/// packer reaches EC2 through `delay` and has the `extra` spec lines, under an operator started
/// with `args` and `env`; returns once the Bake reaches `phase`.
async fn slow_bake(
    name: &str,
    delay: Delay,
    extra: &str,
    args: &[&str],
    env: &[(&str, &str)],
    phase: BakePhase,
) -> Result<SlowBake> {
    let (rig, client, ns) = namespace(name).await?;
    let (proxy, template) = slow_template(&client, &ns, delay, extra).await?;
    let operator = Operator::start_with(rig, ns.name(), args, env).await?;
    create_bake(&ns, &bake_yaml(name, &template, name, "1.0.0", "hvm")).await?;
    let bake = wait_for_phase(&ns.api(), name, phase, BAKE_TIMEOUT).await?;
    Ok(SlowBake {
        ns,
        bake,
        _proxy: proxy,
        _operator: operator,
    })
}

/// [`slow_bake`] of a Bake with a 10 s timeout, under an operator that grants 3 s of grace.
async fn bake_with_a_deadline(name: &str, delay: Delay, phase: BakePhase) -> Result<SlowBake> {
    let grace = ["--bake-grace-seconds", "3"];
    slow_bake(name, delay, "  timeoutSeconds: 10", &grace, &[], phase).await
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn bake_over_its_timeout_fails_with_reason_timeout_and_leaves_no_process() -> Result<()> {
    // Packer never gets its instance: RunInstances is held for a minute.
    let held = Delay::On("RunInstances", Duration::from_secs(60));
    let late = bake_with_a_deadline("late", held, BakePhase::Failed).await?;
    expect_reason(&late.bake, "Timeout")?;
    no_process_for(&format!("{}/late", late.ns.name()))?;
    finish(late.ns).await
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn bake_timing_out_after_its_image_exists_adopts_the_image() -> Result<()> {
    // The AMI is made and tagged, then every later call of packer is held: the deadline hits.
    let held = Delay::After("CreateTags", Duration::from_secs(60));
    let almost = bake_with_a_deadline("almost", held, BakePhase::Succeeded).await?;
    let bake = &almost.bake;
    expect_reason(bake, "Adopted")?;
    let tagged = images_of(bake).await?;
    assert_eq!(Some(ami_of(bake)?), image_ids(&tagged).first().cloned());
    finish(almost.ns).await
}

/// [`slow_bake`] of a Bake whose packer has its instance, security group and key pair, and
/// waits on CreateImage: returned Running.
async fn bake_held_at_create_image(name: &str, args: &[&str], env: &[(&str, &str)]) -> Result<SlowBake> {
    let held = Delay::On("CreateImage", Duration::from_secs(120));
    slow_bake(name, held, "", args, env, BakePhase::Running).await
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn deleting_a_running_bake_stops_its_pod_and_leaves_nothing_in_ec2() -> Result<()> {
    let doomed = bake_held_at_create_image("doomed", &["--bake-grace-seconds", "20"], &[]).await?;
    let ns = &doomed.ns;
    let uid = doomed.bake.uid().unwrap_or_default();
    let ec2 = rig().ec2();
    let by_uid = || {
        Filter::builder()
            .name(format!("tag:{}", keys::BAKE_UID))
            .values(&uid)
            .build()
    };
    // Wait until packer's instance exists, so there is something to clean up.
    let instances = try_wait_until(Duration::from_secs(60), "packer's instance", || async {
        let out = ec2.describe_instances().filters(by_uid()).send().await?;
        let found: Vec<aws_sdk_ec2::types::Instance> = out
            .reservations()
            .iter()
            .flat_map(|r| r.instances().to_vec())
            .collect();
        Ok((!found.is_empty()).then_some(found))
    })
    .await?;

    let bakes = ns.api::<Bake>();
    bakes.delete("doomed", &DeleteParams::default()).await?;
    wait_deleted(&bakes, "doomed", Duration::from_secs(90)).await?;
    wait_deleted(&ns.api::<Pod>(), "bake-doomed", Duration::from_secs(30)).await?;

    let out = ec2.describe_instances().filters(by_uid()).send().await?;
    for instance in out.reservations().iter().flat_map(|r| r.instances()) {
        let state = instance
            .state()
            .and_then(|s| s.name())
            .map(|n| n.as_str().to_string());
        assert_eq!(
            state.as_deref(),
            Some("terminated"),
            "instance {:?} left {state:?}",
            instance.instance_id()
        );
    }
    for instance in &instances {
        for group in instance.security_groups() {
            let id = group.group_id().unwrap_or_default();
            let found = ec2.describe_security_groups().group_ids(id).send().await;
            assert!(
                found.map(|f| f.security_groups().is_empty()).unwrap_or(true),
                "security group {id} ({:?}) left",
                group.group_name()
            );
        }
        if let Some(key) = instance.key_name() {
            let found = ec2.describe_key_pairs().key_names(key).send().await;
            assert!(
                found.map(|f| f.key_pairs().is_empty()).unwrap_or(true),
                "key pair {key} left"
            );
        }
    }
    finish(doomed.ns).await
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn a_bake_pod_deleted_by_someone_else_fails_the_bake_with_a_clear_message() -> Result<()> {
    let orphan = bake_held_at_create_image("orphan", &["--bake-grace-seconds", "2"], &[]).await?;
    let ns = &orphan.ns;
    ns.api::<Pod>()
        .delete("bake-orphan", &DeleteParams::default())
        .await?;
    let bake = wait_for_phase(&ns.api(), "orphan", BakePhase::Failed, BAKE_TIMEOUT).await?;
    let message = expect_reason(&bake, "PodDeleted")?;
    assert!(
        message.contains("was deleted before the bake finished"),
        "{message}"
    );
    finish(orphan.ns).await
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn a_deleted_bake_is_released_when_ec2_stays_unreachable_with_an_event_naming_the_leak() -> Result<()> {
    // Packer is stalled at CreateImage; the operator's own EC2 endpoint can be taken down.
    let operator_ec2 = SlowProxy::start(rig().ec2_endpoint(), Delay::All(Duration::ZERO)).await?;
    let args = ["--bake-grace-seconds", "2", "--cleanup-timeout-seconds", "5"];
    let env = [("AWS_ENDPOINT_URL_EC2", operator_ec2.url.as_str())];
    let stranded = bake_held_at_create_image("stranded", &args, &env).await?;
    let ns = &stranded.ns;
    operator_ec2.set_down(true);
    let bakes = ns.api::<Bake>();
    bakes.delete("stranded", &DeleteParams::default()).await?;
    wait_deleted(&bakes, "stranded", Duration::from_secs(120)).await?;
    let notes = event_notes(ns, "CleanupIncomplete").await?;
    assert!(
        notes
            .iter()
            .any(|n| n.contains("may have leaked") && n.contains(keys::BAKE_UID)),
        "no CleanupIncomplete Event naming the leak: {notes:?}"
    );
    finish(stranded.ns).await
}

/// Kills the operator at a failpoint, restarts it, and checks the Bake ends with one pod and one
/// AMI.
async fn crash_at(failpoint: &str, prefix: &str) -> Result<()> {
    let (rig, _, ns, template) = namespace_with_template(prefix, "").await?;
    let watch = PodWatch::start(ns.api());
    let mut crashing = Operator::start_with(rig, ns.name(), &[], &[("BAKER_FAILPOINTS", failpoint)]).await?;
    create_bake(&ns, &bake_yaml("crash", &template, prefix, "1.0.0", "hvm")).await?;
    let code = crashing.wait_exit(Duration::from_secs(120)).await?;
    assert_eq!(code, Some(86), "the operator stopped at failpoint {failpoint}");

    let _operator = Operator::start(rig, ns.name()).await?;
    let bake = wait_for_phase(&ns.api::<Bake>(), "crash", BakePhase::Succeeded, BAKE_TIMEOUT).await?;
    let tagged = images_of(&bake).await?;
    assert_eq!(tagged.len(), 1, "one AMI after a crash at {failpoint}");
    assert_eq!(watch.order().len(), 1, "one pod after a crash at {failpoint}");
    finish(ns).await
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn operator_crash_after_recording_the_launch_but_before_creating_the_pod_bakes_once() -> Result<()> {
    crash_at(baker::failpoint::LAUNCH_RECORDED, "crash-launch").await
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn operator_crash_after_the_pod_ended_but_before_the_final_status_bakes_once() -> Result<()> {
    crash_at(baker::failpoint::BEFORE_FINAL_STATUS, "crash-final").await
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn a_bake_reconciled_from_a_cache_older_than_its_launch_keeps_its_launch_record_and_succeeds()
-> Result<()> {
    let (rig, client, ns) = namespace("lag").await?;
    // Packer waits 5 s for its instance, so the pod is seen pending and running.
    let (_proxy, template) = slow_template(
        &client,
        &ns,
        Delay::On("RunInstances", Duration::from_secs(5)),
        "",
    )
    .await?;
    let watch = PodWatch::start(ns.api());
    // Bake events reach the cache a second late, pod events at once: the pod's events wake the
    // reconciler while its copy of the Bake predates the launch record.
    let operator = Operator::start_with(
        rig,
        ns.name(),
        &[],
        &[("BAKER_FAILPOINTS", baker::failpoint::BAKE_CACHE_LAG)],
    )
    .await?;
    create_bake(&ns, &bake_yaml("lag", &template, "lag", "1.0.0", "hvm")).await?;
    let bake = wait_for_phase(&ns.api::<Bake>(), "lag", BakePhase::Succeeded, BAKE_TIMEOUT).await?;
    let status = bake.status.clone().unwrap_or_default();
    assert_eq!(status.region.as_deref(), Some(rig.region()), "{status:?}");
    assert!(status.bake_key.is_some(), "{status:?}");
    assert!(status.source_ami_id.is_some(), "{status:?}");
    // Nothing was decided from the stale copy: no reconcile failed on a record it lacked.
    let log = operator.log();
    assert!(!log.contains("reconcile failed"), "{log}");
    let tagged = images_of(&bake).await?;
    assert_eq!(tagged.len(), 1);
    assert_eq!(watch.order().len(), 1);
    finish(ns).await
}
