//! Operator configuration: flags with environment fallbacks, so the Helm chart can set either.

use clap::Args;

/// The bake image used when a template names none: Packer 1.6.6 ships the Amazon builders
/// built in and reads the JSON templates Baker renders.
pub const DEFAULT_PACKER_IMAGE: &str = "docker.io/hashicorp/packer:1.6.6";

/// Settings of the Bake controller.
#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct OperatorConfig {
    /// Container image for bake pods when the BakeTemplate names none.
    #[arg(long, env = "BAKER_PACKER_IMAGE", default_value = DEFAULT_PACKER_IMAGE)]
    pub packer_image: String,

    /// Name of a Secret in each Bake's namespace with `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY` (and optionally `AWS_SESSION_TOKEN`) for Packer. Unset: bake pods
    /// use the default AWS credential chain (IRSA, EKS Pod Identity, instance profile).
    #[arg(long, env = "BAKER_AWS_CREDENTIALS_SECRET")]
    pub aws_credentials_secret: Option<String>,

    /// ServiceAccount bake pods run as (for IRSA / EKS Pod Identity). Unset: the namespace's
    /// `default`.
    #[arg(long, env = "BAKER_BAKE_SERVICE_ACCOUNT")]
    pub bake_service_account: Option<String>,

    /// Seconds Packer gets to clean up (terminate its instance, delete its key pair and security
    /// group) when a bake pod is stopped.
    #[arg(long, env = "BAKER_BAKE_GRACE_SECONDS", default_value_t = 300)]
    pub bake_grace_seconds: i64,

    /// Seconds a bake pod may stay unstarted while the scheduler or the node reports why (no node
    /// fits, a missing Secret or ConfigMap, an image that cannot be pulled) before the pod is
    /// stopped and the Bake fails (`Unschedulable` or `PodStartFailed`). The reason shows in the
    /// Bake's message at once.
    #[arg(long, env = "BAKER_POD_START_TIMEOUT_SECONDS", default_value_t = 300)]
    pub pod_start_timeout_seconds: u64,

    /// Most bakes running at once, operator-wide; more wait in phase `Queued`, in creation order.
    #[arg(long, env = "BAKER_MAX_CONCURRENT_BAKES", default_value_t = 10)]
    pub max_concurrent_bakes: usize,

    /// Most bakes running at once in one namespace. Unset: only the operator-wide limit applies.
    #[arg(long, env = "BAKER_MAX_CONCURRENT_BAKES_PER_NAMESPACE")]
    pub max_concurrent_bakes_per_namespace: Option<usize>,

    /// Seconds a deleted Bake keeps trying to remove leftover EC2 resources (instances, security
    /// groups, key pairs, volumes) before it is released anyway, with a Warning Event naming what
    /// may have leaked.
    #[arg(long, env = "BAKER_CLEANUP_TIMEOUT_SECONDS", default_value_t = 300)]
    pub cleanup_timeout_seconds: i64,

    /// Watch Bakes in this namespace only (the operator then needs no cluster-wide rights on
    /// Bakes and pods). Unset: all namespaces.
    #[arg(long = "namespace", env = "BAKER_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,

    /// EC2 endpoint for the operator and the bake pods; normally unset. Read from the standard
    /// `AWS_ENDPOINT_URL_EC2` so a local EC2-compatible endpoint serves both.
    #[arg(long, env = "AWS_ENDPOINT_URL_EC2")]
    pub ec2_endpoint: Option<String>,

    /// Namespaces where bake pods (privileged, for packer's chroot builders) may run, comma
    /// separated. A Bake elsewhere fails with reason `NamespaceNotAllowed` and no pod is created.
    /// Unset: every namespace (the Helm chart always sets it).
    #[arg(long, env = "BAKER_BAKE_NAMESPACES", value_delimiter = ',')]
    pub bake_namespaces: Vec<String>,
}

impl OperatorConfig {
    /// Whether bake pods may run in `namespace`: an empty list allows every namespace.
    pub fn bake_namespace_allowed(&self, namespace: &str) -> bool {
        self.bake_namespaces.is_empty() || self.bake_namespaces.iter().any(|n| n == namespace)
    }
}

impl Default for OperatorConfig {
    fn default() -> Self {
        Self {
            packer_image: DEFAULT_PACKER_IMAGE.to_string(),
            aws_credentials_secret: None,
            bake_service_account: None,
            bake_grace_seconds: 300,
            pod_start_timeout_seconds: 300,
            max_concurrent_bakes: 10,
            max_concurrent_bakes_per_namespace: None,
            cleanup_timeout_seconds: 300,
            watch_namespace: None,
            ec2_endpoint: None,
            bake_namespaces: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_list_every_namespace_may_run_bake_pods() {
        assert!(OperatorConfig::default().bake_namespace_allowed("anything"));
    }

    #[test]
    fn with_a_list_only_its_namespaces_may_run_bake_pods() {
        let config = OperatorConfig {
            bake_namespaces: vec!["bakes".into(), "team-a".into()],
            ..Default::default()
        };
        assert!(config.bake_namespace_allowed("bakes"));
        assert!(config.bake_namespace_allowed("team-a"));
        assert!(!config.bake_namespace_allowed("kube-system"));
        assert!(!config.bake_namespace_allowed("bake"));
    }
}
