//! Publishing a channel's image: SSM parameters (data type `aws:ec2:image`) and launch template
//! versions. Each call reads first and writes only when the target does not hold the image, and
//! refuses targets that are not the namespace's: a parameter another channel publishes (by
//! Baker's `baker.io/channel` tag on it) or a launch template not tagged for the namespace.

use std::sync::Arc;

use aws_sdk_ssm::types::{ParameterType, ResourceTypeForTagging, Tag};

use crate::api::channel::LaunchTemplateTarget;
use crate::api::keys;
use crate::aws::{CallMetrics, Ec2, Ec2Error, Regional};

/// What a target holds after publishing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Held {
    /// It held the image already.
    Unchanged { version: Option<i64> },
    /// It holds the image now.
    Written { version: Option<i64> },
    /// Not this namespace's (or channel's) to write, and why.
    Refused(String),
}

/// SSM clients, one per region, on the operator's AWS configuration (`AWS_ENDPOINT_URL_SSM`
/// points them at an SSM-compatible endpoint for local development).
pub struct Ssm {
    base: aws_config::SdkConfig,
    clients: Regional<aws_sdk_ssm::Client>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl Ssm {
    pub fn new(base: aws_config::SdkConfig, metrics: Arc<crate::metrics::Metrics>) -> Self {
        Self {
            base,
            clients: Regional::default(),
            metrics,
        }
    }

    fn client(&self, region: &str) -> aws_sdk_ssm::Client {
        self.clients.get(region, || {
            let config = aws_sdk_ssm::config::Builder::from(&self.base)
                .region(aws_sdk_ssm::config::Region::new(region.to_string()))
                .timeout_config(crate::aws::timeouts())
                .interceptor(CallMetrics(self.metrics.clone()))
                .build();
            aws_sdk_ssm::Client::from_conf(config)
        })
    }

    /// Makes parameter `name` in `region` hold `image`, on behalf of `channel` (`namespace/name`).
    pub async fn publish(
        &self,
        region: &str,
        name: &str,
        image: &str,
        channel: &str,
    ) -> Result<Held, Ec2Error> {
        let client = self.client(region);
        let current = match client.get_parameter().name(name).send().await {
            Ok(out) => out.parameter().and_then(|p| p.value()).map(str::to_string),
            Err(e) => {
                let e = Ec2Error::from_sdk_of("SSM", "GetParameter", e);
                if e.code != "ParameterNotFound" {
                    return Err(e);
                }
                None
            }
        };
        let description = format!("The image of AmiChannel {channel}, published by Baker");
        let put = |overwrite: bool| {
            client
                .put_parameter()
                .name(name)
                .value(image)
                .r#type(ParameterType::String)
                .data_type("aws:ec2:image")
                .description(&description)
                .overwrite(overwrite)
        };
        let Some(current) = current else {
            put(false)
                .tags(tag(keys::CHANNEL, channel)?)
                .tags(tag(keys::MANAGED_BY, keys::MANAGED_BY_VALUE)?)
                .send()
                .await
                .map_err(|e| Ec2Error::from_sdk_of("SSM", "PutParameter", e))?;
            return Ok(Held::Written { version: None });
        };
        let tags = client
            .list_tags_for_resource()
            .resource_type(ResourceTypeForTagging::Parameter)
            .resource_id(name)
            .send()
            .await
            .map_err(|e| Ec2Error::from_sdk_of("SSM", "ListTagsForResource", e))?;
        let owner = tags
            .tag_list()
            .iter()
            .find(|t| t.key() == keys::CHANNEL)
            .map(|t| t.value().to_string());
        if let Some(other) = owner.as_deref().filter(|o| *o != channel) {
            return Ok(Held::Refused(format!(
                "AmiChannel {other} publishes this parameter"
            )));
        }
        if current != image {
            // Tags cannot go with an overwrite: they are added apart.
            put(true)
                .send()
                .await
                .map_err(|e| Ec2Error::from_sdk_of("SSM", "PutParameter", e))?;
        }
        // A parameter made before (by a person, under the namespace's path) becomes the channel's.
        if owner.is_none() {
            client
                .add_tags_to_resource()
                .resource_type(ResourceTypeForTagging::Parameter)
                .resource_id(name)
                .tags(tag(keys::CHANNEL, channel)?)
                .send()
                .await
                .map_err(|e| Ec2Error::from_sdk_of("SSM", "AddTagsToResource", e))?;
        }
        Ok(if current == image {
            Held::Unchanged { version: None }
        } else {
            Held::Written { version: None }
        })
    }
}

fn tag(key: &str, value: &str) -> Result<Tag, Ec2Error> {
    Tag::builder()
        .key(key)
        .value(value)
        .build()
        .map_err(|e| Ec2Error::new("PutParameter", "InvalidTag", e.to_string()))
}

/// Makes launch template `target` in `region` have a version with `image` as its latest (and
/// default, if asked), provided its `baker.io/publish-namespace` tag names `namespace`.
pub async fn launch_template(
    ec2: &Ec2,
    region: &str,
    target: &LaunchTemplateTarget,
    image: &str,
    namespace: &str,
    description: &str,
) -> Result<Held, Ec2Error> {
    let client = ec2.client(region);
    let found = match client
        .describe_launch_templates()
        .launch_template_names(&target.name)
        .send()
        .await
    {
        Ok(out) => out.launch_templates().first().cloned(),
        Err(e) => {
            let e = Ec2Error::from_sdk("DescribeLaunchTemplates", e);
            if !e.code.starts_with("InvalidLaunchTemplateName") {
                return Err(e);
            }
            None
        }
    };
    let Some(template) = found else {
        return Ok(Held::Refused(format!(
            "there is no launch template {} in {region}: whoever administers the account creates it, tagged {}={namespace}",
            target.name,
            keys::PUBLISH_NAMESPACE
        )));
    };
    let tag = template
        .tags()
        .iter()
        .find(|t| t.key() == Some(keys::PUBLISH_NAMESPACE))
        .and_then(|t| t.value());
    if !super::launch_template_allowed(tag, namespace) {
        return Ok(Held::Refused(format!(
            "launch template {} is not assigned to this namespace: its {} tag does not name {namespace}",
            target.name,
            keys::PUBLISH_NAMESPACE
        )));
    }
    let id = template.launch_template_id().unwrap_or_default().to_string();
    let latest = template.latest_version_number();
    let latest_image = client
        .describe_launch_template_versions()
        .launch_template_id(&id)
        .versions("$Latest")
        .send()
        .await
        .map_err(|e| Ec2Error::from_sdk("DescribeLaunchTemplateVersions", e))?
        .launch_template_versions()
        .first()
        .and_then(|v| v.launch_template_data()?.image_id().map(str::to_string));
    let make_default = |version: i64| {
        let client = client.clone();
        let id = id.clone();
        async move {
            client
                .modify_launch_template()
                .launch_template_id(id)
                .default_version(version.to_string())
                .send()
                .await
                .map_err(|e| Ec2Error::from_sdk("ModifyLaunchTemplate", e))
        }
    };
    if latest_image.as_deref() == Some(image) {
        let Some(latest) = latest else {
            return Ok(Held::Unchanged { version: None });
        };
        if target.make_default && template.default_version_number() != Some(latest) {
            make_default(latest).await?;
            return Ok(Held::Written {
                version: Some(latest),
            });
        }
        return Ok(Held::Unchanged {
            version: Some(latest),
        });
    }
    let created = client
        .create_launch_template_version()
        .launch_template_id(&id)
        .source_version("$Latest")
        .version_description(crate::k8s::truncate(description, 255))
        .launch_template_data(
            aws_sdk_ec2::types::RequestLaunchTemplateData::builder()
                .image_id(image)
                .build(),
        )
        .send()
        .await
        .map_err(|e| Ec2Error::from_sdk("CreateLaunchTemplateVersion", e))?;
    let version = created.launch_template_version().and_then(|v| v.version_number());
    if target.make_default
        && let Some(v) = version
    {
        make_default(v).await?;
    }
    Ok(Held::Written { version })
}
