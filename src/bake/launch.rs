//! The launch decision for a Bake that has no pod yet: may it run in its namespace, which source
//! image, which rendered template and key, whether an identical image can be reused, and whether
//! it waits or launches now. One pure function over facts the reconciler gathered.
//!
//! A fact that costs a request (EC2's answer for a source filter, the images carrying a key) or
//! needs the launch lock (the Bakes the queue decides against) is gathered only when the decision
//! asks for it ([`Plan::Ask`]); the reconciler fetches it and decides again. So EC2 is never asked
//! while the lock is held, and a Bake that waits asks EC2 nothing.

use crate::api::template::{BakeTemplateSpec, ImageFilter};
use crate::api::{AmiCatalog, Bake, BakeTemplate, keys};
use crate::aws::ImageSummary;
use crate::config::{OperatorConfig, Scope};
use crate::packer::{BakeIdentity, RenderInput, ResolvedSource};
use kube::ResourceExt;

use super::key::{self, Keyed};
use super::queue::{self, BakeView, Decision, Limits};
use super::status::{Reason, Transition};

/// The answer of EC2 to a source filter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FilterAnswer {
    Found(String),
    NotFound,
    /// The call failed; the message says why.
    Failed(String),
}

/// Everything the decision reads. The `Option` facts are `None` until the decision asked for them.
pub struct Facts<'a> {
    pub bake: &'a Bake,
    /// The admin's settings: allowed namespaces, default packer image and EC2 endpoint, reuse
    /// scope, concurrency limits.
    pub config: &'a OperatorConfig,
    /// The Bake's template, from the cache.
    pub template: Option<&'a BakeTemplate>,
    /// The template's source catalog in the Bake's namespace, from the cache.
    pub catalog: Option<&'a AmiCatalog>,
    /// EC2's answer for the template's source filter.
    pub filter: Option<FilterAnswer>,
    /// Images of the account carrying the Bake's key.
    pub keyed_images: Option<&'a [ImageSummary]>,
    /// The Bakes the queue sees, read under the launch lock.
    pub bakes: Option<&'a [BakeView]>,
    /// The time of the decision (a deprecated image is not reused).
    pub now: jiff::Timestamp,
}

/// A fact the decision needs before it can decide.
#[derive(Clone, Debug, PartialEq)]
pub enum Need {
    /// EC2's answer for the template's source filter.
    SourceFilter { region: String, filter: ImageFilter },
    /// The account's images tagged with this key.
    ImagesWithKey { region: String, key: String },
    /// The Bakes in scope, under the launch lock, with this key (finished Bakes of other keys
    /// play no part).
    Bakes { key: String },
}

/// What a launch needs once decided: the source, the rendered template and its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prepared {
    pub region: String,
    pub source_ami: String,
    pub keyed: Keyed,
}

/// What to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    Ask(Need),
    /// The Bake cannot start (yet): record why.
    Stop(Transition),
    /// An image with the Bake's key exists: take it.
    Reuse {
        prepared: Prepared,
        ami_id: String,
        /// The Bake that made it (`namespace/name`), as its tag or the other Bake's status says.
        from: Option<String>,
    },
    /// Wait (queued, or for an identical Bake); the key and source are recorded meanwhile.
    Wait {
        prepared: Prepared,
        transition: Transition,
    },
    Launch(Prepared),
}

/// What comes before a launch can be prepared: a stop, or a fact to fetch.
#[derive(Clone, Debug, PartialEq)]
pub enum Early {
    Ask(Need),
    Stop(Transition),
}

impl From<Early> for Plan {
    fn from(early: Early) -> Plan {
        match early {
            Early::Ask(need) => Plan::Ask(need),
            Early::Stop(t) => Plan::Stop(t),
        }
    }
}

