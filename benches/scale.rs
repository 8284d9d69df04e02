//! Baker's scale benchmark against the local rig: `make bench` (full size, release operator) and
//! `make bench-ci` (small size, debug operator, deterministic counts asserted).
//!
//! Each run makes its own namespace `bench-<random>`, runs every operator namespace-scoped in it,
//! and prints one table (figure | measured | goal | met?); `target/bench/report.json` keeps every
//! figure with its samples. Times are only reported. In the small size the counts that do not
//! depend on the machine (API writes on restart, LISTs per kind, writes per Bake, writes to queued
//! Bakes, per-image EC2 calls) fail the run when they miss their goal.
//!
//! Run without `--size` (as `cargo test --benches` would), it does nothing: it needs the rig.

#[path = "scale/harness.rs"]
mod harness;
#[path = "scale/phases.rs"]
mod phases;
#[path = "scale/report.rs"]
mod report;
// The e2e tests' helpers (with `bake`, `ship` and `render` under it); the bench uses part of them.
#[path = "../tests/e2e/support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use serde_json::json;

use harness::Bench;
use phases::Sizes;
use report::{Figure, mib, thousands};

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Size {
    /// B=10,000 Bakes, L=100 launches, Q=1,000 queued, N=10 timed bakes.
    Full,
    /// B=500, L=20, Q=50, N=3: for CI; asserts the deterministic counts.
    Small,
}

