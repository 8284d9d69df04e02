//! The few EC2 calls Baker makes, and how its EC2 clients are built.
//!
//! Credentials come from aws-config's default chain (environment, IRSA web identity, EKS Pod
//! Identity, instance profile). The standard `AWS_ENDPOINT_URL_EC2` points every client at an
//! EC2-compatible endpoint for local development. Nothing here logs credentials.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{Filter, Image};

use crate::api::{ImageFilter, VirtualizationType};

/// An EC2 (or SSM) failure, with the AWS error code when AWS answered (e.g.
/// `UnauthorizedOperation`), or a transport description when it did not; the SDK's own error is
/// kept as the source.
#[derive(Debug, thiserror::Error, Clone)]
#[error("{service} {action} failed: {code}: {message}")]
pub struct Ec2Error {
    /// `EC2` or `SSM`.
    pub service: &'static str,
    pub action: &'static str,
    pub code: String,
    pub message: String,
    #[source]
    pub source: Option<std::sync::Arc<dyn std::error::Error + Send + Sync>>,
}

/// Equal when they say the same thing: the SDK's error behind it is not comparable.
impl PartialEq for Ec2Error {
    fn eq(&self, other: &Self) -> bool {
        (self.service, self.action, &self.code, &self.message)
            == (other.service, other.action, &other.code, &other.message)
    }
}

impl Eq for Ec2Error {}

impl Ec2Error {
    /// An error of `action` with this code and message and no SDK error behind it.
    pub fn new(action: &'static str, code: impl Into<String>, message: impl Into<String>) -> Self {
        Ec2Error {
            service: "EC2",
            action,
            code: code.into(),
            message: message.into(),
            source: None,
        }
    }

    pub(crate) fn from_sdk<E, R>(action: &'static str, err: aws_sdk_ec2::error::SdkError<E, R>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug + Send + Sync + 'static,
    {
        Self::from_sdk_of("EC2", action, err)
    }

    /// The same for a call to another AWS service (`service` names it in messages).
    pub(crate) fn from_sdk_of<E, R>(
        service: &'static str,
        action: &'static str,
        err: aws_sdk_ec2::error::SdkError<E, R>,
    ) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug + Send + Sync + 'static,
    {
        use aws_sdk_ec2::error::SdkError;
        let (code, message) = match &err {
            SdkError::ServiceError(e) => (
                e.err().code().unwrap_or("Unknown").to_string(),
                e.err().message().unwrap_or("").to_string(),
            ),
            SdkError::TimeoutError(_) => ("Timeout".to_string(), format!("no answer from {service} in time")),
            SdkError::DispatchFailure(e) => (
                "Unreachable".to_string(),
                if e.is_io() {
                    format!("cannot connect to the {service} endpoint")
                } else {
                    format!("{e:?}")
                },
            ),
            // The whole chain: the top level alone ("failed to construct request") hides why.
            other => (
                "RequestFailed".to_string(),
                aws_sdk_ec2::error::DisplayErrorContext(other).to_string(),
            ),
        };
        Ec2Error {
            service,
            action,
            code,
            message,
            source: Some(std::sync::Arc::new(err)),
        }
    }
}

/// The fields of an EC2 image Baker uses.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ImageSummary {
    pub image_id: String,
    pub name: Option<String>,
    pub creation_date: Option<String>,
    pub state: Option<String>,
    pub virtualization_type: Option<String>,
    pub tags: BTreeMap<String, String>,
    /// Snapshots of the image's EBS block devices.
    pub snapshot_ids: Vec<String>,
    pub description: Option<String>,
    /// When EC2 marks the image deprecated (ISO 8601), if it does.
    pub deprecation_time: Option<String>,
    /// Whether an EBS snapshot of the image is encrypted.
    pub encrypted: bool,
    /// Why the image is in its state (e.g. why a copy failed).
    pub state_reason: Option<String>,
}

