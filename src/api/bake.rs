//! `Bake`: one request to bake an AMI for a service version.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// A request to bake one AMI: a service at a version, with a virtualization type, using a
/// BakeTemplate. The operator runs `packer build` in a pod and writes the phase and the resulting
/// AMI id to the status. The spec cannot be changed after creation: to bake again, create a new
/// Bake.
// Repeated `type_ = ...` arguments of distinct `printcolumn`s are not duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "baker.io",
    version = "v1alpha1",
    kind = "Bake",
    namespaced,
    status = "BakeStatus",
    shortname = "bk",
    category = "baker",
    doc = "A request to bake one AMI for a service version with a BakeTemplate. The status carries the phase and the AMI id.",
    printcolumn(name = "Service", type_ = "string", json_path = ".spec.service"),
    printcolumn(name = "Version", type_ = "string", json_path = ".spec.version"),
    printcolumn(name = "Virt", type_ = "string", json_path = ".spec.virtualizationType"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "AMI", type_ = "string", json_path = ".status.amiId"),
    printcolumn(name = "Regions", type_ = "string", json_path = ".status.distribution.regions"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].reason"),
    printcolumn(name = "Message", type_ = "string", json_path = ".status.message", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = kube::core::Rule::new("size(self.metadata.name) <= 63").message("a Bake's name must be at most 63 characters (it names and labels the bake pod)")
)]
#[x_kube(validation = kube::core::Rule::new("self == oldSelf").message("spec is immutable: create a new Bake to bake again"))]
#[serde(rename_all = "camelCase")]
pub struct BakeSpec {
    /// Name of the BakeTemplate (cluster-scoped) to bake with, e.g. `ebs-example`.
    #[x_kube(validation = kube::core::Rule::new("self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')").message("template must name a BakeTemplate: lowercase letters, digits, '-' and '.'"))]
    #[schemars(length(min = 1, max = 253))]
    pub template: String,

    /// The service to bake, as a DNS-1123 label (lowercase letters, digits and '-'), e.g.
    /// `simple-service`. Provisioning steps see it as `BAKE_SERVICE`.
    #[x_kube(validation = kube::core::Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("service must be a DNS-1123 label: lowercase letters, digits and '-', starting and ending with a letter or digit"))]
    #[schemars(length(min = 1, max = 63))]
    pub service: String,

    /// The package version to bake, e.g. `1.0.4`: letters, digits, '.', '_', '+', '~' and '-',
    /// starting with a letter or digit. Provisioning steps see it as `BAKE_VERSION`.
    #[x_kube(validation = kube::core::Rule::new("self.matches('^[A-Za-z0-9][A-Za-z0-9._+~-]*$')").message("version must be a package version: letters, digits, '.', '_', '+', '~' and '-', starting with a letter or digit"))]
    #[schemars(length(min = 1, max = 64))]
    pub version: String,

    /// Virtualization type of the AMI: `hvm` or `paravirtual`.
    pub virtualization_type: VirtualizationType,

    /// Bake even if an identical image already exists. By default a Bake whose inputs (rendered
    /// template, source image, bake image) match an existing AMI, or a Bake already under way,
    /// reuses that AMI instead of running packer again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rebake: bool,

    /// Deregister the AMI (and delete its snapshots) when this Bake is deleted. Only an image this
    /// Bake made itself is removed, never one it reused. Default: the AMI outlives the Bake.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deregister_image_on_delete: bool,
}

/// EC2 virtualization type.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum VirtualizationType {
    Hvm,
    Paravirtual,
}

impl VirtualizationType {
    pub fn as_str(self) -> &'static str {
        match self {
            VirtualizationType::Hvm => "hvm",
            VirtualizationType::Paravirtual => "paravirtual",
        }
    }
}

/// Where a Bake is in its life.
#[derive(
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    schemars::JsonSchema,
    Default,
    strum::IntoStaticStr,
    strum::EnumString,
)]
pub enum BakePhase {
    /// Accepted; waiting for its template, source image or bake pod to start.
    #[default]
    Pending,
    /// Waiting for a free slot under the operator's concurrency limits, or for an identical bake
    /// under way; the `Ready` condition's reason and `message` say which.
    Queued,
    /// Packer is running.
    Running,
    /// The AMI exists; its id is in `amiId`.
    Succeeded,
    /// The bake ended without an AMI; `message` says why.
    Failed,
    /// A phase this version of Baker does not know (written by a newer one): read, never written,
    /// so an older replica during an upgrade neither fails to read the Bake nor stops its watch.
    #[serde(other)]
    #[schemars(skip)]
    Unknown,
}

