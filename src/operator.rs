//! `baker run`: the HTTP server, leader election and the Bake controller, wired together.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use tracing::{error, info};

use crate::aws::Ec2;
use crate::bake::controller::{self, Context};
use crate::bake::watch::Caches;
use crate::config::OperatorConfig;
use crate::http::{self, Health, Role};
use crate::leader::{self, LeaderElector, LeaderError};
use crate::metrics::Metrics;
use crate::seed;

/// Settings of the process around the controllers: HTTP and leader election.
#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct ServeConfig {
    /// Address of the HTTP server (`/healthz`, `/readyz`, `/metrics`). Empty: no server.
    #[arg(long, env = "BAKER_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: String,

    /// Reconcile only while holding a Lease, so that of several replicas exactly one works.
    #[arg(long, env = "BAKER_LEADER_ELECTION")]
    pub leader_election: bool,

    /// Name of the Lease.
    #[arg(long, env = "BAKER_LEADER_ELECTION_NAME", default_value = "baker")]
    pub leader_election_name: String,

    /// Namespace of the Lease. Unset: the pod's namespace (`POD_NAMESPACE`), else the watched
    /// namespace, else `default`.
    #[arg(long, env = "BAKER_LEADER_ELECTION_NAMESPACE")]
    pub leader_election_namespace: Option<String>,

    /// Seconds a standby waits, seeing the Lease unrenewed, before it takes over.
    #[arg(long, env = "BAKER_LEADER_ELECTION_LEASE_SECONDS", default_value_t = 15)]
    pub leader_election_lease_seconds: u64,

    /// Serve the seed's HTTP API (`/ping`, `/healthcheck`, `/status`, `/amis`, `POST /bake/...`)
    /// on the HTTP server.
    #[arg(long, env = "BAKER_SEED_API")]
    pub seed_api: bool,

    /// File holding the bearer token `POST /bake` requires (the chart mounts a Secret there).
    #[arg(long, env = "BAKER_SEED_API_TOKEN_FILE")]
    pub seed_api_token_file: Option<std::path::PathBuf>,

    /// Serve the image listings (`GET /amis`, `GET /amis/{service}`) without the bearer token.
    #[arg(long, env = "BAKER_SEED_API_PUBLIC_READS")]
    pub seed_api_public_reads: bool,

    /// Namespace where `POST /bake` creates Bakes. Unset: the watched namespace, else the first of
    /// `--bake-namespaces`, else `default`.
    #[arg(long, env = "BAKER_SEED_API_NAMESPACE")]
    pub seed_api_namespace: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("invalid --http-addr {addr:?}: {source}")]
    HttpAddr {
        addr: String,
        source: std::net::AddrParseError,
    },
    #[error("the HTTP server failed: {0}")]
    Http(#[source] std::io::Error),
    #[error(transparent)]
    Leader(#[from] LeaderError),
    #[error("--seed-api needs --seed-api-token-file: writes require a bearer token")]
    NoSeedToken,
    #[error("cannot read the seed API token file {path}: {source}")]
    SeedToken {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// The Kubernetes client the operator uses: the inferred configuration (in-cluster, or the
/// kubeconfig), with every request counted in `baker_kube_requests_total`.
pub async fn client(metrics: Arc<Metrics>) -> Result<kube::Client, ClientError> {
    let config = kube::Config::infer().await?;
    let count = tower::util::MapRequestLayer::new(move |request: ::http::Request<kube::client::Body>| {
        metrics.kube_request(request.method(), request.uri());
        request
    });
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&count)
        .build())
}

/// Why the Kubernetes client could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot find a Kubernetes configuration (in-cluster or kubeconfig): {0}")]
    Config(#[from] kube::config::InferConfigError),
    #[error("cannot build the Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Runs the operator until a shutdown signal, or until it loses the leader lease (an error: the
/// process exits and Kubernetes restarts it as a standby).
pub async fn run(
    client: kube::Client,
    aws: aws_config::SdkConfig,
    metrics: Arc<Metrics>,
    config: OperatorConfig,
    serve: ServeConfig,
) -> Result<(), OperatorError> {
    let health = Arc::new(Health::new(metrics.clone()));
    let ec2 = || Ec2::new(aws.clone()).with_metrics(metrics.clone());
    let catalogs = Arc::new(crate::catalog::controller::Context::new(
        client.clone(),
        ec2(),
        &config,
        metrics.clone(),
    ));
    let server = if serve.http_addr.is_empty() {
        None
    } else {
        let addr: SocketAddr = serve
            .http_addr
            .parse()
            .map_err(|source| OperatorError::HttpAddr {
                addr: serve.http_addr.clone(),
                source,
            })?;
        let mut router = http::router(health.clone());
        if serve.seed_api {
            let path = serve
                .seed_api_token_file
                .clone()
                .ok_or(OperatorError::NoSeedToken)?;
            let token = seed::TokenFile::open(path.clone())
                .map_err(|source| OperatorError::SeedToken { path, source })?
                .ok_or(OperatorError::NoSeedToken)?;
            let namespace = serve
                .seed_api_namespace
                .clone()
                .or_else(|| config.watch_namespace.clone())
                .or_else(|| config.bake_namespaces.first().cloned())
                .unwrap_or_else(|| "default".into());
            info!(namespace = %namespace, "serving the seed's HTTP API");
            router = router.merge(seed::router(Arc::new(seed::SeedState {
                client: client.clone(),
                namespace,
                token,
                public_reads: serve.seed_api_public_reads,
                health: health.clone(),
            })));
        }
        Some(tokio::spawn(http::serve(addr, router)))
    };
    let server_failed = async move {
        match server {
            Some(handle) => match handle.await {
                Ok(Err(e)) => OperatorError::Http(e),
                _ => OperatorError::Http(std::io::Error::other("the HTTP server stopped")),
            },
            None => std::future::pending().await,
        }
    };

    let watch_namespace = config.watch_namespace.clone();
    let caches = Caches::new();
    let ctx = Arc::new(Context::new(
        client.clone(),
        ec2(),
        config,
        caches.stores(),
        health.clone(),
    ));
    // The caches fill from the start, on a standby too: one that takes over has them warm.
    let cached = caches.run(client.clone(), watch_namespace.as_deref(), health.clone());
    tokio::pin!(cached, server_failed);

    if !serve.leader_election {
        health.set_role(Role::Single);
        return tokio::select! {
            _ = run_controllers(&aws, ctx, catalogs, &caches) => Ok(()),
            _ = &mut cached => Ok(()),
            e = &mut server_failed => Err(e),
        };
    }

    let namespace = serve
        .leader_election_namespace
        .clone()
        .or_else(|| std::env::var("POD_NAMESPACE").ok().filter(|s| !s.is_empty()))
        .or_else(|| watch_namespace.clone())
        .unwrap_or_else(|| "default".into());
    let mut elector = LeaderElector::new(
        client,
        &namespace,
        &serve.leader_election_name,
        leader::default_identity(),
        Duration::from_secs(serve.leader_election_lease_seconds.max(1)),
    );
    health.set_role(Role::Undecided);
    info!(lease = %serve.leader_election_name, namespace = %namespace, identity = %elector.identity(), "leader election on");
    tokio::select! {
        _ = elector.acquire(&health) => {}
        _ = shutdown_signal() => return Ok(()),
        _ = &mut cached => return Ok(()),
        e = &mut server_failed => return Err(e),
    }
    info!(identity = %elector.identity(), "leading: starting the controllers");
    tokio::select! {
        _ = run_controllers(&aws, ctx, catalogs, &caches) => {
            elector.release().await;
            Ok(())
        }
        lost = elector.keep() => {
            error!(error = %lost, "stopping: lost the leader lease");
            Err(lost.into())
        }
        _ = &mut cached => Ok(()),
        e = &mut server_failed => Err(e),
    }
}

/// The controllers in one process, on the process's shared caches (already running, or about
/// to); each stops on the shutdown signal.
async fn run_controllers(
    aws: &aws_config::SdkConfig,
    bakes: Arc<Context>,
    catalogs: Arc<crate::catalog::controller::Context>,
    caches: &Caches,
) {
    let schedules = Arc::new(crate::schedule::controller::Context::new(
        bakes.client.clone(),
        bakes.health.metrics.clone(),
        caches.stores(),
        bakes.config.schedule_min_interval_seconds,
    ));
    let schedule_controller = crate::schedule::controller::run(schedules, caches);
    let channels = Arc::new(crate::channel::controller::Context {
        client: bakes.client.clone(),
        recorder: crate::k8s::recorder(&bakes.client),
        metrics: bakes.health.metrics.clone(),
        stores: caches.stores(),
        ec2: Ec2::new(aws.clone()).with_metrics(bakes.health.metrics.clone()),
        ssm: crate::channel::publish::Ssm::new(aws.clone(), bakes.health.metrics.clone()),
        ssm_prefix: bakes.config.channel_ssm_prefix.clone(),
        check_interval: Duration::from_secs(bakes.config.channel_check_seconds.max(1)),
    });
    let channel_controller = crate::channel::controller::run(channels, caches);
    let bake_controller = controller::run(bakes, caches);
    let catalog_controller = crate::catalog::controller::run(catalogs, caches);
    tokio::join!(
        bake_controller,
        catalog_controller,
        schedule_controller,
        channel_controller
    );
}
