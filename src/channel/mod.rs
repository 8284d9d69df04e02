//! AmiChannels: which image a channel points at, where it publishes it, and its status, as pure
//! decisions; the controller gathers from the caches (and, for publishing, from AWS) and acts.
//!
//! A channel never trusts what a tenant writes as evidence of an image: the image comes from
//! the status of its catalog or of a Bake in its namespace (both written by Baker), and the
//! regions it was copied to from a Bake's status or Baker's tags on the copies.

pub mod controller;
pub mod publish;

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::AmiCatalogStatus;
use crate::api::catalog::CatalogImage;
use crate::api::channel::{
    AmiChannelSpec, AmiChannelStatus, ChannelMove, Follow, LaunchTemplateTarget, Publication, RegionImage,
};
use crate::api::conditions::{self, Desired as Condition, READY};

/// True while the channel's image is revoked.
pub const DEGRADED: &str = "Degraded";

/// Publication kinds and states.
pub const SSM_PARAMETER: &str = "SsmParameter";
pub const LAUNCH_TEMPLATE: &str = "LaunchTemplate";
pub const PUBLISHED: &str = "Published";
pub const WAITING: &str = "Waiting";
pub const REFUSED: &str = "Refused";
pub const FAILED: &str = "Failed";

const DEFAULT_HISTORY: i32 = 10;
/// How soon a target AWS refused is tried again.
pub const RETRY_FAILED: Duration = Duration::from_secs(60);

/// The catalog a channel points into, as the cache shows it.
#[derive(Clone, Copy, Debug)]
pub struct Catalog<'a> {
    pub name: &'a str,
    pub region: &'a str,
    pub status: Option<&'a AmiCatalogStatus>,
}

/// Everything [`choose`] reads.
pub struct Facts<'a> {
    pub spec: &'a AmiChannelSpec,
    pub status: Option<&'a AmiChannelStatus>,
    /// `None`: the catalog does not exist.
    pub catalog: Option<Catalog<'a>>,
    /// Whether a Bake in the channel's namespace made the pinned image.
    pub pinned_baked: bool,
    pub now: jiff::Timestamp,
}

/// Why a channel cannot point where its spec says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocked {
    pub reason: &'static str,
    pub message: String,
}

/// Which image the channel points at now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    /// The image after this decision (`None`: it never pointed at one and cannot yet).
    pub image: Option<String>,
    /// Set when the channel moves to `image`: why.
    pub moved: Option<String>,
    /// Why the channel is not where its spec says, if it is not.
    pub blocked: Option<Blocked>,
    /// Set while `image` is revoked: why, and what to do.
    pub degraded: Option<String>,
    /// When a newer image finishes soaking.
    pub wake: Option<Duration>,
}

/// Why an image is revoked in the catalog, if it is.
pub fn revoked(status: Option<&AmiCatalogStatus>, id: &str) -> Option<String> {
    let status = status?;
    status
        .revoked
        .iter()
        .find(|r| r.image_id == id)
        .map(|r| r.reason.clone())
        .or_else(|| listed(status).find(|i| i.image_id == id)?.revoked.clone())
}

/// The catalog's images, newest first (`latest` first: it is the newest).
fn listed(status: &AmiCatalogStatus) -> impl Iterator<Item = &CatalogImage> {
    status.latest.iter().chain(status.images.iter())
}

fn seconds(d: jiff::SignedDuration) -> Duration {
    Duration::from_secs(u64::try_from(d.as_secs()).unwrap_or(0).max(1))
}

/// Chooses the channel's image.
pub fn choose(facts: &Facts) -> Choice {
    let current = facts.status.and_then(|s| s.image_id.clone());
    let Some(catalog) = facts.catalog else {
        return Choice {
            image: current,
            moved: None,
            blocked: Some(Blocked {
                reason: "CatalogNotFound",
                message: format!(
                    "AmiCatalog {:?} does not exist in this namespace",
                    facts.spec.catalog
                ),
            }),
            degraded: None,
            wake: None,
        };
    };
    let revoked_why = |id: &str| revoked(catalog.status, id);
    let (image, moved, blocked, wake) = match (&facts.spec.follow, &facts.spec.image_id) {
        (_, Some(pinned)) => pin(facts, catalog, current.as_deref(), pinned),
        (Some(Follow::Latest), None) | (None, None) => follow(facts, catalog, current.as_deref()),
    };
    let degraded = image.as_deref().and_then(|id| {
        let why = revoked_why(id)?;
        Some(match (&facts.spec.image_id, &blocked) {
            (Some(_), _) => format!(
                "{id} is revoked in AmiCatalog {:?} ({why}); the channel stays on it until spec.imageId names another image",
                catalog.name
            ),
            (None, _) => format!(
                "{id} is revoked in AmiCatalog {:?} ({why}) and the catalog lists no other image to follow",
                catalog.name
            ),
        })
    });
    Choice {
        image,
        moved,
        blocked,
        degraded,
        wake,
    }
}

