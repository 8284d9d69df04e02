//! The bench's phases, in the order they run: each measures its figures on the bench namespace
//! and leaves it with the B finished Bakes only (plus, at the end, the queue's).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use baker::api::bake::ReusedImage;
use baker::api::{AmiCatalog, Bake, BakePhase};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::harness::{
    BakeWatch, Bench, IN_FLIGHT, PARKED_SELECTOR, PROGRESS, PodTimes, Running, SET_LABEL, delta,
    requests_json, secs, writes,
};
use crate::report::{Figure, median, mib, quantile, thousands};

/// How many of each the bench makes.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    /// Bakes timed against a bare packer build.
    pub n: usize,
    /// Finished Bakes present during the restart, launch, memory and takeover phases.
    pub b: usize,
    /// Bakes launched one after another while B are present.
    pub l: usize,
    /// Bakes queued at once with a cap of 10.
    pub q: usize,
    /// The CI size: deterministic counts are asserted.
    pub small: bool,
    /// How long the queue phase may drain before it is stopped and reported as far as it got:
    /// a slow EC2 (the rig's moto is one Python process) must not keep the table from printing.
    /// `BAKER_BENCH_QUEUE_BUDGET_SECONDS` overrides it.
    pub queue_budget: Duration,
}

/// Waits without a bound for a Bake the watch follows to finish; fails when it does not within
/// `timeout`, or ends Failed.
async fn finished(watch: &BakeWatch, bench: &Bench, name: &str, timeout: Duration) -> Result<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some((at, phase)) = watch.finished(name)? {
            if phase != Some(BakePhase::Succeeded) {
                let bake = bench.bakes.get(name).await?;
                bail!("Bake {name} ended {phase:?}: {:#?}", bake.status);
            }
            return Ok(at);
        }
        if Instant::now() > deadline {
            let bake = bench.bakes.get(name).await?;
            bail!(
                "Bake {name} did not finish within {timeout:?}: {:#?}",
                bake.status
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Phase 1: apply -> Succeeded against a bare `packer build` of the same rendered template, one
/// at a time, alternating so that moto's slowing down with more images weighs on both alike.
/// Returns a Bake that really baked, whose status the finished Bakes copy.
pub async fn overhead(bench: &Bench, sizes: &Sizes, figures: &mut Vec<Figure>) -> Result<Bake> {
    let op = bench.operator(&[]).await?;
    op.wait_ready(Duration::from_secs(120)).await?;
    let watch = BakeWatch::start(bench.bakes.clone(), "overhead").await?;
    let pods = PodTimes::start(bench.pods.clone()).await?;
    let mut applied = Vec::new();
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let template_file = dir.path().join("template.yaml");
    std::fs::write(
        &template_file,
        crate::support::bake::rig_template(&bench.template, ""),
    )?;
    let mut baker_times = Vec::new();
    let mut bare_times = Vec::new();
    let mut origin = None;
    for i in 0..sizes.n {
        let name = format!("ovh-{i:02}");
        let bake = bench.bake(
            "overhead",
            &name,
            &bench.template,
            "bench-ovh",
            &format!("1.0.{i}"),
        )?;
        let t0 = Instant::now();
        bench.create(&bake).await?;
        let done = finished(&watch, bench, &name, Duration::from_secs(300)).await?;
        let baker = done - t0;
        applied.push((name.clone(), t0, done));
        let baked = bench.bakes.get(&name).await?;
        let source = baked
            .status
            .as_ref()
            .and_then(|s| s.source_ami_id.clone())
            .with_context(|| format!("Bake {name} succeeded without a sourceAmiId"))?;

        // The same template and source, rendered by `baker template render`, built by packer.
        let mut bare: Bake = bench.bake(
            "overhead",
            &format!("bare-{i:02}"),
            &bench.template,
            "bench-ovh",
            &format!("2.0.{i}"),
        )?;
        bare.metadata.namespace = Some(bench.ns.clone());
        let bake_file = dir.path().join(format!("bare-{i:02}.yaml"));
        std::fs::write(&bake_file, serde_yaml::to_string(&bare)?)?;
        let mut render = bench.rig.command(crate::support::bake::baker_bin());
        render
            .arg("template")
            .arg("render")
            .arg("--template")
            .arg(&template_file)
            .arg("--bake")
            .arg(&bake_file)
            .args(["--source-ami", &source]);
        let rendered = crate::support::run(render).await?.ok()?.stdout;
        let mut packer_json: serde_json::Value =
            serde_json::from_str(&rendered).context("parsing the rendered Packer template")?;
        // The pod writes packer's manifest to its termination log; a host process must not.
        if let Some(pps) = packer_json["post-processors"].as_array_mut() {
            for pp in pps {
                pp["output"] = json!(dir.path().join(format!("manifest-{i:02}.json")));
            }
        }
        let packer_file = dir.path().join(format!("packer-{i:02}.json"));
        std::fs::write(&packer_file, serde_json::to_string_pretty(&packer_json)?)?;
        let mut build = bench.rig.command("packer");
        build
            .args(["build", "-color=false"])
            .arg(&packer_file)
            .current_dir(dir.path());
        let t0 = Instant::now();
        let out = crate::support::run(build).await?;
        let bare = t0.elapsed();
        if !out.success() {
            bail!(
                "bare `packer build` failed ({}):\n{}\n{}",
                out.status,
                crate::harness::tail(&out.stdout, 30),
                out.stderr
            );
        }
        eprintln!(
            "overhead {}/{}: apply -> Succeeded {:.2} s, bare packer build {:.2} s",
            i + 1,
            sizes.n,
            secs(baker),
            secs(bare)
        );
        baker_times.push(secs(baker));
        bare_times.push(secs(bare));
        origin = Some(baked);
    }
    let origin = origin.context("no Bake baked (N is 0)")?;
    let breakdown = overhead_breakdown(&watch, &pods, &applied)?;
    eprintln!("overhead: {}", breakdown["summary"].as_str().unwrap_or_default());

    // Gone while the operator runs, so their cleanup runs as it would for a user.
    bench
        .bakes
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels(&format!("{SET_LABEL}=overhead")),
        )
        .await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = bench
            .bakes
            .list_metadata(&ListParams::default().labels(&format!("{SET_LABEL}=overhead")))
            .await?
            .items
            .len();
        if left == 0 {
            break;
        }
        if Instant::now() > deadline {
            eprintln!("warning: {left} overhead Bakes not deleted by the operator in 120 s; removing them");
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    op.terminate().await?;
    bench.remove_bakes(&format!("{SET_LABEL}=overhead")).await?;

    let (Some(baker), Some(bare)) = (median(&baker_times), median(&bare_times)) else {
        bail!("no overhead samples");
    };
    let overhead = baker - bare;
    figures.push(
        Figure::new(
            "bake_overhead_seconds",
            format!(
                "1. apply -> Ready minus bare packer build (median of {})",
                sizes.n
            ),
        )
        .value(
            overhead,
            "s",
            format!("{overhead:.2} s (Baker {baker:.2} s, bare {bare:.2} s)"),
        )
        .goal("<= 0.3 s", overhead <= 0.3)
        .details(json!({
            "baker_seconds": baker_times,
            "bare_packer_seconds": bare_times,
            "baker_median": baker,
            "bare_median": bare,
            "breakdown": breakdown,
        })),
    );
    Ok(origin)
}

/// Where the phase-1 Bakes' time went, by median: apply -> pod created, pod created -> Running,
/// Running -> pod Succeeded (packer), pod Succeeded -> Bake Succeeded; and their status steps.
fn overhead_breakdown(
    watch: &BakeWatch,
    pods: &PodTimes,
    applied: &[(String, Instant, Instant)],
) -> Result<serde_json::Value> {
    let ms = |a: Option<Instant>, b: Option<Instant>| match (a, b) {
        (Some(a), Some(b)) => Some(b.saturating_duration_since(a).as_secs_f64() * 1e3),
        _ => None,
    };
    let mut parts: [Vec<f64>; 4] = Default::default();
    let mut samples = Vec::new();
    for (name, t0, done) in applied {
        let pod = pods.get(name);
        let created = pod.as_ref().map(|p| p.created);
        let running = pod.as_ref().and_then(|p| p.phase("Running"));
        let succeeded = pod.as_ref().and_then(|p| p.phase("Succeeded"));
        for (part, v) in parts.iter_mut().zip([
            ms(Some(*t0), created),
            ms(created, running),
            ms(running.or(created), succeeded),
            ms(succeeded, Some(*done)),
        ]) {
            part.extend(v);
        }
        if let Some(history) = watch.with(|s| s.bakes.get(name).map(|b| b.history.clone()))? {
            samples.push((*t0, history));
        }
    }
    let names = [
        "apply -> pod created",
        "pod created -> Running",
        "Running -> pod Succeeded",
        "pod Succeeded -> Bake Succeeded",
    ];
    let medians: Vec<Option<f64>> = parts.iter().map(|p| median(p)).collect();
    let summary = names
        .iter()
        .zip(&medians)
        .map(|(n, m)| format!("{n} {:.0} ms", m.unwrap_or(f64::NAN)))
        .collect::<Vec<_>>()
        .join(", ");
    let steps = crate::harness::timeline(&samples);
    Ok(json!({
        "summary": summary,
        "median_ms": names.iter().zip(&medians).map(|(n, m)| (n.to_string(), json!(m))).collect::<serde_json::Map<_, _>>(),
        "status_steps": steps,
    }))
}

/// B finished Bakes, as the operator leaves a Bake that reused an image: Baker's finalizer, and
/// the status of a Bake that really baked (written with Baker's field manager), current for
/// their generation. `IN_FLIGHT` at a time.
pub async fn populate(bench: &Bench, sizes: &Sizes, origin: &Bake) -> Result<Duration> {
    let mut model = origin.status.clone().context("the model Bake has no status")?;
    model.pod_name = None;
    model.pod_uid = None;
    model.reused_from = Some(ReusedImage {
        image_id: model.ami_id.clone().unwrap_or_default(),
        bake: Some(format!("{}/{}", bench.ns, origin.name_any())),
    });
    let spec = &origin.spec;
    let started = Instant::now();
    let mut said = Instant::now();
    let mut done = 0usize;
    let mut creates = futures::stream::iter((0..sizes.b).map(|i| {
        let model = model.clone();
        async move {
            let name = format!("f-{i:05}");
            let mut bake = bench.bake("fill", &name, &spec.template, &spec.service, &spec.version)?;
            bake.metadata.finalizers = Some(vec![baker::bake::controller::FINALIZER.to_string()]);
            let created = bench.create(&bake).await?;
            let mut status = model;
            status.observed_generation = created.metadata.generation;
            let patch = json!({ "apiVersion": "baker.io/v1alpha1", "kind": "Bake", "status": status });
            bench
                .bakes
                .patch_status(&name, &PatchParams::apply("baker").force(), &Patch::Apply(&patch))
                .await
                .with_context(|| format!("writing the status of Bake {name}"))?;
            anyhow::Ok(())
        }
    }))
    .buffer_unordered(IN_FLIGHT);
    while let Some(r) = creates.next().await {
        r?;
        done += 1;
        if said.elapsed() >= PROGRESS {
            eprintln!(
                "populating {}/{} Bakes",
                thousands(done as u64),
                thousands(sizes.b as u64)
            );
            said = Instant::now();
        }
    }
    let took = started.elapsed();
    eprintln!(
        "populated {} finished Bakes in {:.1} s",
        thousands(sizes.b as u64),
        secs(took)
    );
    Ok(took)
}

/// The flags of the operators over the B Bakes: no launch queues, and a parked pod never fails
/// its Bake during the bench.
pub fn launch_args(sizes: &Sizes) -> Vec<String> {
    vec![
        "--max-concurrent-bakes".into(),
        (sizes.l + 50).to_string(),
        "--pod-start-timeout-seconds".into(),
        "3600".into(),
    ]
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// Phases 3 (idle memory) and 4 (restart): an operator started over the B finished Bakes, its
/// RSS once idle; then SIGTERM and a new one, timed to `/readyz`, and what it asked of the API
/// server in its first seconds. Returns the restarted operator.
pub async fn restart(bench: &Bench, sizes: &Sizes, figures: &mut Vec<Figure>) -> Result<Running> {
    let args = launch_args(sizes);
    let t0 = Instant::now();
    let first = bench.operator(&strs(&args)).await?;
    let first_ready = first.wait_ready(Duration::from_secs(300)).await? - t0;
    let idle = first
        .wait_idle(Duration::from_secs(2), Duration::from_secs(300))
        .await?;
    let rss = first.rss()?;
    eprintln!(
        "first start over {} Bakes: ready after {:.2} s, RSS {:.1} MiB{}",
        thousands(sizes.b as u64),
        secs(first_ready),
        mib(rss),
        if idle {
            ""
        } else {
            " (still reconciling after 300 s)"
        }
    );
    figures.push(
        Figure::new(
            "rss_idle_bytes",
            format!("3. operator RSS, idle with B={} Bakes", sizes.b),
        )
        .value(rss as f64, "bytes", format!("{:.1} MiB", mib(rss)))
        .goal("<= 64 MiB", rss <= 64 * 1024 * 1024)
        .details(json!({ "first_start_ready_seconds": secs(first_ready), "idle": idle })),
    );
    first.terminate().await?;

    let t0 = Instant::now();
    let op = bench.operator(&strs(&args)).await?;
    let ready = op.wait_ready(Duration::from_secs(300)).await? - t0;
    figures.push(
        Figure::new(
            "restart_ready_seconds",
            format!("4. restart -> /readyz 200 with B={} finished Bakes", sizes.b),
        )
        .value(secs(ready), "s", format!("{:.2} s", secs(ready)))
        .goal("<= 2 s", secs(ready) <= 2.0),
    );
    // Long enough for every finished Bake's first reconcile on this machine; then until quiet.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle = op
        .wait_idle(Duration::from_secs(1), Duration::from_secs(120))
        .await?;
    let requests = op.metrics().await?.kube_requests();
    let written = writes(&requests, None);
    let written_by: BTreeMap<(String, String), u64> = requests
        .iter()
        .filter(|((verb, resource), _)| {
            crate::harness::WRITE_VERBS.contains(&verb.as_str())
                && resource != "events"
                && resource != "leases"
        })
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    eprintln!(
        "restart: ready after {:.2} s; requests in its first seconds: {requests:?}",
        secs(ready)
    );
    figures.push(
        Figure::new("restart_api_writes", "4. restart: API writes (no events, leases)")
            .value(written as f64, "requests", written.to_string())
            .goal("0", written == 0)
            .asserted(sizes.small)
            .details(json!({ "writes": requests_json(&written_by), "requests": requests_json(&requests), "went_idle": idle })),
    );
    let lists: BTreeMap<String, u64> = requests
        .iter()
        .filter(|((verb, _), _)| verb == "list")
        .map(|((_, resource), n)| (resource.clone(), *n))
        .collect();
    let watched = baker::bake::watch::WATCHED;
    let once = watched.iter().all(|k| lists.get(*k) == Some(&1)) && lists.len() == watched.len();
    let shown = lists
        .iter()
        .map(|(k, n)| format!("{k}={n}"))
        .collect::<Vec<_>>()
        .join(" ");
    figures.push(
        Figure::new("restart_lists", "4. restart: LIST requests by resource")
            .value(
                lists.values().sum::<u64>() as f64,
                "requests",
                if shown.is_empty() { "none".into() } else { shown },
            )
            .goal("1 per watched kind (6)", once)
            .asserted(sizes.small)
            .details(json!(lists)),
    );
    Ok(op)
}

/// One pod-create round trip: the median of 10 creates of a pod no node takes, each deleted
/// after it was timed.
async fn pod_round_trip(bench: &Bench) -> Result<(f64, Vec<f64>)> {
    let mut samples = Vec::new();
    for i in 0..10 {
        let name = format!("bench-rtt-{i}");
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": name },
            "spec": {
                "nodeSelector": { PARKED_SELECTOR.0: PARKED_SELECTOR.1 },
                "containers": [{ "name": "c", "image": "bench.invalid/none" }],
            }
        }))?;
        let t0 = Instant::now();
        bench
            .pods
            .create(&PostParams::default(), &pod)
            .await
            .with_context(|| format!("creating pod {name}"))?;
        samples.push(secs(t0.elapsed()));
        bench
            .pods
            .delete(&name, &DeleteParams::default().grace_period(0))
            .await
            .with_context(|| format!("deleting pod {name}"))?;
    }
    Ok((median(&samples).unwrap_or_default(), samples))
}

