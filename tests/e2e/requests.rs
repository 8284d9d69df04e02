//! End to end on the rig: what the operator asks of the API server and EC2, counted.
//!
//! - A restart over hundreds of finished Bakes writes nothing and lists each kind once.
//! - Bakes waiting in the queue make no EC2 call and no API request while they wait.
//!
//! API requests are counted from the apiserver's own request metrics, which every client shares,
//! so the tests of this binary run one at a time, and each first waits for other tests'
//! namespaces to finish deleting.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use baker::api::bake::ReusedImage;
use baker::api::{Bake, BakePhase};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};

use crate::support::bake::*;
use crate::support::{Rig, Seen, wait_for_object, wait_progressing};

/// One test at a time: the apiserver's counters are shared by every client.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Requests the apiserver has served, by verb and resource, for `resources` (all verbs but
/// WATCH), from its own request metrics.
async fn request_counts(rig: &Rig, resources: &[&str]) -> Result<BTreeMap<(String, String), u64>> {
    let metrics = rig.kubectl(["get", "--raw", "/metrics"]).await?.ok()?.stdout;
    let label = |line: &str, name: &str| {
        let start = format!("{name}=\"");
        let rest = line.split(&start).nth(1)?;
        Some(rest.split('"').next()?.to_string())
    };
    let mut counts = BTreeMap::new();
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        let (Some(verb), Some(resource)) = (label(line, "verb"), label(line, "resource")) else {
            continue;
        };
        if verb == "WATCH" || !resources.contains(&resource.as_str()) {
            continue;
        }
        let value = line.rsplit(' ').next().unwrap_or("0");
        *counts.entry((verb, resource)).or_default() += value.parse::<f64>().context("metric value")? as u64;
    }
    Ok(counts)
}

/// Requests with one of `verbs` on one of `resources`.
async fn requests(rig: &Rig, verbs: &[&str], resources: &[&str]) -> Result<u64> {
    Ok(request_counts(rig, resources)
        .await?
        .iter()
        .filter(|((verb, _), _)| verbs.contains(&verb.as_str()))
        .map(|(_, n)| n)
        .sum())
}

/// Write requests for the kinds the operator writes.
async fn writes(rig: &Rig) -> Result<u64> {
    requests(
        rig,
        &["POST", "PUT", "PATCH", "APPLY", "DELETE", "DELETECOLLECTION"],
        &["bakes", "pods", "configmaps", "events"],
    )
    .await
}

/// The operator's own counters of one metric family, by label set (e.g.
/// `{verb="patch",resource="bakes"}`), from its `/metrics`.
async fn operator_counts(operator: &Operator, family: &str) -> Result<BTreeMap<String, u64>> {
    let text = crate::support::ship::get(&operator.http, "/metrics").await?.body;
    let prefix = format!("{family}{{");
    Ok(text
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((
                series[family.len()..].to_string(),
                value.parse::<f64>().ok()? as u64,
            ))
        })
        .collect())
}

/// What grew between two snapshots of the operator's counters.
fn grown_counts(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> Vec<String> {
    after
        .iter()
        .filter_map(|(series, n)| {
            let was = before.get(series).copied().unwrap_or(0);
            (*n > was).then(|| format!("{series} +{}", n - was))
        })
        .collect()
}

/// Waits until no other test's namespace is left: namespaces being deleted write pods and Events.
async fn other_namespaces_gone(client: &Client, mine: &str) -> Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    wait_progressing(
        Duration::from_secs(120),
        "other test namespaces to be gone",
        || async {
            // Bakes left by tests whose operator is gone (a failed test) are released, on every
            // look: their namespace's deletion marks them deleted a moment after it starts.
            release_bakes(&Api::<Bake>::all(client.clone())).await.ok();
            let list = namespaces
                .list(&ListParams::default().labels("baker.io/test=true"))
                .await?;
            let others: Vec<String> = list
                .items
                .iter()
                .map(|n| n.name_any())
                .filter(|n| n != mine)
                .collect();
            Ok(if others.is_empty() {
                Seen::Done(())
            } else {
                Seen::Waiting {
                    state: format!("still there: {others:?}"),
                }
            })
        },
    )
    .await
}

