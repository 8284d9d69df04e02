//! AmiCatalogs: the EC2 query a catalog's spec stands for, what its status becomes after a sync
//! (pure, unit-tested here), and the reconciler that runs the sync (`controller`).

pub mod controller;
pub mod error;
pub mod retention;
pub mod revocation;

pub use error::{Error, Result};

use std::time::Duration;

use aws_sdk_ec2::types::Filter;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::catalog::{AmiCatalog, AmiCatalogSpec, AmiCatalogStatus, CatalogImage};
use crate::api::conditions::{self, Desired, READY};
use crate::api::keys;
use crate::api::{Bake, BakePhase};
use crate::aws::{Ec2Error, ImageSummary, sort_newest_first};

/// Images listed in status when the spec sets no limit: the seed's `GET /amis/:service`.
pub const DEFAULT_LIMIT: usize = 10;
/// Seconds between syncs when the spec sets no interval.
pub const DEFAULT_REFRESH_SECONDS: u64 = 300;
/// A failed sync is retried at least this often, so a catalog recovers soon after EC2 does.
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(30);

/// Ready reason of a catalog that read EC2 successfully.
pub const REASON_SYNCED: &str = "Synced";

/// Owners to ask EC2 for: the spec's, or `self`.
pub fn owners(spec: &AmiCatalogSpec) -> Vec<String> {
    if spec.owners.is_empty() {
        vec!["self".to_string()]
    } else {
        spec.owners.clone()
    }
}

/// The server-side EC2 filters of a catalog: images being made or ready (not failed or
/// deregistered ones), the name pattern, the tags, and the service's `baker.io/service` tag.
pub fn filters(spec: &AmiCatalogSpec) -> Vec<Filter> {
    let mut out = vec![
        Filter::builder()
            .name("state")
            .values("available")
            .values("pending")
            .build(),
    ];
    if let Some(name) = &spec.name_pattern {
        out.push(Filter::builder().name("name").values(name).build());
    }
    for (k, v) in &spec.tags {
        out.push(Filter::builder().name(format!("tag:{k}")).values(v).build());
    }
    if let Some(service) = &spec.service {
        out.push(
            Filter::builder()
                .name(format!("tag:{}", keys::SERVICE))
                .values(service)
                .build(),
        );
    }
    out
}

pub fn limit(spec: &AmiCatalogSpec) -> usize {
    spec.limit
        .and_then(|l| usize::try_from(l).ok())
        .filter(|l| *l > 0)
        .unwrap_or(DEFAULT_LIMIT)
}

pub fn refresh_interval(spec: &AmiCatalogSpec) -> Duration {
    spec.refresh_interval_seconds
        .and_then(|s| u64::try_from(s).ok())
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(DEFAULT_REFRESH_SECONDS))
}

/// One catalog entry; service, version and source image come from Baker's tags. The
/// virtualization type is EC2's, or Baker's tag when EC2 does not say.
pub fn catalog_image(image: &ImageSummary) -> CatalogImage {
    let tag = |k: &str| image.tags.get(k).cloned();
    CatalogImage {
        image_id: image.image_id.clone(),
        name: image.name.clone(),
        creation_date: image.creation_date.clone(),
        state: image.state.clone(),
        virtualization_type: image
            .virtualization_type
            .clone()
            .or_else(|| tag(keys::VIRTUALIZATION_TYPE)),
        service: tag(keys::SERVICE),
        version: tag(keys::VERSION),
        source_ami_id: tag(keys::SOURCE_AMI),
        revoked: None,
    }
}

/// The catalog's images: newest first, at most `limit`.
pub fn catalog_images(mut images: Vec<ImageSummary>, limit: usize) -> Vec<CatalogImage> {
    sort_newest_first(&mut images);
    images.iter().take(limit).map(catalog_image).collect()
}

/// Condition reasons must be CamelCase-ish (`[A-Za-z][A-Za-z0-9_,:]*`); AWS codes such as
/// `InvalidAMIID.NotFound` carry dots.
pub fn condition_reason(code: &str) -> String {
    let mut out: String = code
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if !out.starts_with(|c: char| c.is_ascii_alphabetic()) {
        out.insert_str(0, "Ec2");
    }
    let trimmed = out.trim_end_matches('_').len();
    out.truncate(trimmed.max(1));
    out
}