impl BakePhase {
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, BakePhase::Succeeded | BakePhase::Failed)
    }
}

/// What the operator observed and did for a Bake.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct BakeStatus {
    /// `Pending`, `Running`, `Succeeded` or `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<BakePhase>,

    /// The baked AMI, once it exists in EC2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ami_id: Option<String>,

    /// The region the AMI was baked in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,

    /// The image the bake started from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ami_id: Option<String>,

    /// A hash of everything that determines the image (rendered template, source image, bake
    /// image), also tagged on the AMI as `baker.io/bake-key`. Bakes with equal keys share one AMI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bake_key: Option<String>,

    /// Set when the Bake reused an existing image instead of running packer: where it came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reused_from: Option<ReusedImage>,

    /// The pod that runs (or ran) packer; `kubectl logs` it to see packer's output. Recorded
    /// before the pod is created, so a restarted operator never starts a second one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,

    /// UID of that pod, once seen: if a pod of this name with another UID or no pod at all is
    /// found later, the original was deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,

    /// When the bake pod was launched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,

    /// When the bake reached `Succeeded` or `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,

    /// A human-readable account of the current phase; for a failed bake, the end of packer's
    /// error output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,

    /// Where the image is, one entry per region (the build region first), when the template
    /// distributes it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub artifacts: Vec<Artifact>,

    /// How far distribution has come, when the template distributes the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distribution: Option<DistributionStatus>,

    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Ready` (True once the AMI exists and, when the template distributes it, is available in
    /// every region it names), `Reconciling` (True while work is under way), `Stalled` (True when
    /// the bake failed, or a region cannot be served, and will not make progress by itself), per
    /// kstatus; and `Distributed` when the template distributes the image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::api::conditions::conditions_schema")]
    pub conditions: Vec<Condition>,
}

/// The image in one region.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Artifact {
    /// The region.
    pub region: String,
    /// The image in that region: the AMI itself in the build region, a copy elsewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
    /// `Available` (usable, tagged, shared and deprecated as the template asks), `Copying` or
    /// `Failed` (`message` says why; the operator tries again at its next check).
    pub state: ArtifactState,
    /// Whether EC2 reports the image's snapshots encrypted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub encrypted: bool,
    /// The KMS key the copy was asked to be encrypted with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms_key_id: Option<String>,
    /// Accounts, organizations and organizational units that may launch it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shared_with: Vec<String>,
    /// When EC2 marks it deprecated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deprecation_time: Option<String>,
    /// Why it is not `Available`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Where a region's image is.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema, Default)]
pub enum ArtifactState {
    #[default]
    Copying,
    Available,
    Failed,
}

/// The distribution a Bake's artifacts fulfil.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DistributionStatus {
    /// Regions available out of those the template asks for, e.g. `3/3`.
    pub regions: String,
    /// A hash of the template's distribution these artifacts were made for: when the template
    /// changes, the operator distributes again.
    pub key: String,
    /// When the operator last checked the image and its copies in EC2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked_at: Option<Time>,
}

/// An image a Bake reused rather than baked.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ReusedImage {
    /// The AMI reused.
    pub image_id: String,
    /// `namespace/name` of the Bake that made it, from the image's `baker.io/bake` tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bake: Option<String>,
}

impl Bake {
    pub fn phase(&self) -> Option<BakePhase> {
        self.status.as_ref().and_then(|s| s.phase)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_phase_from_a_newer_baker_reads_as_unknown_and_is_not_terminal() {
        let phase: BakePhase = serde_json::from_value(serde_json::json!("Frozen")).expect("any phase reads");
        assert_eq!(phase, BakePhase::Unknown);
        assert!(!phase.is_terminal());
        let known: BakePhase = serde_json::from_value(serde_json::json!("Succeeded")).expect("reads");
        assert_eq!(known.as_str(), "Succeeded");
    }
}
