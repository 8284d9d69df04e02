use std::collections::BTreeMap;

use serde_json::json;

use super::*;
use crate::api::template::{Builder, CatalogSource};
use crate::api::{BakePhase, BakeStatus};

fn bake(name: &str, created: &str, status: Option<BakeStatus>) -> Bake {
    let mut bake: Bake = serde_json::from_value(json!({
        "apiVersion": "baker.io/v1alpha1",
        "kind": "Bake",
        "metadata": {
            "name": name,
            "namespace": "team-a",
            "uid": format!("uid-{name}"),
            "creationTimestamp": created,
            "generation": 1,
        },
        "spec": crate::fixtures::bake_spec("1.0.0"),
    }))
    .expect("a valid Bake");
    bake.status = status;
    bake
}

fn template(source: impl FnOnce(&mut crate::api::template::SourceImage)) -> BakeTemplate {
    let mut spec = crate::fixtures::template(Builder::AmazonEbs);
    source(&mut spec.source);
    BakeTemplate::new("ebs-example", spec)
}

fn catalog(images: serde_json::Value) -> AmiCatalog {
    serde_json::from_value(json!({
        "apiVersion": "baker.io/v1alpha1",
        "kind": "AmiCatalog",
        "metadata": { "name": "base", "namespace": "team-a" },
        "spec": { "region": "eu-west-1" },
        "status": { "images": images },
    }))
    .expect("a valid AmiCatalog")
}

fn image(id: &str, key: &str, namespace: &str) -> ImageSummary {
    ImageSummary {
        image_id: id.into(),
        name: None,
        creation_date: None,
        state: Some("available".into()),
        virtualization_type: Some("hvm".into()),
        tags: BTreeMap::from([
            (keys::BAKE_KEY.to_string(), key.to_string()),
            (keys::BAKE.to_string(), format!("{namespace}/maker")),
            (keys::NAMESPACE.to_string(), namespace.to_string()),
            (keys::BAKE_UID.to_string(), "uid-maker".to_string()),
        ]),
        snapshot_ids: vec![],
        ..Default::default()
    }
}

fn facts<'a>(bake: &'a Bake, template: Option<&'a BakeTemplate>, config: &'a OperatorConfig) -> Facts<'a> {
    Facts {
        bake,
        config,
        template,
        catalog: None,
        filter: None,
        keyed_images: None,
        bakes: None,
        now: jiff::Timestamp::now(),
    }
}

fn prepared(plan: &Plan) -> &Prepared {
    match plan {
        Plan::Reuse { prepared, .. } | Plan::Wait { prepared, .. } | Plan::Launch(prepared) => prepared,
        other => panic!("no launch prepared: {other:?}"),
    }
}

fn stop_reason(plan: Plan) -> Reason {
    match plan {
        Plan::Stop(t) => t.reason,
        other => panic!("expected a stop, got {other:?}"),
    }
}

/// The key a Bake gets with the default template: asked for once, by a first decision.
fn key_of(bake: &Bake, template: &BakeTemplate, config: &OperatorConfig) -> String {
    match decide(&facts(bake, Some(template), config)) {
        Plan::Ask(Need::ImagesWithKey { key, .. }) => key,
        other => panic!("expected a key lookup, got {other:?}"),
    }
}

/// A Bake that waited once: its key and source are recorded.
fn waiting_bake(template: &BakeTemplate, config: &OperatorConfig) -> (Bake, String) {
    let key = key_of(&bake("b", "2026-01-01T00:00:00Z", None), template, config);
    let waiting = BakeStatus {
        bake_key: Some(key.clone()),
        source_ami_id: Some("ami-0123456789abcdef0".into()),
        ..Default::default()
    };
    (bake("b", "2026-01-01T00:00:00Z", Some(waiting)), key)
}

