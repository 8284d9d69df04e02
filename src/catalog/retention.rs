//! Retention, as pure functions: which images a catalog's retention may touch at all, which of
//! those are past its policy, which of those something still uses, and what `status.retention`
//! says afterwards.

use std::collections::BTreeMap;

use crate::api::catalog::{ProtectedImage, RemovedImage, Retention, RetentionStatus};
use crate::api::keys;
use crate::aws::{ImageSummary, Uses, sort_newest_first};
use crate::config::Scope;

/// Protected images listed in status; the rest are counted.
pub const MAX_PROTECTED_LISTED: usize = 20;

/// The images retention may consider for a catalog in `namespace`: only images Baker baked
/// (tagged with a Bake's UID), and with the default scope only those baked for Bakes of the
/// same namespace. A tenant's catalog never reaches another tenant's images, nor images Baker
/// did not make, whatever its query matches.
pub fn in_scope(images: &[ImageSummary], scope: Scope, namespace: &str) -> Vec<ImageSummary> {
    images
        .iter()
        .filter(|i| i.baked_by_baker() && scope.reaches(namespace, i.baker_namespace()))
        .cloned()
        .collect()
}

/// Images past the policy: available images that are neither among the newest `keepNewest` of
/// their service nor younger than `maxAgeDays` (when set). The newest image of each service is
/// always kept, and images being made are never touched.
pub fn past_policy(images: &[ImageSummary], policy: &Retention, now: jiff::Timestamp) -> Vec<ImageSummary> {
    let mut by_service: BTreeMap<Option<&str>, Vec<&ImageSummary>> = BTreeMap::new();
    for image in images.iter().filter(|i| i.state.as_deref() == Some("available")) {
        by_service
            .entry(image.tags.get(keys::SERVICE).map(String::as_str))
            .or_default()
            .push(image);
    }
    let keep_newest = policy.keep_newest.and_then(|n| usize::try_from(n).ok());
    let max_age = policy
        .max_age_days
        .map(|d| jiff::SignedDuration::from_hours(i64::from(d) * 24));
    let young = |image: &ImageSummary| match (max_age, &image.creation_date) {
        (Some(age), Some(date)) => date
            .parse::<jiff::Timestamp>()
            // An unreadable date is kept: removal needs proof of age.
            .map_or(true, |created| now.duration_since(created) < age),
        (Some(_), None) => true,
        (None, _) => false,
    };
    let mut out = Vec::new();
    for group in by_service.into_values() {
        let mut group: Vec<ImageSummary> = group.into_iter().cloned().collect();
        sort_newest_first(&mut group);
        for (rank, image) in group.into_iter().enumerate() {
            // The newest of a group stays whatever the limits say: an age limit alone must not
            // leave a service without an image.
            let newest = rank == 0 || keep_newest.is_some_and(|n| rank < n);
            // With only an age limit, rank does not keep anything; with only a count, age does not.
            if newest || young(&image) || (keep_newest.is_none() && max_age.is_none()) {
                continue;
            }
            out.push(image);
        }
    }
    sort_newest_first(&mut out);
    out
}

/// The images past the policy split into those to remove and those something uses.
pub fn split(past: Vec<ImageSummary>, uses: &[&Uses]) -> (Vec<ImageSummary>, Vec<ProtectedImage>) {
    let mut remove = Vec::new();
    let mut protected = Vec::new();
    for image in past {
        match uses.iter().find_map(|u| u.get(&image.image_id)) {
            Some(reason) => protected.push(ProtectedImage {
                image_id: image.image_id.clone(),
                reason: reason.clone(),
            }),
            None => remove.push(image),
        }
    }
    (remove, protected)
}

/// What one sync does: remove at most `cap` images (the oldest first, so a capped pass frees the
/// least wanted), defer the rest to later syncs.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    pub remove: Vec<ImageSummary>,
    pub protected: Vec<ProtectedImage>,
    /// Past the policy and unused, but over this sync's cap.
    pub deferred: usize,
}