impl From<&Image> for ImageSummary {
    fn from(image: &Image) -> Self {
        ImageSummary {
            image_id: image.image_id().unwrap_or_default().to_string(),
            name: image.name().map(str::to_string),
            creation_date: image.creation_date().map(str::to_string),
            state: image.state().map(|s| s.as_str().to_string()),
            virtualization_type: image.virtualization_type().map(|v| v.as_str().to_string()),
            tags: image
                .tags()
                .iter()
                .filter_map(|t| Some((t.key()?.to_string(), t.value().unwrap_or_default().to_string())))
                .collect(),
            snapshot_ids: image
                .block_device_mappings()
                .iter()
                .filter_map(|m| Some(m.ebs()?.snapshot_id()?.to_string()))
                .collect(),
            description: image.description().map(str::to_string),
            deprecation_time: image.deprecation_time().map(str::to_string),
            encrypted: image
                .block_device_mappings()
                .iter()
                .any(|m| m.ebs().and_then(|e| e.encrypted()).unwrap_or(false)),
            state_reason: image
                .state_reason()
                .and_then(|r| r.message().or(r.code()))
                .map(str::to_string),
        }
    }
}

impl ImageSummary {
    /// Whether Baker baked this image: it carries the UID of the Bake that made it.
    pub fn baked_by_baker(&self) -> bool {
        self.tags.contains_key(crate::api::keys::BAKE_UID)
    }

    /// The namespace of the Bake that made the image: its `baker.io/namespace` tag, or for images
    /// made before that tag existed, the namespace part of its `baker.io/bake` tag. `None` for an
    /// image Baker did not bake.
    pub fn baker_namespace(&self) -> Option<&str> {
        use crate::api::keys;
        if !self.baked_by_baker() {
            return None;
        }
        self.tags
            .get(keys::NAMESPACE)
            .map(String::as_str)
            .or_else(|| self.tags.get(keys::BAKE)?.split_once('/').map(|(ns, _)| ns))
            .filter(|ns| !ns.is_empty())
    }
}

/// Newest first by creation date (ISO 8601 sorts as text), then by id for a stable order.
pub fn sort_newest_first(images: &mut [ImageSummary]) {
    images.sort_by(|a, b| {
        b.creation_date
            .cmp(&a.creation_date)
            .then_with(|| b.image_id.cmp(&a.image_id))
    });
}

/// The EC2 filters for a template's source image query.
pub fn source_filters(filter: &ImageFilter, virtualization: VirtualizationType) -> Vec<Filter> {
    let mut filters = vec![
        Filter::builder().name("state").values("available").build(),
        Filter::builder()
            .name("virtualization-type")
            .values(virtualization.as_str())
            .build(),
    ];
    if let Some(name) = &filter.name {
        filters.push(
            Filter::builder()
                .name("name")
                .values(name.replace("{virtualizationType}", virtualization.as_str()))
                .build(),
        );
    }
    for (k, v) in &filter.tags {
        filters.push(Filter::builder().name(format!("tag:{k}")).values(v).build());
    }
    filters
}

/// How long one AWS call may take: a connection that stops answering is abandoned and the call
/// retried (within the operation's bound) on a new one, instead of holding a reconcile forever.
pub(crate) fn timeouts() -> aws_sdk_ec2::config::timeout::TimeoutConfig {
    aws_sdk_ec2::config::timeout::TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(5))
        .operation_attempt_timeout(Duration::from_secs(20))
        .operation_timeout(Duration::from_secs(60))
        .build()
}

/// Clients of one AWS service, one per region, each made on first use.
pub(crate) struct Regional<C>(Mutex<HashMap<String, C>>);

impl<C: Clone> Default for Regional<C> {
    fn default() -> Self {
        Self(Mutex::new(HashMap::new()))
    }
}

impl<C: Clone> Regional<C> {
    pub(crate) fn get(&self, region: &str, make: impl FnOnce() -> C) -> C {
        // A panic elsewhere while holding the lock leaves a usable map.
        let mut clients = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        clients.entry(region.to_string()).or_insert_with(make).clone()
    }
}

/// EC2 clients, one per region, sharing one credential chain and endpoint configuration.
pub struct Ec2 {
    base: aws_config::SdkConfig,
    clients: Regional<aws_sdk_ec2::Client>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
}

impl Ec2 {
    /// Loads the default AWS configuration (credential chain, `AWS_ENDPOINT_URL_EC2`, retries).
    pub async fn from_env() -> Self {
        let base = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
        Self::new(base)
    }

    pub fn new(base: aws_config::SdkConfig) -> Self {
        Self {
            base,
            clients: Regional::default(),
            metrics: std::sync::Arc::default(),
        }
    }

