//! The EC2 calls of distribution: find an image and its copies, copy, tag, share, deprecate.
//! Each is one request (or one paginated read) and safe to repeat.

use std::collections::{BTreeMap, BTreeSet};

use aws_sdk_ec2::types::{
    Filter, ImageAttributeName, LaunchPermission, LaunchPermissionModifications, OperationType, ResourceType,
    SnapshotAttributeName, Tag, TagSpecification,
};

use super::Grantee;
use crate::api::keys;
use crate::aws::{Ec2, Ec2Error, ImageSummary};

impl Ec2 {
    /// One image by id, or `None` when EC2 does not list it (deregistered).
    pub async fn image(&self, region: &str, id: &str) -> Result<Option<ImageSummary>, Ec2Error> {
        // A disabled image (a revocation) is still there, and still Baker's to find.
        match self
            .client(region)
            .describe_images()
            .image_ids(id)
            .include_disabled(true)
            .send()
            .await
        {
            Ok(out) => Ok(out.images().first().map(ImageSummary::from)),
            Err(e) => {
                let e = Ec2Error::from_sdk("DescribeImages", e);
                if e.code.starts_with("InvalidAMIID") {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// This account's images in `region` with exactly this name (EC2 allows one per region; a
    /// copy keeps its image's name, so this finds a copy even before it is tagged).
    pub async fn images_named(&self, region: &str, name: &str) -> Result<Vec<ImageSummary>, Ec2Error> {
        let filters = vec![Filter::builder().name("name").values(name).build()];
        Ok(self
            .images_capped(region, &["self".to_string()], filters, usize::MAX)
            .await?
            .0)
    }

    /// This account's copies of `source` in `region`, by Baker's `baker.io/copy-of` tag.
    pub async fn copies_of(&self, region: &str, source: &str) -> Result<Vec<ImageSummary>, Ec2Error> {
        self.images_tagged(region, keys::COPY_OF, source).await
    }

    /// Who may launch the image besides its owner.
    pub async fn launch_grantees(&self, region: &str, id: &str) -> Result<BTreeSet<Grantee>, Ec2Error> {
        let out = self
            .client(region)
            .describe_image_attribute()
            .image_id(id)
            .attribute(ImageAttributeName::LaunchPermission)
            .send()
            .await
            .map_err(|e| Ec2Error::from_sdk("DescribeImageAttribute", e))?;
        Ok(out
            .launch_permissions()
            .iter()
            .filter_map(|p| {
                p.user_id()
                    .map(|a| Grantee::Account(a.to_string()))
                    .or_else(|| p.organization_arn().map(|o| Grantee::Organization(o.to_string())))
                    .or_else(|| p.organizational_unit_arn().map(|o| Grantee::Unit(o.to_string())))
            })
            .collect())
    }

    /// Accounts that may create volumes from a snapshot.
    pub async fn snapshot_accounts(
        &self,
        region: &str,
        snapshot: &str,
    ) -> Result<BTreeSet<String>, Ec2Error> {
        let out = self
            .client(region)
            .describe_snapshot_attribute()
            .snapshot_id(snapshot)
            .attribute(SnapshotAttributeName::CreateVolumePermission)
            .send()
            .await
            .map_err(|e| Ec2Error::from_sdk("DescribeSnapshotAttribute", e))?;
        Ok(out
            .create_volume_permissions()
            .iter()
            .filter_map(|p| p.user_id().map(str::to_string))
            .collect())
    }

    /// Copies `source` (in `source_region`) into `region` under the same name, tagged at creation
    /// where EC2 supports it. The SDK gives the request an idempotency token and keeps it across
    /// its retries, so a retried request makes no second copy. Returns the copy's id.
    pub async fn copy_image(
        &self,
        region: &str,
        source_region: &str,
        source: &ImageSummary,
        request: &CopyRequest<'_>,
    ) -> Result<String, Ec2Error> {
        let tags: Vec<Tag> = request
            .tags
            .iter()
            .map(|(k, v)| Tag::builder().key(k).value(v).build())
            .collect();
        let mut call = self
            .client(region)
            .copy_image()
            .source_image_id(&source.image_id)
            .source_region(source_region)
            .set_name(source.name.clone())
            .description(request.description)
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Image)
                    .set_tags(Some(tags.clone()))
                    .build(),
            )
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Snapshot)
                    .set_tags(Some(tags))
                    .build(),
            );
        if let Some(kms) = request.kms_key_id {
            call = call.encrypted(true).kms_key_id(kms);
        }
        let out = call
            .send()
            .await
            .map_err(|e| Ec2Error::from_sdk("CopyImage", e))?;
        out.image_id()
            .map(str::to_string)
            .ok_or_else(|| Ec2Error::new("CopyImage", "NoImageId", "EC2 answered without an image id"))
    }

