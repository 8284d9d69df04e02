//! AmiChannels end to end on the rig: a catalog of images (copies of the rig's source image, so
//! no bake is needed), channels that follow it or are pinned, publishing to moto's SSM parameters
//! and launch templates, and what a tenant may not publish to.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use aws_sdk_ec2::types::{RequestLaunchTemplateData, ResourceType, Tag, TagSpecification};
use baker::api::channel::AmiChannel;
use baker::api::conditions;
use kube::api::{Api, Patch, PatchParams};

use crate::support::bake::*;
use crate::support::{Rig, TestNamespace, try_wait_until, wait_for_object};

pub(crate) async fn apply_channel(api: &Api<AmiChannel>, name: &str, spec: &str) -> Result<()> {
    let mut yaml =
        format!("apiVersion: baker.io/v1alpha1\nkind: AmiChannel\nmetadata:\n  name: {name}\nspec:\n");
    for line in spec.lines() {
        yaml.push_str(&format!("  {line}\n"));
    }
    let channel: AmiChannel = serde_yaml::from_str(&yaml)?;
    api.patch(
        name,
        &PatchParams::apply("baker-tests").force(),
        &Patch::Apply(&channel),
    )
    .await?;
    Ok(())
}

/// Waits until the channel's status satisfies `cond`.
async fn wait_channel(
    api: &Api<AmiChannel>,
    name: &str,
    what: &str,
    cond: impl Fn(&baker::api::channel::AmiChannelStatus) -> bool,
) -> Result<AmiChannel> {
    wait_for_object(api, name, Duration::from_secs(60), what, |c| {
        c.status.as_ref().is_some_and(&cond)
    })
    .await
}

fn condition(status: &baker::api::channel::AmiChannelStatus, type_: &str) -> Option<(String, String)> {
    conditions::find(&status.conditions, type_).map(|c| (c.status.clone(), c.reason.clone()))
}

fn ready(status: &baker::api::channel::AmiChannelStatus) -> bool {
    condition(status, "Ready").is_some_and(|(s, _)| s == "True")
}

/// A launch template named `name` whose `baker.io/publish-namespace` tag is `tag` (none: untagged),
/// starting from `image`; returns its id.
async fn launch_template(rig: &Rig, name: &str, tag: Option<&str>, image: &str) -> Result<String> {
    let mut request = rig
        .ec2()
        .create_launch_template()
        .launch_template_name(name)
        .launch_template_data(
            RequestLaunchTemplateData::builder()
                .image_id(image)
                .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
                .build(),
        );
    if let Some(tag) = tag {
        request = request.tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::LaunchTemplate)
                .tags(
                    Tag::builder()
                        .key("baker.io/publish-namespace")
                        .value(tag)
                        .build(),
                )
                .build(),
        );
    }
    let out = request.send().await?;
    out.launch_template()
        .and_then(|t| t.launch_template_id())
        .map(str::to_string)
        .context("the new launch template's id")
}

/// The launch template's (latest version, default version, image of its latest version).
async fn launch_template_state(rig: &Rig, name: &str) -> Result<(i64, i64, String)> {
    let ec2 = rig.ec2();
    let found = ec2
        .describe_launch_templates()
        .launch_template_names(name)
        .send()
        .await?;
    let t = found.launch_templates().first().context("the launch template")?;
    let versions = ec2
        .describe_launch_template_versions()
        .launch_template_name(name)
        .versions("$Latest")
        .send()
        .await?;
    let image = versions
        .launch_template_versions()
        .first()
        .and_then(|v| v.launch_template_data()?.image_id())
        .unwrap_or_default()
        .to_string();
    Ok((
        t.latest_version_number().unwrap_or_default(),
        t.default_version_number().unwrap_or_default(),
        image,
    ))
}