/// The status after a sync. A failed sync keeps the images last read (they are still the best
/// knowledge) and says why in `Ready`. `cut_at` is set when the query matched more images than
/// one sync reads: the message says so.
pub fn next_status(
    previous: Option<&AmiCatalogStatus>,
    spec: &AmiCatalogSpec,
    generation: Option<i64>,
    outcome: &Result<Vec<ImageSummary>, Ec2Error>,
    cut_at: Option<usize>,
    now: &Time,
) -> AmiCatalogStatus {
    let prev = previous.cloned().unwrap_or_default();
    let (mut next, desired) = match outcome {
        Ok(images) => {
            let images = catalog_images(images.clone(), limit(spec));
            let latest = images
                .iter()
                .find(|i| i.state.as_deref() == Some("available"))
                .cloned();
            let mut message = match &latest {
                Some(l) => format!("{} image(s) listed; the latest is {}", images.len(), l.image_id),
                None => "no available image matches".to_string(),
            };
            if let Some(max) = cut_at {
                message.push_str(&format!(
                    "; the query matches more than the {max} images one sync reads, so the list may miss newer ones and retention is paused: narrow it with namePattern or tags"
                ));
            }
            let count = i32::try_from(images.len()).unwrap_or(i32::MAX);
            let next = AmiCatalogStatus {
                images,
                latest,
                count: Some(count),
                last_sync_time: Some(now.clone()),
                ..prev.clone()
            };
            (next, Desired::new(READY, true, REASON_SYNCED, message))
        }
        Err(e) => (
            prev.clone(),
            Desired::new(READY, false, condition_reason(&e.code), e.to_string()),
        ),
    };
    next.observed_generation = generation;
    next.conditions = conditions::merge(&prev.conditions, &[desired], generation, now);
    next
}

/// Whether `next` says anything `previous` did not. The sync time alone is no reason to write:
/// an unchanged catalog costs the API server nothing.
pub fn changed(previous: Option<&AmiCatalogStatus>, next: &AmiCatalogStatus) -> bool {
    let Some(previous) = previous else {
        return true;
    };
    let strip = |s: &AmiCatalogStatus| AmiCatalogStatus {
        last_sync_time: None,
        ..s.clone()
    };
    strip(previous) != strip(next)
}

/// When a catalog should next read EC2: now if it was never synced, its spec changed, a Bake
/// asked for it, or its interval has passed; otherwise after the time left.
pub fn due(
    last: Option<(std::time::Instant, Option<i64>)>,
    generation: Option<i64>,
    forced: bool,
    interval: Duration,
    now: std::time::Instant,
) -> Option<Duration> {
    match last {
        Some((at, seen)) if !forced && seen == generation => {
            let elapsed = now.saturating_duration_since(at);
            (elapsed < interval).then(|| interval - elapsed)
        }
        _ => None,
    }
}

/// The image a Bake of this virtualization type starts from when its template names the catalog:
/// the newest available one listed of that type (an image whose type is unknown also serves) that
/// is not revoked.
pub fn source_image(status: Option<&AmiCatalogStatus>, virtualization_type: &str) -> Option<String> {
    let status = status?;
    let fits = |i: &&CatalogImage| {
        i.revoked.is_none()
            && i.state.as_deref() == Some("available")
            && i.virtualization_type
                .as_deref()
                .is_none_or(|v| v == virtualization_type)
    };
    status
        .latest
        .iter()
        .filter(fits)
        .chain(status.images.iter().filter(fits))
        .map(|i| i.image_id.clone())
        .next()
}

/// How long after it finished a succeeded Bake still refreshes catalogs: long enough for a
/// restarted operator to catch up, short enough that relisting old Bakes costs nothing.
pub const REFRESH_WINDOW: Duration = Duration::from_secs(600);

/// Whether a Bake's watch event should refresh catalogs: it succeeded recently.
pub fn refreshes_on(bake: &Bake, now: jiff::Timestamp) -> bool {
    let Some(status) = bake.status.as_ref() else {
        return false;
    };
    if status.phase != Some(BakePhase::Succeeded) {
        return false;
    }
    status
        .finished_at
        .as_ref()
        .is_none_or(|f| now.duration_since(f.0).unsigned_abs() <= REFRESH_WINDOW)
}

