//! End to end on the rig: an operator restarted with hundreds of finished Bakes writes nothing to
//! the API server, and lists Bakes once. Requests are counted from the apiserver's own request
//! metrics, so this file runs as a test binary of its own (cargo runs test binaries one after
//! another) and first waits for other tests' namespaces to finish deleting.

mod bake_support;
mod support;

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bake_support::*;
use baker::api::{Bake, BakePhase};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{ListParams, PostParams};
use kube::{Api, ResourceExt};
use support::{Rig, rig, try_wait_until};

const BAKES: usize = 300;
const VERSIONS: usize = 30;

/// Requests the apiserver has served with one of `verbs` on one of `resources`, from its own
/// request metrics.
async fn requests(rig: &Rig, verbs: &[&str], resources: &[&str]) -> Result<u64> {
    let metrics = rig.kubectl(["get", "--raw", "/metrics"]).await?.ok()?.stdout;
    let mut total = 0u64;
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        let verb = verbs.iter().any(|v| line.contains(&format!("verb=\"{v}\"")));
        let resource = resources
            .iter()
            .any(|r| line.contains(&format!("resource=\"{r}\"")));
        if verb && resource {
            let value = line.rsplit(' ').next().unwrap_or("0");
            total += value.parse::<f64>().context("metric value")? as u64;
        }
    }
    Ok(total)
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

/// LIST requests for Bakes: one per watch the operator opens.
async fn bake_lists(rig: &Rig) -> Result<u64> {
    requests(rig, &["LIST"], &["bakes"]).await
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_with_300_finished_bakes_writes_nothing_to_the_api_server() -> Result<()> {
    let rig = rig();
    let client = rig.client().await?;
    let ns = namespace(rig, &client, "restart300").await?;
    let template = format!("{}-t", ns.name());
    apply_template(&client, &rig_template(&template, "")).await?;
    let mut operator = Operator::start_with(rig, ns.name(), &["--max-concurrent-bakes", "20"], &[]).await?;

    let bakes = ns.api::<Bake>();
    for i in 0..BAKES {
        let yaml = bake_yaml(
            &format!("b-{i:03}"),
            &template,
            "fleet",
            &format!("1.0.{}", i % VERSIONS),
            "hvm",
        );
        let bake: Bake = serde_yaml::from_str(&yaml)?;
        bakes.create(&PostParams::default(), &bake).await?;
    }
    let start = Instant::now();
    try_wait_until(Duration::from_secs(600), "all 300 Bakes to succeed", || async {
        let list = bakes.list(&ListParams::default()).await?;
        let done = list
            .items
            .iter()
            .filter(|b| b.phase() == Some(BakePhase::Succeeded))
            .count();
        let failed: Vec<String> = list
            .items
            .iter()
            .filter(|b| b.phase() == Some(BakePhase::Failed))
            .map(|b| b.name_any())
            .collect();
        anyhow::ensure!(failed.is_empty(), "Bakes failed: {failed:?}");
        Ok((done == BAKES).then_some(()))
    })
    .await?;
    eprintln!(
        "{BAKES} Bakes ({VERSIONS} distinct images) finished in {:.1?}",
        start.elapsed()
    );
    operator.kill().await?;

    // Other tests' namespaces still being deleted would write pods and events; Bakes left there
    // by tests whose operator is gone are released first.
    release_bakes(&Api::<Bake>::all(client.clone())).await.ok();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    try_wait_until(
        Duration::from_secs(180),
        "other test namespaces to be gone",
        || async {
            let list = namespaces
                .list(&ListParams::default().labels("baker.io/test=true"))
                .await?;
            Ok(list.items.iter().all(|n| n.name_any() == ns.name()).then_some(()))
        },
    )
    .await?;

    let before = writes(rig).await?;
    let lists_before = bake_lists(rig).await?;
    let started = Instant::now();
    let restarted = Operator::start(rig, ns.name()).await?;
    // Only the restarted process's own log lines count: every one of the 300 Bakes reviewed.
    try_wait_until(
        Duration::from_secs(120),
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
            Ok((seen.len() >= BAKES).then_some(()))
        },
    )
    .await?;
    let ready = started.elapsed();
    let after = writes(rig).await?;
    let lists = bake_lists(rig).await? - lists_before;
    eprintln!(
        "restarted operator reviewed {BAKES} finished Bakes in {ready:.2?} with {} writes and {lists} LIST of Bakes",
        after - before
    );
    // One shared watch of Bakes serves both controllers, readiness and metrics.
    assert_eq!(lists, 1, "the restarted operator listed Bakes {lists} times");
    assert_eq!(
        after, before,
        "a restart over finished Bakes wrote to the API server"
    );
    let result = finish(ns).await;
    drop(restarted);
    result
}