/// The SSM parameter's (value, data type), if it exists.
async fn parameter(rig: &Rig, name: &str) -> Result<Option<(String, String)>> {
    match rig.ssm().get_parameter().name(name).send().await {
        Ok(out) => Ok(out.parameter().map(|p| {
            (
                p.value().unwrap_or_default().to_string(),
                p.data_type().unwrap_or_default().to_string(),
            )
        })),
        Err(e) if e.as_service_error().is_some_and(|e| e.is_parameter_not_found()) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// A namespace with catalog `imgs` over images named `<ns>-img-*` (the first, `<ns>-img-1`, made
/// now) and an operator; returns the first image.
async fn catalog_namespace(prefix: &str) -> Result<(&'static Rig, TestNamespace, String, Operator)> {
    let (rig, _client, ns) = namespace(prefix).await?;
    let first = source_copy(rig, &format!("{}-img-1", ns.name())).await?;
    apply_catalog(
        &ns.api(),
        "imgs",
        &format!(
            "owners: [self]\nnamePattern: \"{}-img-*\"\nrefreshIntervalSeconds: 10",
            ns.name()
        ),
    )
    .await?;
    let operator = Operator::start(rig, ns.name()).await?;
    Ok((rig, ns, first, operator))
}

/// Adds image `<ns>-img-<n>` and waits until the catalog lists it as its latest.
async fn newer_image(rig: &Rig, ns: &TestNamespace, n: u32) -> Result<String> {
    // EC2 dates images to the second: the new one must be created in a later second than the
    // catalog's latest, or the two tie.
    let catalogs: Api<baker::api::AmiCatalog> = ns.api();
    let newest = wait_catalog(&catalogs, "imgs", "the catalog's latest image", |s| {
        s.latest.is_some()
    })
    .await?
    .status
    .and_then(|s| s.latest?.creation_date)
    .and_then(|d| d.parse::<jiff::Timestamp>().ok())
    .context("the latest image's creation date")?;
    try_wait_until(
        Duration::from_secs(5),
        "a second later than the latest image",
        || async { Ok((jiff::Timestamp::now().as_second() > newest.as_second()).then_some(())) },
    )
    .await?;
    let id = source_copy(rig, &format!("{}-img-{n}", ns.name())).await?;
    wait_catalog(&ns.api(), "imgs", "the new image listed as the latest", |s| {
        s.latest.as_ref().is_some_and(|l| l.image_id == id)
    })
    .await?;
    Ok(id)
}

#[tokio::test]
#[ignore = "needs the rig: make test"]
async fn a_channel_following_latest_publishes_to_an_ssm_parameter_and_a_launch_template_and_moves_with_the_catalog()
-> Result<()> {
    let (rig, ns, first, _operator) = catalog_namespace("chan").await?;
    let lt = format!("{}-web", ns.name());
    launch_template(rig, &lt, Some(ns.name()), &first).await?;
    let param = format!("/baker/{}/web/ami", ns.name());
    let channels: Api<AmiChannel> = ns.api();
    apply_channel(
        &channels,
        "web",
        &format!(
            "catalog: imgs\nfollow: Latest\npublish:\n  ssmParameters: [{param}]\n  launchTemplates:\n  - name: {lt}\n    makeDefault: true"
        ),
    )
    .await?;
    let c = wait_channel(&channels, "web", "the channel Ready on the first image", |s| {
        ready(s) && s.image_id.as_deref() == Some(first.as_str())
    })
    .await?;
    let status = c.status.context("status")?;
    ensure!(status.published.len() == 2, "{:?}", status.published);
    ensure!(
        parameter(rig, &param).await? == Some((first.clone(), "aws:ec2:image".into())),
        "the parameter holds the image, as data type aws:ec2:image"
    );
    // The template started on this image: nothing to add.
    ensure!(launch_template_state(rig, &lt).await? == (1, 1, first.clone()));

    let second = newer_image(rig, &ns, 2).await?;
    let c = wait_channel(&channels, "web", "the channel moved to the new image", |s| {
        ready(s) && s.image_id.as_deref() == Some(second.as_str())
    })
    .await?;
    ensure!(parameter(rig, &param).await?.map(|p| p.0) == Some(second.clone()));
    ensure!(
        launch_template_state(rig, &lt).await? == (2, 2, second.clone()),
        "a new version with the image, made the default"
    );
    let status = c.status.context("status")?;
    let history: Vec<&str> = status.history.iter().map(|m| m.image_id.as_str()).collect();
    ensure!(history == [second.as_str(), first.as_str()], "{history:?}");
    ensure!(status.history[1].until.is_some() && status.history[0].until.is_none());
    let moved = event_notes(&ns, "Moved").await?;
    ensure!(
        moved.iter().any(|n| n.contains(&first) && n.contains(&second)),
        "{moved:?}"
    );
    let get = rig.kubectl(["get", "amichannels", "-n", ns.name()]).await?.ok()?;
    ensure!(get.stdout.contains(&second), "{}", get.stdout);
    finish(ns).await
}

#[tokio::test]
#[ignore = "needs the rig: make test"]
async fn a_pinned_channel_moves_only_when_its_image_field_changes() -> Result<()> {
    let (rig, ns, first, _operator) = catalog_namespace("pin").await?;
    let param = format!("/baker/{}/pinned", ns.name());
    let channels: Api<AmiChannel> = ns.api();
    let spec = |image: &str, limit: u32| {
        format!(
            "catalog: imgs\nimageId: {image}\nhistoryLimit: {limit}\npublish:\n  ssmParameters: [{param}]"
        )
    };
    apply_channel(&channels, "prod", &spec(&first, 10)).await?;
    wait_channel(&channels, "prod", "the pinned channel Ready", |s| {
        ready(s) && s.image_id.as_deref() == Some(first.as_str())
    })
    .await?;
    let second = newer_image(rig, &ns, 2).await?;
    // A change of an unrelated field makes the channel look again with the new catalog.
    apply_channel(&channels, "prod", &spec(&first, 9)).await?;
    let c = wait_channel(&channels, "prod", "the channel to see its change", |s| {
        s.observed_generation == Some(2)
    })
    .await?;
    ensure!(
        c.status.as_ref().and_then(|s| s.image_id.clone()) == Some(first.clone()),
        "a pinned channel does not follow the catalog"
    );
    ensure!(parameter(rig, &param).await?.map(|p| p.0) == Some(first.clone()));
    // Promotion: a change of the field.
    apply_channel(&channels, "prod", &spec(&second, 9)).await?;
    wait_channel(&channels, "prod", "the channel promoted", |s| {
        ready(s) && s.image_id.as_deref() == Some(second.as_str()) && s.history.len() == 2
    })
    .await?;
    ensure!(parameter(rig, &param).await?.map(|p| p.0) == Some(second));
    // An image neither in the catalog nor baked here is refused; the channel stays.
    apply_channel(&channels, "prod", &spec("ami-0123456789abcdef0", 9)).await?;
    let c = wait_channel(&channels, "prod", "the unknown image refused", |s| {
        condition(s, "Ready").is_some_and(|(st, r)| st == "False" && r == "ImageNotFound")
    })
    .await?;
    ensure!(c.status.and_then(|s| s.image_id) != Some("ami-0123456789abcdef0".into()));
    finish(ns).await
}

#[tokio::test]
#[ignore = "needs the rig: make test"]
async fn a_tenant_cannot_publish_outside_its_ssm_path_or_to_launch_templates_not_assigned_to_it() -> Result<()>
{
    let (rig, ns, first, _operator) = catalog_namespace("fence").await?;
    let name = ns.name().to_string();
    // Another team's launch template, an untagged one, and a parameter of another channel.
    let theirs = format!("{name}-theirs");
    launch_template(rig, &theirs, Some("payments"), &first).await?;
    let untagged = format!("{name}-untagged");
    launch_template(rig, &untagged, None, &first).await?;
    let taken = format!("/baker/{name}/taken");
    rig.ssm()
        .put_parameter()
        .name(&taken)
        .value(&first)
        .r#type(aws_sdk_ssm::types::ParameterType::String)
        .tags(
            aws_sdk_ssm::types::Tag::builder()
                .key("baker.io/channel")
                .value(format!("{name}/someone-else"))
                .build()?,
        )
        .send()
        .await?;
    let outside = "/baker/payments/prod/ami".to_string();
    let second = newer_image(rig, &ns, 2).await?;
    let channels: Api<AmiChannel> = ns.api();
    apply_channel(
        &channels,
        "greedy",
        &format!(
            "catalog: imgs\nfollow: Latest\npublish:\n  ssmParameters: [{outside}, {taken}]\n  launchTemplates:\n  - name: {theirs}\n  - name: {untagged}\n  - name: {name}-missing"
        ),
    )
    .await?;
    let c = wait_channel(&channels, "greedy", "every target refused", |s| {
        s.published.len() == 5 && s.published.iter().all(|p| p.state == "Refused")
    })
    .await?;
    let status = c.status.context("status")?;
    ensure!(
        condition(&status, "Ready") == Some(("False".into(), "PublishRefused".into())),
        "{:?}",
        status.conditions
    );
    ensure!(
        parameter(rig, &outside).await?.is_none(),
        "nothing written outside the namespace's path"
    );
    ensure!(
        parameter(rig, &taken).await?.map(|p| p.0) == Some(first.clone()),
        "another channel's parameter is untouched"
    );
    for lt in [&theirs, &untagged] {
        ensure!(
            launch_template_state(rig, lt).await? == (1, 1, first.clone()),
            "launch template {lt} is untouched"
        );
    }
    let refused = event_notes(&ns, "PublishRefused").await?;
    ensure!(refused.len() >= 5, "a Warning per refused target: {refused:?}");
    ensure!(status.image_id.as_deref() == Some(second.as_str()));
    finish(ns).await
}

/// Waits until a condition of the channel has this status and reason.
pub(crate) async fn wait_channel_condition(
    api: &Api<AmiChannel>,
    name: &str,
    type_: &str,
    status: &str,
    reason: &str,
) -> Result<AmiChannel> {
    try_wait_until(
        Duration::from_secs(60),
        &format!("channel {name} {type_}={status} ({reason})"),
        || async {
            let c = api.get(name).await?;
            let ok = c
                .status
                .as_ref()
                .and_then(|s| condition(s, type_))
                .is_some_and(|(st, r)| st == status && r == reason);
            Ok(ok.then_some(c))
        },
    )
    .await
}
