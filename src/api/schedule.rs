//! `BakeSchedule`: Bakes made without a person, on a cron schedule and when the template's source
//! image moves.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::bake::VirtualizationType;

/// Bakes one service again and again: on a cron schedule, and when the source image its template
/// starts from moves (a new image in the source AmiCatalog). The schedule creates Bakes it owns,
/// named after the trigger, so a trigger never bakes twice; `kubectl get bakeschedules` shows
/// which schedules are outdated and why.
// Repeated `type_ = ...` arguments of distinct `printcolumn`s are not duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "baker.io",
    version = "v1alpha1",
    kind = "BakeSchedule",
    namespaced,
    status = "BakeScheduleStatus",
    shortname = "bs",
    category = "baker",
    doc = "Bakes a service on a cron schedule and whenever its template's source image moves.",
    printcolumn(name = "Template", type_ = "string", json_path = ".spec.bake.template"),
    printcolumn(name = "Schedule", type_ = "string", json_path = ".spec.schedule"),
    printcolumn(name = "Outdated", type_ = "string", json_path = ".status.conditions[?(@.type==\"Outdated\")].status"),
    printcolumn(name = "Why", type_ = "string", json_path = ".status.conditions[?(@.type==\"Outdated\")].reason"),
    printcolumn(name = "Last Bake", type_ = "string", json_path = ".status.lastTrigger.bake"),
    printcolumn(name = "AMI", type_ = "string", json_path = ".status.latest.amiId"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = kube::core::Rule::new("size(self.metadata.name) <= 32").message("a BakeSchedule's name must be at most 32 characters: its Bakes are named after it")
)]
#[x_kube(validation = kube::core::Rule::new("has(self.schedule) || self.onSourceChange").message("set a schedule, onSourceChange: true, or both: otherwise nothing ever bakes"))]
#[serde(rename_all = "camelCase")]
pub struct BakeScheduleSpec {
    /// What each Bake asks for.
    pub bake: ScheduledBake,

    /// When to bake, as a cron expression: five fields (minute hour day-of-month month
    /// day-of-week), or six with seconds first. E.g. `0 3 * * 1` is Mondays at 03:00. Missed times
    /// (the operator was down) make one Bake, not one each.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 9, max = 128))]
    pub schedule: Option<String>,

    /// The time zone `schedule` is read in, an IANA name such as `Europe/Berlin`. Default `UTC`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("self.matches('^[A-Za-z][A-Za-z0-9_+/-]*$')").message("timeZone must be an IANA time zone name, e.g. Europe/Berlin"))]
    #[schemars(length(min = 1, max = 64))]
    pub time_zone: Option<String>,

    /// Bake again when the template's source resolves to another image: a new image in the
    /// AmiCatalog the template starts from, seen at the catalog's refresh (no EC2 call of the
    /// schedule's own). Needs a template whose source is a catalog; to follow an EC2 filter, put
    /// an AmiCatalog with that query in front of it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub on_source_change: bool,

    /// `IfChanged` (default): a Bake whose inputs are unchanged reuses the existing image.
    /// `Always`: every trigger bakes afresh (`rebake`), for images whose provisioning pulls
    /// updates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<ScheduleMode>,

    /// Stop making Bakes (a Bake under way finishes). Cron times that pass while suspended are
    /// dropped; a source change waits and bakes once the schedule is resumed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspend: bool,

    /// `Forbid` (default): while one of the schedule's Bakes is unfinished no other starts; the
    /// next trigger waits for it. `Allow`: triggers start Bakes regardless.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency_policy: Option<ConcurrencyPolicy>,

    /// The fewest seconds between two of the schedule's Bakes: a source that moves often (or a
    /// cascade of base images) cannot start more. Default 600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 2_592_000))]
    pub min_interval_seconds: Option<i64>,

    /// Succeeded Bakes kept (older ones are deleted; their images stay unless the Bake says
    /// `deregisterImageOnDelete`). Default 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub successful_bakes_history_limit: Option<i32>,

    /// Failed Bakes kept. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub failed_bakes_history_limit: Option<i32>,
}

/// The Bake a schedule makes: as a Bake's spec.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ScheduledBake {
    /// Name of the BakeTemplate to bake with.
    #[x_kube(validation = kube::core::Rule::new("self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')").message("template must name a BakeTemplate: lowercase letters, digits, '-' and '.'"))]
    #[schemars(length(min = 1, max = 253))]
    pub template: String,

    /// The service, a DNS-1123 label.
    #[x_kube(validation = kube::core::Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("service must be a DNS-1123 label: lowercase letters, digits and '-', starting and ending with a letter or digit"))]
    #[schemars(length(min = 1, max = 63))]
    pub service: String,

    /// The package version to bake.
    #[x_kube(validation = kube::core::Rule::new("self.matches('^[A-Za-z0-9][A-Za-z0-9._+~-]*$')").message("version must be a package version: letters, digits, '.', '_', '+', '~' and '-', starting with a letter or digit"))]
    #[schemars(length(min = 1, max = 64))]
    pub version: String,

    /// `hvm` or `paravirtual`.
    pub virtualization_type: VirtualizationType,

    /// Deregister each Bake's AMI when the Bake is deleted (by the history limits too).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deregister_image_on_delete: bool,
}

/// Whether a trigger may reuse an unchanged image.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema, Default)]
pub enum ScheduleMode {
    #[default]
    IfChanged,
    Always,
}

/// Whether a schedule's Bakes may overlap.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema, Default)]
pub enum ConcurrencyPolicy {
    #[default]
    Forbid,
    Allow,
}

/// What a schedule saw and did.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct BakeScheduleStatus {
    /// The image the template's source resolves to now (from its catalog).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ami_id: Option<String>,

    /// The last trigger that made a Bake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_trigger: Option<ScheduleTrigger>,

    /// The source the last source-change trigger was for: a failed Bake of it is not retried
    /// until the source moves again (or the cron time comes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_source_trigger: Option<String>,

    /// How many source changes made a Bake: the number in their Bakes' names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_triggers: Option<i64>,

    /// The cron time last acted on (so a restart never acts on it again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<Time>,

    /// When the cron schedule fires next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_schedule_time: Option<Time>,

    /// The schedule's newest succeeded Bake and its image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest: Option<LatestImage>,

    /// A human-readable account of what the schedule waits for, if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,

    /// `Outdated` (True while the newest image was not built on the newest source, or none was
    /// built yet) and `Ready` (the schedule can act: its template and source are there).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::api::conditions::conditions_schema")]
    pub conditions: Vec<Condition>,

    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A trigger and the Bake it made.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleTrigger {
    /// `Schedule` (the cron time came) or `SourceChange` (the source moved, or no image was made
    /// from it yet).
    pub kind: String,
    /// Why, in words.
    pub message: String,
    /// The Bake it made.
    pub bake: String,
    /// The source image the trigger saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ami_id: Option<String>,
    pub at: Option<Time>,
}

/// The newest image a schedule made.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct LatestImage {
    pub bake: String,
    pub ami_id: String,
    /// The image it was built on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ami_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
}
