//! The custom resources Baker serves, all in the `baker.io` API group at `v1alpha1`.
//!
//! The `///` docs on these types become the CRD field descriptions that `kubectl explain` shows,
//! so they are written for the people who apply these objects.

pub mod bake;
pub mod catalog;
pub mod channel;
pub mod conditions;
#[cfg(test)]
mod drift_tests;
pub mod schedule;
pub mod template;

pub use bake::{Bake, BakePhase, BakeSpec, BakeStatus, VirtualizationType};
pub use catalog::{AmiCatalog, AmiCatalogSpec, AmiCatalogStatus};
pub use template::{
    BakeTemplate, BakeTemplateSpec, Builder, Communicator, Distribution, ImageFilter, LaunchPermissions,
    RegionCopy, SourceImage,
};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// The API group of every Baker resource.
pub const GROUP: &str = "baker.io";

/// Label and tag keys Baker writes. Tags on EC2 resources use the same keys so that a person can
/// go from an AMI to its Bake and back.
pub mod keys {
    /// The Bake's UID: the source of truth that ties an AMI (and every temporary resource) to one Bake.
    pub const BAKE_UID: &str = "baker.io/bake-uid";
    /// Hash of everything that determines the image: Bakes with equal keys share one AMI.
    pub const BAKE_KEY: &str = "baker.io/bake-key";
    /// `namespace/name` of the Bake.
    pub const BAKE: &str = "baker.io/bake";
    /// Namespace of the Bake that made the image: the tenant a catalog's retention may act for.
    pub const NAMESPACE: &str = "baker.io/namespace";
    pub const SERVICE: &str = "baker.io/service";
    pub const VERSION: &str = "baker.io/version";
    pub const TEMPLATE: &str = "baker.io/template";
    pub const VIRTUALIZATION_TYPE: &str = "baker.io/virtualization-type";
    /// The image the AMI was baked from (lineage).
    pub const SOURCE_AMI: &str = "baker.io/source-ami";
    /// On a copy of an image in another region: the image it was copied from.
    pub const COPY_OF: &str = "baker.io/copy-of";
    /// On an image: the regions Baker copies it to, comma separated, written before each copy
    /// so that retention and a restarted operator know where to look.
    pub const COPIED_TO: &str = "baker.io/copied-to";
    /// On a launch template: the namespaces (comma separated) whose AmiChannels may publish new
    /// versions of it. Set by whoever administers the account; Baker only reads it.
    pub const PUBLISH_NAMESPACE: &str = "baker.io/publish-namespace";
    /// On an SSM parameter: the AmiChannel (`namespace/name`) that publishes it; no other channel
    /// overwrites it.
    pub const CHANNEL: &str = "baker.io/channel";
    /// Pod label naming the Bake that owns it.
    pub const BAKE_NAME_LABEL: &str = "baker.io/bake";
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
    pub const MANAGED_BY_VALUE: &str = "baker";
}

/// Every CRD Baker installs, in a stable order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        BakeTemplate::crd(),
        Bake::crd(),
        AmiCatalog::crd(),
        schedule::BakeSchedule::crd(),
        channel::AmiChannel::crd(),
    ]
}

/// The CRDs as one multi-document YAML stream.
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}

/// File name under `crds/` for one CRD: `<plural>.<group>.yaml`.
pub fn crd_file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or("unnamed"))
}