const BAKES: usize = 300;
/// Bakes that really run packer; the others are created finished, their status written as the
/// operator writes a reused Bake's.
const REAL: usize = 3;

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn restart_with_300_finished_bakes_writes_nothing_and_lists_each_kind_once() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let (rig, client, ns, template) = namespace_with_template("restart300", "").await?;
    let mut operator = Operator::start(rig, ns.name()).await?;

    let bakes = ns.api::<Bake>();
    let yaml = |i: usize| {
        bake_yaml(
            &format!("b-{i:03}"),
            &template,
            "fleet",
            &format!("1.0.{}", i % REAL),
            "hvm",
        )
    };
    for i in 0..REAL {
        create_bake(&ns, &yaml(i)).await?;
    }
    let mut real = Vec::new();
    for i in 0..REAL {
        real.push(wait_for_phase(&bakes, &format!("b-{i:03}"), BakePhase::Succeeded, BAKE_TIMEOUT).await?);
    }
    operator.kill().await?;

    // The rest, created as a finished Bake looks: Baker's finalizer, and a status that reuses one
    // of the real AMIs, written with Baker's field manager.
    let started = Instant::now();
    for i in REAL..BAKES {
        let mut bake: Bake = serde_yaml::from_str(&yaml(i))?;
        bake.metadata.finalizers = Some(vec![baker::bake::controller::FINALIZER.to_string()]);
        bakes.create(&PostParams::default(), &bake).await?;
        let origin = &real[i % REAL];
        let mut status = origin.status.clone().context("a real Bake's status")?;
        status.pod_name = None;
        status.pod_uid = None;
        status.reused_from = Some(ReusedImage {
            image_id: status.ami_id.clone().unwrap_or_default(),
            bake: Some(format!("{}/{}", ns.name(), origin.name_any())),
        });
        let patch = serde_json::json!({
            "apiVersion": "baker.io/v1alpha1",
            "kind": "Bake",
            "status": status,
        });
        bakes
            .patch_status(
                &format!("b-{i:03}"),
                &PatchParams::apply("baker").force(),
                &Patch::Apply(&patch),
            )
            .await?;
    }
    eprintln!(
        "{REAL} Bakes baked, {} created finished in {:.1?}",
        BAKES - REAL,
        started.elapsed()
    );

    other_namespaces_gone(&client, ns.name()).await?;
    let before = writes(rig).await?;
    let lists_before = requests(rig, &["LIST"], &baker::bake::watch::WATCHED).await?;
    let bake_lists_before = requests(rig, &["LIST"], &["bakes"]).await?;
    let started = Instant::now();
    let restarted = Operator::start(rig, ns.name()).await?;
    // Only the restarted process's own log lines count: every one of the Bakes reviewed.
    wait_progressing(
        Duration::from_secs(60),
        "the restarted operator to look at every Bake",
        || async {
            let log = restarted.log();
            let mut seen: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("finished and up to date"))
                .filter_map(|l| l.split("bake=").nth(1)?.split_whitespace().next())
                .collect();
            seen.sort_unstable();
            seen.dedup();
            Ok(if seen.len() >= BAKES {
                Seen::Done(())
            } else {
                Seen::Waiting {
                    state: format!("{} of {BAKES} reviewed", seen.len()),
                }
            })
        },
    )
    .await?;
    let ready = started.elapsed();
    let after = writes(rig).await?;
    let lists = requests(rig, &["LIST"], &baker::bake::watch::WATCHED).await? - lists_before;
    let bake_lists = requests(rig, &["LIST"], &["bakes"]).await? - bake_lists_before;
    eprintln!(
        "restarted operator reviewed {BAKES} finished Bakes in {ready:.2?} with {} writes, {bake_lists} LIST of Bakes and {lists} LISTs in all (Bakes, pods, BakeTemplates, AmiCatalogs, BakeSchedules, AmiChannels)",
        after - before
    );
    // One shared watch per kind serves both controllers, readiness and metrics.
    assert_eq!(
        bake_lists, 1,
        "the restarted operator listed Bakes {bake_lists} times"
    );
    assert_eq!(
        lists, 6,
        "one LIST each of Bakes, pods, BakeTemplates, AmiCatalogs, BakeSchedules and AmiChannels, not {lists}"
    );
    assert_eq!(
        after, before,
        "a restart over finished Bakes wrote to the API server"
    );
    finish(ns).await
}