type Chosen = (Option<String>, Option<String>, Option<Blocked>, Option<Duration>);

fn pin(facts: &Facts, catalog: Catalog, current: Option<&str>, pinned: &str) -> Chosen {
    let stay = |blocked: Blocked| (current.map(str::to_string), None, Some(blocked), None);
    if current == Some(pinned) {
        return (current.map(str::to_string), None, None, None);
    }
    if let Some(why) = revoked(catalog.status, pinned) {
        return stay(Blocked {
            reason: "Revoked",
            message: format!(
                "{pinned} is revoked in AmiCatalog {:?} ({why}): pin another image",
                catalog.name
            ),
        });
    }
    let known = facts.pinned_baked
        || catalog
            .status
            .is_some_and(|s| listed(s).any(|i| i.image_id == pinned));
    if !known {
        return stay(Blocked {
            reason: "ImageNotFound",
            message: format!(
                "{pinned} is neither listed in AmiCatalog {:?} nor the image of a Bake in this namespace",
                catalog.name
            ),
        });
    }
    (
        Some(pinned.to_string()),
        Some("pinned by spec.imageId".to_string()),
        None,
        None,
    )
}

fn follow(facts: &Facts, catalog: Catalog, current: Option<&str>) -> Chosen {
    let soak = jiff::SignedDuration::from_secs(facts.spec.soak_seconds.unwrap_or(0).max(0));
    let virtualization = facts.spec.virtualization_type.map(|v| v.as_str());
    let fits = |i: &&CatalogImage| {
        i.revoked.is_none()
            && revoked(catalog.status, &i.image_id).is_none()
            && i.state.as_deref() == Some("available")
            && virtualization.is_none_or(|v| i.virtualization_type.as_deref().is_none_or(|t| t == v))
    };
    let age = |i: &CatalogImage| {
        i.creation_date
            .as_deref()
            .and_then(|d| d.parse::<jiff::Timestamp>().ok())
            .map(|created| facts.now.duration_since(created))
    };
    let mut wake: Option<Duration> = None;
    let mut chosen = None;
    for image in catalog.status.into_iter().flat_map(listed).filter(fits) {
        // An image without a creation date cannot be soaked: it counts as old enough.
        match age(image) {
            Some(age) if age < soak => {
                let left = seconds(soak - age);
                wake = Some(wake.map_or(left, |w| w.min(left)));
            }
            _ => {
                chosen = Some(image.image_id.clone());
                break;
            }
        }
    }
    let Some(chosen) = chosen else {
        let message = match (catalog.status.is_some_and(|s| listed(s).next().is_some()), wake) {
            (_, Some(_)) => format!(
                "the images of AmiCatalog {:?} have not soaked for {}s yet",
                catalog.name,
                soak.as_secs()
            ),
            (true, None) => format!(
                "AmiCatalog {:?} lists no available image that is not revoked",
                catalog.name
            ),
            (false, None) => format!("AmiCatalog {:?} lists no image yet", catalog.name),
        };
        return (
            current.map(str::to_string),
            None,
            Some(Blocked {
                reason: "NoImage",
                message,
            }),
            wake,
        );
    };
    if current == Some(chosen.as_str()) {
        return (Some(chosen), None, None, wake);
    }
    let why = match current.and_then(|c| Some((c, revoked(catalog.status, c)?))) {
        Some((old, reason)) => format!("the image it pointed at, {old}, was revoked ({reason})"),
        None if soak.as_secs() > 0 => format!(
            "the newest image of AmiCatalog {:?} that soaked for {}s",
            catalog.name,
            soak.as_secs()
        ),
        None => format!("the newest image of AmiCatalog {:?}", catalog.name),
    };
    (Some(chosen), Some(why), None, wake)
}

/// A place to publish the image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Ssm { name: String, region: String },
    LaunchTemplate(LaunchTemplateTarget, String),
}

