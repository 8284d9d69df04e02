//! Operator configuration: flags with environment fallbacks, so the Helm chart can set either.

use clap::{Args, ValueEnum};

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

    /// Which earlier images a Bake may reuse instead of baking: `namespace` (default) only images
    /// baked for Bakes of its own namespace; `cluster` those of any namespace. Either way the
    /// image must carry the Bake's key in its own `baker.io/bake-key` tag.
    #[arg(long, env = "BAKER_REUSE_SCOPE", value_enum, default_value_t = Scope::Namespace)]
    pub reuse_scope: Scope,

    /// Which images an AmiCatalog's retention may remove: `namespace` (default) only images Baker
    /// baked for Bakes of the catalog's own namespace; `cluster` images Baker baked for any
    /// namespace. Images Baker did not bake are never removed.
    #[arg(long, env = "BAKER_RETENTION_SCOPE", value_enum, default_value_t = Scope::Namespace)]
    pub retention_scope: Scope,

    /// Most images one catalog sync removes; the rest wait for the next sync (and show in
    /// `status.retention.deferred`).
    #[arg(long, env = "BAKER_RETENTION_MAX_REMOVALS", default_value_t = 5)]
    pub retention_max_removals: usize,

    /// Most images one catalog sync reads from EC2; a query that matches more is cut there (newest
    /// first within what was read) and says so in its `Ready` message, and its retention pauses.
    #[arg(long, env = "BAKER_CATALOG_MAX_IMAGES", default_value_t = 2000)]
    pub catalog_max_images: usize,

    /// Attempts at creating a bake pod (or its ConfigMap) that the API server refuses (a
    /// ResourceQuota, Pod Security admission, a webhook) before the Bake fails with reason
    /// `PodRejected`.
    #[arg(long, env = "BAKER_POD_CREATE_ATTEMPTS", default_value_t = 3)]
    pub pod_create_attempts: u32,

    /// Seconds between the operator's checks of a distributed image and its copies in EC2
    /// (within the template's `distribution.maintainDays`): a copy deleted or a permission
    /// removed by hand is put back at the next check. Each check reads two or three EC2 calls per
    /// region.
    #[arg(long, env = "BAKER_DISTRIBUTION_CHECK_SECONDS", default_value_t = 3600)]
    pub distribution_check_seconds: u64,

    /// The fewest seconds between two Bakes of one BakeSchedule, whatever its
    /// `minIntervalSeconds` says: a tenant's schedule cannot make Bakes faster than this.
    #[arg(long, env = "BAKER_SCHEDULE_MIN_INTERVAL_SECONDS", default_value_t = 60)]
    pub schedule_min_interval_seconds: i64,

    /// The SSM path under which a namespace's AmiChannels may publish parameters:
    /// `{namespace}` stands for the channel's namespace. It must start and end with `/` and
    /// contain `{namespace}`, so that no namespace can write another's parameters.
    #[arg(long, env = "BAKER_CHANNEL_SSM_PREFIX", default_value = DEFAULT_SSM_PREFIX, value_parser = ssm_prefix)]
    pub channel_ssm_prefix: String,

    /// Seconds between the operator's checks that an AmiChannel's SSM parameters and launch
    /// templates still hold its image (one or two AWS reads per target); a changed channel is
    /// published at once.
    #[arg(long, env = "BAKER_CHANNEL_CHECK_SECONDS", default_value_t = 3600)]
    pub channel_check_seconds: u64,
}

/// The default of `--channel-ssm-prefix`.
pub const DEFAULT_SSM_PREFIX: &str = "/baker/{namespace}/";

/// Checks `--channel-ssm-prefix`.
fn ssm_prefix(value: &str) -> Result<String, String> {
    if !value.starts_with('/') || !value.ends_with('/') {
        return Err("the SSM prefix must start and end with '/'".into());
    }
    if !value.contains("{namespace}") {
        return Err("the SSM prefix must contain {namespace}: otherwise every namespace could write the same parameters".into());
    }
    Ok(value.to_string())
}

/// Whose objects a tenant-facing feature may act on.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Scope {
    /// Only the namespace the Bake or AmiCatalog is in.
    #[default]
    Namespace,
    /// Every namespace in the operator's scope: a cluster admin's choice.
    Cluster,
}

impl Scope {
    /// Whether an image made for a Bake of `image_namespace` is within reach of `namespace`.
    pub fn reaches(self, namespace: &str, image_namespace: Option<&str>) -> bool {
        match self {
            Scope::Cluster => true,
            Scope::Namespace => image_namespace == Some(namespace),
        }
    }
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
            reuse_scope: Scope::Namespace,
            retention_scope: Scope::Namespace,
            retention_max_removals: 5,
            catalog_max_images: 2000,
            pod_create_attempts: 3,
            distribution_check_seconds: 3600,
            schedule_min_interval_seconds: 60,
            channel_ssm_prefix: DEFAULT_SSM_PREFIX.to_string(),
            channel_check_seconds: 3600,
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

    #[test]
    fn namespace_scope_reaches_only_images_of_the_same_namespace() {
        assert!(Scope::Namespace.reaches("team-a", Some("team-a")));
        assert!(!Scope::Namespace.reaches("team-a", Some("team-b")));
        assert!(!Scope::Namespace.reaches("team-a", None));
        assert!(Scope::Cluster.reaches("team-a", Some("team-b")));
    }
}
