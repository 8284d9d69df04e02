//! baker-rig-node: a kubelet test double for the Baker test rig. It
//! registers one Node and runs the pods bound to it as host processes.
//!
//! - [`node`]: Node registration, Lease and status heartbeats.
//! - [`pods`]: the pod watch; [`worker`]: one pod's life (volumes, env,
//!   spawn, deadline, deletion, status).
//! - [`spawn`]: a container process in its own session and private mount
//!   namespace with bind mounts and credentials.
//! - [`server`] and [`logs`]: the kubelet endpoint for `kubectl logs`.
//! - Pure parts: [`expand`] (`$(VAR)`), [`envvars`], [`termination`],
//!   [`status`], [`unsupported`].
//!
//! Spec fields the rig ignores are reported as Warning events with reason
//! `Unsupported` (see [`unsupported`]).

pub mod cli;
pub mod context;
pub mod envvars;
pub mod events;
pub mod expand;
pub mod logs;
pub mod node;
pub mod objects;
pub mod pods;
pub mod retry;
pub mod server;
pub mod spawn;
pub mod status;
pub mod termination;
pub mod unsupported;
pub mod volumes;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::signal::unix::{SignalKind, signal};

use crate::cli::Args;
use crate::context::{NodeContext, ProcessGroups, pods_root};
use crate::events::Recorder;
use crate::logs::LogRegistry;
use crate::node::NodeConfig;

/// Upper bound of the grace period containers get when the node itself
/// stops (each gets its pod's `terminationGracePeriodSeconds` up to this).
const SHUTDOWN_GRACE_CAP: Duration = Duration::from_secs(10);

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// Runs the node until SIGTERM/SIGINT.
pub async fn run(args: Args) -> anyhow::Result<()> {
    if !args.listen.ip().is_loopback() {
        bail!("--listen must be a loopback address, got {}", args.listen);
    }
    // Both the kube client and the endpoint use rustls; pin one provider.
    let _ = tokio_rustls::rustls::crypto::aws_lc_rs::default_provider().install_default();

    std::fs::create_dir_all(pods_root(&args.state_dir))
        .with_context(|| format!("creating {}", args.state_dir.display()))?;
    // Mount sources must be absolute paths.
    let state_dir = std::fs::canonicalize(&args.state_dir)?;

    let kubeconfig = Kubeconfig::read_from(&args.kubeconfig)
        .with_context(|| format!("reading {}", args.kubeconfig.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .context("loading kubeconfig")?;
    let api_host = config
        .cluster_url
        .host()
        .unwrap_or("127.0.0.1")
        .trim_matches(|c| c == '[' || c == ']')
        .to_string();
    let api_port = config.cluster_url.port_u16().unwrap_or(443);
    let client = Client::try_from(config).context("building the Kubernetes client")?;

    let tls = server::tls_config(&args.tls_cert, &args.tls_key)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let port = listener.local_addr()?.port();

    // Containers of a node process that was killed are still running: kill them before this
    // process marks their pods NodeRestarted.
    let record = state_dir.join("process-groups");
    let killed = ProcessGroups::kill_recorded(&record);
    if killed > 0 {
        tracing::warn!(
            groups = killed,
            "killed the containers a previous node process left running"
        );
    }
    let logs = LogRegistry::default();
    let ctx = Arc::new(NodeContext {
        client: client.clone(),
        node_name: args.node_name.clone(),
        state_dir,
        logs: logs.clone(),
        recorder: Recorder::new(client.clone(), args.node_name.clone()),
        service_env: envvars::kubernetes_service_env(&api_host, api_port),
        host_path: std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
        groups: ProcessGroups::recorded(record),
        shutting_down: Default::default(),
    });
    tracing::info!(node = %args.node_name, %port, "kubelet endpoint listening");
    tokio::spawn(server::serve(listener, tls, logs));

    let node_cfg = NodeConfig {
        name: args.node_name.clone(),
        kubelet_port: port,
    };
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let node = tokio::select! {
        n = node::register(&client, &node_cfg) => n,
        s = &mut shutdown => return s,
    };
    tokio::spawn(node::heartbeat(client.clone(), node_cfg, node));
    tokio::spawn(pods::run(ctx.clone()));

    shutdown.await?;
    tracing::info!("shutting down: stopping every container");
    ctx.begin_shutdown();
    ctx.groups.terminate_all(SHUTDOWN_GRACE_CAP).await;
    tracing::info!("all containers stopped");
    Ok(())
}