impl Target {
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Ssm { .. } => SSM_PARAMETER,
            Target::LaunchTemplate(..) => LAUNCH_TEMPLATE,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Target::Ssm { name, .. } => name,
            Target::LaunchTemplate(t, _) => &t.name,
        }
    }

    pub fn region(&self) -> &str {
        match self {
            Target::Ssm { region, .. } | Target::LaunchTemplate(_, region) => region,
        }
    }

    /// A publication of this target in `state`.
    pub fn publication(&self, state: &str, image_id: Option<String>, message: Option<String>) -> Publication {
        Publication {
            kind: self.kind().to_string(),
            name: self.name().to_string(),
            region: self.region().to_string(),
            image_id,
            version: None,
            state: state.to_string(),
            message,
        }
    }
}

/// Every target: each SSM parameter in each region the image exists in, each launch template in
/// its region (the catalog's by default).
pub fn targets(spec: &AmiChannelSpec, home: &str, regions: &[RegionImage]) -> Vec<Target> {
    let mut out = Vec::new();
    for name in &spec.publish.ssm_parameters {
        for r in regions {
            out.push(Target::Ssm {
                name: name.clone(),
                region: r.region.clone(),
            });
        }
    }
    for t in &spec.publish.launch_templates {
        let region = t.region.clone().unwrap_or_else(|| home.to_string());
        out.push(Target::LaunchTemplate(t.clone(), region));
    }
    out
}

/// The SSM path a namespace may publish under: the operator's pattern with `{namespace}`
/// replaced.
pub fn ssm_prefix(pattern: &str, namespace: &str) -> String {
    pattern.replace("{namespace}", namespace)
}

/// Whether a namespace may publish to a parameter: its name lies under the namespace's path.
pub fn ssm_allowed(name: &str, prefix: &str) -> bool {
    // The prefix ends in '/' (the operator checks its flag), so a sibling path such as
    // /baker/team-b/ never matches /baker/team/.
    name.starts_with(prefix) && name.len() > prefix.len()
}

/// Whether a launch template's `baker.io/publish-namespace` tag names the namespace.
pub fn launch_template_allowed(tag: Option<&str>, namespace: &str) -> bool {
    tag.is_some_and(|v| v.split(',').any(|n| n.trim() == namespace))
}

/// What a target holds before publishing, when that is decided without AWS: refused (outside
/// the namespace's path) or waiting (no image in its region yet). `None`: publish.
pub fn precheck(target: &Target, regions: &[RegionImage], prefix: &str) -> Option<Publication> {
    if let Target::Ssm { name, .. } = target
        && !ssm_allowed(name, prefix)
    {
        return Some(target.publication(
            REFUSED,
            None,
            Some(format!(
                "this namespace may publish SSM parameters only under {prefix}"
            )),
        ));
    }
    if !regions.iter().any(|r| r.region == target.region()) {
        return Some(target.publication(
            WAITING,
            None,
            Some(format!("the image has no copy in {} (yet)", target.region())),
        ));
    }
    None
}

/// The image in a region.
pub fn image_in<'a>(regions: &'a [RegionImage], region: &str) -> Option<&'a str> {
    regions
        .iter()
        .find(|r| r.region == region)
        .map(|r| r.image_id.as_str())
}

/// Whether the targets must be checked against AWS now: the image, the regions or the spec
/// changed, a target is not done, or the last check is older than `interval`.
pub fn due(
    status: Option<&AmiChannelStatus>,
    generation: Option<i64>,
    image: &str,
    regions: &[RegionImage],
    interval: Duration,
    now: jiff::Timestamp,
) -> bool {
    let Some(status) = status else { return true };
    let settled = |p: &Publication| p.state == PUBLISHED || p.state == REFUSED;
    status.image_id.as_deref() != Some(image)
        || status.observed_generation != generation
        || status.regions != regions
        || !status.published.iter().all(settled)
        || status.checked_at.as_ref().is_none_or(|t| {
            now.duration_since(t.0) >= jiff::SignedDuration::try_from(interval).unwrap_or_default()
        })
}

/// The status after a decision and, if the targets were checked, what they hold.
pub struct Outcome<'a> {
    pub choice: &'a Choice,
    pub regions: Vec<RegionImage>,
    /// `None`: not checked this time (the previous publications stand).
    pub published: Option<Vec<Publication>>,
    pub generation: Option<i64>,
    pub now: jiff::Timestamp,
}

