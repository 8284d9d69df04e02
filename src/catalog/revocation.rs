//! Revocation, as pure functions: which images a catalog's `revoked` list reaches (with their
//! descendants by Baker's lineage tag), what to do to each in EC2, and how the catalog's list
//! shows them. The catalog controller reads EC2 and acts.

use std::collections::{BTreeMap, BTreeSet};

use crate::api::catalog::{AmiCatalogStatus, Revocation, RevokeAction, RevokedImage};
use crate::aws::ImageSummary;
use crate::config::Scope;

/// How many generations of descendants a revocation follows.
pub const MAX_GENERATIONS: usize = 5;

/// A revoked image: why, and through which revoked ancestor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revoked {
    pub image_id: String,
    pub reason: String,
    pub descendant_of: Option<String>,
    pub action: RevokeAction,
}

/// The images `spec.revoked` names, then, for entries with `descendants`, the images built on
/// them generation by generation: `children` maps an image to those whose `baker.io/source-ami`
/// names it. An image reached twice keeps its first (most direct) reason.
pub fn expand(revocations: &[Revocation], children: &BTreeMap<String, Vec<String>>) -> Vec<Revoked> {
    let mut out: Vec<Revoked> = Vec::new();
    let mut seen = BTreeSet::new();
    for r in revocations {
        if seen.insert(r.image_id.clone()) {
            out.push(Revoked {
                image_id: r.image_id.clone(),
                reason: r.reason.clone(),
                descendant_of: None,
                action: r.action.unwrap_or_default(),
            });
        }
    }
    for r in revocations.iter().filter(|r| r.descendants) {
        let mut generation = vec![r.image_id.clone()];
        // Walked separately from `seen`: a descendant named in the list itself keeps its own
        // entry, and its children are still reached through it.
        let mut walked = BTreeSet::from([r.image_id.clone()]);
        for _ in 0..MAX_GENERATIONS {
            let mut next = Vec::new();
            for parent in &generation {
                for child in children.get(parent).into_iter().flatten() {
                    if !walked.insert(child.clone()) {
                        continue;
                    }
                    if seen.insert(child.clone()) {
                        out.push(Revoked {
                            image_id: child.clone(),
                            reason: r.reason.clone(),
                            descendant_of: Some(r.image_id.clone()),
                            action: r.action.unwrap_or_default(),
                        });
                    }
                    next.push(child.clone());
                }
            }
            if next.is_empty() {
                break;
            }
            generation = next;
        }
    }
    out
}

/// What to do to a revoked image in EC2, given how EC2 lists it: nothing if it is done already
/// (deprecated by now or sooner, or disabled), nothing if Baker did not bake it for this
/// namespace (`scope` decides, as for retention).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// Deprecate at this time (the next whole minute: EC2 refuses a time in the past).
    Deprecate(jiff::Timestamp),
    Disable,
    Done,
    NotOurs,
}

pub fn act(image: &ImageSummary, r: &Revoked, scope: Scope, namespace: &str, now: jiff::Timestamp) -> Act {
    if !image.baked_by_baker() || !scope.reaches(namespace, image.baker_namespace()) {
        return Act::NotOurs;
    }
    match r.action {
        RevokeAction::Disable if image.state.as_deref() == Some("disabled") => Act::Done,
        RevokeAction::Disable => Act::Disable,
        RevokeAction::Deprecate => {
            let soon = now + jiff::SignedDuration::from_secs(120);
            let deprecated = image
                .deprecation_time
                .as_deref()
                .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                .is_some_and(|t| t <= soon);
            if deprecated {
                Act::Done
            } else {
                let next_minute = (now.as_second() / 60 + 1) * 60;
                Act::Deprecate(jiff::Timestamp::from_second(next_minute).unwrap_or(now))
            }
        }
    }
}

/// The outcome word for status.
pub fn outcome(r: &Revoked, act: Act) -> &'static str {
    match (act, r.action) {
        (Act::NotOurs, _) => "NotActedOn",
        (_, RevokeAction::Deprecate) => "Deprecated",
        (_, RevokeAction::Disable) => "Disabled",
    }
}

/// Marks revoked images in the catalog's list, and makes `latest` the newest available image
/// that is not revoked.
pub fn mark(status: &mut AmiCatalogStatus, revoked: &[Revoked]) {
    let why: BTreeMap<&str, &Revoked> = revoked.iter().map(|r| (r.image_id.as_str(), r)).collect();
    for image in &mut status.images {
        image.revoked = why.get(image.image_id.as_str()).map(|r| match &r.descendant_of {
            Some(a) => format!("{} (built on revoked {a})", r.reason),
            None => r.reason.clone(),
        });
    }
    status.latest = status
        .images
        .iter()
        .find(|i| i.revoked.is_none() && i.state.as_deref() == Some("available"))
        .cloned();
}

