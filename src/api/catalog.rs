//! `AmiCatalog`: a mirror of recent images from EC2 (the seed's `GET /amis` and
//! `GET /amis/:service`).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// A mirror of recent AMIs that match a query: the newest images of one service, a base image
/// family, or a public image family. Bakes can start from the latest image of a catalog.
// Repeated `type_ = ...` arguments of distinct `printcolumn`s are not duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "baker.io",
    version = "v1alpha1",
    kind = "AmiCatalog",
    namespaced,
    status = "AmiCatalogStatus",
    shortname = "amic",
    category = "baker",
    doc = "A mirror of the newest AMIs in EC2 that match a query (owners, name pattern, tags, or a service).",
    printcolumn(name = "Latest", type_ = "string", json_path = ".status.latest.imageId"),
    printcolumn(name = "Images", type_ = "integer", json_path = ".status.count"),
    printcolumn(name = "Last Sync", type_ = "date", json_path = ".status.lastSyncTime"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.retention) || !has(self.owners) || self.owners.all(o, o == 'self' || o.matches('^[0-9]{12}$'))"
).message("retention removes images of this account only: owners must be self or account ids"))]
#[x_kube(validation = kube::core::Rule::new(
    "has(self.namePattern) || !has(self.owners) || self.owners.all(o, o == 'self' || o.matches('^[0-9]{12}$'))"
).message("a catalog of images owned by amazon, aws-marketplace or others needs a namePattern: without one every sync would page through all of their public images"))]
#[serde(rename_all = "camelCase")]
pub struct AmiCatalogSpec {
    /// AWS region to list images in.
    #[x_kube(validation = kube::core::Rule::new("self.matches('^[a-z]{2}(-[a-z]+)+-[0-9]+$')").message("region must look like an AWS region, e.g. eu-west-1"))]
    #[schemars(length(min = 1, max = 32))]
    pub region: String,

    /// Image owners: account ids, `self`, `amazon` or `aws-marketplace`. Default `self`. Owners
    /// other than `self` and account ids need a `namePattern`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 10),
        inner(regex(pattern = r"^([0-9]{12}|self|amazon|aws-marketplace)$"))
    )]
    pub owners: Vec<String>,

    /// Image name pattern (`*` and `?` wildcards).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub name_pattern: Option<String>,

    /// Tags the images must carry, key to value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(length(max = 10))]
    pub tags: BTreeMap<String, String>,

    /// Only images Baker baked for this service (its `baker.io/service` tag).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("service must be a DNS-1123 label, as a Bake's service is"))]
    #[schemars(length(min = 1, max = 63))]
    pub service: Option<String>,

    /// How many images to list in status, newest first. Default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub limit: Option<i32>,

    /// Seconds between two syncs with EC2. Default 300.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 86400))]
    pub refresh_interval_seconds: Option<i64>,

    /// Opt-in removal of old images that the catalog matches: deregistered, their snapshots
    /// deleted. Only images Baker baked for Bakes of this catalog's namespace are considered
    /// (the operator's admin may widen this to every namespace); images Baker did not bake are
    /// never removed. An image is never removed while it is the recorded base
    /// (`baker.io/source-ami`) of another image, the `amiId` or source of an existing Bake in any
    /// namespace, used by an instance, or named by a launch template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retention>,

    /// Images nothing new may start from: a template whose source is this catalog takes the
    /// newest image not revoked (or waits), BakeSchedules on it see the source move and bake
    /// again, and images Baker baked for this namespace are deprecated at once (or disabled) in
    /// EC2, with their copies in other regions. Remove an entry to stop excluding the image (its
    /// deprecation or disabling stays: undo it in EC2 by hand).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50))]
    pub revoked: Vec<Revocation>,
}

/// One revoked image.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Revocation {
    /// The image, e.g. `ami-0123456789abcdef0`.
    #[x_kube(validation = kube::core::Rule::new("self.matches('^ami-[0-9a-f]{8,17}$')").message("imageId must look like ami-0123456789abcdef0"))]
    #[schemars(length(max = 21))]
    pub image_id: String,

    /// Why, for people: shown in the catalog's status and Events.
    #[x_kube(validation = kube::core::Rule::new("!self.matches('[\\x00-\\x1f\\x7f]')").message("reason may not contain control characters"))]
    #[schemars(length(min = 1, max = 256))]
    pub reason: String,

    /// Revoke the images built on it too (by Baker's `baker.io/source-ami` lineage tag), and
    /// theirs, five generations deep.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub descendants: bool,

    /// `Deprecate` (default: EC2 marks the image deprecated now; it still launches, but no
    /// longer shows in searches for the newest image) or `Disable` (EC2 refuses to launch it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<RevokeAction>,
}

/// What revocation does to an image in EC2.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema, Default)]
pub enum RevokeAction {
    #[default]
    Deprecate,
    Disable,
}

/// A revoked image and what was done to it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RevokedImage {
    pub image_id: String,
    pub reason: String,
    /// The revoked image this one descends from, when it is revoked as a descendant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub descendant_of: Option<String>,
    /// `Deprecated`, `Disabled`, or `NotActedOn` (an image Baker did not bake for this namespace:
    /// only excluded as a source).
    pub outcome: String,
    /// The image's copies in other regions that got the same.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub copies: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Which images to keep; the others are removed. With both limits, an image is kept if either
/// keeps it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = kube::core::Rule::new("has(self.keepNewest) || has(self.maxAgeDays)").message("retention needs keepNewest or maxAgeDays"))]
#[serde(rename_all = "camelCase")]
pub struct Retention {
    /// Keep the newest N images of each service (images without a `baker.io/service` tag form
    /// one group). The newest image of each service is always kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub keep_newest: Option<i32>,

    /// Keep images younger than this many days.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3650))]
    pub max_age_days: Option<i32>,

    /// List in `status.retention` what would be removed, and remove nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// One image in a catalog.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CatalogImage {
    pub image_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_date: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtualization_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ami_id: Option<String>,
    /// Set when the image is revoked: why. A revoked image is never a source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<String>,
}

/// The images found at the last sync.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AmiCatalogStatus {
    /// Matching images, newest first, at most `limit`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<CatalogImage>,
    /// The newest matching image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest: Option<CatalogImage>,
    /// Number of images listed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<i32>,
    /// When EC2 was last read successfully.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// What the retention policy removed (or, in a dry run, would remove) and what it kept
    /// because something still uses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<RetentionStatus>,
    /// The revoked images (those `spec.revoked` names and their descendants) and what was done.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked: Vec<RevokedImage>,
    /// `Ready` is False with the AWS error code when EC2 could not be read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::api::conditions::conditions_schema")]
    pub conditions: Vec<Condition>,
}

/// The outcome of the retention policy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RetentionStatus {
    /// True: nothing was removed, and `removed` lists what would be.
    #[serde(default)]
    pub dry_run: bool,
    /// Images removed at the last pass that removed any (or that would be removed now).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<RemovedImage>,
    /// Images past the policy that are kept because something uses them (the first 20).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub protected: Vec<ProtectedImage>,
    /// How many more protected images there are than `protected` lists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protected_not_listed: Option<i32>,
    /// Images past the policy and unused that this sync left for later ones: each sync removes
    /// at most the operator's limit (5 by default), so one policy change cannot sweep an account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deferred: Option<i32>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RemovedImage {
    pub image_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_date: Option<String>,
    /// Snapshots deleted with the image (or that would be).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshot_ids: Vec<String>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ProtectedImage {
    pub image_id: String,
    /// What uses it, e.g. `the amiId of Bake ns/name`.
    pub reason: String,
}