/// Whether a catalog could list the image of a Bake: same namespace and region, the Bake's
/// service (if the catalog names one), and images of this account. Name patterns and tags are
/// left to EC2: a needless refresh is one DescribeImages call.
pub fn may_list(catalog: &AmiCatalog, bake: &Bake) -> bool {
    use kube::ResourceExt;
    let spec = &catalog.spec;
    let region = bake.status.as_ref().and_then(|s| s.region.as_deref());
    catalog.namespace() == bake.namespace()
        && region.is_none_or(|r| r == spec.region)
        && spec.service.as_ref().is_none_or(|s| *s == bake.spec.service)
        && (spec.owners.is_empty()
            || spec
                .owners
                .iter()
                .any(|o| o == "self" || o.chars().all(|c| c.is_ascii_digit())))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn spec() -> AmiCatalogSpec {
        AmiCatalogSpec {
            region: "eu-west-1".into(),
            owners: vec![],
            name_pattern: None,
            tags: BTreeMap::new(),
            service: None,
            limit: None,
            refresh_interval_seconds: None,
            retention: None,
            revoked: vec![],
        }
    }

    fn t(secs: i64) -> Time {
        Time(jiff::Timestamp::from_second(secs).unwrap_or(jiff::Timestamp::UNIX_EPOCH))
    }

    fn image(id: &str, day: u32, state: &str) -> ImageSummary {
        ImageSummary {
            image_id: id.into(),
            name: Some(format!("name-{id}")),
            creation_date: Some(format!("2026-01-{day:02}T00:00:00.000Z")),
            state: Some(state.into()),
            virtualization_type: Some("hvm".into()),
            tags: BTreeMap::from([
                (keys::SERVICE.to_string(), "svc".to_string()),
                (keys::VERSION.to_string(), format!("1.0.{day}")),
                (keys::SOURCE_AMI.to_string(), "ami-base".to_string()),
            ]),
            snapshot_ids: vec![format!("snap-{id}")],
            ..Default::default()
        }
    }

    fn pairs(filters: &[Filter]) -> Vec<(String, Vec<String>)> {
        filters
            .iter()
            .map(|f| (f.name().unwrap_or_default().to_string(), f.values().to_vec()))
            .collect()
    }

    #[test]
    fn owners_default_to_self() {
        assert_eq!(owners(&spec()), ["self"]);
        let s = AmiCatalogSpec {
            owners: vec!["amazon".into()],
            ..spec()
        };
        assert_eq!(owners(&s), ["amazon"]);
    }

    #[test]
    fn filters_carry_name_tags_and_service_server_side() {
        let s = AmiCatalogSpec {
            name_pattern: Some("base-*".into()),
            tags: BTreeMap::from([("role".to_string(), "base".to_string())]),
            service: Some("svc".into()),
            ..spec()
        };
        let p = pairs(&filters(&s));
        assert!(p.contains(&("state".into(), vec!["available".into(), "pending".into()])));
        assert!(p.contains(&("name".into(), vec!["base-*".into()])));
        assert!(p.contains(&("tag:role".into(), vec!["base".into()])));
        assert!(p.contains(&("tag:baker.io/service".into(), vec!["svc".into()])));
        assert_eq!(p.len(), 4);
    }

    #[test]
    fn a_bare_spec_filters_on_state_only() {
        assert_eq!(pairs(&filters(&spec())).len(), 1);
    }

    #[test]
    fn images_are_newest_first_and_cut_to_the_limit() {
        let images: Vec<_> = (1..=15)
            .map(|d| image(&format!("ami-{d:02}"), d, "available"))
            .collect();
        let out = catalog_images(images, 10);
        let ids: Vec<_> = out.iter().map(|i| i.image_id.as_str()).collect();
        assert_eq!(ids.len(), 10);
        assert_eq!(ids[0], "ami-15");
        assert_eq!(ids[9], "ami-06");
    }

    #[test]
    fn catalog_image_reads_service_version_and_source_from_tags() {
        let c = catalog_image(&image("ami-1", 3, "available"));
        assert_eq!(c.service.as_deref(), Some("svc"));
        assert_eq!(c.version.as_deref(), Some("1.0.3"));
        assert_eq!(c.source_ami_id.as_deref(), Some("ami-base"));
        assert_eq!(c.virtualization_type.as_deref(), Some("hvm"));
    }

    #[test]
    fn limit_and_interval_have_defaults() {
        assert_eq!(limit(&spec()), 10);
        assert_eq!(refresh_interval(&spec()), Duration::from_secs(300));
        let s = AmiCatalogSpec {
            limit: Some(3),
            refresh_interval_seconds: Some(10),
            ..spec()
        };
        assert_eq!(limit(&s), 3);
        assert_eq!(refresh_interval(&s), Duration::from_secs(10));
    }

    #[test]
    fn latest_is_the_newest_available_image() {
        let out = next_status(
            None,
            &spec(),
            Some(1),
            &Ok(vec![
                image("ami-old", 1, "available"),
                image("ami-new", 2, "pending"),
            ]),
            None,
            &t(10),
        );
        assert_eq!(out.images.len(), 2);
        assert_eq!(out.images[0].image_id, "ami-new");
        assert_eq!(out.latest.as_ref().map(|l| l.image_id.as_str()), Some("ami-old"));
        assert_eq!(out.count, Some(2));
        let ready = conditions::find(&out.conditions, READY).map(|c| (c.status.clone(), c.reason.clone()));
        assert_eq!(ready, Some(("True".into(), REASON_SYNCED.into())));
        assert_eq!(out.observed_generation, Some(1));
    }

    #[test]
    fn a_failed_sync_keeps_images_and_reports_the_aws_code() {
        let ok = next_status(
            None,
            &spec(),
            Some(1),
            &Ok(vec![image("ami-1", 1, "available")]),
            None,
            &t(10),
        );
        let err = Ec2Error::new(
            "DescribeImages",
            "Unreachable",
            "cannot connect to the EC2 endpoint",
        );
        let failed = next_status(Some(&ok), &spec(), Some(1), &Err(err), None, &t(20));
        assert_eq!(failed.images, ok.images);
        assert_eq!(failed.last_sync_time, Some(t(10)));
        let ready = conditions::find(&failed.conditions, READY)
            .cloned()
            .expect("a Ready condition");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "Unreachable")
        );
        assert_eq!(ready.last_transition_time, t(20));
        assert!(ready.message.contains("DescribeImages"));
        assert!(changed(Some(&ok), &failed));
    }

    #[test]
    fn a_listing_cut_at_the_sync_limit_says_so_in_ready() {
        let out = next_status(
            None,
            &spec(),
            Some(1),
            &Ok(vec![image("ami-1", 1, "available")]),
            Some(2000),
            &t(10),
        );
        let ready = conditions::find(&out.conditions, READY).map(|c| c.message.clone());
        assert!(ready.is_some_and(|m| m.contains("more than the 2000 images")));
    }

    #[test]
    fn an_unchanged_sync_is_not_written() {
        let images = vec![image("ami-1", 1, "available")];
        let first = next_status(None, &spec(), Some(1), &Ok(images.clone()), None, &t(10));
        let second = next_status(Some(&first), &spec(), Some(1), &Ok(images), None, &t(400));
        assert!(!changed(Some(&first), &second));
        assert!(changed(None, &first));
        let third = next_status(
            Some(&first),
            &spec(),
            Some(1),
            &Ok(vec![
                image("ami-1", 1, "available"),
                image("ami-2", 2, "available"),
            ]),
            None,
            &t(800),
        );
        assert!(changed(Some(&first), &third));
        assert_eq!(third.last_sync_time, Some(t(800)));
    }

    #[test]
    fn a_bake_starts_from_the_latest_image_of_its_virtualization_type() {
        let mut para = image("ami-para", 5, "available");
        para.virtualization_type = Some("paravirtual".into());
        let status = next_status(
            None,
            &spec(),
            Some(1),
            &Ok(vec![
                image("ami-hvm-old", 1, "available"),
                image("ami-hvm", 3, "available"),
                para,
            ]),
            None,
            &t(1),
        );
        assert_eq!(
            source_image(Some(&status), "paravirtual").as_deref(),
            Some("ami-para")
        );
        assert_eq!(source_image(Some(&status), "hvm").as_deref(), Some("ami-hvm"));
        assert_eq!(source_image(None, "hvm"), None);
        let pending = next_status(
            None,
            &spec(),
            Some(1),
            &Ok(vec![image("ami-p", 1, "pending")]),
            None,
            &t(1),
        );
        assert_eq!(source_image(Some(&pending), "hvm"), None);
    }

    #[test]
    fn aws_codes_become_valid_condition_reasons() {
        assert_eq!(condition_reason("InvalidAMIID.NotFound"), "InvalidAMIID_NotFound");
        assert_eq!(condition_reason("Unreachable"), "Unreachable");
        assert_eq!(condition_reason("500"), "Ec2500");
    }

    #[test]
    fn a_catalog_is_due_when_new_changed_forced_or_its_interval_passed() {
        let now = std::time::Instant::now();
        let minute = Duration::from_secs(60);
        assert_eq!(due(None, Some(1), false, minute, now), None);
        let ten_ago = now.checked_sub(Duration::from_secs(10)).unwrap_or(now);
        let last = Some((ten_ago, Some(1)));
        let left = due(last, Some(1), false, minute, now);
        assert!(left.is_some_and(|d| d <= Duration::from_secs(50)));
        assert_eq!(due(last, Some(2), false, minute, now), None);
        assert_eq!(due(last, Some(1), true, minute, now), None);
        assert_eq!(due(last, Some(1), false, Duration::from_secs(5), now), None);
    }
}
