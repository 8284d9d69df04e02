//! `BakeTemplate`: how images of one kind are baked. Cluster-scoped and owned by cluster admins,
//! so that people who may create Bakes choose among reviewed recipes and cannot put commands of
//! their own into a bake pod (which is privileged for the chroot builder).

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// The seed's default hard timeout for one bake: 30 minutes.
pub const DEFAULT_TIMEOUT_SECONDS: i64 = 30 * 60;
/// The default AMI name: unique per bake run, readable, and valid as an AMI name.
pub const DEFAULT_AMI_NAME: &str = "{service}-{version}-{virtualizationType}-{timestamp}";

/// A reviewed recipe for baking AMIs with Packer. Bakes name a template; the template decides the
/// builder, the region, the source image, the provisioning steps and how the AMI is named and
/// tagged. A Bake's service, version and virtualization type reach the provisioning steps only as
/// the environment variables `BAKE_SERVICE`, `BAKE_VERSION` and `BAKE_VIRTUALIZATION_TYPE`.
// Repeated `type_ = ...` arguments of distinct `printcolumn`s are not duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "baker.io",
    version = "v1alpha1",
    kind = "BakeTemplate",
    shortname = "bt",
    category = "baker",
    doc = "A reviewed recipe for baking AMIs with Packer, referenced by Bakes. Cluster-scoped: owned by cluster admins.",
    printcolumn(name = "Builder", type_ = "string", json_path = ".spec.builder"),
    printcolumn(name = "Region", type_ = "string", json_path = ".spec.region"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = kube::core::Rule::new(
    "self.builder != 'amazon-chroot' || !has(self.communicator) || self.communicator == 'ssh'"
).message("communicator applies to the amazon-ebs builder only; amazon-chroot runs steps on the bake host"))]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.communicator) || self.communicator != 'none' || !has(self.provisioners) || size(self.provisioners) == 0"
).message("provisioners need a communicator: with communicator 'none' the template must not have provisioners"))]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.distribution) || !has(self.distribution.regions) || self.distribution.regions.all(r, r.name != self.region)"
).message("distribution.regions lists the regions to copy to: the build region is not one of them"))]
#[serde(rename_all = "camelCase")]
pub struct BakeTemplateSpec {
    /// Packer builder: `amazon-ebs` launches an instance from the source image and provisions it
    /// (no privilege needed in the cluster); `amazon-chroot` builds on the node the bake pod runs
    /// on, which must itself be an EC2 instance: the bake pod is then privileged and sees the
    /// node's `/dev`.
    pub builder: Builder,

    /// AWS region the AMI is built in, e.g. `eu-west-1`.
    #[x_kube(validation = kube::core::Rule::new("self.matches('^[a-z]{2}(-[a-z]+)+-[0-9]+$')").message("region must look like an AWS region, e.g. eu-west-1"))]
    #[schemars(length(min = 1, max = 32))]
    pub region: String,

    /// The image to start from.
    pub source: SourceImage,

    /// EC2 instance type for the temporary build instance (`amazon-ebs` only). Default `t3.micro`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("self.matches('^[a-z0-9][a-z0-9-]*\\\\.[a-z0-9]+$')").message("instanceType must be an EC2 instance type, e.g. t3.micro"))]
    #[schemars(length(min = 1, max = 64))]
    pub instance_type: Option<String>,

    /// How Packer reaches the build instance (`amazon-ebs` only): `ssh` (default) or `none`, which
    /// skips provisioning entirely and snapshots the source image as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub communicator: Option<Communicator>,

    /// SSH user on the source image when the communicator is `ssh`. Default `ec2-user`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("self.matches('^[A-Za-z_][A-Za-z0-9_.-]*$')").message("sshUsername must be a user name: letters, digits, '_', '.' and '-'"))]
    #[schemars(length(min = 1, max = 64))]
    pub ssh_username: Option<String>,

    /// Provisioning steps, run in order on the build instance (or in the chroot). Each step is a
    /// list of shell lines. The Bake's values are available only as environment variables:
    /// `BAKE_SERVICE`, `BAKE_VERSION`, `BAKE_VIRTUALIZATION_TYPE`, `BAKE_NAME`, `BAKE_NAMESPACE`.
    /// Quote them as shell variables, e.g. `yum install -y "$BAKE_SERVICE-$BAKE_VERSION"`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub provisioners: Vec<Provisioner>,