    /// Counts every call in `metrics` (the process's, served on `/metrics`).
    pub fn with_metrics(self, metrics: std::sync::Arc<crate::metrics::Metrics>) -> Self {
        Self { metrics, ..self }
    }

    pub fn client(&self, region: &str) -> aws_sdk_ec2::Client {
        self.clients.get(region, || {
            let config = aws_sdk_ec2::config::Builder::from(&self.base)
                .region(aws_sdk_ec2::config::Region::new(region.to_string()))
                .timeout_config(timeouts())
                .interceptor(CallMetrics(self.metrics.clone()))
                .build();
            aws_sdk_ec2::Client::from_conf(config)
        })
    }

    async fn describe(
        &self,
        region: &str,
        owners: &[String],
        filters: Vec<Filter>,
    ) -> Result<Vec<ImageSummary>, Ec2Error> {
        Ok(self.images_capped(region, owners, filters, usize::MAX).await?.0)
    }

    /// Images of these owners matching server-side filters, every page newest first, stopping
    /// once `max` images were read; `true` when it stopped early (more images match).
    pub async fn images_capped(
        &self,
        region: &str,
        owners: &[String],
        filters: Vec<Filter>,
        max: usize,
    ) -> Result<(Vec<ImageSummary>, bool), Ec2Error> {
        // Disabled images (revoked ones) are listed too: retention, cleanup and distribution
        // must find them; whoever picks an image to use checks its state.
        let mut request = self
            .client(region)
            .describe_images()
            .set_filters(Some(filters))
            .include_disabled(true);
        for owner in owners {
            request = request.owners(owner);
        }
        let mut pages = request.into_paginator().send();
        let mut out = Vec::new();
        let mut cut = false;
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| Ec2Error::from_sdk("DescribeImages", e))?;
            out.extend(page.images().iter().map(ImageSummary::from));
            if out.len() >= max {
                cut = out.len() > max || page.next_token().is_some_and(|t| !t.is_empty());
                break;
            }
        }
        sort_newest_first(&mut out);
        out.truncate(max);
        Ok((out, cut))
    }

    /// The newest available image matching a template's source filter, if any.
    pub async fn resolve_source(
        &self,
        region: &str,
        filter: &ImageFilter,
        virtualization: VirtualizationType,
    ) -> Result<Option<ImageSummary>, Ec2Error> {
        let images = self
            .describe(region, &filter.owners, source_filters(filter, virtualization))
            .await?;
        Ok(images.into_iter().next())
    }

    /// Images this account owns that carry a tag, newest first.
    pub async fn images_tagged(
        &self,
        region: &str,
        key: &str,
        value: &str,
    ) -> Result<Vec<ImageSummary>, Ec2Error> {
        let filters = vec![Filter::builder().name(format!("tag:{key}")).values(value).build()];
        self.describe(region, &["self".to_string()], filters).await
    }
}

/// What retention must not remove: image id to a description of what uses it.
pub type Uses = BTreeMap<String, String>;

impl Ec2 {
    /// Images of this account whose `baker.io/source-ami` tag names one of `ids`: `ids` are their
    /// bases.
    pub async fn bases_among(&self, region: &str, ids: &[String]) -> Result<Uses, Ec2Error> {
        let mut uses = Uses::new();
        for (base, children) in self.children_of(region, ids).await? {
            if let Some(child) = children.first() {
                uses.insert(base, format!("the base of image {child}"));
            }
        }
        Ok(uses)
    }