    /// Puts tags on resources (an image and its snapshots), replacing values of equal keys.
    pub async fn tag(
        &self,
        region: &str,
        ids: &[String],
        tags: &BTreeMap<String, String>,
    ) -> Result<(), Ec2Error> {
        if ids.is_empty() || tags.is_empty() {
            return Ok(());
        }
        self.client(region)
            .create_tags()
            .set_resources(Some(ids.to_vec()))
            .set_tags(Some(
                tags.iter()
                    .map(|(k, v)| Tag::builder().key(k).value(v).build())
                    .collect(),
            ))
            .send()
            .await
            .map_err(|e| Ec2Error::from_sdk("CreateTags", e))?;
        Ok(())
    }

    /// Adds launch permissions to an image.
    pub async fn share(&self, region: &str, id: &str, grantees: &[Grantee]) -> Result<(), Ec2Error> {
        if grantees.is_empty() {
            return Ok(());
        }
        let add = grantees
            .iter()
            .map(|g| match g {
                Grantee::Account(a) => LaunchPermission::builder().user_id(a).build(),
                Grantee::Organization(o) => LaunchPermission::builder().organization_arn(o).build(),
                Grantee::Unit(u) => LaunchPermission::builder().organizational_unit_arn(u).build(),
            })
            .collect();
        self.client(region)
            .modify_image_attribute()
            .image_id(id)
            .launch_permission(
                LaunchPermissionModifications::builder()
                    .set_add(Some(add))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| Ec2Error::from_sdk("ModifyImageAttribute", e))?;
        Ok(())
    }

    /// Lets accounts create volumes from a snapshot.
    pub async fn share_snapshot(
        &self,
        region: &str,
        snapshot: &str,
        accounts: &[String],
    ) -> Result<(), Ec2Error> {
        if accounts.is_empty() {
            return Ok(());
        }
        self.client(region)
            .modify_snapshot_attribute()
            .snapshot_id(snapshot)
            .attribute(SnapshotAttributeName::CreateVolumePermission)
            .operation_type(OperationType::Add)
            .set_user_ids(Some(accounts.to_vec()))
            .send()
            .await
            .map_err(|e| Ec2Error::from_sdk("ModifySnapshotAttribute", e))?;
        Ok(())
    }

    /// Sets when EC2 marks the image deprecated.
    pub async fn deprecate(&self, region: &str, id: &str, at: jiff::Timestamp) -> Result<(), Ec2Error> {
        self.client(region)
            .enable_image_deprecation()
            .image_id(id)
            .deprecate_at(aws_sdk_ec2::primitives::DateTime::from_secs(at.as_second()))
            .send()
            .await
            .map_err(|e| Ec2Error::from_sdk("EnableImageDeprecation", e))?;
        Ok(())
    }
}

/// What a copy is made with.
pub struct CopyRequest<'a> {
    pub tags: &'a BTreeMap<String, String>,
    pub description: &'a str,
    pub kms_key_id: Option<&'a str>,
}