    /// Name of the AMI. Placeholders: `{service}`, `{version}`, `{virtualizationType}`,
    /// `{template}` and `{timestamp}` (Unix seconds at build time). Characters AMI names do not
    /// allow are replaced. Default `{service}-{version}-{virtualizationType}-{timestamp}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("self.matches('^[A-Za-z0-9()\\\\[\\\\] ./\\'@_{}-]+$') && !self.contains('{{') && !self.contains('}}')").message("amiName may use letters, digits, spaces, ( ) [ ] . / - ' @ _ and {placeholders}, and no {{ or }}"))]
    #[schemars(length(min = 3, max = 128))]
    pub ami_name: Option<String>,

    /// Description of the AMI, with the same placeholders as `amiName`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("!self.contains('{{') && !self.contains('}}') && !self.matches('[\\\\x00-\\\\x1f\\\\x7f]')").message("amiDescription may not contain {{, }} or control characters"))]
    #[schemars(length(max = 255))]
    pub ami_description: Option<String>,

    /// Extra tags on the AMI, its snapshots and every temporary resource of the build. Baker adds
    /// its own `baker.io/*` tags (the Bake's UID, service, version, template, source image), which
    /// cannot be overridden here.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[x_kube(validation = kube::core::Rule::new("self.all(k, !k.startsWith('baker.io/'))").message("tags under baker.io/ are reserved for Baker"))]
    #[x_kube(validation = kube::core::Rule::new("self.all(k, !k.startsWith('aws:'))").message("tags under aws: are reserved by AWS"))]
    #[x_kube(validation = kube::core::Rule::new("self.all(k, size(k) <= 128)").message("tag keys are at most 128 characters"))]
    #[x_kube(validation = kube::core::Rule::new("self.all(k, !k.contains('{{') && !k.contains('}}') && !self[k].contains('{{') && !self[k].contains('}}'))").message("tags may not contain {{ or }}"))]
    #[schemars(schema_with = "tags_schema")]
    pub tags: BTreeMap<String, String>,

    /// Hard limit for one bake, in seconds: the bake pod's `activeDeadlineSeconds`. Default 1800
    /// (30 minutes). A bake that runs out of time fails with reason `Timeout`, unless its AMI
    /// was already made, in which case the Bake adopts it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 86400))]
    pub timeout_seconds: Option<i64>,

    /// EC2 API endpoint for this template's bakes, for EC2-compatible endpoints in local
    /// development. Leave unset in production: the operator's own endpoint (the standard
    /// `AWS_ENDPOINT_URL_EC2`, if set) is used otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("self.matches('^https?://[^ ]+$')").message("ec2Endpoint must be an http(s) URL"))]
    #[schemars(length(max = 256))]
    pub ec2_endpoint: Option<String>,

    /// Container image for the bake pod, which must contain `packer` on its PATH. Default: the
    /// operator's configured bake image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub packer_image: Option<String>,

    /// Where bake pods of this template run and what they may use: pin `amazon-chroot` bakes,
    /// which run as root on their node, to dedicated nodes with a node selector, tolerations and
    /// affinity, and give every bake pod resource requests and limits. Placement does not change
    /// the image, so it is not part of the bake key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<BakePodSettings>,

    /// Where the AMI goes after it is baked: copies in other regions, launch permissions for
    /// other accounts and organizations, and a deprecation date. The operator does this itself
    /// after packer has finished and keeps it true: a region or account added here later reaches
    /// the images this template baked recently, without baking them again, and a copy removed or
    /// unshared by hand is put back at the next check. Distribution is not part of the bake key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distribution: Option<Distribution>,
}

/// The most regions one template copies to: `baker.io/copied-to` on the image lists them in one
/// tag value, which EC2 limits to 256 characters.
pub const MAX_DISTRIBUTION_REGIONS: usize = 15;

