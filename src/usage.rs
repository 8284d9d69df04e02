//! Whether an image is still used: one rule for a catalog's retention and for a deleted Bake's
//! `deregisterImageOnDelete`. An image is used while a Bake in any namespace the operator watches
//! names it (its `amiId`, or the source of a Bake not finished), another image records it as its
//! base, an instance runs from it, or a launch template names it.

use kube::ResourceExt;

use crate::api::Bake;
use crate::aws::{Ec2, Ec2Error, Uses};

/// Images Bakes name, read from the Bake cache: their AMIs, and the sources of Bakes not finished.
/// `except` is the UID of a Bake that does not count (the deleted Bake itself).
pub fn bake_uses<B: std::ops::Deref<Target = Bake>>(bakes: &[B], except: Option<&str>) -> Uses {
    let mut uses = Uses::new();
    for bake in bakes {
        if except.is_some_and(|uid| bake.uid().as_deref() == Some(uid)) {
            continue;
        }
        let Some(status) = bake.status.as_ref() else {
            continue;
        };
        let who = format!("{}/{}", bake.namespace().unwrap_or_default(), bake.name_any());
        if let Some(ami) = &status.ami_id {
            uses.entry(ami.clone())
                .or_insert_with(|| format!("the amiId of Bake {who}"));
        }
        for artifact in &status.artifacts {
            if let Some(id) = &artifact.image_id
                && status.ami_id.as_deref() != Some(id.as_str())
            {
                uses.entry(id.clone())
                    .or_insert_with(|| format!("the copy in {} of Bake {who}'s image", artifact.region));
            }
        }
        if let Some(source) = &status.source_ami_id
            && !status.phase.is_some_and(|p| p.is_terminal())
        {
            uses.entry(source.clone())
                .or_insert_with(|| format!("the source of Bake {who}, not finished"));
        }
    }
    uses
}

/// Which of `ids` are used, and by what: `bakes` (from [`bake_uses`]) first, then EC2. Every EC2
/// check must succeed: removal needs proof that nothing uses an image.
pub async fn in_use(ec2: &Ec2, region: &str, ids: &[String], bakes: Uses) -> Result<Uses, Ec2Error> {
    let mut uses: Uses = bakes.into_iter().filter(|(id, _)| ids.contains(id)).collect();
    if ids.is_empty() {
        return Ok(uses);
    }
    let bases = ec2.bases_among(region, ids).await?;
    let instances = ec2.instances_using(region, ids).await?;
    let templates = ec2.launch_template_images(region).await?;
    for found in [bases, instances, templates] {
        for (id, reason) in found {
            if ids.contains(&id) {
                uses.entry(id).or_insert(reason);
            }
        }
    }
    Ok(uses)
}

/// Copies of an image in other regions: (region, copy).
pub type Copies = Vec<(String, crate::aws::ImageSummary)>;

/// The copies of `images` in every region their `baker.io/copied-to` tag names, and which images
/// are used through a copy (the reason names the region). An image is kept while any copy is.
pub async fn copies_in_use(
    ec2: &Ec2,
    images: &[crate::aws::ImageSummary],
    bakes: &Uses,
) -> Result<(Uses, std::collections::BTreeMap<String, Copies>), Ec2Error> {
    let mut copies: std::collections::BTreeMap<String, Copies> = Default::default();
    let mut by_region: std::collections::BTreeMap<String, Vec<(String, String)>> = Default::default();
    for image in images {
        for region in crate::distribution::copy_regions(image) {
            for copy in ec2.copies_of(&region, &image.image_id).await? {
                by_region
                    .entry(region.clone())
                    .or_default()
                    .push((copy.image_id.clone(), image.image_id.clone()));
                copies
                    .entry(image.image_id.clone())
                    .or_default()
                    .push((region.clone(), copy));
            }
        }
    }
    let mut uses = Uses::new();
    for (region, pairs) in by_region {
        let ids: Vec<String> = pairs.iter().map(|(copy, _)| copy.clone()).collect();
        let used = in_use(ec2, &region, &ids, bakes.clone()).await?;
        for (copy, image) in pairs {
            if let Some(reason) = used.get(&copy) {
                uses.entry(image)
                    .or_insert_with(|| format!("its copy {copy} in {region} is {reason}"));
            }
        }
    }
    Ok((uses, copies))
}

/// Removes an image's copies (and their snapshots), then the image: never an image without its
/// copies gone first, so a failure halfway leaves the image, which names where its copies are.
pub async fn remove_with_copies(
    ec2: &Ec2,
    region: &str,
    image: &crate::aws::ImageSummary,
    copies: &[(String, crate::aws::ImageSummary)],
) -> Result<(), Ec2Error> {
    for (copy_region, copy) in copies {
        ec2.remove_image(copy_region, copy).await?;
    }
    ec2.remove_image(region, image).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{BakePhase, BakeStatus};

    fn bake(uid: &str, ami: Option<&str>, source: &str, phase: BakePhase) -> Bake {
        let mut b = Bake::new(uid, crate::fixtures::bake_spec("1.0.0"));
        b.metadata.namespace = Some("team-a".into());
        b.metadata.uid = Some(uid.into());
        b.status = Some(BakeStatus {
            phase: Some(phase),
            ami_id: ami.map(str::to_string),
            source_ami_id: Some(source.into()),
            ..Default::default()
        });
        b
    }

    #[test]
    fn bakes_use_their_amis_and_the_sources_of_unfinished_bakes_but_not_the_excepted_one() {
        let bakes: Vec<std::sync::Arc<Bake>> = [
            bake("done", Some("ami-done"), "ami-src-done", BakePhase::Succeeded),
            bake("running", None, "ami-src-running", BakePhase::Running),
            bake(
                "deleted",
                Some("ami-deleted"),
                "ami-src-deleted",
                BakePhase::Succeeded,
            ),
        ]
        .into_iter()
        .map(std::sync::Arc::new)
        .collect();
        let uses = bake_uses(&bakes, Some("deleted"));
        assert_eq!(
            uses.get("ami-done").map(String::as_str),
            Some("the amiId of Bake team-a/done")
        );
        assert!(uses.contains_key("ami-src-running"));
        assert!(!uses.contains_key("ami-src-done"));
        assert!(!uses.contains_key("ami-deleted"));
    }
}