#[test]
fn a_namespace_the_admin_did_not_allow_stops_before_anything_is_read() {
    let config = OperatorConfig {
        bake_namespaces: vec!["builds".into()],
        ..Default::default()
    };
    let b = bake("b", "2026-01-01T00:00:00Z", None);
    let plan = decide(&facts(&b, None, &config));
    match plan {
        Plan::Stop(t) => {
            assert_eq!(t.reason, Reason::NamespaceNotAllowed);
            assert!(t.message.contains("builds"), "{}", t.message);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_missing_template_stops_the_bake_until_it_exists() {
    let config = OperatorConfig::default();
    let b = bake("b", "2026-01-01T00:00:00Z", None);
    assert_eq!(
        stop_reason(decide(&facts(&b, None, &config))),
        Reason::TemplateNotFound
    );
}

#[test]
fn the_recorded_source_wins_over_the_templates_so_a_rerender_is_identical() {
    let config = OperatorConfig::default();
    let t = template(|_| {});
    let recorded = BakeStatus {
        source_ami_id: Some("ami-00ec0000".into()),
        ..Default::default()
    };
    let b = bake("b", "2026-01-01T00:00:00Z", Some(recorded));
    let p = prepare(&facts(&b, Some(&t), &config)).expect("prepared");
    assert_eq!(p.source_ami, "ami-00ec0000");
    assert!(p.keyed.rendered.contains("ami-00ec0000"));
}

#[test]
fn a_filter_source_asks_ec2_once_and_every_answer_decides() {
    let config = OperatorConfig::default();
    let t = template(|s| {
        s.ami_id = None;
        s.filter = Some(ImageFilter {
            owners: vec!["self".into()],
            ..Default::default()
        });
    });
    let b = bake("b", "2026-01-01T00:00:00Z", None);
    let mut f = facts(&b, Some(&t), &config);
    assert!(matches!(decide(&f), Plan::Ask(Need::SourceFilter { .. })));
    f.filter = Some(FilterAnswer::NotFound);
    assert_eq!(stop_reason(decide(&f)), Reason::SourceImageNotFound);
    f.filter = Some(FilterAnswer::Failed("throttled".into()));
    assert_eq!(stop_reason(decide(&f)), Reason::Ec2Unavailable);
    f.filter = Some(FilterAnswer::Found("ami-00f0d000".into()));
    let plan = decide(&f);
    assert!(matches!(plan, Plan::Ask(Need::ImagesWithKey { .. })), "{plan:?}");
    assert_eq!(prepare(&f).expect("prepared").source_ami, "ami-00f0d000");
}

#[test]
fn a_catalog_source_takes_the_latest_available_image_of_the_bakes_type_from_the_cache() {
    let config = OperatorConfig::default();
    let t = template(|s| {
        s.ami_id = None;
        s.catalog = Some(CatalogSource { name: "base".into() });
    });
    let b = bake("b", "2026-01-01T00:00:00Z", None);
    let mut f = facts(&b, Some(&t), &config);
    match decide(&f) {
        Plan::Stop(t) => {
            assert_eq!(t.reason, Reason::SourceCatalogEmpty);
            assert!(t.message.contains("does not exist"), "{}", t.message);
        }
        other => panic!("{other:?}"),
    }
    let empty = catalog(json!([]));
    f.catalog = Some(&empty);
    match decide(&f) {
        Plan::Stop(t) => assert!(t.message.contains("lists no available"), "{}", t.message),
        other => panic!("{other:?}"),
    }
    let listed = catalog(json!([
        // Newest first, as a sync writes them.
        { "imageId": "ami-00b00000", "state": "available", "virtualizationType": "paravirtual", "creationDate": "2026-03-01T00:00:00Z" },
        { "imageId": "ami-00e00000", "state": "available", "virtualizationType": "hvm", "creationDate": "2026-02-01T00:00:00Z" },
        { "imageId": "ami-00d00000", "state": "available", "virtualizationType": "hvm", "creationDate": "2026-01-01T00:00:00Z" },
    ]));
    f.catalog = Some(&listed);
    assert_eq!(prepare(&f).expect("prepared").source_ami, "ami-00e00000");
}

#[test]
fn an_image_with_the_key_in_scope_is_reused_and_one_of_another_namespace_is_not() {
    let config = OperatorConfig::default();
    let t = template(|_| {});
    let b = bake("b", "2026-01-01T00:00:00Z", None);
    let key = key_of(&b, &t, &config);

    let foreign = [image("ami-00f0f000", &key, "team-b")];
    let mut f = facts(&b, Some(&t), &config);
    f.keyed_images = Some(&foreign);
    assert!(
        matches!(decide(&f), Plan::Ask(Need::Bakes { .. })),
        "a foreign image is not reused"
    );

    let mine = [
        image("ami-00f0f000", &key, "team-b"),
        image("ami-00a1e000", &key, "team-a"),
    ];
    f.keyed_images = Some(&mine);
    match decide(&f) {
        Plan::Reuse { ami_id, from, .. } => {
            assert_eq!(ami_id, "ami-00a1e000");
            assert_eq!(from.as_deref(), Some("team-a/maker"));
        }
        other => panic!("{other:?}"),
    }

    let cluster = OperatorConfig {
        reuse_scope: Scope::Cluster,
        ..Default::default()
    };
    let mut f = facts(&b, Some(&t), &cluster);
    f.keyed_images = Some(&foreign);
    assert!(
        matches!(decide(&f), Plan::Reuse { .. }),
        "cluster scope reaches team-b"
    );
}

#[test]
fn a_bake_that_recorded_its_key_asks_ec2_nothing_and_decides_on_the_bakes() {
    let config = OperatorConfig::default();
    let t = template(|_| {});
    let (b, key) = waiting_bake(&t, &config);
    let mut f = facts(&b, Some(&t), &config);
    assert_eq!(decide(&f), Plan::Ask(Need::Bakes { key: key.clone() }));
    let none = [];
    f.bakes = Some(&none);
    let plan = decide(&f);
    assert!(matches!(plan, Plan::Launch(_)), "{plan:?}");
    assert_eq!(prepared(&plan).keyed.key, key);
}

#[test]
fn rebake_never_looks_for_an_image_to_reuse() {
    let config = OperatorConfig::default();
    let t = template(|_| {});
    let mut b = bake("b", "2026-01-01T00:00:00Z", None);
    b.spec.rebake = true;
    let mut f = facts(&b, Some(&t), &config);
    assert!(matches!(decide(&f), Plan::Ask(Need::Bakes { .. })));
    let none = [];
    f.bakes = Some(&none);
    assert!(matches!(decide(&f), Plan::Launch(_)));
}

fn finished_with(key: &str, ami: &str) -> queue::BakeView {
    queue::BakeView {
        uid: "uid-done".into(),
        namespace: "team-a".into(),
        name: "done".into(),
        created: 0,
        phase: Some(BakePhase::Succeeded),
        reason: Some("Succeeded".into()),
        launched: true,
        key: Some(key.into()),
        ami_id: Some(ami.into()),
    }
}

#[test]
fn an_identical_bakes_image_is_reused_only_if_ec2_still_shows_it_with_the_key() {
    let config = OperatorConfig::default();
    let t = template(|_| {});
    // Woken after the identical Bake ended: the key was looked up while waiting.
    let (b, key) = waiting_bake(&t, &config);
    let done = [finished_with(&key, "ami-00d0e000")];
    let mut f = facts(&b, Some(&t), &config);
    f.bakes = Some(&done);
    assert!(matches!(decide(&f), Plan::Ask(Need::ImagesWithKey { .. })));

    let still = [image("ami-00d0e000", &key, "team-a")];
    f.keyed_images = Some(&still);
    assert!(matches!(decide(&f), Plan::Reuse { ref ami_id, .. } if ami_id == "ami-00d0e000"));

    // Deregistered (or its key tag removed) since: the status alone is no evidence.
    let gone = [];
    f.keyed_images = Some(&gone);
    assert!(matches!(decide(&f), Plan::Launch(_)));
}

#[test]
fn a_full_queue_waits_with_its_key_and_source_recorded_and_a_message_without_counts() {
    let config = OperatorConfig {
        max_concurrent_bakes: 1,
        ..Default::default()
    };
    let t = template(|_| {});
    let b = bake("b", "2026-01-01T00:00:00Z", None);
    let running = queue::BakeView {
        uid: "uid-running".into(),
        namespace: "team-b".into(),
        name: "running".into(),
        created: 0,
        phase: Some(BakePhase::Running),
        reason: None,
        launched: true,
        key: Some("other".into()),
        ami_id: None,
    };
    let bakes = [running];
    let none = [];
    let mut f = facts(&b, Some(&t), &config);
    f.keyed_images = Some(&none);
    f.bakes = Some(&bakes);
    match decide(&f) {
        Plan::Wait { prepared, transition } => {
            assert_eq!(transition.reason, Reason::Queued);
            assert!(
                transition.message.contains("at most 1 bake(s)"),
                "{}",
                transition.message
            );
            assert_eq!(prepared.source_ami, "ami-0123456789abcdef0");
            assert_eq!(prepared.region, "eu-west-1");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_cli_dry_run_renders_what_the_operator_renders() {
    let config = OperatorConfig::default();
    let t = template(|_| {});
    let b = bake("b", "2026-01-01T00:00:00Z", None);
    let p = prepare(&facts(&b, Some(&t), &config)).expect("prepared");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (template_file, bake_file) = (dir.path().join("t.yaml"), dir.path().join("b.yaml"));
    std::fs::write(&template_file, serde_yaml::to_string(&t).expect("yaml")).expect("written");
    std::fs::write(&bake_file, serde_yaml::to_string(&b).expect("yaml")).expect("written");
    let dry_run = crate::cli::render_from_files(&template_file, &bake_file, None, None).expect("renders");
    assert_eq!(dry_run, p.keyed.rendered);
}

#[test]
fn a_deprecated_image_with_the_key_is_never_reused() {
    let now = jiff::Timestamp::now();
    let mut old = image("ami-revoked", "k", "team-a");
    old.deprecation_time = Some((now - jiff::SignedDuration::from_secs(60)).to_string());
    let mut later = image("ami-later", "k", "team-a");
    later.deprecation_time = Some((now + jiff::SignedDuration::from_hours(24)).to_string());
    let images = [old, later];
    let found = reusable(&images, "k", "team-a", Scope::Namespace, now);
    assert_eq!(found.map(|i| i.image_id.as_str()), Some("ami-later"));
}