/// How an image is distributed after its bake.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.regions) || self.regions.all(r, self.regions.exists_one(o, o.name == r.name))"
).message("each region may be listed once"))]
#[serde(rename_all = "camelCase")]
pub struct Distribution {
    /// Regions the AMI is copied to, besides the region it is built in. Each copy carries the
    /// image's tags (Baker's `baker.io/*` tags and the template's), the same launch permissions
    /// and the same deprecation date. Removing a region here does not delete the copies already
    /// made there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 15))]
    pub regions: Vec<RegionCopy>,

    /// Who besides this account may launch the image and its copies. Baker adds these
    /// permissions and never removes one: taking an account out of this list does not unshare
    /// images already shared with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch_permissions: Option<LaunchPermissions>,

    /// Days after the image was made at which EC2 marks it and its copies deprecated (it still
    /// launches, but no longer shows in searches for the newest image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3650))]
    pub deprecate_after_days: Option<i32>,

    /// Days after its bake that an image is kept distributed: within them, a changed
    /// distribution reaches the image and a copy or permission removed by hand is put back at
    /// the operator's periodic check. Older images are left as they are. Default 30.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3650))]
    pub maintain_days: Option<i32>,
}

/// One region to copy the image to.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RegionCopy {
    /// The region, e.g. `eu-central-1`. It must be enabled for the account.
    #[x_kube(validation = kube::core::Rule::new("self.matches('^[a-z]{2}(-[a-z]+)+-[0-9]+$')").message("region must look like an AWS region, e.g. eu-west-1"))]
    #[schemars(length(min = 1, max = 32))]
    pub name: String,

    /// KMS key for an encrypted copy: a key id, key ARN, alias name (`alias/...`) or alias ARN
    /// in the copy's region. The operator needs `kms:CreateGrant`, `kms:Decrypt`,
    /// `kms:DescribeKey`, `kms:GenerateDataKey*` and `kms:ReEncrypt*` on it. A key changed here
    /// applies to copies made from then on. Unset: the copy is encrypted as its image is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("self.matches('^(arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:(key|alias)/[A-Za-z0-9/_-]+|alias/[A-Za-z0-9/_-]+|[0-9a-fA-F-]{36}|mrk-[0-9a-f]{32})$')").message("kmsKeyId must be a KMS key id, key ARN, alias/<name> or alias ARN"))]
    #[schemars(length(min = 1, max = 2048))]
    pub kms_key_id: Option<String>,
}

/// Accounts, organizations and organizational units that may launch the image.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct LaunchPermissions {
    /// AWS account ids (12 digits).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100), inner(regex(pattern = r"^[0-9]{12}$")))]
    pub accounts: Vec<String>,

    /// Organization ARNs, e.g. `arn:aws:organizations::123456789012:organization/o-abc1234567`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 10),
        inner(regex(pattern = r"^arn:aws[a-z-]*:organizations::[0-9]{12}:organization/o-[a-z0-9]{10,32}$"))
    )]
    pub organizations: Vec<String>,

    /// Organizational unit ARNs, e.g.
    /// `arn:aws:organizations::123456789012:ou/o-abc1234567/ou-ab12-cdef3456`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 50),
        inner(regex(
            pattern = r"^arn:aws[a-z-]*:organizations::[0-9]{12}:ou/o-[a-z0-9]{10,32}/ou-[a-z0-9]{4,32}-[a-z0-9]{8,32}$"
        ))
    )]
    pub organizational_units: Vec<String>,

    /// Also give the accounts permission to create volumes from the image's snapshots, which
    /// they need to copy the image into their own account. Organizations and organizational
    /// units get that with the image itself.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub share_snapshots: bool,
}

impl Distribution {
    /// How long after its bake an image is kept distributed.
    pub fn maintain_days(&self) -> i32 {
        self.maintain_days.unwrap_or(30)
    }
}

/// Placement and resources of bake pods, as in a pod spec.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct BakePodSettings {
    /// Labels a node must have to run the bake pod.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(length(max = 20))]
    pub node_selector: BTreeMap<String, String>,

    /// Taints the bake pod tolerates, e.g. those of nodes reserved for chroot bakes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub tolerations: Vec<k8s_openapi::api::core::v1::Toleration>,

    /// Node affinity and pod (anti-)affinity of the bake pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<k8s_openapi::api::core::v1::Affinity>,

    /// CPU and memory requests and limits of the packer container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<k8s_openapi::api::core::v1::ResourceRequirements>,

    /// Priority class of the bake pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub priority_class_name: Option<String>,
}

