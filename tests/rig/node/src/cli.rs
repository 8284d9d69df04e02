//! Command line.

use std::net::SocketAddr;
use std::path::PathBuf;

/// A kubelet test double: registers one Node and runs the pods bound to it
/// as host processes.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "baker-rig-node", version)]
pub struct Args {
    /// Kubeconfig of the rig's apiserver.
    #[arg(long)]
    pub kubeconfig: PathBuf,
    /// Name of the Node to register.
    #[arg(long)]
    pub node_name: String,
    /// Loopback address of the kubelet HTTPS endpoint (for `kubectl logs`).
    #[arg(long)]
    pub listen: SocketAddr,
    /// PEM certificate for the endpoint.
    #[arg(long)]
    pub tls_cert: PathBuf,
    /// PEM (PKCS#8) private key for the endpoint.
    #[arg(long)]
    pub tls_key: PathBuf,
    /// Directory for per-pod files (volumes, logs, termination messages).
    #[arg(long)]
    pub state_dir: PathBuf,
}