pub fn plan(past: Vec<ImageSummary>, uses: &[&Uses], cap: usize) -> Plan {
    let (mut remove, protected) = split(past, uses);
    // `past` is newest first: the oldest are at the end.
    remove.reverse();
    let deferred = remove.len().saturating_sub(cap);
    remove.truncate(cap);
    Plan {
        remove,
        protected,
        deferred,
    }
}

pub fn removed_image(image: &ImageSummary) -> RemovedImage {
    RemovedImage {
        image_id: image.image_id.clone(),
        name: image.name.clone(),
        creation_date: image.creation_date.clone(),
        snapshot_ids: image.snapshot_ids.clone(),
    }
}

/// `status.retention` after a pass. A dry run lists what it would remove now; a real pass keeps
/// the list of the last pass that removed something, so a removal stays visible. Protected images
/// past [`MAX_PROTECTED_LISTED`] are counted, not listed, so status stays small.
pub fn next_status(
    previous: Option<&RetentionStatus>,
    dry_run: bool,
    removed: &[ImageSummary],
    mut protected: Vec<ProtectedImage>,
    deferred: usize,
) -> RetentionStatus {
    let removed: Vec<RemovedImage> = removed.iter().map(removed_image).collect();
    let removed = match previous {
        Some(p) if !dry_run && !p.dry_run && removed.is_empty() => p.removed.clone(),
        _ => removed,
    };
    let not_listed = protected.len().saturating_sub(MAX_PROTECTED_LISTED);
    protected.truncate(MAX_PROTECTED_LISTED);
    let count = |n: usize| (n > 0).then(|| i32::try_from(n).unwrap_or(i32::MAX));
    RetentionStatus {
        dry_run,
        removed,
        protected,
        protected_not_listed: count(not_listed),
        deferred: count(deferred),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(id: &str, service: &str, day: u32) -> ImageSummary {
        ImageSummary {
            image_id: id.into(),
            creation_date: Some(format!("2026-01-{day:02}T00:00:00.000Z")),
            state: Some("available".into()),
            tags: BTreeMap::from([
                (keys::SERVICE.to_string(), service.to_string()),
                (keys::BAKE_UID.to_string(), format!("uid-{id}")),
                (keys::NAMESPACE.to_string(), "team-a".to_string()),
            ]),
            ..Default::default()
        }
    }

    fn now() -> jiff::Timestamp {
        "2026-02-01T00:00:00Z".parse().expect("a timestamp")
    }

    fn ids(images: &[ImageSummary]) -> Vec<&str> {
        images.iter().map(|i| i.image_id.as_str()).collect()
    }

    fn policy(keep: Option<i32>, days: Option<i32>) -> Retention {
        Retention {
            keep_newest: keep,
            max_age_days: days,
            dry_run: false,
        }
    }

    #[test]
    fn keep_newest_counts_per_service() {
        let images: Vec<_> = (1..=5)
            .map(|d| image(&format!("ami-a{d}"), "a", d))
            .chain((1..=2).map(|d| image(&format!("ami-b{d}"), "b", d)))
            .collect();
        let past = past_policy(&images, &policy(Some(3), None), now());
        assert_eq!(ids(&past), ["ami-a2", "ami-a1"]);
    }

    #[test]
    fn an_age_limit_keeps_young_images_even_past_the_count() {
        let images: Vec<_> = (1..=5).map(|d| image(&format!("ami-{d}"), "a", d * 5)).collect();
        // Days 5..25 of January; on Feb 1 those younger than 10 days are the 25th only.
        let past = past_policy(&images, &policy(Some(1), Some(10)), now());
        assert_eq!(ids(&past), ["ami-4", "ami-3", "ami-2", "ami-1"]);
        let past = past_policy(&images, &policy(None, Some(20)), now());
        assert_eq!(ids(&past), ["ami-2", "ami-1"]);
    }

    #[test]
    fn an_age_limit_alone_never_removes_the_newest_image_of_a_service() {
        let images: Vec<_> = (1..=3).map(|d| image(&format!("ami-{d}"), "a", d)).collect();
        let past = past_policy(&images, &policy(None, Some(1)), now());
        assert_eq!(ids(&past), ["ami-2", "ami-1"]);
    }

    #[test]
    fn only_images_baker_baked_for_the_catalogs_namespace_are_in_scope() {
        let mine = image("ami-mine", "a", 1);
        let mut theirs = image("ami-theirs", "a", 2);
        theirs.tags.insert(keys::NAMESPACE.into(), "team-b".into());
        let mut foreign = image("ami-foreign", "a", 3);
        foreign.tags.remove(keys::BAKE_UID);
        // Made before the namespace tag: the Bake tag names the namespace.
        let mut older = image("ami-older", "a", 4);
        older.tags.remove(keys::NAMESPACE);
        older.tags.insert(keys::BAKE.into(), "team-a/b".into());
        let all = [mine, theirs, foreign, older];
        assert_eq!(
            ids(&in_scope(&all, Scope::Namespace, "team-a")),
            ["ami-mine", "ami-older"]
        );
        assert_eq!(
            ids(&in_scope(&all, Scope::Cluster, "team-a")),
            ["ami-mine", "ami-theirs", "ami-older"]
        );
    }

    #[test]
    fn a_sync_removes_at_most_its_cap_oldest_first_and_defers_the_rest() {
        let past: Vec<_> = (1..=8)
            .rev()
            .map(|d| image(&format!("ami-{d}"), "a", d))
            .collect();
        let p = plan(past, &[], 3);
        assert_eq!(ids(&p.remove), ["ami-1", "ami-2", "ami-3"]);
        assert_eq!(p.deferred, 5);
        let status = next_status(None, false, &p.remove, p.protected, p.deferred);
        assert_eq!(status.deferred, Some(5));
    }

    #[test]
    fn status_lists_a_bounded_number_of_protected_images_and_counts_the_rest() {
        let protected: Vec<_> = (0..25)
            .map(|i| ProtectedImage {
                image_id: format!("ami-{i}"),
                reason: "used".into(),
            })
            .collect();
        let status = next_status(None, false, &[], protected, 0);
        assert_eq!(status.protected.len(), MAX_PROTECTED_LISTED);
        assert_eq!(status.protected_not_listed, Some(5));
        assert_eq!(status.deferred, None);
    }

    #[test]
    fn pending_images_are_never_past_the_policy() {
        let mut pending = image("ami-p", "a", 1);
        pending.state = Some("pending".into());
        let past = past_policy(
            &[pending, image("ami-new", "a", 9)],
            &policy(Some(1), None),
            now(),
        );
        assert!(past.is_empty());
    }

    #[test]
    fn used_images_are_protected_with_the_reason() {
        let past = vec![image("ami-1", "a", 1), image("ami-2", "a", 2)];
        let bakes = Uses::from([("ami-1".to_string(), "the amiId of Bake ns/b".to_string())]);
        let (remove, protected) = split(past, &[&bakes, &Uses::new()]);
        assert_eq!(ids(&remove), ["ami-2"]);
        assert_eq!(protected[0].image_id, "ami-1");
        assert_eq!(protected[0].reason, "the amiId of Bake ns/b");
    }

    #[test]
    fn a_real_pass_that_removes_nothing_keeps_the_last_removals_listed() {
        let first = next_status(None, false, &[image("ami-1", "a", 1)], vec![], 0);
        let second = next_status(Some(&first), false, &[], vec![], 0);
        assert_eq!(second.removed, first.removed);
        let dry = next_status(Some(&second), true, &[], vec![], 0);
        assert!(dry.removed.is_empty() && dry.dry_run);
    }
}
