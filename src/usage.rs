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