/// The status entry for one revoked image.
pub fn status_entry(r: &Revoked, act: Act, copies: Vec<String>, message: Option<String>) -> RevokedImage {
    RevokedImage {
        image_id: r.image_id.clone(),
        reason: r.reason.clone(),
        descendant_of: r.descendant_of.clone(),
        outcome: outcome(r, act).to_string(),
        copies,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::catalog::CatalogImage;
    use crate::api::keys;

    fn revocation(id: &str, descendants: bool) -> Revocation {
        Revocation {
            image_id: id.into(),
            reason: "CVE-1".into(),
            descendants,
            action: None,
        }
    }

    #[test]
    fn descendants_are_followed_generation_by_generation_each_image_once() {
        let children = BTreeMap::from([
            (
                "ami-base".to_string(),
                vec!["ami-svc".to_string(), "ami-svc2".to_string()],
            ),
            ("ami-svc".to_string(), vec!["ami-leaf".to_string()]),
        ]);
        let all = expand(
            &[revocation("ami-base", true), revocation("ami-svc", false)],
            &children,
        );
        let ids: Vec<&str> = all.iter().map(|r| r.image_id.as_str()).collect();
        assert_eq!(ids, ["ami-base", "ami-svc", "ami-svc2", "ami-leaf"]);
        assert_eq!(
            all[1].descendant_of, None,
            "named directly, it keeps its own entry"
        );
        assert_eq!(all[3].descendant_of.as_deref(), Some("ami-base"));
        let alone = expand(&[revocation("ami-base", false)], &children);
        assert_eq!(alone.len(), 1);
    }

    fn image(namespace: &str, deprecation: Option<&str>, state: &str) -> ImageSummary {
        ImageSummary {
            image_id: "ami-base".into(),
            state: Some(state.into()),
            deprecation_time: deprecation.map(str::to_string),
            tags: BTreeMap::from([
                (keys::BAKE_UID.to_string(), "u".to_string()),
                (keys::NAMESPACE.to_string(), namespace.to_string()),
            ]),
            ..Default::default()
        }
    }

    #[test]
    fn only_images_baked_for_the_namespace_are_acted_on_and_only_once() {
        let now: jiff::Timestamp = "2026-12-03T10:00:30Z"
            .parse()
            .unwrap_or(jiff::Timestamp::UNIX_EPOCH);
        let r = &expand(&[revocation("ami-base", false)], &BTreeMap::new())[0];
        assert_eq!(
            act(
                &image("team-a", None, "available"),
                r,
                Scope::Namespace,
                "team-a",
                now
            ),
            Act::Deprecate("2026-12-03T10:01:00Z".parse().unwrap_or(now))
        );
        assert_eq!(
            act(
                &image("team-b", None, "available"),
                r,
                Scope::Namespace,
                "team-a",
                now
            ),
            Act::NotOurs
        );
        let deprecated = image("team-a", Some("2026-12-03T10:01:00.000Z"), "available");
        assert_eq!(act(&deprecated, r, Scope::Namespace, "team-a", now), Act::Done);
        let later = image("team-a", Some("2027-06-01T00:00:00.000Z"), "available");
        assert!(matches!(
            act(&later, r, Scope::Namespace, "team-a", now),
            Act::Deprecate(_)
        ));
        let disable = Revoked {
            action: RevokeAction::Disable,
            ..r.clone()
        };
        assert_eq!(
            act(
                &image("team-a", None, "available"),
                &disable,
                Scope::Namespace,
                "team-a",
                now
            ),
            Act::Disable
        );
        assert_eq!(
            act(
                &image("team-a", None, "disabled"),
                &disable,
                Scope::Namespace,
                "team-a",
                now
            ),
            Act::Done
        );
    }

    #[test]
    fn a_revoked_image_is_marked_and_never_the_latest() {
        let mut status = AmiCatalogStatus {
            images: ["ami-new", "ami-old"]
                .iter()
                .map(|id| CatalogImage {
                    image_id: id.to_string(),
                    state: Some("available".into()),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        mark(
            &mut status,
            &expand(&[revocation("ami-new", false)], &BTreeMap::new()),
        );
        assert_eq!(
            status.latest.as_ref().map(|l| l.image_id.as_str()),
            Some("ami-old")
        );
        assert_eq!(status.images[0].revoked.as_deref(), Some("CVE-1"));
        assert_eq!(
            crate::catalog::source_image(Some(&status), "hvm").as_deref(),
            Some("ami-old")
        );
    }
}