/// Where the source image comes from.
enum SourceChoice<'a> {
    Known(String),
    Catalog(&'a str),
    Filter(&'a ImageFilter),
    Missing,
}

/// The recorded source wins (a re-render after a restart is identical and a waiting Bake never
/// asks EC2 again); then the template's `amiId`, `filter`, `catalog`, in that order.
fn source_choice<'a>(recorded: Option<&str>, template: &'a BakeTemplateSpec) -> SourceChoice<'a> {
    let source = &template.source;
    match (recorded, &source.ami_id, &source.filter, &source.catalog) {
        (Some(id), ..) => SourceChoice::Known(id.to_string()),
        (None, Some(id), ..) => SourceChoice::Known(id.clone()),
        (None, None, Some(filter), _) => SourceChoice::Filter(filter),
        (None, None, None, Some(catalog)) => SourceChoice::Catalog(&catalog.name),
        (None, None, None, None) => SourceChoice::Missing,
    }
}

/// The source, template and key of the Bake; or the plan that comes first (a stop, or a fact to
/// fetch).
pub fn prepare(f: &Facts<'_>) -> Result<Prepared, Early> {
    let bake = f.bake;
    let spec = &bake.spec;
    let namespace = bake.namespace().unwrap_or_default();
    let stop = |reason, message: String| Err(Early::Stop(Transition::new(reason, message)));
    // Bake pods are privileged: they run only where the admin allowed them.
    if !f.config.bake_namespace_allowed(&namespace) {
        return stop(
            Reason::NamespaceNotAllowed,
            format!(
                "bake pods may not run in namespace {namespace}; the operator's admin allows: {}",
                f.config.bake_namespaces.join(", ")
            ),
        );
    }
    let Some(template) = f.template else {
        return stop(
            Reason::TemplateNotFound,
            format!(
                "BakeTemplate {:?} does not exist; the Bake starts once it is created",
                spec.template
            ),
        );
    };
    let tspec = &template.spec;
    let virt = spec.virtualization_type.as_str();
    let recorded = bake.status.as_ref().and_then(|s| s.source_ami_id.as_deref());
    let source_ami = match source_choice(recorded, tspec) {
        SourceChoice::Known(id) => id,
        SourceChoice::Catalog(name) => {
            match crate::catalog::source_image(f.catalog.and_then(|c| c.status.as_ref()), virt) {
                Some(id) => id,
                None => {
                    let revoked = f
                        .catalog
                        .and_then(|c| c.status.as_ref())
                        .map_or(0, |s| s.images.iter().filter(|i| i.revoked.is_some()).count());
                    let what = match (f.catalog.is_some(), revoked) {
                        (false, _) => "does not exist, so it lists no",
                        (true, 0) => "lists no available",
                        // Every candidate is revoked: say so, a person has to act.
                        (true, _) => "lists only revoked images, no available",
                    };
                    return stop(
                        Reason::SourceCatalogEmpty,
                        format!(
                            "AmiCatalog {name:?} (the source of BakeTemplate {:?}) {what} {virt} image; the Bake starts once it does",
                            spec.template
                        ),
                    );
                }
            }
        }
        SourceChoice::Filter(filter) => match &f.filter {
            None => {
                return Err(Early::Ask(Need::SourceFilter {
                    region: tspec.region.clone(),
                    filter: filter.clone(),
                }));
            }
            Some(FilterAnswer::Found(id)) => id.clone(),
            Some(FilterAnswer::NotFound) => {
                return stop(
                    Reason::SourceImageNotFound,
                    format!(
                        "no available {virt} image in {} matches the source filter of BakeTemplate {:?}",
                        tspec.region, spec.template
                    ),
                );
            }
            Some(FilterAnswer::Failed(e)) => return stop(Reason::Ec2Unavailable, e.clone()),
        },
        SourceChoice::Missing => {
            return stop(
                Reason::InvalidTemplate,
                "the BakeTemplate sets none of source.amiId, source.filter or source.catalog".into(),
            );
        }
    };
    let identity = BakeIdentity {
        name: bake.name_any(),
        namespace,
        uid: bake.uid().unwrap_or_default(),
    };
    let packer_image = tspec.packer_image.as_deref().unwrap_or(&f.config.packer_image);
    let input = RenderInput {
        bake: spec,
        identity: &identity,
        template_name: &spec.template,
        template: tspec,
        source: ResolvedSource::AmiId(source_ami.clone()),
        default_ec2_endpoint: f.config.ec2_endpoint.as_deref(),
        bake_key: "",
    };
    match key::render_keyed(&input, packer_image) {
        Ok(keyed) => Ok(Prepared {
            region: tspec.region.clone(),
            source_ami,
            keyed,
        }),
        Err(e) => stop(Reason::InvalidTemplate, e.to_string()),
    }
}