    /// The images of this account built on each of `ids` (by their `baker.io/source-ami` tag).
    pub async fn children_of(
        &self,
        region: &str,
        ids: &[String],
    ) -> Result<BTreeMap<String, Vec<String>>, Ec2Error> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        if ids.is_empty() {
            return Ok(out);
        }
        let filters = vec![
            Filter::builder()
                .name(format!("tag:{}", crate::api::keys::SOURCE_AMI))
                .set_values(Some(ids.to_vec()))
                .build(),
        ];
        for child in self.describe(region, &["self".to_string()], filters).await? {
            if let Some(base) = child.tags.get(crate::api::keys::SOURCE_AMI) {
                out.entry(base.clone()).or_default().push(child.image_id.clone());
            }
        }
        Ok(out)
    }

    /// Makes EC2 refuse to launch an image (it stays, and can be enabled again).
    pub async fn disable_image(&self, region: &str, id: &str) -> Result<(), Ec2Error> {
        self.client(region)
            .disable_image()
            .image_id(id)
            .send()
            .await
            .map_err(|e| Ec2Error::from_sdk("DisableImage", e))?;
        Ok(())
    }

    /// Instances (not terminated) launched from one of `ids`.
    pub async fn instances_using(&self, region: &str, ids: &[String]) -> Result<Uses, Ec2Error> {
        let mut pages = self
            .client(region)
            .describe_instances()
            .filters(
                Filter::builder()
                    .name("image-id")
                    .set_values(Some(ids.to_vec()))
                    .build(),
            )
            .filters(
                Filter::builder()
                    .name("instance-state-name")
                    .values("pending")
                    .values("running")
                    .values("stopping")
                    .values("stopped")
                    .build(),
            )
            .into_paginator()
            .send();
        let mut uses = Uses::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| Ec2Error::from_sdk("DescribeInstances", e))?;
            for instance in page.reservations().iter().flat_map(|r| r.instances()) {
                if let (Some(image), Some(id)) = (instance.image_id(), instance.instance_id()) {
                    uses.entry(image.to_string())
                        .or_insert_with(|| format!("used by instance {id}"));
                }
            }
        }
        Ok(uses)
    }

    /// Images named by any version of any launch template of the account.
    pub async fn launch_template_images(&self, region: &str) -> Result<Uses, Ec2Error> {
        let client = self.client(region);
        let mut templates = Vec::new();
        let mut pages = client.describe_launch_templates().into_paginator().send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| Ec2Error::from_sdk("DescribeLaunchTemplates", e))?;
            templates.extend(page.launch_templates().iter().filter_map(|t| {
                Some((
                    t.launch_template_id()?.to_string(),
                    t.launch_template_name().unwrap_or_default().to_string(),
                ))
            }));
        }
        let mut uses = Uses::new();
        for (id, name) in templates {
            let mut pages = client
                .describe_launch_template_versions()
                .launch_template_id(&id)
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                let page = match page {
                    Ok(page) => page,
                    Err(e) => {
                        let e = Ec2Error::from_sdk("DescribeLaunchTemplateVersions", e);
                        // Deleted since it was listed: it names no image any more.
                        if e.code == "InvalidLaunchTemplateId.NotFound" {
                            break;
                        }
                        return Err(e);
                    }
                };
                for version in page.launch_template_versions() {
                    if let Some(image) = version.launch_template_data().and_then(|d| d.image_id()) {
                        uses.entry(image.to_string()).or_insert_with(|| {
                            format!(
                                "named by launch template {name} version {}",
                                version.version_number().unwrap_or_default()
                            )
                        });
                    }
                }
            }
        }
        Ok(uses)
    }

    /// Deregisters an image and deletes its snapshots (a snapshot already gone is fine).
    pub async fn remove_image(&self, region: &str, image: &ImageSummary) -> Result<(), Ec2Error> {
        let client = self.client(region);
        client
            .deregister_image()
            .image_id(&image.image_id)
            .send()
            .await
            .map_err(|e| Ec2Error::from_sdk("DeregisterImage", e))?;
        for snapshot in &image.snapshot_ids {
            if let Err(e) = client.delete_snapshot().snapshot_id(snapshot).send().await {
                let e = Ec2Error::from_sdk("DeleteSnapshot", e);
                if e.code != "InvalidSnapshot.NotFound" {
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}

/// Counts every EC2 operation (after its retries) and its failures by action, in one place for
/// all calls the operator makes.
pub(crate) struct CallMetrics(pub(crate) std::sync::Arc<crate::metrics::Metrics>);

impl std::fmt::Debug for CallMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallMetrics")
    }
}

impl aws_sdk_ec2::config::Intercept for CallMetrics {
    fn name(&self) -> &'static str {
        "baker-call-metrics"
    }

    fn read_after_execution(
        &self,
        context: &aws_smithy_runtime_api::client::interceptors::context::FinalizerInterceptorContextRef<'_>,
        _runtime_components: &aws_sdk_ec2::config::RuntimeComponents,
        cfg: &mut aws_sdk_ec2::config::ConfigBag,
    ) -> Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        let action = cfg
            .load::<aws_smithy_runtime_api::client::orchestrator::Metadata>()
            .map(|m| m.name())
            .unwrap_or("other");
        let failed = !matches!(context.output_or_error(), Some(Ok(_)));
        self.0.ec2_call(action, failed);
        Ok(())
    }
}