#[derive(Parser, Debug)]
#[command(about = "Baker's scale benchmark against the local rig (see `make bench`)")]
struct Args {
    /// Which size to run. Without it nothing runs (`cargo test --benches` must not need a rig).
    #[arg(long, value_enum)]
    size: Option<Size>,
    /// Seconds `cargo build --bin baker` took for the operator under test, as `make` ran it.
    #[arg(long)]
    build_seconds: Option<f64>,
    /// Whether that build was cold (no `baker` binary of that profile before it).
    #[arg(long)]
    build_cold: Option<bool>,
    /// The cargo profile the operator was built with.
    #[arg(long, default_value = "unknown")]
    build_profile: String,
    /// Where the binary under test was built, if `BAKER_BIN` is a copy of it.
    #[arg(long)]
    built_at: Option<String>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
    /// Filters passed by `cargo bench`/`cargo test`; ignored.
    #[arg(hide = true)]
    filters: Vec<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let Some(size) = args.size else {
        eprintln!(
            "benches/scale: nothing to do without --size full|small (run `make bench` or `make bench-ci`)"
        );
        return ExitCode::SUCCESS;
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&args, size)) {
        Ok(failures) if failures.is_empty() => ExitCode::SUCCESS,
        Ok(failures) => {
            eprintln!("\nbench FAILED: deterministic counts missed their goals:");
            for f in failures {
                eprintln!("  - {f}");
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("\nbench FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn sizes(size: Size) -> Sizes {
    let budget = |default: u64| {
        let secs = std::env::var("BAKER_BENCH_QUEUE_BUDGET_SECONDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default);
        std::time::Duration::from_secs(secs)
    };
    match size {
        Size::Full => Sizes {
            n: 10,
            b: 10_000,
            l: 100,
            q: 1_000,
            small: false,
            queue_budget: budget(20 * 60),
        },
        Size::Small => Sizes {
            n: 3,
            b: 500,
            l: 20,
            q: 50,
            small: true,
            queue_budget: budget(10 * 60),
        },
    }
}

/// The rig, its API server, moto, packer, the node and the binary under test, each checked with
/// a message saying what to do when it is missing.
async fn preflight() -> Result<(&'static support::Rig, kube::Client, serde_json::Value)> {
    let state = support::Rig::state_dir();
    if !state.join("env").is_file() || !state.join("kubeconfig").is_file() {
        bail!(
            "the rig is not up (no env or kubeconfig in {}): run `make rig-up`, or use `make bench` / `make bench-ci`, which bring it up",
            state.display()
        );
    }
    let rig = support::rig();
    let client = rig.client().await?;
    let packer = support::run({
        let mut c = rig.command("packer");
        c.arg("version");
        c
    })
    .await
    .context("packer is not installed: `tests/rig/rig.sh up` installs it (Debian's packer package)")?;
    if !packer.success() {
        bail!("`packer version` failed: {}{}", packer.stdout, packer.stderr);
    }
    let images = rig
        .ec2()
        .describe_images()
        .owners("self")
        .send()
        .await
        .with_context(|| {
            format!(
                "moto's EC2 endpoint {} does not answer: the rig is half up (`make rig-up` repairs it)",
                rig.ec2_endpoint()
            )
        })?
        .images()
        .len();
    let node = Api::<Node>::all(client.clone())
        .get(rig.node_name())
        .await
        .with_context(|| {
            format!(
                "the rig's node {} is not registered: run `make rig-up`",
                rig.node_name()
            )
        })?;
    let ready = node
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    if !ready {
        bail!(
            "the rig's node {} is not Ready: run `make rig-up`",
            rig.node_name()
        );
    }
    let bin = support::bake::baker_bin();
    if !bin.is_file() {
        bail!(
            "the operator binary {} does not exist (set BAKER_BIN, or run `make bench`)",
            bin.display()
        );
    }
    // Another operator watching every namespace would act on the bench's Bakes too.
    let others = cluster_wide_operators();
    if !others.is_empty() {
        eprintln!(
            "warning: operators watching every namespace are running (pids {others:?}); they act on the bench's Bakes and skew its figures"
        );
    }
    let env = json!({
        "packer": packer.stdout.lines().next().unwrap_or_default(),
        "images_in_moto_at_start": images,
        "cluster_wide_operators": others,
    });
    Ok((rig, client, env))
}

/// Pids of `baker run` processes without `--namespace`.
fn cluster_wide_operators() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let is_baker = args.first()?.rsplit('/').next()? == "baker" && args.get(1)? == "run";
            (is_baker
                && !args
                    .iter()
                    .any(|a| a == "--namespace" || a.starts_with("--namespace=")))
            .then_some(pid)
        })
        .collect()
}

async fn run(args: &Args, size: Size) -> Result<Vec<String>> {
    let sizes = sizes(size);
    let started = Instant::now();
    let timestamp = jiff::Timestamp::now();
    let (rig, client, env) = preflight().await?;
    let bin = support::bake::baker_bin();
    eprintln!(
        "bench ({size:?}): N={} B={} L={} Q={}, operator {}",
        sizes.n,
        thousands(sizes.b as u64),
        sizes.l,
        thousands(sizes.q as u64),
        bin.display()
    );
    let mut figures = Vec::new();
    binary_figures(args, &bin, &mut figures)?;

    let bench = Bench::setup(rig, client).await?;
    eprintln!("bench namespace: {}", bench.ns);
    // Interrupted, it still stops its operators, tears down and reports what it measured.
    let result = tokio::select! {
        r = phases(&bench, &sizes, &mut figures) => r,
        s = interrupted() => Err(anyhow::anyhow!("interrupted by {s}")),
    };
    let ns = bench.ns.clone();
    let teardown = bench.teardown().await;

    println!("\n{}", report::table(&figures));
    let failures: Vec<String> = figures
        .iter()
        .filter(|f| f.failed_assertion())
        .map(|f| format!("{}: measured {}, goal {}", f.name, f.shown, f.goal))
        .collect();
    // Relative to where `make` runs it (the checkout's root): the binary may have been built in
    // another checkout sharing the target dir, so its compile-time paths are not evidence.
    let path = Path::new("target/bench/report.json");
    let mut extra = serde_json::Map::new();
    extra.insert("timestamp".into(), json!(timestamp.to_string()));
    extra.insert("size".into(), json!(format!("{size:?}").to_lowercase()));
    extra.insert(
        "sizes".into(),
        json!({ "N": sizes.n, "B": sizes.b, "L": sizes.l, "Q": sizes.q }),
    );
    extra.insert("machine".into(), report::machine());
    extra.insert("rig".into(), env);
    extra.insert("namespace".into(), json!(ns));
    extra.insert("operator_binary".into(), json!(bin.display().to_string()));
    extra.insert("seconds".into(), json!(started.elapsed().as_secs_f64()));
    extra.insert("complete".into(), json!(result.is_ok()));
    if let Err(e) = &result {
        extra.insert("error".into(), json!(format!("{e:#}")));
    }
    extra.insert("failed_assertions".into(), json!(failures));
    report::write_json(path, &figures, extra)?;
    eprintln!(
        "report: {} ({:.0} s in all)",
        path.display(),
        started.elapsed().as_secs_f64()
    );
    result?;
    teardown.context("tearing down the bench namespace")?;
    Ok(failures)
}

async fn phases(bench: &Bench, sizes: &Sizes, figures: &mut Vec<Figure>) -> Result<()> {
    eprintln!("\n== 1. bake overhead against a bare packer build");
    let origin = phases::overhead(bench, sizes, figures).await?;
    eprintln!("\n== populating B={} finished Bakes", thousands(sizes.b as u64));
    phases::populate(bench, sizes, &origin).await?;
    eprintln!("\n== 3./4. memory when idle, restart");
    let op = phases::restart(bench, sizes, figures).await?;
    eprintln!("\n== 2./3. launches with B present, memory after");
    phases::launches(bench, sizes, op, figures).await?;
    eprintln!("\n== 7. leader takeover");
    phases::takeover(bench, sizes, figures).await?;
    eprintln!(
        "\n== 5./6. queue of Q={} with a cap of 10",
        thousands(sizes.q as u64)
    );
    let op = phases::queue(bench, sizes, figures).await?;
    eprintln!("\n== 6. catalog sync");
    phases::catalog(bench, sizes, op, figures).await?;
    Ok(())
}

/// The first SIGINT or SIGTERM.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = tokio::signal::ctrl_c() => "SIGINT",
        },
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}

/// Phase 8: the operator binary's size and how long `make` took to build it.
fn binary_figures(args: &Args, bin: &Path, figures: &mut Vec<Figure>) -> Result<()> {
    let bytes = std::fs::metadata(bin)
        .with_context(|| format!("reading the size of {}", bin.display()))?
        .len();
    figures.push(
        Figure::new(
            "binary_bytes",
            format!("8. {} baker binary size", args.build_profile),
        )
        .value(
            bytes as f64,
            "bytes",
            format!("{} bytes ({:.1} MiB)", thousands(bytes), mib(bytes)),
        )
        .details(json!({ "path": args.built_at.clone().unwrap_or_else(|| bin.display().to_string()) })),
    );
    let build = match (args.build_seconds, args.build_cold) {
        (Some(s), cold) => Figure::new(
            "build_seconds",
            format!("8. cargo build --bin baker ({})", args.build_profile),
        )
        .value(
            s,
            "s",
            format!(
                "{s:.1} s ({})",
                match cold {
                    Some(true) => "cold: no binary before",
                    Some(false) => "warm: binary existed",
                    None => "cold or warm: unknown",
                }
            ),
        )
        .details(json!({ "cold": cold })),
        (None, _) => Figure::new("build_seconds", "8. cargo build --bin baker")
            .shown("not measured (run through make bench)"),
    };
    figures.push(build);
    Ok(())
}
