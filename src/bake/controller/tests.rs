//! The Bake reconciler's I/O paths against a mocked API server and the in-memory EC2: which
//! requests one reconcile makes, in which order, and what it does with each answer.

use std::sync::Arc;
use std::time::Duration;

use http::Method;
use k8s_openapi::api::core::v1::{Pod, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;
use kube::runtime::controller::Action;
use serde_json::{Value, json};

use super::{Context, FINALIZER, reconcile};
use crate::api::template::Builder;
use crate::api::{Bake, BakeStatus, BakeTemplate};
use crate::bake::Error;
use crate::bake::watch::Caches;
use crate::ec2_fake::FakeEc2;
use crate::error::ReconcileError;
use crate::mock_api::{self, Answer, ApiLog, Recorded};

mod distribution;

const NS: &str = "team";
const UID: &str = "0b9a4c1e-uid";
const BAKES: &str = "/apis/baker.io/v1alpha1/namespaces/team/bakes";

fn template() -> BakeTemplate {
    let mut t = BakeTemplate::new("ebs-example", crate::fixtures::template(Builder::AmazonEbs));
    t.metadata.uid = Some("template-uid".into());
    t
}

/// A Bake named `b` as the cache holds it: Baker's finalizer on, no status yet.
fn bake() -> Bake {
    let mut b = Bake::new("b", crate::fixtures::bake_spec("1.0.0"));
    b.metadata = ObjectMeta {
        name: Some("b".into()),
        namespace: Some(NS.into()),
        uid: Some(UID.into()),
        resource_version: Some("7".into()),
        generation: Some(1),
        finalizers: Some(vec![FINALIZER.into()]),
        ..Default::default()
    };
    b
}

/// The Bake's pod `bake-b`, owned by it, in `phase`.
fn pod(phase: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some("bake-b".into()),
            namespace: Some(NS.into()),
            uid: Some("pod-uid".into()),
            owner_references: Some(vec![OwnerReference {
                api_version: "baker.io/v1alpha1".into(),
                kind: "Bake".into(),
                name: "b".into(),
                uid: UID.into(),
                controller: Some(true),
                ..Default::default()
            }]),
            ..Default::default()
        },
        status: Some(PodStatus {
            phase: Some(phase.into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

struct Rig {
    ctx: Arc<Context>,
    api: ApiLog,
    ec2: Arc<FakeEc2>,
}

fn rig(
    bakes: Vec<Bake>,
    pods: Vec<Pod>,
    respond: impl Fn(&Recorded) -> Option<Answer> + Send + Sync + 'static,
) -> Rig {
    rig_with(template(), FakeEc2::new(), bakes, pods, respond)
}

/// A rig whose caches hold `template`, on the EC2 given (which a test may carry from one rig to
/// the next, as the same EC2 outlives a template change).
fn rig_with(
    template: BakeTemplate,
    ec2: Arc<FakeEc2>,
    bakes: Vec<Bake>,
    pods: Vec<Pod>,
    respond: impl Fn(&Recorded) -> Option<Answer> + Send + Sync + 'static,
) -> Rig {
    let caches = Caches::filled(bakes, pods, vec![template], vec![]);
    let (client, api) = mock_api::client(move |r| respond(r).or_else(|| bake_written(r)));
    let ctx = Context::new(
        client,
        ec2.ec2(),
        crate::config::OperatorConfig::default(),
        caches.stores(),
        Arc::default(),
    );
    Rig {
        ctx: Arc::new(ctx),
        api,
        ec2,
    }
}

/// What the API server answers a write to Bake `b`: the Bake with what was written.
fn bake_written(r: &Recorded) -> Option<Answer> {
    if r.method != Method::PATCH || !r.path.starts_with(&format!("{BAKES}/b")) {
        return None;
    }
    let mut b = bake();
    if r.path.ends_with("/status") {
        b.status = Some(sent_status(r));
    } else if let Some(f) = r.body["metadata"]["finalizers"].as_array() {
        b.metadata.finalizers = Some(f.iter().filter_map(|f| f.as_str().map(String::from)).collect());
    }
    Some((http::StatusCode::OK, serde_json::to_value(b).unwrap_or_default()))
}

/// The status a write sent, read back.
fn sent_status(r: &Recorded) -> BakeStatus {
    serde_json::from_value(r.body.get("status").cloned().unwrap_or(Value::Null)).unwrap_or_default()
}

fn status_writes(api: &ApiLog) -> Vec<BakeStatus> {
    api.all()
        .iter()
        .filter(|r| r.method == Method::PATCH && r.path == format!("{BAKES}/b/status"))
        .map(sent_status)
        .collect()
}

#[tokio::test]
async fn a_launch_is_recorded_in_status_before_the_configmap_and_the_pod_are_created() {
    let rig = rig(vec![bake()], vec![], |_| None);
    let action = reconcile(Arc::new(bake()), rig.ctx.clone())
        .await
        .expect("the launch succeeds");
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    assert_eq!(
        rig.api.lines(),
        [
            format!("PATCH {BAKES}/b/status"),
            "POST /api/v1/namespaces/team/configmaps".to_string(),
            "POST /api/v1/namespaces/team/pods".to_string(),
        ]
    );
    let launched = &status_writes(&rig.api)[0];
    assert_eq!(launched.pod_name.as_deref(), Some("bake-b"));
    assert!(launched.bake_key.is_some() && launched.region.is_some());
    assert_eq!(launched.source_ami_id.as_deref(), Some("ami-0123456789abcdef0"));
    // Reuse was looked for once in EC2, outside the launch lock; nothing else was asked.
    assert_eq!(rig.ec2.calls().len(), 1, "{:?}", rig.ec2.calls());
    assert_eq!(rig.ec2.count("DescribeImages"), 1);
    assert_eq!(rig.api.event_reasons(), ["Launched"]);
}

#[tokio::test]
async fn a_pod_whose_launch_record_is_not_in_the_cache_yet_is_read_from_the_api_server_and_the_record_kept() {
    // The API server has the launch record the cache has not caught up with.
    let mut latest = bake();
    latest.status = Some(BakeStatus {
        pod_name: Some("bake-b".into()),
        bake_key: Some("k123".into()),
        region: Some("eu-west-1".into()),
        source_ami_id: Some("ami-0123456789abcdef0".into()),
        ..Default::default()
    });
    let answer = serde_json::to_value(&latest).expect("a Bake serializes");
    let rig = rig(vec![bake()], vec![pod("Running")], move |r| {
        (r.method == Method::GET && r.path == format!("{BAKES}/b"))
            .then(|| (http::StatusCode::OK, answer.clone()))
    });
    reconcile(Arc::new(bake()), rig.ctx.clone())
        .await
        .expect("the reconcile succeeds");
    let lines = rig.api.lines();
    assert_eq!(lines[0], format!("GET {BAKES}/b"), "{lines:?}");
    let written = status_writes(&rig.api);
    assert_eq!(written.len(), 1, "one status write: {lines:?}");
    assert_eq!(written[0].pod_uid.as_deref(), Some("pod-uid"));
    assert_eq!(
        written[0].bake_key.as_deref(),
        Some("k123"),
        "the launch record is kept"
    );
    assert_eq!(written[0].source_ami_id.as_deref(), Some("ami-0123456789abcdef0"));
    assert!(
        !lines.iter().any(|l| l.starts_with("POST")),
        "nothing is created again: {lines:?}"
    );
    assert!(rig.ec2.calls().is_empty(), "{:?}", rig.ec2.calls());
}

#[tokio::test]
async fn a_conflict_adding_the_finalizer_writes_nothing_else_and_retries_at_once_without_counting_an_error() {
    let mut fresh = bake();
    fresh.metadata.finalizers = None;
    let rig = rig(vec![fresh.clone()], vec![], |r| {
        (r.method == Method::PATCH && r.path == format!("{BAKES}/b")).then(|| {
            mock_api::status(
                409,
                "Conflict",
                "Operation cannot be fulfilled on bakes.baker.io \"b\": the object has been modified",
            )
        })
    });
    let error = reconcile(Arc::new(fresh), rig.ctx.clone())
        .await
        .expect_err("the finalizer write conflicts");
    assert!(matches!(error, Error::Conflict("finalizers")), "{error}");
    assert!(error.is_conflict());
    assert_eq!(
        crate::k8s::retry_after(&error),
        Action::requeue(Duration::from_secs(1))
    );
    assert_eq!(rig.api.lines(), [format!("PATCH {BAKES}/b")]);
    let sent = &rig.api.all()[0].body;
    assert_eq!(
        sent["metadata"]["resourceVersion"],
        json!("7"),
        "guarded by resourceVersion"
    );
    let metrics = rig.ctx.metrics().render();
    assert!(
        metrics.contains("baker_reconcile_errors_total{controller=\"bake\",category=\"kube_write\"} 0"),
        "{metrics}"
    );
}

#[tokio::test]
async fn deleting_a_bake_whose_pod_runs_stops_the_pod_with_the_grace_period_and_keeps_the_finalizer() {
    let mut deleted = bake();
    deleted.metadata.deletion_timestamp = Some(crate::k8s::now());
    deleted.status = Some(BakeStatus {
        pod_name: Some("bake-b".into()),
        region: Some("eu-west-1".into()),
        ..Default::default()
    });
    let rig = rig(vec![deleted.clone()], vec![pod("Running")], |_| None);
    let action = reconcile(Arc::new(deleted), rig.ctx.clone())
        .await
        .expect("cleanup is under way");
    assert_eq!(action, Action::requeue(Duration::from_secs(2)));
    assert_eq!(
        rig.api.lines(),
        ["DELETE /api/v1/namespaces/team/pods/bake-b".to_string()],
        "the pod is stopped and the finalizer stays"
    );
    let delete = &rig.api.all()[0].body;
    let grace = rig.ctx.config.bake_grace_seconds;
    assert_eq!(delete["gracePeriodSeconds"], json!(grace), "{delete}");
    assert_eq!(delete["preconditions"]["uid"], json!("pod-uid"), "{delete}");
    assert!(
        rig.ec2.calls().is_empty(),
        "EC2 is swept only once the pod stopped"
    );
    assert_eq!(rig.api.event_reasons(), ["Cancelling"]);
}

#[tokio::test]
async fn a_bake_without_a_namespace_is_an_invalid_object_retried_only_when_it_changes() {
    let mut b = bake();
    b.metadata.namespace = None;
    let rig = rig(vec![], vec![], |_| None);
    let error = reconcile(Arc::new(b), rig.ctx.clone())
        .await
        .expect_err("a Bake needs a namespace");
    assert_eq!(error.category(), crate::error::Category::InvalidObject);
    assert_eq!(crate::k8s::retry_after(&error), Action::await_change());
    assert!(rig.api.all().is_empty());
    let metrics = rig.ctx.metrics().render();
    assert!(
        metrics.contains("baker_reconcile_errors_total{controller=\"bake\",category=\"invalid_object\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_bake_replaced_under_its_name_while_reconciled_gets_no_status_and_is_retried_as_a_conflict() {
    let rig = rig(vec![bake()], vec![], |r| {
        (r.method == Method::PATCH && r.path.ends_with("/status")).then(|| {
            mock_api::status(
                409,
                "Conflict",
                "Precondition failed: UID in precondition: 0b9a4c1e-uid, UID in object meta: other; metadata.uid",
            )
        })
    });
    let error = reconcile(Arc::new(bake()), rig.ctx.clone())
        .await
        .expect_err("the status write meets another Bake");
    assert!(error.is_conflict(), "{error}");
    let lines = rig.api.lines();
    assert!(
        !lines.iter().any(|l| l.starts_with("POST")),
        "no pod for a Bake whose launch was not recorded: {lines:?}"
    );
    let patch = &rig.api.all()[0].body;
    assert_eq!(
        patch["metadata"]["uid"],
        json!(UID),
        "the write is preconditioned on the UID"
    );
    assert_eq!(Bake::kind(&()), patch["kind"].as_str().unwrap_or_default());
}

/// A Bake whose pod `bake-b` ran in eu-west-1 and has now failed, with an instance packer left
/// running (tagged with the Bake's UID).
fn packer_died() -> (Bake, Rig) {
    let mut b = bake();
    b.status = Some(BakeStatus {
        phase: Some(crate::api::BakePhase::Running),
        pod_name: Some("bake-b".into()),
        pod_uid: Some("pod-uid".into()),
        region: Some("eu-west-1".into()),
        ..Default::default()
    });
    let rig = rig(vec![b.clone()], vec![pod("Failed")], |_| None);
    rig.ec2.add_instance(
        "eu-west-1",
        crate::ec2_fake::FakeInstance::new("i-left", "ami-0123456789abcdef0")
            .state("running")
            .tag(crate::api::keys::BAKE_UID, UID),
    );
    (b, rig)
}

#[tokio::test]
async fn when_packer_dies_after_creating_the_ami_the_instance_it_left_is_terminated_and_the_ami_adopted() {
    let (b, rig) = packer_died();
    rig.ec2.add_image(
        "eu-west-1",
        crate::ec2_fake::FakeImage::new("ami-0fedcba987654321f", "svc-1.0.0", "2026-12-01T00:00:00.000Z")
            .tag(crate::api::keys::BAKE_UID, UID),
    );
    reconcile(Arc::new(b), rig.ctx.clone())
        .await
        .expect("the Bake is finished");
    let instances = rig.ec2.instances("eu-west-1");
    assert_eq!(instances[0].state, "terminated", "{instances:?}");
    let written = status_writes(&rig.api);
    let last = written.last().expect("a status write");
    assert_eq!(last.ami_id.as_deref(), Some("ami-0fedcba987654321f"));
    assert_eq!(last.phase, Some(crate::api::BakePhase::Succeeded));
    assert_eq!(rig.api.event_reasons(), ["Cleaned", "Adopted"]);
}

#[tokio::test]
async fn a_sweep_ec2_refuses_after_packer_died_does_not_hold_the_bake_and_a_warning_says_so() {
    let (b, rig) = packer_died();
    rig.ec2
        .fail_always("DescribeInstances", crate::ec2_fake::FakeError::throttled());
    reconcile(Arc::new(b), rig.ctx.clone())
        .await
        .expect("the Bake is finished");
    let written = status_writes(&rig.api);
    assert_eq!(
        written.last().and_then(|s| s.phase),
        Some(crate::api::BakePhase::Failed)
    );
    assert_eq!(rig.api.event_reasons(), ["CleanupIncomplete", "PackerFailed"]);
    assert_eq!(rig.ec2.instances("eu-west-1")[0].state, "running");
}
