//! Baker's fault suite against the local rig: `make faults` (50 Bakes per scenario) and, smaller,
//! at the end of `make test`.
//!
//! Each scenario runs one workload (Bakes with distinct keys, identical pairs, Bakes whose source
//! comes from an AmiCatalog, some deleted mid-bake; a cap of 4) in a fresh namespace while one kind of fault strikes, lets it settle, and counts what must be zero:
//! duplicate AMIs for one bake key, Bakes whose packer ran twice, EC2 resources left tagged with a
//! Bake that no longer runs, Bakes stuck unfinished. It prints one table and writes
//! `target/faults/report.json`, and exits non-zero when a must-be-zero figure is not.
//!
//! Run without `--size` (as `cargo test --benches` would), it does nothing: it needs the rig.

#[path = "scale/harness.rs"]
#[allow(dead_code)]
mod harness;
#[path = "faults/proxy.rs"]
mod proxy;
#[path = "scale/report.rs"]
#[allow(dead_code)]
mod report;
#[path = "../tests/e2e/support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use baker::api::{AmiCatalog, Bake, BakePhase, keys};
use clap::{Parser, ValueEnum};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use serde_json::json;

use harness::{Bench, Running};
use proxy::{FaultProxy, Rng};
use support::bake::{apply_catalog, apply_template, ready_reason, rig_template};

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Size {
    /// 50 Bakes per scenario, 20 operator kills.
    Full,
    /// 12 Bakes per scenario, 4 operator kills: what `make test` runs.
    Small,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Scenario {
    /// EC2 faults on 20% of the operator's and packer's requests.
    Ec2Faults,
    /// The operator SIGKILLed at seeded moments and restarted each time.
    OperatorKills,
    /// kube-apiserver restarted twice and etcd once.
    ApiserverRestarts,
    /// The node process SIGKILLed while bake pods run, and restarted.
    NodeRestart,
    /// packer SIGKILLed inside running bake pods.
    PackerKills,
    /// Two replicas with leader election; the leader SIGKILLed mid-run.
    LeaderKill,
}

impl Scenario {
    fn what(self) -> &'static str {
        match self {
            Scenario::Ec2Faults => "EC2 faults",
            Scenario::OperatorKills => "operator SIGKILLs",
            Scenario::ApiserverRestarts => "kube-apiserver, etcd, kube-apiserver restarts",
            Scenario::NodeRestart => "node SIGKILL and restart",
            Scenario::PackerKills => "packer SIGKILLs in running bake pods",
            Scenario::LeaderKill => "leader SIGKILL",
        }
    }
}

#[derive(Parser, Debug)]
#[command(about = "Baker's fault suite against the local rig (see `make faults`)")]
struct Args {
    /// Which size to run. Without it nothing runs (`cargo test --benches` must not need a rig).
    #[arg(long, value_enum)]
    size: Option<Size>,
    /// The seed of every random choice (fault moments, faulted requests).
    #[arg(long, default_value_t = 13)]
    seed: u64,
    /// Run only these scenarios (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Scenario>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
    /// Filters passed by `cargo bench`/`cargo test`; ignored.
    #[arg(hide = true)]
    filters: Vec<String>,
}

const CAP: &str = "4";
const CATALOG: &str = "base";
/// The service whose versions a catalog with retention (keep the newest one) watches: its use
/// checks run under the faults too, and every image stays, since a Bake uses each.
const RETAINED: &str = "retained";

