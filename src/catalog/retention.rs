//! Retention, as pure functions: which images of a catalog are past its policy, which of those
//! something still uses, and what `status.retention` says afterwards.

use std::collections::BTreeMap;

use crate::api::catalog::{ProtectedImage, RemovedImage, Retention, RetentionStatus};
use crate::api::keys;
use crate::aws::{ImageSummary, Uses, sort_newest_first};

/// Images past the policy: available images that are neither among the newest `keepNewest` of
/// their service nor younger than `maxAgeDays` (when set). Images being made are never touched.
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
            let newest = keep_newest.is_some_and(|n| rank < n);
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

pub fn removed_image(image: &ImageSummary) -> RemovedImage {
    RemovedImage {
        image_id: image.image_id.clone(),
        name: image.name.clone(),
        creation_date: image.creation_date.clone(),
        snapshot_ids: image.snapshot_ids.clone(),
    }
}

/// `status.retention` after a pass. A dry run lists what it would remove now; a real pass keeps
/// the list of the last pass that removed something, so a removal stays visible.
pub fn next_status(
    previous: Option<&RetentionStatus>,
    dry_run: bool,
    removed: &[ImageSummary],
    protected: Vec<ProtectedImage>,
) -> RetentionStatus {
    let removed: Vec<RemovedImage> = removed.iter().map(removed_image).collect();
    let removed = match previous {
        Some(p) if !dry_run && !p.dry_run && removed.is_empty() => p.removed.clone(),
        _ => removed,
    };
    RetentionStatus {
        dry_run,
        removed,
        protected,
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
            tags: BTreeMap::from([(keys::SERVICE.to_string(), service.to_string())]),
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
        let first = next_status(None, false, &[image("ami-1", "a", 1)], vec![]);
        let second = next_status(Some(&first), false, &[], vec![]);
        assert_eq!(second.removed, first.removed);
        let dry = next_status(Some(&second), true, &[], vec![]);
        assert!(dry.removed.is_empty() && dry.dry_run);
    }
}