/// Phases 2 and 3: L Bakes applied one after another (each once the previous one's pod was seen)
/// with B present, timed to their pod as a watching client sees it; the operator's RSS after.
pub async fn launches(bench: &Bench, sizes: &Sizes, op: Running, figures: &mut Vec<Figure>) -> Result<()> {
    let (rtt, rtt_samples) = pod_round_trip(bench).await?;
    let pods = PodTimes::start(bench.pods.clone()).await?;
    let watch = BakeWatch::start(bench.bakes.clone(), "launch").await?;
    let mut applied = Vec::new();
    let mut latencies = Vec::new();
    let mut peak = op.rss()?;
    let mut said = Instant::now();
    for i in 0..sizes.l {
        let name = format!("launch-{i:03}");
        let bake = bench.bake(
            "launch",
            &name,
            &bench.parked_template,
            "bench-launch",
            &format!("3.0.{i}"),
        )?;
        let t0 = Instant::now();
        bench.create(&bake).await?;
        let seen = pods
            .wait(&name, Duration::from_secs(60))
            .await
            .with_context(|| format!("the operator's log:\n{}", crate::harness::tail(&op.op.log(), 20)))?;
        latencies.push(secs(seen - t0));
        applied.push((name, t0));
        peak = peak.max(op.rss()?);
        if said.elapsed() >= PROGRESS {
            eprintln!("launches: {}/{} pods seen", i + 1, sizes.l);
            said = Instant::now();
        }
    }
    let p50 = quantile(&latencies, 0.5).unwrap_or_default();
    let p99 = quantile(&latencies, 0.99).unwrap_or_default();
    eprintln!(
        "launches: apply -> pod p50 {:.1} ms, p99 {:.1} ms; one pod create {:.1} ms",
        p50 * 1e3,
        p99 * 1e3,
        rtt * 1e3
    );
    // The Bakes' status steps, next to the pod: which of them the launch waits for.
    let samples: Vec<(Instant, Vec<(Instant, String)>)> = watch.with(|s| {
        applied
            .iter()
            .filter_map(|(name, t0)| Some((*t0, s.bakes.get(name)?.history.clone())))
            .collect()
    })?;
    let steps = crate::harness::timeline(&samples);
    eprintln!("launches: status steps {}", crate::harness::timeline_line(&steps));
    let details = json!({
        "status_steps": steps,
        "apply_to_pod_seconds": latencies,
        "pod_create_round_trip_seconds": rtt_samples,
        "pod_create_round_trip_median": rtt,
    });
    figures.push(
        Figure::new(
            "apply_to_pod_p50_seconds",
            format!("2. apply -> bake pod p50 (L={} with B={})", sizes.l, sizes.b),
        )
        .value(
            p50,
            "s",
            format!(
                "{:.1} ms = {:.1}x pod create ({:.1} ms)",
                p50 * 1e3,
                p50 / rtt,
                rtt * 1e3
            ),
        )
        .goal("<= 2x pod create", p50 <= 2.0 * rtt)
        .details(details.clone()),
    );
    figures.push(
        Figure::new("apply_to_pod_p99_seconds", "2. apply -> bake pod p99")
            .value(
                p99,
                "s",
                format!("{:.1} ms = {:.1}x pod create", p99 * 1e3, p99 / rtt),
            )
            .goal("<= 5x pod create", p99 <= 5.0 * rtt),
    );
    let idle = op
        .wait_idle(Duration::from_secs(1), Duration::from_secs(60))
        .await?;
    let rss = op.rss()?;
    figures.push(
        Figure::new(
            "rss_after_launches_bytes",
            format!("3. operator RSS after the L={} launches", sizes.l),
        )
        .value(
            rss as f64,
            "bytes",
            format!("{:.1} MiB (peak seen {:.1} MiB)", mib(rss), mib(peak)),
        )
        .goal("<= 64 MiB", rss <= 64 * 1024 * 1024)
        .details(json!({ "peak_during_launches_bytes": peak, "idle": idle })),
    );
    op.terminate().await?;
    bench.remove_bakes(&format!("{SET_LABEL}=launch")).await
}

