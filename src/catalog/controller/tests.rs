//! The AmiCatalog reconciler's retention against a mocked API server and the in-memory EC2:
//! removal needs proof that nothing uses an image, and a check that cannot be made removes nothing.

use std::sync::Arc;

use http::Method;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::Value;

use super::{Context, reconcile};
use crate::api::catalog::{AmiCatalogSpec, Retention};
use crate::api::{AmiCatalog, AmiCatalogStatus, keys};
use crate::bake::watch::Caches;
use crate::ec2_fake::{FakeEc2, FakeError, FakeImage, FakeInstance};
use crate::mock_api::{self, Answer, ApiLog, Recorded};

const REGION: &str = "eu-west-1";
const CATALOGS: &str = "/apis/baker.io/v1alpha1/namespaces/team/amicatalogs";

fn catalog() -> AmiCatalog {
    let spec: AmiCatalogSpec = serde_json::from_value(serde_json::json!({
        "region": REGION, "service": "svc"
    }))
    .unwrap_or_else(|e| panic!("a valid catalog spec: {e}"));
    let mut c = AmiCatalog::new("images", spec);
    c.spec.retention = Some(Retention {
        keep_newest: Some(1),
        ..Default::default()
    });
    c.metadata = ObjectMeta {
        name: Some("images".into()),
        namespace: Some("team".into()),
        uid: Some("catalog-uid".into()),
        generation: Some(1),
        ..Default::default()
    };
    c
}

/// Three images of `svc` baked by Baker in `team`, oldest first: ami-1, ami-2, ami-3.
fn ec2_with_images() -> Arc<FakeEc2> {
    let ec2 = FakeEc2::new();
    for (i, date) in ["2026-01-01", "2026-02-01", "2026-03-01"].iter().enumerate() {
        let n = i + 1;
        ec2.add_image(
            REGION,
            FakeImage::new(
                &format!("ami-{n}"),
                &format!("svc-{n}"),
                &format!("{date}T00:00:00.000Z"),
            )
            .tag(keys::BAKE_UID, &format!("bake-{n}"))
            .tag(keys::NAMESPACE, "team")
            .tag(keys::SERVICE, "svc")
            .snapshot(&format!("snap-{n}")),
        );
    }
    ec2
}

fn answer_catalog_writes(r: &Recorded) -> Option<Answer> {
    (r.method == Method::PATCH && r.path == format!("{CATALOGS}/images/status")).then(|| {
        let mut c = catalog();
        c.status = serde_json::from_value(r.body["status"].clone()).ok();
        (http::StatusCode::OK, serde_json::to_value(c).unwrap_or_default())
    })
}

async fn sync(ec2: &Arc<FakeEc2>) -> (ApiLog, AmiCatalogStatus) {
    let caches = Caches::filled(vec![], vec![], vec![], vec![catalog()]);
    let (client, api) = mock_api::client(answer_catalog_writes);
    let ctx = Context::new(
        client,
        ec2.ec2(),
        &crate::config::OperatorConfig::default(),
        Arc::default(),
    );
    let _ = ctx.stores.set(caches.stores());
    reconcile(Arc::new(catalog()), Arc::new(ctx))
        .await
        .unwrap_or_else(|e| panic!("the sync ends without a reconcile error: {e}"));
    let written = api
        .all()
        .iter()
        .rev()
        .find(|r| r.method == Method::PATCH)
        .map(|r| r.body["status"].clone())
        .unwrap_or(Value::Null);
    let status = serde_json::from_value(written).unwrap_or_else(|e| panic!("a status was written: {e}"));
    (api, status)
}

#[tokio::test]
async fn retention_removes_only_images_nothing_uses_with_their_snapshots() {
    let ec2 = ec2_with_images();
    ec2.add_instance(REGION, FakeInstance::new("i-1", "ami-2"));
    let (api, status) = sync(&ec2).await;
    let left: Vec<String> = ec2.images(REGION).iter().map(|i| i.id.clone()).collect();
    assert_eq!(
        left,
        ["ami-2", "ami-3"],
        "the newest is kept, and the one an instance runs"
    );
    assert!(
        !ec2.snapshots(REGION).contains("snap-1"),
        "the removed image's snapshot goes too"
    );
    assert_eq!(ec2.count("DeregisterImage"), 1);
    let retention = status.retention.unwrap_or_default();
    assert_eq!(retention.protected.len(), 1, "{retention:?}");
    assert!(retention.protected[0].reason.contains("i-1"), "{retention:?}");
    assert_eq!(api.event_reasons(), ["ImageRemoved"]);
}

#[tokio::test]
async fn retention_removes_nothing_when_one_use_check_fails_and_the_status_says_why() {
    let ec2 = ec2_with_images();
    ec2.fail_always(
        "DescribeLaunchTemplateVersions",
        FakeError::new("UnauthorizedOperation", "not allowed", 403),
    );
    ec2.fail_always(
        "DescribeLaunchTemplates",
        FakeError::new("UnauthorizedOperation", "not allowed", 403),
    );
    let (api, status) = sync(&ec2).await;
    assert_eq!(ec2.count("DeregisterImage"), 0, "{:?}", ec2.calls());
    assert_eq!(ec2.images(REGION).len(), 3);
    let text = serde_json::to_string(&status).unwrap_or_default();
    assert!(text.contains("UnauthorizedOperation"), "{text}");
    assert!(api.event_reasons().is_empty(), "{:?}", api.event_reasons());
}