/// An available image carrying `key` and baked for a Bake within `scope` of `namespace`, and not
/// deprecated by `now` (a revoked image is deprecated or disabled: a Bake never reuses it). The
/// key tag is checked again here: EC2's tag filter is the query, not the evidence.
pub fn reusable<'a>(
    images: &'a [ImageSummary],
    key: &str,
    namespace: &str,
    scope: Scope,
    now: jiff::Timestamp,
) -> Option<&'a ImageSummary> {
    let deprecated = |i: &ImageSummary| {
        i.deprecation_time
            .as_deref()
            .and_then(|t| t.parse::<jiff::Timestamp>().ok())
            .is_some_and(|t| t <= now)
    };
    images.iter().find(|i| {
        i.tags.get(keys::BAKE_KEY).map(String::as_str) == Some(key)
            && i.state.as_deref() == Some("available")
            && !deprecated(i)
            && scope.reaches(namespace, i.baker_namespace())
    })
}

/// Decides what a Bake without a pod does now.
pub fn decide(f: &Facts<'_>) -> Plan {
    let prepared = match prepare(f) {
        Ok(p) => p,
        Err(early) => return early.into(),
    };
    let bake = f.bake;
    let key = prepared.keyed.key.clone();
    let namespace = bake.namespace().unwrap_or_default();
    let rebake = bake.spec.rebake;
    let scope = f.config.reuse_scope;
    let limits = Limits::from_config(f.config);
    // EC2 is asked once per key: a Bake that waits has recorded the key it looked up.
    let looked_up = bake.status.as_ref().and_then(|s| s.bake_key.as_deref()) == Some(key.as_str());
    let ask_images = || {
        Plan::Ask(Need::ImagesWithKey {
            region: prepared.region.clone(),
            key: key.clone(),
        })
    };
    if !rebake {
        match f.keyed_images {
            Some(images) => {
                if let Some(image) = reusable(images, &key, &namespace, scope, f.now) {
                    return Plan::Reuse {
                        ami_id: image.image_id.clone(),
                        from: image.tags.get(keys::BAKE).cloned(),
                        prepared,
                    };
                }
            }
            None if !looked_up => return ask_images(),
            None => {}
        }
    }
    let Some(bakes) = f.bakes else {
        return Plan::Ask(Need::Bakes { key: key.clone() });
    };
    let mut me = BakeView::from_bake(bake);
    me.key = Some(key.clone());
    let mut decision = queue::decide(&me, &key, rebake, scope, bakes, limits);
    if let Decision::Reuse { .. } = decision {
        // The other Bake's status is Baker's, but only an image that still carries the key is
        // evidence. Had EC2 listed one, it would have been reused above: this one is gone or
        // retagged, so bake anew.
        if f.keyed_images.is_none() {
            return ask_images();
        }
        decision = queue::decide(&me, &key, true, scope, bakes, limits);
    }
    let wait = |transition| Plan::Wait {
        prepared: prepared.clone(),
        transition,
    };
    match decision {
        // Not with `rebake` set, which the second decision has.
        Decision::Launch | Decision::Reuse { .. } => Plan::Launch(prepared),
        Decision::WaitForIdentical { other } => wait(Transition::new(
            Reason::WaitingForIdenticalBake,
            format!("Bake {other} is baking the identical image; this Bake will reuse its AMI"),
        )),
        Decision::Queued { message } => wait(Transition::new(Reason::Queued, message)),
    }
}

#[cfg(test)]
mod tests;