/// What a sweep found and removed for one Bake.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub instances: Vec<String>,
    pub security_groups: Vec<String>,
    pub key_pairs: Vec<String>,
    pub volumes: Vec<String>,
    pub images: Vec<String>,
    pub snapshots: Vec<String>,
}

impl SweepReport {
    pub fn is_empty(&self) -> bool {
        self.instances.is_empty()
            && self.security_groups.is_empty()
            && self.key_pairs.is_empty()
            && self.volumes.is_empty()
            && self.images.is_empty()
            && self.snapshots.is_empty()
    }

    /// A one-line account for Events and logs.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = [
            ("instance", &self.instances),
            ("security group", &self.security_groups),
            ("key pair", &self.key_pairs),
            ("volume", &self.volumes),
            ("image", &self.images),
            ("snapshot", &self.snapshots),
        ]
        .iter()
        .filter(|(_, ids)| !ids.is_empty())
        .map(|(what, ids)| format!("{what}(s) {}", ids.join(", ")))
        .collect();
        if parts.is_empty() {
            "nothing".to_string()
        } else {
            parts.join("; ")
        }
    }
}

/// Packer names its temporary security groups and key pairs `packer_<id>`: only those are
/// removed when found through an instance, never a group or key the template named.
fn packer_made(name: &str) -> bool {
    name.starts_with("packer_") || name.starts_with("packer-")
}