/// The channel's next status.
pub fn status(spec: &AmiChannelSpec, previous: Option<&AmiChannelStatus>, out: &Outcome) -> AmiChannelStatus {
    let now = Time(out.now);
    let mut next = AmiChannelStatus {
        image_id: out.choice.image.clone(),
        since: previous.and_then(|s| s.since.clone()),
        regions: out.regions.clone(),
        published: previous.map(|s| s.published.clone()).unwrap_or_default(),
        history: previous.map(|s| s.history.clone()).unwrap_or_default(),
        checked_at: previous.and_then(|s| s.checked_at.clone()),
        message: None,
        conditions: Vec::new(),
        observed_generation: out.generation,
    };
    if let (Some(image), Some(why)) = (&out.choice.image, &out.choice.moved) {
        next.since = Some(now.clone());
        if let Some(last) = next.history.first_mut()
            && last.until.is_none()
        {
            last.until = Some(now.clone());
        }
        next.history.insert(
            0,
            ChannelMove {
                image_id: image.clone(),
                since: Some(now.clone()),
                until: None,
                reason: why.clone(),
            },
        );
        let limit = usize::try_from(spec.history_limit.unwrap_or(DEFAULT_HISTORY)).unwrap_or(1);
        next.history.truncate(limit.max(1));
    }
    if let Some(published) = &out.published {
        next.published = published.clone();
        next.checked_at = Some(now.clone());
    }
    let ready = ready(out.choice, &next.published);
    next.message = (!ready.status).then(|| ready.message.clone());
    let degraded = match &out.choice.degraded {
        Some(why) => Condition::new(DEGRADED, true, "Revoked", why.clone()),
        None => Condition::new(
            DEGRADED,
            false,
            "NotRevoked",
            "the channel's image is not revoked",
        ),
    };
    let previous_conditions = previous.map(|s| s.conditions.as_slice()).unwrap_or_default();
    next.conditions = conditions::merge(previous_conditions, &[ready, degraded], out.generation, &now);
    next
}

fn ready(choice: &Choice, published: &[Publication]) -> Condition {
    if let Some(b) = &choice.blocked {
        return Condition::new(READY, false, b.reason, b.message.clone());
    }
    let Some(image) = &choice.image else {
        return Condition::new(READY, false, "NoImage", "the channel points at no image yet");
    };
    let not = |state: &str| -> Vec<String> {
        published
            .iter()
            .filter(|p| p.state == state)
            .map(|p| {
                format!(
                    "{} {} in {}{}",
                    p.kind,
                    p.name,
                    p.region,
                    p.message.as_deref().map(|m| format!(": {m}")).unwrap_or_default()
                )
            })
            .collect()
    };
    for (state, reason) in [
        (FAILED, "PublishFailed"),
        (REFUSED, "PublishRefused"),
        (WAITING, "Waiting"),
    ] {
        let which = not(state);
        if !which.is_empty() {
            return Condition::new(READY, false, reason, which.join("; "));
        }
    }
    let held = published.len();
    Condition::new(
        READY,
        true,
        "Published",
        if held == 0 {
            format!("the channel points at {image}")
        } else {
            format!("the channel points at {image}, published to {held} target(s)")
        },
    )
}

/// When to look again: a soaking image, a failed target, the next check.
pub fn requeue(
    choice: &Choice,
    status: &AmiChannelStatus,
    interval: Duration,
    now: jiff::Timestamp,
) -> Option<Duration> {
    let failed = status
        .published
        .iter()
        .any(|p| p.state == FAILED)
        .then_some(RETRY_FAILED);
    let check = (!status.published.is_empty()).then(|| {
        let since = status
            .checked_at
            .as_ref()
            .map_or(jiff::SignedDuration::ZERO, |t| now.duration_since(t.0));
        interval
            .saturating_sub(Duration::try_from(since).unwrap_or_default())
            .max(Duration::from_secs(1))
    });
    [choice.wake, failed, check].into_iter().flatten().min()
}

/// The regions a Bake's status says its image exists in: its own and its available copies.
pub fn regions_of_bake(home: &str, image: &str, bake: &crate::api::BakeStatus) -> Vec<RegionImage> {
    let mut out = BTreeSet::from([RegionImage {
        region: home.to_string(),
        image_id: image.to_string(),
    }]);
    for a in &bake.artifacts {
        if a.state == crate::api::bake::ArtifactState::Available
            && let Some(id) = &a.image_id
        {
            out.insert(RegionImage {
                region: a.region.clone(),
                image_id: id.clone(),
            });
        }
    }
    out.into_iter().collect()
}

#[cfg(test)]
mod tests;