const WAITING: usize = 200;

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn bakes_waiting_in_the_queue_make_no_ec2_calls_and_no_api_requests() -> Result<()> {
    let _serial = SERIAL.lock().await;
    // No credentials Secret in this namespace: the one slot is held by a bake whose pod cannot
    // start, so nothing runs packer (or calls EC2) while the others wait, and the namespace goes
    // at once at the end.
    let (rig, client, ns, template) = namespace_without_credentials("waiting").await?;
    let operator = Operator::start_with(rig, ns.name(), &["--max-concurrent-bakes", "1"], &[]).await?;
    let bakes = ns.api::<Bake>();
    create_bake(&ns, &bake_yaml("holder", &template, "svc", "0.0.1", "hvm")).await?;
    wait_for_phase(&bakes, "holder", BakePhase::Pending, Duration::from_secs(60)).await?;
    wait_for_object(
        &ns.api::<Pod>(),
        "bake-holder",
        Duration::from_secs(60),
        "the holder's pod to exist",
        |_| true,
    )
    .await?;

    // Half wait for the slot, half for the identical bake under way.
    for i in 0..WAITING {
        let version = if i % 2 == 0 {
            format!("1.0.{i}")
        } else {
            "0.0.1".into()
        };
        create_bake(
            &ns,
            &bake_yaml(&format!("w-{i:03}"), &template, "svc", &version, "hvm"),
        )
        .await?;
    }
    wait_progressing(
        Duration::from_secs(60),
        "every waiting Bake to be queued with its key recorded",
        || async {
            let list = bakes.list(&ListParams::default()).await?.items;
            let waiting = list
                .iter()
                .filter(|b| b.name_any().starts_with("w-"))
                .filter(|b| b.phase() == Some(BakePhase::Queued))
                .filter(|b| b.status.as_ref().is_some_and(|s| s.bake_key.is_some()))
                .count();
            Ok(if waiting == WAITING {
                Seen::Done(())
            } else {
                Seen::Waiting { state: tally(&list) }
            })
        },
    )
    .await?;
    other_namespaces_gone(&client, ns.name()).await?;

    let ec2_before = operator_counts(&operator, "baker_ec2_calls_total").await?;
    // Requests the operator itself sent, by verb and resource; its watches stay open meanwhile.
    let kube_before = operator_counts(&operator, "baker_kube_requests_total").await?;
    // Nothing happening can only be seen over a window: this one is longer than the 15 s at
    // which every waiting Bake used to poll EC2 and list every Bake.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let ec2_during = grown_counts(
        &ec2_before,
        &operator_counts(&operator, "baker_ec2_calls_total").await?,
    );
    let kube_during: Vec<String> = grown_counts(
        &kube_before,
        &operator_counts(&operator, "baker_kube_requests_total").await?,
    )
    .into_iter()
    .filter(|s| !s.contains("verb=\"watch\""))
    .collect();
    let list = bakes.list(&ListParams::default()).await?.items;
    let first_pass: u64 = ec2_before.values().sum();
    eprintln!(
        "{WAITING} waiting Bakes ({}): {first_pass} EC2 calls to queue them all, then in 20 s of waiting EC2 calls {ec2_during:?} and API requests {kube_during:?}",
        tally(&list)
    );
    // Each Bake asks EC2 twice, once: its source (the template's filter) and its key.
    let bound = 2 * (WAITING as u64 + 1);
    assert!(
        first_pass <= bound,
        "queueing {} Bakes took {first_pass} EC2 calls, more than two each",
        WAITING + 1
    );
    assert!(ec2_during.is_empty(), "waiting Bakes called EC2: {ec2_during:?}");
    assert!(
        kube_during.is_empty(),
        "waiting Bakes sent API requests: {kube_during:?}"
    );
    finish(ns).await
}