impl Ec2 {
    /// Removes what a bake left behind in EC2: instances tagged with its UID, the temporary
    /// security groups and key pairs packer made for them (or tagged with the UID), and unattached
    /// volumes tagged with the UID. With `images`, also deregisters the AMIs tagged with the UID
    /// and deletes their snapshots. Idempotent; a partial failure is an error, and a retry resumes.
    pub async fn sweep(&self, region: &str, uid: &str, images: bool) -> Result<SweepReport, Ec2Error> {
        let client = self.client(region);
        let by_uid = || {
            Filter::builder()
                .name(format!("tag:{}", crate::api::keys::BAKE_UID))
                .values(uid)
                .build()
        };
        let mut report = SweepReport::default();
        let mut group_ids = std::collections::BTreeSet::new();
        let mut key_names = std::collections::BTreeSet::new();

        let mut pages = client
            .describe_instances()
            .filters(by_uid())
            .into_paginator()
            .send();
        let mut to_terminate = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| Ec2Error::from_sdk("DescribeInstances", e))?;
            for instance in page.reservations().iter().flat_map(|r| r.instances()) {
                let state = instance
                    .state()
                    .and_then(|s| s.name())
                    .map(|n| n.as_str().to_string());
                for group in instance.security_groups() {
                    if let (Some(id), Some(name)) = (group.group_id(), group.group_name())
                        && packer_made(name)
                    {
                        group_ids.insert(id.to_string());
                    }
                }
                if let Some(key) = instance.key_name().filter(|k| packer_made(k)) {
                    key_names.insert(key.to_string());
                }
                if let Some(id) = instance.instance_id()
                    && !matches!(state.as_deref(), Some("terminated" | "shutting-down"))
                {
                    to_terminate.push(id.to_string());
                }
            }
        }
        if !to_terminate.is_empty() {
            client
                .terminate_instances()
                .set_instance_ids(Some(to_terminate.clone()))
                .send()
                .await
                .map_err(|e| Ec2Error::from_sdk("TerminateInstances", e))?;
            report.instances = to_terminate;
        }

        let groups = client
            .describe_security_groups()
            .filters(by_uid())
            .send()
            .await
            .map_err(|e| Ec2Error::from_sdk("DescribeSecurityGroups", e))?;
        group_ids.extend(
            groups
                .security_groups()
                .iter()
                .filter_map(|g| g.group_id().map(str::to_string)),
        );
        for id in group_ids {
            match client.delete_security_group().group_id(&id).send().await {
                Ok(_) => report.security_groups.push(id),
                Err(e) => {
                    let e = Ec2Error::from_sdk("DeleteSecurityGroup", e);
                    if e.code != "InvalidGroup.NotFound" {
                        return Err(e);
                    }
                }
            }
        }

        let keys = client
            .describe_key_pairs()
            .filters(by_uid())
            .send()
            .await
            .map_err(|e| Ec2Error::from_sdk("DescribeKeyPairs", e))?;
        key_names.extend(
            keys.key_pairs()
                .iter()
                .filter_map(|k| k.key_name().map(str::to_string)),
        );
        for name in key_names {
            // Deleting a key pair that is gone succeeds.
            client
                .delete_key_pair()
                .key_name(&name)
                .send()
                .await
                .map_err(|e| Ec2Error::from_sdk("DeleteKeyPair", e))?;
            report.key_pairs.push(name);
        }

        let volumes = client
            .describe_volumes()
            .filters(by_uid())
            .filters(Filter::builder().name("status").values("available").build())
            .send()
            .await
            .map_err(|e| Ec2Error::from_sdk("DescribeVolumes", e))?;
        for volume in volumes.volumes() {
            if let Some(id) = volume.volume_id() {
                client
                    .delete_volume()
                    .volume_id(id)
                    .send()
                    .await
                    .map_err(|e| Ec2Error::from_sdk("DeleteVolume", e))?;
                report.volumes.push(id.to_string());
            }
        }

        if images {
            let described = client
                .describe_images()
                .owners("self")
                .filters(by_uid())
                .send()
                .await
                .map_err(|e| Ec2Error::from_sdk("DescribeImages", e))?;
            for image in described.images() {
                let Some(id) = image.image_id() else { continue };
                client
                    .deregister_image()
                    .image_id(id)
                    .send()
                    .await
                    .map_err(|e| Ec2Error::from_sdk("DeregisterImage", e))?;
                report.images.push(id.to_string());
                for snapshot in image
                    .block_device_mappings()
                    .iter()
                    .filter_map(|m| m.ebs()?.snapshot_id())
                {
                    client
                        .delete_snapshot()
                        .snapshot_id(snapshot)
                        .send()
                        .await
                        .map_err(|e| Ec2Error::from_sdk("DeleteSnapshot", e))?;
                    report.snapshots.push(snapshot.to_string());
                }
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_packer_made_groups_and_keys_are_swept_through_instances() {
        assert!(packer_made("packer_6571b2f1-9a3c"));
        assert!(!packer_made("default"));
        assert!(!packer_made("team-bastion"));
    }

    #[test]
    fn sweep_report_describes_what_it_removed() {
        let report = SweepReport {
            instances: vec!["i-1".into()],
            key_pairs: vec!["packer_1".into()],
            ..Default::default()
        };
        assert_eq!(report.describe(), "instance(s) i-1; key pair(s) packer_1");
        assert_eq!(SweepReport::default().describe(), "nothing");
    }

    #[test]
    fn newest_image_sorts_first() {
        let mut images = vec![
            ImageSummary {
                image_id: "ami-a".into(),
                creation_date: Some("2026-01-01T00:00:00.000Z".into()),
                ..Default::default()
            },
            ImageSummary {
                image_id: "ami-b".into(),
                creation_date: Some("2026-03-01T00:00:00.000Z".into()),
                ..Default::default()
            },
            ImageSummary {
                image_id: "ami-c".into(),
                creation_date: None,
                ..Default::default()
            },
        ];
        sort_newest_first(&mut images);
        let ids: Vec<_> = images.iter().map(|i| i.image_id.as_str()).collect();
        assert_eq!(ids, ["ami-b", "ami-a", "ami-c"]);
    }

    #[test]
    fn source_filters_always_pin_state_and_virtualization_type() {
        let filter = ImageFilter {
            owners: vec!["self".into()],
            name: Some("base-{virtualizationType}-*".into()),
            tags: BTreeMap::from([("role".to_string(), "base".to_string())]),
        };
        let filters = source_filters(&filter, VirtualizationType::Paravirtual);
        let pairs: Vec<(String, Vec<String>)> = filters
            .iter()
            .map(|f| (f.name().unwrap_or_default().to_string(), f.values().to_vec()))
            .collect();
        assert!(pairs.contains(&("state".into(), vec!["available".into()])));
        assert!(pairs.contains(&("virtualization-type".into(), vec!["paravirtual".into()])));
        assert!(pairs.contains(&("name".into(), vec!["base-paravirtual-*".into()])));
        assert!(pairs.contains(&("tag:role".into(), vec!["base".into()])));
    }
}