/// Phase 7: two operators with leader election over the B Bakes; the leader is killed and a
/// Bake applied at once, timed from the kill to its pod.
pub async fn takeover(bench: &Bench, sizes: &Sizes, figures: &mut Vec<Figure>) -> Result<()> {
    const LEASE: u64 = 5;
    let lease_name = format!("{}-lease", bench.ns);
    let mut args = launch_args(sizes);
    args.extend([
        "--leader-election".into(),
        "--leader-election-lease-seconds".into(),
        LEASE.to_string(),
        "--leader-election-name".into(),
        lease_name,
    ]);
    let a = bench.operator_named("bench-a", &strs(&args)).await?;
    let b = bench.operator_named("bench-b", &strs(&args)).await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut said = Instant::now();
    let leader_is_a = loop {
        a.wait_ready(Duration::from_secs(300)).await?;
        b.wait_ready(Duration::from_secs(300)).await?;
        let la = a.metrics().await?.sum("baker_leader", &[]);
        let lb = b.metrics().await?.sum("baker_leader", &[]);
        match (la as i64, lb as i64) {
            (1, 0) => break true,
            (0, 1) => break false,
            _ if Instant::now() > deadline => {
                bail!("no single leader after 300 s (leader gauges {la} and {lb})")
            }
            _ => {}
        }
        if said.elapsed() >= PROGRESS {
            eprintln!("takeover: waiting for one leader (gauges {la}, {lb})");
            said = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (mut leader, standby) = if leader_is_a { (a, b) } else { (b, a) };
    // The leader has reviewed every Bake before it is killed: the takeover is not a cold start.
    leader
        .wait_idle(Duration::from_secs(1), Duration::from_secs(120))
        .await?;
    let pods = PodTimes::start(bench.pods.clone()).await?;
    let name = "takeover-0";
    let bake = bench.bake(
        "takeover",
        name,
        &bench.parked_template,
        "bench-takeover",
        "5.0.0",
    )?;
    let killed = Instant::now();
    leader.op.kill().await.context("killing the leader")?;
    bench.create(&bake).await?;
    let seen = pods.wait(name, Duration::from_secs(120)).await.with_context(|| {
        format!(
            "the standby's log:\n{}",
            crate::harness::tail(&standby.op.log(), 30)
        )
    })?;
    let took = secs(seen - killed);
    eprintln!("takeover: leader killed -> new Bake's pod in {took:.2} s");
    figures.push(
        Figure::new(
            "takeover_seconds",
            format!(
                "7. leader SIGKILL -> new Bake's pod (lease {LEASE} s, B={})",
                sizes.b
            ),
        )
        .value(took, "s", format!("{took:.2} s"))
        .goal(
            format!("<= {} s (lease + 2 s)", LEASE + 2),
            took <= (LEASE + 2) as f64,
        ),
    );
    standby.terminate().await?;
    bench.remove_bakes(&format!("{SET_LABEL}=takeover")).await
}

/// How long the queue may go without a Bake finishing before it counts as stalled.
const STALL: Duration = Duration::from_secs(300);

/// Phases 5 and 6 (per bake): Q Bakes applied at once to an operator with a cap of 10, timed
/// until all succeeded; the operator's API writes and EC2 calls per Bake; and, from the harness's
/// watch, writes to Bakes that stayed queued per freed slot. Returns the operator, idle.
pub async fn queue(bench: &Bench, sizes: &Sizes, figures: &mut Vec<Figure>) -> Result<Running> {
    let op = bench.operator(&["--max-concurrent-bakes", "10"]).await?;
    op.wait_ready(Duration::from_secs(300)).await?;
    op.wait_idle(Duration::from_secs(1), Duration::from_secs(120))
        .await?;
    let watch = BakeWatch::start(bench.bakes.clone(), "queue").await?;
    let before = op.metrics().await?;
    let t0 = Instant::now();
    let mut creates = futures::stream::iter((0..sizes.q).map(|i| async move {
        let name = format!("q-{i:04}");
        let bake = bench.bake(
            "queue",
            &name,
            &bench.template,
            "bench-queue",
            &format!("4.0.{i}"),
        )?;
        bench.create(&bake).await
    }))
    .buffer_unordered(IN_FLIGHT);
    let mut said = Instant::now();
    let mut created = 0usize;
    while let Some(r) = creates.next().await {
        r?;
        created += 1;
        if said.elapsed() >= PROGRESS {
            eprintln!("queue: applied {created}/{}", sizes.q);
            said = Instant::now();
        }
    }
    let applied = t0.elapsed();
    eprintln!("queue: {} Bakes applied in {:.1} s", sizes.q, secs(applied));
    let mut last = (0usize, Instant::now());
    let mut stopped = false;
    loop {
        let (finished, tally) = watch.with(|s| {
            let mut tally = BTreeMap::<&str, usize>::new();
            for b in s.bakes.values() {
                *tally.entry(b.phase.map_or("none", |p| p.as_str())).or_default() += 1;
            }
            (s.finished, format!("{tally:?}"))
        })?;
        if finished >= sizes.q {
            break;
        }
        if t0.elapsed() > sizes.queue_budget {
            eprintln!(
                "queue: stopped after {:.0} s (budget {:.0} s) with {finished}/{} finished: {tally}",
                secs(t0.elapsed()),
                secs(sizes.queue_budget),
                sizes.q
            );
            stopped = true;
            break;
        }
        if finished != last.0 {
            last = (finished, Instant::now());
        } else if last.1.elapsed() > STALL {
            let message = format!(
                "queue: no Bake finished for {:.0} s ({finished}/{} finished, {tally}); the operator's log:\n{}",
                secs(STALL),
                sizes.q,
                crate::harness::tail(&op.op.log(), 30)
            );
            // At the CI size a stall is a regression. At full size the rig's moto, one Python
            // process, can stop answering under a thousand images and ten packers: the queue is
            // then reported as far as it got, like one out of budget, so the table still prints.
            if sizes.small {
                bail!(message);
            }
            eprintln!("{message}\nqueue: stopped (stalled)");
            stopped = true;
            break;
        }
        if said.elapsed() >= PROGRESS {
            eprintln!(
                "queue: {finished}/{} finished after {:.0} s: {tally}",
                sizes.q,
                secs(t0.elapsed())
            );
            said = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (done_at, failed, rewrites, rewrites_early, rewritten, freed) = watch.with(|s| {
        (
            s.bakes.values().filter_map(|b| b.finished).max(),
            s.failed.clone(),
            s.queued_rewrites,
            s.queued_rewrites_before_first_finish,
            s.rewritten.clone(),
            s.finished,
        )
    })?;
    let (samples, versions, histories) = watch.with(|s| {
        let versions: usize = s.bakes.values().map(|b| b.history.len()).sum();
        let mut histories = BTreeMap::new();
        for name in ["q-0000".to_string(), format!("q-{:04}", sizes.q - 1)] {
            if let Some(b) = s.bakes.get(&name) {
                let t0 = b.history.first().map_or(t0, |(t, _)| *t);
                let steps: Vec<String> = b
                    .history
                    .iter()
                    .map(|(t, l)| format!("{l} @{:.0} ms", secs(t.saturating_duration_since(t0)) * 1e3))
                    .collect();
                histories.insert(name, steps);
            }
        }
        (s.rewrite_samples.clone(), versions, histories)
    })?;
    let took = done_at.map_or(t0.elapsed(), |t| t - t0);
    if !failed.is_empty() {
        eprintln!(
            "warning: {} queued Bakes failed (first: {:?}); the figures below count them as finished",
            failed.len(),
            failed.iter().take(5).collect::<Vec<_>>()
        );
    }
    // Final pod and status writes trail the last Succeeded a little. A stopped queue's metrics are
    // read first; then its other Bakes go, so the catalog phase counts only its own EC2 calls.
    if !stopped {
        op.wait_idle(Duration::from_secs(2), Duration::from_secs(120))
            .await?;
    }
    let after = op.metrics().await?;
    if stopped {
        bench.remove_bakes(&format!("{SET_LABEL}=queue")).await?;
        op.wait_idle(Duration::from_secs(2), Duration::from_secs(120))
            .await?;
    }
    // Per-Bake figures are over the Bakes that finished (a stopped queue's others have written
    // their finalizer and `Queued` too, so its per-Bake writes read high).
    let q = freed.max(1) as f64;

    let drained = if stopped {
        format!(
            "stopped after {:.1} s: {freed}/{} finished ({:.2} Bakes/s)",
            secs(took),
            sizes.q,
            q / secs(took)
        )
    } else {
        format!("{:.1} s ({:.2} Bakes/s)", secs(took), q / secs(took))
    };
    figures.push(
        Figure::new(
            "queue_seconds",
            format!("5. queue of Q={} (cap 10): apply -> all Succeeded", sizes.q),
        )
        .value(secs(took), "s", drained)
        .details(json!({ "apply_seconds": secs(applied), "failed": failed, "stopped": stopped, "finished": freed })),
    );
    let requests = delta(&before.kube_requests(), &after.kube_requests());
    let written = writes(&requests, Some(&["bakes", "pods", "configmaps"]));
    let per_bake = written as f64 / q;
    figures.push(
        Figure::new(
            "queue_api_writes_per_bake",
            "5. API writes per Bake (bakes, pods, configmaps)",
        )
        .value(per_bake, "requests", format!("{per_bake:.2} ({written} in all)"))
        .goal("<= 6", per_bake <= 6.0)
        .details(json!({
            "requests": requests_json(&requests),
            "versions_seen_per_bake": versions as f64 / q,
            "histories": histories,
        })),
    );
    // What a queued Bake writes today, and what CI holds it to: the finalizer, Queued, the launch
    // record, the ConfigMap, the pod, Running, Succeeded. One more than the goal above, because
    // a queued Bake says so in its status.
    figures.push(
        Figure::new(
            "queue_api_writes_per_bake_budget",
            "5. API writes per queued Bake, against today's budget",
        )
        .value(per_bake, "requests", format!("{per_bake:.2}"))
        .goal("<= 7", per_bake <= 7.0)
        .asserted(sizes.small),
    );
    let per_slot = if freed == 0 {
        0.0
    } else {
        rewrites as f64 / freed as f64
    };
    let most: Vec<(String, u64)> = {
        let mut v: Vec<(String, u64)> = rewritten.into_iter().collect();
        v.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
        v.into_iter().take(10).collect()
    };
    figures.push(
        Figure::new(
            "queued_writes_per_freed_slot",
            "5. writes to queued Bakes per freed slot",
        )
        .value(
            per_slot,
            "writes",
            format!("{per_slot:.2} ({rewrites} writes, {freed} slots freed)"),
        )
        .goal("0", rewrites == 0)
        .asserted(sizes.small)
        .details(json!({
            "queued_rewrites": rewrites,
            "before_first_finish": rewrites_early,
            "freed_slots": freed,
            "most_rewritten": most,
            "samples": samples,
        })),
    );
    let ec2 = delta(&before.ec2_calls(), &after.ec2_calls());
    let ec2_total: u64 = ec2.values().sum();
    let ec2_per_bake = ec2_total as f64 / q;
    let by_action = ec2
        .iter()
        .map(|(a, n)| format!("{a} {:.2}", *n as f64 / q))
        .collect::<Vec<_>>()
        .join(", ");
    figures.push(
        Figure::new(
            "ec2_calls_per_bake",
            "6. operator EC2 calls per Bake (queue phase)",
        )
        .value(ec2_per_bake, "calls", format!("{ec2_per_bake:.2} ({by_action})"))
        .details(json!(ec2)),
    );
    Ok(op)
}

/// Phase 6: one AmiCatalog of the account's own images: the EC2 calls of its first sync, by
/// action, against the pages the harness needed to list the same images.
pub async fn catalog(bench: &Bench, sizes: &Sizes, op: Running, figures: &mut Vec<Figure>) -> Result<()> {
    let ec2 = bench.rig.ec2();
    let mut pages = ec2.describe_images().owners("self").into_paginator().send();
    let (mut page_count, mut images) = (0u64, 0u64);
    while let Some(page) = pages.next().await {
        let page = page.context("listing the account's images (DescribeImages, owners self)")?;
        page_count += 1;
        images += page.images().len() as u64;
    }
    let before = op.metrics().await?.ec2_calls();
    let catalogs: Api<AmiCatalog> = Api::namespaced(bench.client.clone(), &bench.ns);
    let catalog: AmiCatalog = serde_json::from_value(json!({
        "apiVersion": "baker.io/v1alpha1",
        "kind": "AmiCatalog",
        "metadata": { "name": "bench-catalog" },
        "spec": {
            "region": bench.rig.region(),
            "owners": ["self"],
            "limit": 100,
            // One sync only in the window measured.
            "refreshIntervalSeconds": 86400,
        }
    }))?;
    catalogs
        .create(&PostParams::default(), &catalog)
        .await
        .context("creating the AmiCatalog")?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let synced = loop {
        let c = catalogs.get("bench-catalog").await?;
        if let Some(s) = &c.status {
            if s.last_sync_time.is_some() {
                break c;
            }
            if let Some(ready) = s
                .conditions
                .iter()
                .find(|c| c.type_ == "Ready" && c.status == "False")
            {
                bail!("the AmiCatalog's sync failed: {} {}", ready.reason, ready.message);
            }
        }
        if Instant::now() > deadline {
            bail!("the AmiCatalog did not sync within 120 s: {:?}", c.status);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Anything the sync does after writing its status.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let calls = delta(&before, &op.metrics().await?.ec2_calls());
    op.terminate().await?;
    let listed = synced.status.as_ref().and_then(|s| s.count).unwrap_or_default();
    let describe = calls.get("DescribeImages").copied().unwrap_or(0);
    let per_image: BTreeMap<&String, &u64> = calls
        .iter()
        .filter(|(a, n)| a.as_str() != "DescribeImages" && **n as f64 >= (images.max(2) as f64))
        .collect();
    let met = describe <= page_count && per_image.is_empty();
    let by_action = calls
        .iter()
        .map(|(a, n)| format!("{a}={n}"))
        .collect::<Vec<_>>()
        .join(" ");
    figures.push(
        Figure::new("catalog_sync_ec2_calls", "6. EC2 calls of one catalog sync")
            .value(
                calls.values().sum::<u64>() as f64,
                "calls",
                format!(
                    "{} for {images} images ({page_count} page(s)); {listed} in status",
                    if by_action.is_empty() {
                        "none".to_string()
                    } else {
                        by_action
                    },
                ),
            )
            .goal("DescribeImages <= pages needed, no per-image call", met)
            .asserted(sizes.small)
            .details(json!({
                "calls": calls,
                "images_owned": images,
                "pages_needed": page_count,
                "status_count": listed,
            })),
    );
    Ok(())
}