fn main() -> ExitCode {
    let args = Args::parse();
    let Some(size) = args.size else {
        eprintln!("benches/faults: nothing to do without --size full|small (run `make faults`)");
        return ExitCode::SUCCESS;
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("faults: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&args, size)) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(n) => {
            eprintln!("\nfaults FAILED: {n} must-be-zero figure(s) are not zero (see the table)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("\nfaults FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What one scenario measured.
#[derive(Debug, Default)]
struct Outcome {
    scenario: String,
    bakes: usize,
    /// `phase/reason` -> count, plus `Deleted` for Bakes deleted mid-run.
    finished: BTreeMap<String, usize>,
    duplicate_amis: usize,
    /// Succeeded Bakes whose AMI EC2 no longer lists (retention must keep what a Bake uses).
    lost_amis: usize,
    packer_twice: usize,
    leaked: Vec<String>,
    stuck: Vec<String>,
    errors: BTreeMap<String, u64>,
    faults: String,
    seconds: f64,
}

impl Outcome {
    fn must_be_zero(&self) -> usize {
        [
            self.duplicate_amis,
            self.lost_amis,
            self.packer_twice,
            self.leaked.len(),
            self.stuck.len(),
        ]
        .iter()
        .filter(|n| **n > 0)
        .count()
    }
}

async fn run(args: &Args, size: Size) -> Result<usize> {
    let state = support::Rig::state_dir();
    if !state.join("env").is_file() {
        bail!(
            "the rig is not up (no env in {}): run `make faults`, which brings it up",
            state.display()
        );
    }
    let rig = support::rig();
    let client = rig.client().await?;
    let bin = support::bake::baker_bin();
    if !bin.is_file() {
        bail!(
            "the operator binary {} does not exist (run `make faults`)",
            bin.display()
        );
    }
    let scenarios: Vec<Scenario> = if args.only.is_empty() {
        Scenario::value_variants().to_vec()
    } else {
        args.only.clone()
    };
    let started = Instant::now();
    let mut outcomes = Vec::new();
    for (i, s) in scenarios.iter().enumerate() {
        reset_ec2(rig).await?;
        eprintln!("\n[faults] scenario {}/{}: {s:?}", i + 1, scenarios.len());
        let seed = args.seed.wrapping_add(i as u64);
        let outcome = scenario(rig, client.clone(), *s, size, seed)
            .await
            .with_context(|| format!("scenario {s:?}"))?;
        eprintln!("[faults] {s:?}: {}", line(&outcome));
        outcomes.push(outcome);
    }
    println!("\n{}", table(&outcomes));
    let failed: usize = outcomes.iter().map(Outcome::must_be_zero).sum();
    let dir = std::path::Path::new("target/faults");
    std::fs::create_dir_all(dir)?;
    let report = json!({
        "size": format!("{size:?}"),
        "seed": args.seed,
        "seconds": started.elapsed().as_secs_f64(),
        "scenarios": outcomes.iter().map(|o| json!({
            "scenario": o.scenario, "bakes": o.bakes, "finished": o.finished,
            "duplicateAmis": o.duplicate_amis, "lostAmis": o.lost_amis, "packerTwice": o.packer_twice,
            "leaked": o.leaked, "stuck": o.stuck, "errors": o.errors,
            "faults": o.faults, "seconds": o.seconds,
        })).collect::<Vec<_>>(),
    });
    std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(&report)?)?;
    eprintln!(
        "report: target/faults/report.json ({:.0} s in all)",
        started.elapsed().as_secs_f64()
    );
    Ok(failed)
}

async fn reset_ec2(rig: &support::Rig) -> Result<()> {
    let out = support::run({
        let mut c = rig.command("tests/rig/rig.sh");
        c.arg("reset-ec2");
        c
    })
    .await?;
    if !out.success() {
        bail!("resetting moto failed: {}", out.stderr);
    }
    Ok(())
}

/// `tests/rig/rig.sh restart <component> <signal>`.
async fn restart(rig: &support::Rig, component: &str, signal: &str) -> Result<()> {
    eprintln!("[faults] restarting {component} (SIG{signal})");
    let out = support::run({
        let mut c = rig.command("tests/rig/rig.sh");
        c.args(["restart", component, signal]);
        c
    })
    .await?;
    if !out.success() {
        bail!("restarting {component} failed: {}", out.stderr);
    }
    Ok(())
}

/// One Bake of the workload: its name, template kind and service/version.
struct Planned {
    name: String,
    from_catalog: bool,
    service: String,
    version: String,
    /// Deleted once it runs.
    delete: bool,
}

/// The workload of `n` Bakes: per ten, one whose source comes from a catalog, an identical pair,
/// one more version of the service a retention catalog keeps one image of, and six of their own
/// (one of them deleted mid-bake).
fn workload(n: usize) -> Vec<Planned> {
    (0..n)
        .map(|i| {
            let (service, version, from_catalog) = match i % 10 {
                1 => (format!("cat-{i}"), "1.0.0".to_string(), true),
                2 | 3 => (format!("same-{}", i / 10), "1.0.0".to_string(), false),
                5 => (RETAINED.to_string(), format!("1.0.{i}"), false),
                _ => (format!("svc-{i}"), "1.0.0".to_string(), false),
            };
            Planned {
                name: format!("f-{i:03}"),
                from_catalog,
                service,
                version,
                delete: i % 10 == 7,
            }
        })
        .collect()
}

/// Distinct pod UIDs per bake pod name, as seen by a watch for the whole run.
#[derive(Clone, Default)]
struct PodLog(Arc<Mutex<BTreeMap<String, BTreeSet<String>>>>);

impl PodLog {
    fn start(pods: Api<Pod>) -> (PodLog, tokio::task::JoinHandle<()>) {
        let log = PodLog::default();
        let seen = log.clone();
        let task = tokio::spawn(async move {
            // With backoff, and past errors: the API server restarts in one scenario, and a
            // watch that ended there would stop counting pods.
            let stream = watcher(pods, watcher::Config::default())
                .default_backoff()
                .applied_objects();
            futures::pin_mut!(stream);
            while let Some(item) = stream.next().await {
                let Ok(pod) = item else { continue };
                let mut map = seen.0.lock().unwrap_or_else(|p| p.into_inner());
                map.entry(pod.name_any())
                    .or_default()
                    .insert(pod.uid().unwrap_or_default());
            }
        });
        (log, task)
    }

    fn twice(&self) -> usize {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.values().filter(|uids| uids.len() > 1).count()
    }
}

/// The operators of a scenario, and the error counts of those already killed.
struct Operators {
    live: Vec<(String, Running)>,
    errors: BTreeMap<String, u64>,
    env: Vec<(String, String)>,
    args: Vec<String>,
}

impl Operators {
    async fn start(
        bench: &Bench,
        names: &[&str],
        args: Vec<String>,
        env: Vec<(String, String)>,
    ) -> Result<Operators> {
        let mut ops = Operators {
            live: Vec::new(),
            errors: BTreeMap::new(),
            env,
            args,
        };
        for name in names {
            let op = ops.spawn(bench, name).await?;
            ops.live.push((name.to_string(), op));
        }
        Ok(ops)
    }

    async fn spawn(&self, bench: &Bench, name: &str) -> Result<Running> {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        bench.operator_with(name, &args, &env).await
    }

    /// Adds a running operator's error counts to the scenario's.
    async fn collect(&mut self, i: usize) {
        if let Ok(m) = self.live[i].1.metrics().await {
            for (k, v) in m.by("baker_reconcile_errors_total", &["category"]) {
                *self.errors.entry(k.join(",")).or_default() += v;
            }
        }
    }

    /// SIGKILLs operator `i` (its errors counted just before) and starts it again.
    async fn kill_and_restart(&mut self, bench: &Bench, i: usize) -> Result<()> {
        self.collect(i).await;
        let name = self.live[i].0.clone();
        self.live[i].1.op.kill().await?;
        eprintln!("[faults] operator {name} SIGKILLed; starting it again");
        self.live[i].1 = self.spawn(bench, &name).await?;
        Ok(())
    }

    async fn finish(mut self) -> BTreeMap<String, u64> {
        for i in 0..self.live.len() {
            self.collect(i).await;
        }
        for (_, op) in self.live.drain(..) {
            op.terminate().await.ok();
        }
        self.errors.retain(|_, v| *v > 0);
        self.errors
    }
}

async fn scenario(
    rig: &'static support::Rig,
    client: kube::Client,
    s: Scenario,
    size: Size,
    seed: u64,
) -> Result<Outcome> {
    let started = Instant::now();
    let n = match size {
        Size::Full => 50,
        Size::Small => 12,
    };
    let bench = Bench::setup(rig, client.clone()).await?;
    // The namespace and its templates go whatever happened, or a failed scenario would leave
    // its Bakes for the next one's cluster-scoped view.
    let outcome = under_fault(rig, client, &bench, s, size, seed, n).await;
    bench.teardown().await?;
    let mut outcome = outcome?;
    outcome.seconds = started.elapsed().as_secs_f64();
    Ok(outcome)
}

/// The workload of `n` Bakes in `bench`'s namespace under fault `s`, and what it left.
async fn under_fault(
    rig: &'static support::Rig,
    client: kube::Client,
    bench: &Bench,
    s: Scenario,
    size: Size,
    seed: u64,
    n: usize,
) -> Result<Outcome> {
    let mut rng = Rng::new(seed);
    let proxy = if s == Scenario::Ec2Faults {
        Some(FaultProxy::start(support::bake::host_port(rig.ec2_endpoint()), 0.2, seed).await?)
    } else {
        None
    };
    let endpoint = proxy
        .as_ref()
        .map(|p| format!("  ec2Endpoint: {}\n", p.url))
        .unwrap_or_default();
    let template = format!("{}-w", bench.ns);
    apply_template(&client, &rig_template(&template, endpoint.trim_end())).await?;
    let from_catalog = format!("{}-c", bench.ns);
    let lines = format!("{endpoint}  source:\n    catalog:\n      name: {CATALOG}");
    apply_template(&client, &rig_template(&from_catalog, &lines)).await?;
    let catalogs: Api<AmiCatalog> = Api::namespaced(client.clone(), &bench.ns);
    // The rig's seeded source images: an AMI packer baked in moto cannot be a source (moto gives
    // it root device type `standard`, which amazon-ebs refuses).
    let spec = "owners: [self]\nnamePattern: \"baker-rig-source-*\"\ntags: {baker.io/rig: source}";
    apply_catalog(&catalogs, CATALOG, spec).await?;
    let spec = format!("service: {RETAINED}\nrefreshIntervalSeconds: 10\nretention:\n  keepNewest: 1");
    apply_catalog(&catalogs, RETAINED, &spec).await?;

    let mut args = vec!["--max-concurrent-bakes".to_string(), CAP.to_string()];
    let mut names = vec!["a"];
    if s == Scenario::LeaderKill {
        args.extend(["--leader-election", "--leader-election-lease-seconds", "5"].map(String::from));
        names.push("b");
    }
    let env = proxy
        .as_ref()
        .map(|p| vec![("AWS_ENDPOINT_URL_EC2".to_string(), p.url.clone())])
        .unwrap_or_default();
    let mut ops = Operators::start(bench, &names, args, env).await?;
    for (_, op) in &ops.live {
        op.wait_ready(Duration::from_secs(60)).await?;
    }
    let (pods, pod_task) = PodLog::start(bench.pods.clone());

    let plan = workload(n);
    for p in &plan {
        let t = if p.from_catalog { &from_catalog } else { &template };
        bench
            .create(&bench.bake("faults", &p.name, t, &p.service, &p.version)?)
            .await?;
    }
    eprintln!("[faults] {n} Bakes created");

    // The faults strike while the workload runs: at moments spread over its expected length.
    // About 3 s a bake on the rig, four at a time (faults make it longer).
    let expected = Duration::from_secs((n as u64).div_ceil(4) * 3);
    let moments = |k: usize, rng: &mut Rng| -> Vec<Duration> {
        let mut m: Vec<Duration> = (0..k)
            .map(|_| expected.mul_f64(0.05 + 0.65 * rng.unit()))
            .collect();
        m.sort();
        m
    };
    let kills = match size {
        Size::Full => 20,
        Size::Small => 4,
    };
    let schedule: Vec<(Duration, &str)> = match s {
        Scenario::Ec2Faults => Vec::new(),
        Scenario::OperatorKills => moments(kills, &mut rng)
            .into_iter()
            .map(|d| (d, "operator"))
            .collect(),
        Scenario::ApiserverRestarts => {
            let m = moments(3, &mut rng);
            vec![(m[0], "kube-apiserver"), (m[1], "etcd"), (m[2], "kube-apiserver")]
        }
        Scenario::NodeRestart => moments(1, &mut rng).into_iter().map(|d| (d, "node")).collect(),
        Scenario::PackerKills => moments(kills.min(n / 4), &mut rng)
            .into_iter()
            .map(|d| (d, "packer"))
            .collect(),
        Scenario::LeaderKill => moments(1, &mut rng).into_iter().map(|d| (d, "leader")).collect(),
    };
    let t0 = Instant::now();
    let mut deleted = BTreeSet::new();
    let planned = schedule.len();
    let mut pending = schedule;
    let mut applied = 0;
    let deadline = t0 + expected * 4 + Duration::from_secs(300);
    let mut said = Instant::now();
    loop {
        let Ok(bakes) = bench.bakes.list(&ListParams::default()).await else {
            // The API server may be restarting: the run goes on.
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        let running = |name: &str| {
            bakes.items.iter().any(|b| {
                (name.is_empty() || b.name_any() == name)
                    && b.status.as_ref().and_then(|s| s.phase) == Some(BakePhase::Running)
            })
        };
        // A fault that needs a running bake (a node or packer kill) waits for one.
        let now = t0.elapsed();
        let mut later = Vec::new();
        for (at, what) in std::mem::take(&mut pending) {
            if at > now || (matches!(what, "node" | "packer") && !running("")) {
                later.push((at, what));
                continue;
            }
            match what {
                "operator" => ops.kill_and_restart(bench, 0).await?,
                "leader" => {
                    let lease = Api::<Lease>::namespaced(client.clone(), &bench.ns)
                        .get_opt("baker")
                        .await?;
                    let holder = lease.and_then(|l| l.spec?.holder_identity).unwrap_or_default();
                    let i = ops.live.iter().position(|(n, _)| *n == holder).unwrap_or(0);
                    eprintln!("[faults] the leader is {holder:?}");
                    ops.kill_and_restart(bench, i).await?;
                }
                "packer" => {
                    if !kill_a_packer() {
                        later.push((at, what));
                        continue;
                    }
                }
                component => {
                    let signal = if component == "node" { "KILL" } else { "TERM" };
                    restart(rig, component, signal).await?;
                }
            }
            applied += 1;
        }
        pending = later;
        for p in plan.iter().filter(|p| p.delete) {
            if !deleted.contains(&p.name)
                && running(&p.name)
                && bench
                    .bakes
                    .delete(&p.name, &DeleteParams::default())
                    .await
                    .is_ok()
            {
                deleted.insert(p.name.clone());
            }
        }
        let unfinished: Vec<&Bake> = bakes.items.iter().filter(|b| !terminal(b)).collect();
        // Faults still waiting for a running bake once none is left cannot strike.
        if unfinished.is_empty()
            && pending
                .iter()
                .all(|(at, w)| *at <= now && matches!(*w, "node" | "packer"))
        {
            break;
        }
        if Instant::now() > deadline {
            break;
        }
        if said.elapsed() >= harness::PROGRESS {
            eprintln!(
                "[faults] {:.0?}: {} unfinished: {}",
                t0.elapsed(),
                unfinished.len(),
                support::bake::tally(&bakes.items)
            );
            said = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let bakes = bench.bakes.list(&ListParams::default()).await?.items;
    let mut finished = BTreeMap::new();
    for b in &bakes {
        let phase = b
            .status
            .as_ref()
            .and_then(|s| s.phase)
            .map_or("-", |p| p.as_str());
        let key = format!("{phase}/{}", ready_reason(b).unwrap_or_default());
        *finished.entry(key).or_insert(0) += 1;
    }
    let gone = n - bakes.len();
    if gone > 0 {
        finished.insert("Deleted".into(), gone);
    }
    let stuck = bakes
        .iter()
        .filter(|b| !terminal(b))
        .map(|b| format!("{} ({})", b.name_any(), ready_reason(b).unwrap_or_default()))
        .collect();
    // Cleanup of failed and deleted Bakes is the operator's, and takes a moment: leaks are what
    // is left once it had 120 s.
    let live: BTreeSet<String> = bakes
        .iter()
        .filter(|b| !terminal(b))
        .filter_map(|b| b.uid())
        .collect();
    let leak_deadline = Instant::now() + Duration::from_secs(120);
    let leaked = loop {
        let leaked = leaked_resources(&rig.ec2(), &live).await?;
        if leaked.is_empty() || Instant::now() > leak_deadline {
            break leaked;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    let (duplicate_amis, listed) = duplicate_amis(&rig.ec2()).await?;
    let lost_amis = bakes
        .iter()
        .filter_map(|b| b.status.as_ref()?.ami_id.clone())
        .filter(|id| !listed.contains(id))
        .count();
    let errors = ops.finish().await;
    pod_task.abort();
    let faults = match &proxy {
        Some(p) => {
            let (requests, faults) = p.counts();
            let total: u64 = requests.values().sum();
            let mut by_kind = BTreeMap::<&str, u64>::new();
            for ((_, f), c) in &faults {
                *by_kind.entry(f.name()).or_default() += c;
            }
            let kinds: Vec<String> = by_kind.iter().map(|(k, v)| format!("{k} {v}")).collect();
            format!(
                "{} of {total} EC2 requests ({})",
                faults.values().sum::<u64>(),
                kinds.join(", ")
            )
        }
        None => format!("{applied} of {planned} struck ({})", s.what()),
    };
    let outcome = Outcome {
        scenario: format!("{s:?}"),
        bakes: n,
        finished,
        duplicate_amis,
        lost_amis,
        packer_twice: pods.twice(),
        leaked,
        stuck,
        errors,
        faults,
        seconds: 0.0,
    };
    Ok(outcome)
}

fn terminal(b: &Bake) -> bool {
    matches!(
        b.status.as_ref().and_then(|s| s.phase),
        Some(BakePhase::Succeeded | BakePhase::Failed)
    ) && b.metadata.deletion_timestamp.is_none()
}

/// SIGKILLs one `packer build` process on this machine (bake pods run as host processes on the
/// rig's node); whether it found one.
fn kill_a_packer() -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_packer = args.first().is_some_and(|a| a.ends_with(b"packer"));
        if is_packer && args.iter().any(|a| *a == b"build") {
            eprintln!("[faults] SIGKILL packer (pid {pid})");
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            return true;
        }
    }
    false
}

/// EC2 resources tagged with a Bake's UID that is not among `live`: instances not terminated,
/// volumes, security groups and key pairs.
async fn leaked_resources(ec2: &aws_sdk_ec2::Client, live: &BTreeSet<String>) -> Result<Vec<String>> {
    use aws_sdk_ec2::types::Filter;
    let tagged = || Filter::builder().name("tag-key").values(keys::BAKE_UID).build();
    let uid_of = |tags: &[aws_sdk_ec2::types::Tag]| {
        tags.iter()
            .find(|t| t.key() == Some(keys::BAKE_UID))
            .and_then(|t| t.value())
            .unwrap_or_default()
            .to_string()
    };
    let mut leaked = Vec::new();
    let reservations = ec2.describe_instances().filters(tagged()).send().await?;
    for i in reservations.reservations().iter().flat_map(|r| r.instances()) {
        let state = i
            .state()
            .and_then(|s| s.name())
            .map(|n| n.as_str().to_string())
            .unwrap_or_default();
        if state != "terminated" && state != "shutting-down" && !live.contains(&uid_of(i.tags())) {
            leaked.push(format!(
                "instance {} ({state})",
                i.instance_id().unwrap_or_default()
            ));
        }
    }
    for v in ec2.describe_volumes().filters(tagged()).send().await?.volumes() {
        if !live.contains(&uid_of(v.tags())) {
            leaked.push(format!("volume {}", v.volume_id().unwrap_or_default()));
        }
    }
    for g in ec2
        .describe_security_groups()
        .filters(tagged())
        .send()
        .await?
        .security_groups()
    {
        if !live.contains(&uid_of(g.tags())) {
            leaked.push(format!("security group {}", g.group_id().unwrap_or_default()));
        }
    }
    for k in ec2
        .describe_key_pairs()
        .filters(tagged())
        .send()
        .await?
        .key_pairs()
    {
        if !live.contains(&uid_of(k.tags())) {
            leaked.push(format!("key pair {}", k.key_name().unwrap_or_default()));
        }
    }
    Ok(leaked)
}

/// Images beyond the first for one bake key, and the ids of every image Baker tagged.
async fn duplicate_amis(ec2: &aws_sdk_ec2::Client) -> Result<(usize, BTreeSet<String>)> {
    use aws_sdk_ec2::types::Filter;
    let images = ec2
        .describe_images()
        .owners("self")
        .filters(Filter::builder().name("tag-key").values(keys::BAKE_KEY).build())
        .send()
        .await?;
    let mut per_key = BTreeMap::<String, usize>::new();
    let ids = images
        .images()
        .iter()
        .filter_map(|i| i.image_id().map(String::from))
        .collect();
    for i in images.images() {
        if let Some(k) = i
            .tags()
            .iter()
            .find(|t| t.key() == Some(keys::BAKE_KEY))
            .and_then(|t| t.value())
        {
            *per_key.entry(k.to_string()).or_default() += 1;
        }
    }
    Ok((per_key.values().map(|c| c.saturating_sub(1)).sum(), ids))
}

fn line(o: &Outcome) -> String {
    format!(
        "finished {:?}; duplicate AMIs {}; lost AMIs {}; packer twice {}; leaked {}; stuck {}; errors {:?}; {:.0} s",
        o.finished,
        o.duplicate_amis,
        o.lost_amis,
        o.packer_twice,
        o.leaked.len(),
        o.stuck.len(),
        o.errors,
        o.seconds
    )
}

fn table(outcomes: &[Outcome]) -> String {
    let mut out = String::from(
        "| scenario | faults | Bakes finished, by phase/reason | duplicate AMIs | lost AMIs | packer twice | leaked EC2 | stuck | operator errors | time |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for o in outcomes {
        let finished: Vec<String> = o.finished.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let errors: Vec<String> = o.errors.iter().map(|(k, v)| format!("{k} {v}")).collect();
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} s |\n",
            o.scenario,
            o.faults,
            finished.join(", "),
            o.duplicate_amis,
            o.lost_amis,
            o.packer_twice,
            if o.leaked.is_empty() {
                "0".to_string()
            } else {
                format!("{}: {}", o.leaked.len(), o.leaked.join(", "))
            },
            if o.stuck.is_empty() {
                "0".to_string()
            } else {
                format!("{}: {}", o.stuck.len(), o.stuck.join(", "))
            },
            if errors.is_empty() {
                "-".to_string()
            } else {
                errors.join(", ")
            },
            o.seconds
        ));
    }
    out
}
