//! `AmiChannel`: a named pointer to one image of an AmiCatalog ("the prod image of payments"),
//! published where deployments read it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::bake::VirtualizationType;

/// A stable name for one image of an AmiCatalog: either the catalog's newest image (`follow:
/// Latest`, optionally only once it has soaked) or an image pinned by id, so that promotion is a
/// git change of one field. The channel can publish its image to SSM parameters and as new
/// versions of launch templates, in every region the image was distributed to. When its image is
/// revoked, a pinned channel stays and turns `Degraded`; it never moves on its own.
// Repeated `type_ = ...` arguments of distinct `printcolumn`s are not duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "baker.io",
    version = "v1alpha1",
    kind = "AmiChannel",
    namespaced,
    status = "AmiChannelStatus",
    shortname = "amich",
    category = "baker",
    doc = "A named pointer to one image of an AmiCatalog, following its newest image or pinned, published to SSM parameters and launch templates.",
    printcolumn(name = "Catalog", type_ = "string", json_path = ".spec.catalog"),
    printcolumn(name = "Follow", type_ = "string", json_path = ".spec.follow"),
    printcolumn(name = "Image", type_ = "string", json_path = ".status.imageId"),
    printcolumn(name = "Since", type_ = "date", json_path = ".status.since"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Degraded",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Degraded\")].status"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = kube::core::Rule::new("has(self.follow) != has(self.imageId)").message("set follow: Latest, or imageId to pin the channel, not both"))]
#[x_kube(validation = kube::core::Rule::new("!has(self.soakSeconds) || has(self.follow)").message("soakSeconds applies to follow: Latest only"))]
#[serde(rename_all = "camelCase")]
pub struct AmiChannelSpec {
    /// The AmiCatalog, in this namespace, whose images the channel points at.
    #[x_kube(validation = kube::core::Rule::new("self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')").message("catalog must name an AmiCatalog: lowercase letters, digits, '-' and '.'"))]
    #[schemars(length(min = 1, max = 253))]
    pub catalog: String,

    /// `Latest`: point at the catalog's newest available image that is not revoked (and has
    /// soaked, with `soakSeconds`). Moves on its own when the catalog lists a newer one, and back
    /// to the newest remaining image when its image is revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follow: Option<Follow>,

    /// Pin the channel to this image of the catalog (or of a Bake in this namespace): it moves
    /// only when this field changes. E.g. `ami-0123456789abcdef0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("self.matches('^ami-[0-9a-f]{8,17}$')").message("imageId must look like ami-0123456789abcdef0"))]
    #[schemars(length(max = 21))]
    pub image_id: Option<String>,

    /// With `follow: Latest`: follow only images at least this many seconds old (by their
    /// creation date), so a new image soaks elsewhere first. Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 7_776_000))]
    pub soak_seconds: Option<i64>,

    /// Only images of this virtualization type (`hvm` or `paravirtual`). Unset: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtualization_type: Option<VirtualizationType>,

    /// Where to publish the image. Nothing by default: the channel's status is the pointer.
    #[serde(default, skip_serializing_if = "Publish::is_empty")]
    pub publish: Publish,

    /// Moves kept in `status.history`, newest first. Default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 50))]
    pub history_limit: Option<i32>,
}

/// How a channel chooses its image when not pinned.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum Follow {
    Latest,
}

/// Where a channel publishes its image.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Publish {
    /// SSM parameter names (data type `aws:ec2:image`), written in the catalog's region and in
    /// every region the image was copied to, each with that region's image id. Names must lie
    /// under the path the operator's admin assigns to this namespace (by default
    /// `/baker/<namespace>/`); a parameter another channel publishes is never overwritten.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 10),
        inner(length(min = 2, max = 1011), regex(pattern = r"^(/[A-Za-z0-9_.-]+)+$"))
    )]
    #[x_kube(validation = kube::core::Rule::new("self.all(n, !n.contains('/..') && !n.lowerAscii().startsWith('/aws') && !n.lowerAscii().startsWith('/ssm'))").message("SSM parameter names may not start with /aws or /ssm (reserved by AWS) or contain '..'"))]
    #[x_kube(validation = kube::core::Rule::new("self.all(n, self.exists_one(m, m == n))").message("an SSM parameter is listed twice"))]
    pub ssm_parameters: Vec<String>,

    /// Launch templates that get a new version with the image whenever the channel moves. Each
    /// launch template must carry the EC2 tag `baker.io/publish-namespace` naming this namespace
    /// (a comma-separated list may name several), set by whoever administers the account.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    #[x_kube(validation = kube::core::Rule::new("self.all(t, self.exists_one(u, u.name == t.name && (has(u.region) ? u.region : '') == (has(t.region) ? t.region : '')))").message("a launch template is listed twice"))]
    pub launch_templates: Vec<LaunchTemplateTarget>,
}

impl Publish {
    pub fn is_empty(&self) -> bool {
        self.ssm_parameters.is_empty() && self.launch_templates.is_empty()
    }
}

/// A launch template to publish to.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct LaunchTemplateTarget {
    /// The launch template's name.
    #[schemars(length(min = 3, max = 128), regex(pattern = r"^[a-zA-Z0-9().\-/_]+$"))]
    pub name: String,

    /// Its region. Default: the catalog's region. The image id written is the channel's image
    /// in that region (its copy there, for a distributed image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("self.matches('^[a-z]{2}(-[a-z]+)+-[0-9]+$')").message("region must look like an AWS region, e.g. eu-west-1"))]
    #[schemars(length(min = 1, max = 32))]
    pub region: Option<String>,

    /// Make the new version the launch template's default version.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub make_default: bool,
}

/// What a channel points at, where it published it, and where it pointed before.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AmiChannelStatus {
    /// The image the channel points at, in the catalog's region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,

    /// When the channel moved to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,

    /// The image in each region it exists in: the catalog's region and the regions it was
    /// copied to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<RegionImage>,

    /// Each publication target and what it holds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub published: Vec<Publication>,

    /// Earlier and current images, newest first, at most `historyLimit`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<ChannelMove>,

    /// When the publication targets were last checked against AWS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked_at: Option<Time>,

    /// A human-readable account of what the channel waits for, if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,

    /// `Ready` (the channel points at an image and every target holds it) and `Degraded` (True
    /// while its image is revoked: a person must move a pinned channel).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::api::conditions::conditions_schema")]
    pub conditions: Vec<Condition>,

    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The channel's image in one region.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
#[serde(rename_all = "camelCase")]
pub struct RegionImage {
    pub region: String,
    pub image_id: String,
}

/// One publication target.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Publication {
    /// `SsmParameter` or `LaunchTemplate`.
    pub kind: String,
    pub name: String,
    pub region: String,
    /// The image the target holds after the last check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
    /// The launch template version with the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
    /// `Published`, `Waiting` (no copy in that region yet), `Refused` (outside what this
    /// namespace may publish to) or `Failed` (AWS refused; see message).
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// One image the channel pointed at.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ChannelMove {
    pub image_id: String,
    pub since: Option<Time>,
    /// When the channel moved on; unset for the current image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<Time>,
    /// Why the channel moved to it.
    pub reason: String,
}