/// Which Packer builder bakes the image.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub enum Builder {
    #[serde(rename = "amazon-ebs")]
    AmazonEbs,
    #[serde(rename = "amazon-chroot")]
    AmazonChroot,
}

impl Builder {
    pub fn as_str(self) -> &'static str {
        match self {
            Builder::AmazonEbs => "amazon-ebs",
            Builder::AmazonChroot => "amazon-chroot",
        }
    }
}

/// How Packer talks to the build instance.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Communicator {
    Ssh,
    None,
}

/// The image a bake starts from: exactly one of `amiId`, `filter` or `catalog`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = kube::core::Rule::new(
    "(has(self.amiId) ? 1 : 0) + (has(self.filter) ? 1 : 0) + (has(self.catalog) ? 1 : 0) == 1"
).message("set exactly one of source.amiId, source.filter or source.catalog"))]
#[serde(rename_all = "camelCase")]
pub struct SourceImage {
    /// A fixed AMI id, e.g. `ami-0abcd1234ef567890`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("self.matches('^ami-[0-9a-f]{8,17}$')").message("amiId must look like ami-0123456789abcdef0"))]
    #[schemars(length(max = 21))]
    pub ami_id: Option<String>,

    /// Find the newest available image that matches. The Bake's virtualization type is always
    /// added as a filter, so one template serves `hvm` and `paravirtual` bakes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<ImageFilter>,

    /// The latest image of an AmiCatalog in the Bake's namespace (of the Bake's virtualization
    /// type, if the catalog lists several): e.g. a base image baked earlier. A Bake whose catalog
    /// lists no such image waits, Pending, with reason `SourceCatalogEmpty`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catalog: Option<CatalogSource>,
}

/// An AmiCatalog to take the source image from.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CatalogSource {
    /// Name of the AmiCatalog, in the Bake's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// An EC2 image query; the newest match wins.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ImageFilter {
    /// Image owners: account ids, `self`, `amazon` or `aws-marketplace`.
    #[schemars(
        length(min = 1, max = 10),
        inner(regex(pattern = r"^([0-9]{12}|self|amazon|aws-marketplace)$"))
    )]
    pub owners: Vec<String>,

    /// Image name pattern (`*` and `?` wildcards), e.g. `amzn2-ami-hvm-*-x86_64-gp2`. May use the
    /// `{virtualizationType}` placeholder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("!self.contains('{{') && !self.contains('}}')").message("the filter's name may not contain {{ or }}"))]
    #[schemars(length(min = 1, max = 128))]
    pub name: Option<String>,

    /// Tags the image must carry, key to value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[x_kube(validation = kube::core::Rule::new("self.all(k, !k.contains('{{') && !k.contains('}}') && !self[k].contains('{{') && !self[k].contains('}}'))").message("the filter's tags may not contain {{ or }}"))]
    #[schemars(schema_with = "filter_tags_schema")]
    pub tags: BTreeMap<String, String>,
}

/// One provisioning step: shell lines run in order by Packer's shell provisioner.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Provisioner {
    /// A short name for the step, shown in the bake's logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("!self.contains('{{') && !self.contains('}}')").message("a step's name may not contain {{ or }}"))]
    #[schemars(length(max = 63))]
    pub name: Option<String>,

    /// The shell lines. Read the Bake's values from `BAKE_*` environment variables.
    #[schemars(length(min = 1, max = 200))]
    pub shell: Vec<String>,
}

/// A template's tags: at most 40 (EC2 allows 50 per resource and Baker adds up to 10 of its own),
/// each value at most 256 characters as EC2 allows.
fn tags_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    tag_map(40)
}

/// A filter's tags: at most 10.
fn filter_tags_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    tag_map(10)
}

fn tag_map(max: u32) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "maxProperties": max,
        "additionalProperties": { "type": "string", "maxLength": 256 },
    })
}

impl BakeTemplateSpec {
    pub fn timeout_seconds(&self) -> i64 {
        self.timeout_seconds.unwrap_or(DEFAULT_TIMEOUT_SECONDS)
    }

    pub fn communicator(&self) -> Communicator {
        self.communicator.unwrap_or(Communicator::Ssh)
    }
}
