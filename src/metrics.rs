//! Prometheus metrics of the operator. Every label comes from a bounded set (a Bake phase, a status
//! reason, an error category, an EC2 API action name): never an object name, a message or an id,
//! so the number of series stays fixed however many Bakes the cluster holds.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::api::{AmiCatalog, Bake, BakePhase};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub phase: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    /// `bake` or `catalog`.
    pub controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub controller: &'static str,
    /// An [`crate::error::Category`].
    pub category: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `Bake`, `BakeTemplate`, `AmiCatalog` or `Pod`.
    pub kind: &'static str,
}

/// The controllers, as metric labels.
pub const CONTROLLERS: [&str; 2] = ["bake", "catalog"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    /// An EC2 API operation name (e.g. `DescribeImages`): the SDK's fixed set.
    pub action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KubeRequestLabels {
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete` or `other`.
    pub verb: &'static str,
    /// The resource's plural name, from the fixed set Baker uses, or `other`.
    pub resource: &'static str,
}

/// Every phase, so that `baker_bakes` shows zeros rather than missing series.
pub const PHASES: [BakePhase; 5] = [
    BakePhase::Pending,
    BakePhase::Queued,
    BakePhase::Running,
    BakePhase::Succeeded,
    BakePhase::Failed,
];

/// Reconciles read caches and make a few requests: buckets from 1 ms to about 16 s.
fn reconcile_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 15,
    ))
}

/// Bake durations run from minutes to hours: buckets from 30 s to about 4.5 h.
fn duration_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        30.0, 2.0, 10,
    ))
}

pub struct Metrics {
    registry: Registry,
    pub bakes: Family<PhaseLabels, Gauge>,
    pub bakes_finished: Family<ResultLabels, Counter>,
    pub bake_duration: Family<ResultLabels, Histogram, fn() -> Histogram>,
    pub reconciles: Family<ControllerLabels, Counter>,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub reconcile_duration: Family<ControllerLabels, Histogram, fn() -> Histogram>,
    pub invalid_objects: Family<KindLabels, Counter>,
    pub ec2_calls: Family<ActionLabels, Counter>,
    pub ec2_errors: Family<ActionLabels, Counter>,
    pub kube_requests: Family<KubeRequestLabels, Counter>,
    pub queue_depth: Gauge,
    pub catalog_images: Gauge,
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("baker");
        let m = Metrics {
            registry: Registry::default(),
            bakes: Family::default(),
            bakes_finished: Family::default(),
            bake_duration: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
            reconciles: Family::default(),
            reconcile_errors: Family::default(),
            reconcile_duration: Family::new_with_constructor(reconcile_histogram as fn() -> Histogram),
            invalid_objects: Family::default(),
            ec2_calls: Family::default(),
            ec2_errors: Family::default(),
            kube_requests: Family::default(),
            queue_depth: Gauge::default(),
            catalog_images: Gauge::default(),
            leader: Gauge::default(),
        };
        registry.register(
            "bakes",
            "Bakes in the operator's scope, by phase",
            m.bakes.clone(),
        );
        registry.register(
            "bakes_finished",
            "Bakes that reached a terminal phase, by phase and reason",
            m.bakes_finished.clone(),
        );
        registry.register(
            "bake_duration_seconds",
            "Seconds from a Bake's start to its terminal phase, by phase and reason",
            m.bake_duration.clone(),
        );
        registry.register(
            "reconciles",
            "Reconciliations, by controller",
            m.reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Failed reconciliations, by controller and error category",
            m.reconcile_errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Seconds one reconciliation took, by controller",
            m.reconcile_duration.clone(),
        );
        registry.register(
            "invalid_objects",
            "Objects the watch could not read (they do not match Baker's types) and left out of the cache, by kind",
            m.invalid_objects.clone(),
        );
        registry.register(
            "ec2_calls",
            "EC2 API calls made by the operator (and the SSM calls of AmiChannels), by action",
            m.ec2_calls.clone(),
        );
        registry.register(
            "ec2_errors",
            "EC2 (and SSM) API calls that failed, by action",
            m.ec2_errors.clone(),
        );
        registry.register(
            "kube_requests",
            "Requests the operator sent to the Kubernetes API server, by verb and resource",
            m.kube_requests.clone(),
        );
        registry.register(
            "queue_depth",
            "Bakes waiting in phase Queued",
            m.queue_depth.clone(),
        );
        registry.register(
            "catalog_images",
            "Images listed in AmiCatalog statuses",
            m.catalog_images.clone(),
        );
        registry.register(
            "leader",
            "1 while this process holds the leader lease (or runs without leader election)",
            m.leader.clone(),
        );
        for controller in CONTROLLERS {
            m.reconciles.get_or_create(&ControllerLabels { controller }).get();
            for category in <crate::error::Category as strum::VariantArray>::VARIANTS {
                m.reconcile_errors
                    .get_or_create(&ErrorLabels {
                        controller,
                        category: category.as_str(),
                    })
                    .get();
            }
        }
        for phase in PHASES {
            m.bakes
                .get_or_create(&PhaseLabels {
                    phase: phase.as_str(),
                })
                .set(0);
        }
        Metrics { registry, ..m }
    }

    /// The Prometheus text format of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Sets the phase gauges and the queue depth from the Bakes the controller sees.
    pub fn observe_bakes<'a>(&self, bakes: impl IntoIterator<Item = &'a Bake>) {
        let counts = count_phases(bakes);
        for (phase, n) in PHASES.iter().zip(counts) {
            self.bakes
                .get_or_create(&PhaseLabels {
                    phase: phase.as_str(),
                })
                .set(n);
        }
        self.queue_depth.set(counts[1]);
    }

    /// Sets the catalog size from the AmiCatalogs the controller sees: the images their statuses
    /// list, summed.
    pub fn observe_catalogs<'a>(&self, catalogs: impl IntoIterator<Item = &'a AmiCatalog>) {
        self.catalog_images.set(catalog_images(catalogs));
    }

    /// Records a Bake reaching a terminal phase after `seconds`.
    pub fn bake_finished(&self, phase: BakePhase, reason: &'static str, seconds: Option<f64>) {
        let labels = ResultLabels {
            phase: phase.as_str(),
            reason,
        };
        self.bakes_finished.get_or_create(&labels).inc();
        if let Some(s) = seconds {
            self.bake_duration.get_or_create(&labels).observe(s.max(0.0));
        }
    }

    /// Records one reconcile of `controller` that took `seconds`, and its error's category.
    pub fn reconciled(&self, controller: &'static str, seconds: f64, error: Option<crate::error::Category>) {
        let labels = ControllerLabels { controller };
        self.reconciles.get_or_create(&labels).inc();
        self.reconcile_duration
            .get_or_create(&labels)
            .observe(seconds.max(0.0));
        if let Some(category) = error {
            self.reconcile_errors
                .get_or_create(&ErrorLabels {
                    controller,
                    category: category.as_str(),
                })
                .inc();
        }
    }

    /// Records an object the watch could not read.
    pub fn invalid_object(&self, kind: &'static str) {
        self.invalid_objects.get_or_create(&KindLabels { kind }).inc();
    }

    /// Records one request to the Kubernetes API server.
    pub fn kube_request(&self, method: &http::Method, uri: &http::Uri) {
        let (verb, resource) = kube_request_labels(method, uri);
        self.kube_requests
            .get_or_create(&KubeRequestLabels { verb, resource })
            .inc();
    }

    /// Records one EC2 call, and whether it failed.
    pub fn ec2_call(&self, action: &str, failed: bool) {
        let labels = ActionLabels {
            action: bounded_action(action),
        };
        self.ec2_calls.get_or_create(&labels).inc();
        if failed {
            self.ec2_errors.get_or_create(&labels).inc();
        }
    }
}

/// Images listed across catalog statuses (`status.count`, else the length of `status.images`).
pub fn catalog_images<'a>(catalogs: impl IntoIterator<Item = &'a AmiCatalog>) -> i64 {
    catalogs
        .into_iter()
        .filter_map(|c| c.status.as_ref())
        .map(|s| s.count.map_or(s.images.len() as i64, i64::from))
        .sum()
}

/// Bakes per phase, in the order of [`PHASES`]; a Bake without a phase yet counts as Pending.
pub fn count_phases<'a>(bakes: impl IntoIterator<Item = &'a Bake>) -> [i64; 5] {
    let mut counts = [0i64; 5];
    for bake in bakes {
        let phase = bake.phase().unwrap_or(BakePhase::Pending);
        if let Some(i) = PHASES.iter().position(|p| *p == phase) {
            counts[i] += 1;
        }
    }
    counts
}

/// An EC2 action name as a label: the SDK's operation names are a fixed set of identifiers;
/// anything else (which should not happen) collapses into `other`.
/// The resources Baker reads or writes; any other counts as `other`, so labels stay bounded.
const KUBE_RESOURCES: [&str; 12] = [
    "bakes",
    "baketemplates",
    "amicatalogs",
    "bakeschedules",
    "amichannels",
    "pods",
    "configmaps",
    "events",
    "leases",
    "secrets",
    "customresourcedefinitions",
    "namespaces",
];

/// Verb and resource of a request to the API server, from its method and path
/// (`/api/v1/namespaces/NS/pods/NAME`, `/apis/GROUP/VERSION/bakes?watch=true`, ...).
pub fn kube_request_labels(method: &http::Method, uri: &http::Uri) -> (&'static str, &'static str) {
    let segments: Vec<&str> = uri.path().split('/').filter(|s| !s.is_empty()).collect();
    // Skip `api/VERSION` or `apis/GROUP/VERSION`, then `namespaces/NS` when it names a namespace.
    let rest = match segments.first() {
        Some(&"api") => segments.get(2..),
        Some(&"apis") => segments.get(3..),
        _ => None,
    }
    .unwrap_or_default();
    let rest = match rest {
        ["namespaces", _, tail @ ..] if !tail.is_empty() => tail,
        other => other,
    };
    let resource = rest
        .first()
        .and_then(|r| KUBE_RESOURCES.iter().find(|k| *k == r).copied())
        .unwrap_or("other");
    let named = rest.len() >= 2;
    let watch = uri
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"));
    let verb = match *method {
        http::Method::GET if watch => "watch",
        // Discovery (`/apis/GROUP/VERSION`) reads one document: a get, not a list.
        http::Method::GET if named || rest.is_empty() => "get",
        http::Method::GET => "list",
        http::Method::POST => "create",
        http::Method::PUT => "update",
        http::Method::PATCH => "patch",
        http::Method::DELETE => "delete",
        _ => "other",
    };
    (verb, resource)
}

pub fn bounded_action(action: &str) -> String {
    if !action.is_empty() && action.len() <= 64 && action.chars().all(|c| c.is_ascii_alphanumeric()) {
        action.to_string()
    } else {
        "other".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bake(phase: Option<BakePhase>) -> Bake {
        let mut b = Bake::new(
            "b",
            serde_json::from_value(serde_json::json!({
                "template": "t", "service": "s", "version": "1", "virtualizationType": "hvm"
            }))
            .unwrap(),
        );
        b.status = Some(crate::api::BakeStatus {
            phase,
            ..Default::default()
        });
        b
    }

    #[test]
    fn renders_every_phase_with_zero_before_any_bake() {
        let text = Metrics::new().render();
        for phase in ["Pending", "Queued", "Running", "Succeeded", "Failed"] {
            assert!(
                text.contains(&format!("baker_bakes{{phase=\"{phase}\"}} 0")),
                "{phase} missing in:\n{text}"
            );
        }
        assert!(text.contains("# TYPE baker_queue_depth gauge"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn catalog_images_sums_the_images_every_catalog_status_lists() {
        let catalog = |count: Option<i32>, images: usize| {
            let mut c: AmiCatalog = serde_json::from_value(serde_json::json!({
                "apiVersion": "baker.io/v1alpha1", "kind": "AmiCatalog",
                "metadata": {"name": "c"}, "spec": {"region": "us-east-1"}
            }))
            .unwrap();
            c.status = Some(crate::api::catalog::AmiCatalogStatus {
                count,
                images: (0..images)
                    .map(|i| crate::api::catalog::CatalogImage {
                        image_id: format!("ami-{i}"),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            });
            c
        };
        let mut never_synced = catalog(None, 0);
        never_synced.status = None;
        let catalogs = [catalog(Some(3), 3), catalog(None, 2), never_synced];
        let m = Metrics::new();
        m.observe_catalogs(catalogs.iter());
        assert!(m.render().contains("baker_catalog_images 5\n"), "{}", m.render());
        m.observe_catalogs([]);
        assert!(m.render().contains("baker_catalog_images 0\n"));
    }

    #[test]
    fn counts_bakes_by_phase_and_queue_depth() {
        let m = Metrics::new();
        let bakes = [
            bake(None),
            bake(Some(BakePhase::Queued)),
            bake(Some(BakePhase::Queued)),
            bake(Some(BakePhase::Succeeded)),
        ];
        m.observe_bakes(bakes.iter());
        let text = m.render();
        assert!(text.contains("baker_bakes{phase=\"Pending\"} 1"), "{text}");
        assert!(text.contains("baker_bakes{phase=\"Queued\"} 2"), "{text}");
        assert!(text.contains("baker_bakes{phase=\"Succeeded\"} 1"), "{text}");
        assert!(text.contains("baker_queue_depth 2"), "{text}");
    }

    #[test]
    fn a_finished_bake_counts_its_result_and_observes_its_duration() {
        let m = Metrics::new();
        m.bake_finished(BakePhase::Succeeded, "Succeeded", Some(90.0));
        let text = m.render();
        assert!(
            text.contains("baker_bakes_finished_total{phase=\"Succeeded\",reason=\"Succeeded\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("baker_bake_duration_seconds_count{phase=\"Succeeded\",reason=\"Succeeded\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "baker_bake_duration_seconds_bucket{le=\"120.0\",phase=\"Succeeded\",reason=\"Succeeded\"} 1"
            ),
            "{text}"
        );
    }

    #[test]
    fn kube_requests_are_labelled_by_verb_and_a_bounded_resource() {
        let cases = [
            (
                "GET",
                "/apis/baker.io/v1alpha1/bakes?&watch=true&timeoutSeconds=290",
                ("watch", "bakes"),
            ),
            (
                "GET",
                "/apis/baker.io/v1alpha1/namespaces/ns/bakes",
                ("list", "bakes"),
            ),
            ("GET", "/api/v1/namespaces/ns/pods/bake-x", ("get", "pods")),
            (
                "PATCH",
                "/apis/baker.io/v1alpha1/namespaces/ns/bakes/b/status",
                ("patch", "bakes"),
            ),
            (
                "POST",
                "/api/v1/namespaces/ns/configmaps",
                ("create", "configmaps"),
            ),
            ("GET", "/api/v1/namespaces/ns", ("get", "namespaces")),
            ("DELETE", "/api/v1/namespaces/ns/widgets/w", ("delete", "other")),
            ("GET", "/version", ("get", "other")),
            ("GET", "/apis/baker.io/v1alpha1", ("get", "other")),
        ];
        for (method, uri, want) in cases {
            let method: http::Method = method.parse().expect("a method");
            let uri: http::Uri = uri.parse().expect("a URI");
            assert_eq!(kube_request_labels(&method, &uri), want, "{method} {uri}");
        }
    }

    #[test]
    fn ec2_calls_and_errors_are_labelled_by_action_only() {
        let m = Metrics::new();
        m.ec2_call("DescribeImages", false);
        m.ec2_call("DescribeImages", true);
        m.ec2_call("ami-123 /weird", true);
        let text = m.render();
        assert!(
            text.contains("baker_ec2_calls_total{action=\"DescribeImages\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("baker_ec2_errors_total{action=\"DescribeImages\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("baker_ec2_errors_total{action=\"other\"} 1"),
            "{text}"
        );
        assert!(!text.contains("ami-123"), "{text}");
    }

    #[test]
    fn reconciles_are_counted_and_timed_per_controller_and_errors_labelled_by_category() {
        let m = Metrics::new();
        m.reconciled("catalog", 0.002, Some(crate::error::Category::InvalidObject));
        m.reconciled("bake", 0.5, None);
        let text = m.render();
        for line in [
            "baker_reconcile_errors_total{controller=\"catalog\",category=\"invalid_object\"} 1",
            "baker_reconcile_errors_total{controller=\"bake\",category=\"invalid_object\"} 0",
            "baker_reconciles_total{controller=\"bake\"} 1",
            "baker_reconcile_duration_seconds_count{controller=\"catalog\"} 1",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }
}
