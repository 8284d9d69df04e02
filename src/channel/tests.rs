use super::*;
use crate::api::catalog::RevokedImage;

fn image(id: &str, created: &str) -> CatalogImage {
    CatalogImage {
        image_id: id.into(),
        creation_date: Some(created.into()),
        state: Some("available".into()),
        virtualization_type: Some("hvm".into()),
        ..Default::default()
    }
}

/// A catalog listing ami-new (day 3), ami-mid (day 2) and ami-old (day 1), newest first.
fn catalog_status() -> AmiCatalogStatus {
    let images = vec![
        image("ami-new", "2026-12-03T00:00:00Z"),
        image("ami-mid", "2026-12-02T00:00:00Z"),
        image("ami-old", "2026-12-01T00:00:00Z"),
    ];
    AmiCatalogStatus {
        latest: images.first().cloned(),
        images,
        ..Default::default()
    }
}

fn spec(yaml: &str) -> AmiChannelSpec {
    serde_yaml::from_str(yaml).expect("a valid spec")
}

fn at(ts: &str) -> jiff::Timestamp {
    ts.parse().expect("a timestamp")
}

fn pointing_at(id: &str) -> AmiChannelStatus {
    AmiChannelStatus {
        image_id: Some(id.into()),
        ..Default::default()
    }
}

fn choose_with(
    spec: &AmiChannelSpec,
    status: Option<&AmiChannelStatus>,
    catalog: &AmiCatalogStatus,
) -> Choice {
    choose(&Facts {
        spec,
        status,
        catalog: Some(Catalog {
            name: "base",
            region: "us-east-1",
            status: Some(catalog),
        }),
        pinned_baked: false,
        now: at("2026-12-03T12:00:00Z"),
    })
}

fn revoke(catalog: &mut AmiCatalogStatus, id: &str) {
    catalog.revoked.push(RevokedImage {
        image_id: id.into(),
        reason: "CVE-2026-1".into(),
        outcome: "Deprecated".into(),
        ..Default::default()
    });
}

#[test]
fn following_latest_points_at_the_newest_image_and_says_why() {
    let s = spec("catalog: base\nfollow: Latest");
    let choice = choose_with(&s, None, &catalog_status());
    assert_eq!(choice.image.as_deref(), Some("ami-new"));
    assert_eq!(
        choice.moved.as_deref(),
        Some("the newest image of AmiCatalog \"base\"")
    );
    assert!(choice.blocked.is_none() && choice.degraded.is_none());
    // Already there: no move.
    let again = choose_with(&s, Some(&pointing_at("ami-new")), &catalog_status());
    assert_eq!(again.image.as_deref(), Some("ami-new"));
    assert!(again.moved.is_none());
}

#[test]
fn following_latest_skips_images_that_have_not_soaked_and_wakes_when_they_have() {
    // 36 hours: ami-new (12 h old) has not soaked, ami-mid (36 h old) has.
    let s = spec("catalog: base\nfollow: Latest\nsoakSeconds: 129600");
    let choice = choose_with(&s, None, &catalog_status());
    assert_eq!(choice.image.as_deref(), Some("ami-mid"));
    assert_eq!(choice.wake, Some(Duration::from_secs(24 * 3600)));
    // Nothing soaked: stays where it is, waiting.
    let s = spec("catalog: base\nfollow: Latest\nsoakSeconds: 7776000");
    let choice = choose_with(&s, Some(&pointing_at("ami-old")), &catalog_status());
    assert_eq!(choice.image.as_deref(), Some("ami-old"));
    assert_eq!(choice.blocked.as_ref().map(|b| b.reason), Some("NoImage"));
    assert!(choice.wake.is_some());
}

#[test]
fn following_latest_moves_back_from_a_revoked_image_to_the_newest_left() {
    let s = spec("catalog: base\nfollow: Latest");
    let mut catalog = catalog_status();
    revoke(&mut catalog, "ami-new");
    let choice = choose_with(&s, Some(&pointing_at("ami-new")), &catalog);
    assert_eq!(choice.image.as_deref(), Some("ami-mid"));
    assert_eq!(
        choice.moved.as_deref(),
        Some("the image it pointed at, ami-new, was revoked (CVE-2026-1)")
    );
    assert!(
        choice.degraded.is_none(),
        "it moved to an image that is not revoked"
    );
}

#[test]
fn a_pinned_channel_moves_only_when_its_field_does_and_turns_degraded_when_revoked() {
    let s = spec("catalog: base\nimageId: ami-old");
    let first = choose_with(&s, None, &catalog_status());
    assert_eq!(first.image.as_deref(), Some("ami-old"));
    assert_eq!(first.moved.as_deref(), Some("pinned by spec.imageId"));
    // A newer image in the catalog changes nothing.
    let later = choose_with(&s, Some(&pointing_at("ami-old")), &catalog_status());
    assert_eq!(later.image.as_deref(), Some("ami-old"));
    assert!(later.moved.is_none());
    // Revoked: it stays, Degraded, and says what to do.
    let mut catalog = catalog_status();
    revoke(&mut catalog, "ami-old");
    let revoked = choose_with(&s, Some(&pointing_at("ami-old")), &catalog);
    assert_eq!(revoked.image.as_deref(), Some("ami-old"));
    assert!(revoked.moved.is_none());
    let why = revoked.degraded.expect("degraded");
    assert!(
        why.contains("CVE-2026-1") && why.contains("spec.imageId"),
        "{why}"
    );
}

#[test]
fn a_pinned_channel_refuses_an_unknown_or_revoked_image_and_keeps_its_own() {
    let s = spec("catalog: base\nimageId: ami-elsewhere");
    let choice = choose_with(&s, Some(&pointing_at("ami-old")), &catalog_status());
    assert_eq!(choice.image.as_deref(), Some("ami-old"));
    assert_eq!(choice.blocked.as_ref().map(|b| b.reason), Some("ImageNotFound"));
    // The image of a Bake of the namespace is known even when the catalog no longer lists it.
    let baked = choose(&Facts {
        spec: &s,
        status: Some(&pointing_at("ami-old")),
        catalog: Some(Catalog {
            name: "base",
            region: "us-east-1",
            status: Some(&catalog_status()),
        }),
        pinned_baked: true,
        now: at("2026-12-03T12:00:00Z"),
    });
    assert_eq!(baked.image.as_deref(), Some("ami-elsewhere"));
    let mut catalog = catalog_status();
    revoke(&mut catalog, "ami-mid");
    let s = spec("catalog: base\nimageId: ami-mid");
    let choice = choose_with(&s, Some(&pointing_at("ami-old")), &catalog);
    assert_eq!(choice.image.as_deref(), Some("ami-old"));
    assert_eq!(choice.blocked.as_ref().map(|b| b.reason), Some("Revoked"));
}

#[test]
fn a_missing_catalog_keeps_the_image_and_blocks() {
    let s = spec("catalog: gone\nfollow: Latest");
    let choice = choose(&Facts {
        spec: &s,
        status: Some(&pointing_at("ami-old")),
        catalog: None,
        pinned_baked: false,
        now: at("2026-12-03T12:00:00Z"),
    });
    assert_eq!(choice.image.as_deref(), Some("ami-old"));
    assert_eq!(choice.blocked.as_ref().map(|b| b.reason), Some("CatalogNotFound"));
}

#[test]
fn ssm_parameters_are_allowed_only_under_the_namespaces_path() {
    let prefix = ssm_prefix("/baker/{namespace}/", "team");
    assert_eq!(prefix, "/baker/team/");
    assert!(ssm_allowed("/baker/team/prod/ami", &prefix));
    assert!(!ssm_allowed("/baker/team", &prefix));
    assert!(!ssm_allowed("/baker/team/", &prefix));
    assert!(!ssm_allowed("/baker/team-b/prod", &prefix));
    assert!(!ssm_allowed("/payments/prod", &prefix));
}

#[test]
fn launch_templates_are_allowed_only_when_their_tag_names_the_namespace() {
    assert!(launch_template_allowed(Some("team"), "team"));
    assert!(launch_template_allowed(Some("ops, team"), "team"));
    assert!(!launch_template_allowed(Some("team-b"), "team"));
    assert!(!launch_template_allowed(Some(""), "team"));
    assert!(!launch_template_allowed(None, "team"));
}

fn regions() -> Vec<RegionImage> {
    vec![
        RegionImage {
            region: "us-east-1".into(),
            image_id: "ami-new".into(),
        },
        RegionImage {
            region: "us-west-2".into(),
            image_id: "ami-copy".into(),
        },
    ]
}

#[test]
fn targets_are_each_parameter_in_each_region_and_each_launch_template_in_its_region() {
    let s = spec(
        "catalog: base\nfollow: Latest\npublish:\n  ssmParameters: [/baker/team/ami]\n  launchTemplates:\n  - name: web\n  - name: api\n    region: eu-west-1",
    );
    let all = targets(&s, "us-east-1", &regions());
    let listed: Vec<(&str, &str, &str)> = all.iter().map(|t| (t.kind(), t.name(), t.region())).collect();
    assert_eq!(
        listed,
        [
            (SSM_PARAMETER, "/baker/team/ami", "us-east-1"),
            (SSM_PARAMETER, "/baker/team/ami", "us-west-2"),
            (LAUNCH_TEMPLATE, "web", "us-east-1"),
            (LAUNCH_TEMPLATE, "api", "eu-west-1"),
        ]
    );
    // A parameter outside the path is refused without asking AWS; a region without a copy waits.
    let outside = Target::Ssm {
        name: "/other/ami".into(),
        region: "us-east-1".into(),
    };
    assert_eq!(
        precheck(&outside, &regions(), "/baker/team/").map(|p| p.state),
        Some(REFUSED.to_string())
    );
    assert_eq!(
        precheck(&all[3], &regions(), "/baker/team/").map(|p| p.state),
        Some(WAITING.to_string())
    );
    assert_eq!(precheck(&all[1], &regions(), "/baker/team/"), None);
    assert_eq!(image_in(&regions(), "us-west-2"), Some("ami-copy"));
}

fn published(state: &str) -> Publication {
    Publication {
        kind: SSM_PARAMETER.into(),
        name: "/baker/team/ami".into(),
        region: "us-east-1".into(),
        image_id: Some("ami-new".into()),
        version: None,
        state: state.into(),
        message: None,
    }
}

#[test]
fn targets_are_checked_when_something_changed_or_the_interval_passed() {
    let now = at("2026-12-03T12:00:00Z");
    let hour = Duration::from_secs(3600);
    let settled = AmiChannelStatus {
        image_id: Some("ami-new".into()),
        regions: regions(),
        published: vec![published(PUBLISHED)],
        checked_at: Some(Time(at("2026-12-03T11:30:00Z"))),
        observed_generation: Some(2),
        ..Default::default()
    };
    assert!(!due(Some(&settled), Some(2), "ami-new", &regions(), hour, now));
    assert!(due(None, Some(2), "ami-new", &regions(), hour, now));
    assert!(
        due(Some(&settled), Some(3), "ami-new", &regions(), hour, now),
        "the spec changed"
    );
    assert!(
        due(Some(&settled), Some(2), "ami-mid", &regions(), hour, now),
        "the image moved"
    );
    assert!(
        due(Some(&settled), Some(2), "ami-new", &regions()[..1], hour, now),
        "the regions changed"
    );
    assert!(due(
        Some(&settled),
        Some(2),
        "ami-new",
        &regions(),
        hour,
        at("2026-12-03T12:30:00Z")
    ));
    let failed = AmiChannelStatus {
        published: vec![published(FAILED)],
        ..settled.clone()
    };
    assert!(due(Some(&failed), Some(2), "ami-new", &regions(), hour, now));
}

#[test]
fn a_move_is_recorded_in_history_newest_first_within_the_limit() {
    let s = spec("catalog: base\nfollow: Latest\nhistoryLimit: 2");
    let mut status: Option<AmiChannelStatus> = None;
    for (i, id) in ["ami-1", "ami-2", "ami-3"].iter().enumerate() {
        let choice = Choice {
            image: Some(id.to_string()),
            moved: Some(format!("move {i}")),
            blocked: None,
            degraded: None,
            wake: None,
        };
        let now = at("2026-12-03T12:00:00Z") + jiff::SignedDuration::from_hours(i as i64);
        status = Some(super::status(
            &s,
            status.as_ref(),
            &Outcome {
                choice: &choice,
                regions: Vec::new(),
                published: Some(Vec::new()),
                generation: Some(1),
                now,
            },
        ));
    }
    let status = status.expect("a status");
    let ids: Vec<&str> = status.history.iter().map(|m| m.image_id.as_str()).collect();
    assert_eq!(ids, ["ami-3", "ami-2"]);
    assert!(status.history[0].until.is_none());
    assert_eq!(status.history[1].until, status.history[0].since);
    assert_eq!(status.since, status.history[0].since);
    let ready = conditions::find(&status.conditions, READY).expect("Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "Published")
    );
}

#[test]
fn conditions_say_what_blocks_the_channel_and_change_time_only_on_a_transition() {
    let s = spec("catalog: base\nimageId: ami-old");
    let choice = Choice {
        image: Some("ami-old".into()),
        moved: None,
        blocked: None,
        degraded: Some("ami-old is revoked".into()),
        wake: None,
    };
    let outcome = |now| Outcome {
        choice: &choice,
        regions: regions(),
        published: Some(vec![published(PUBLISHED), {
            let mut p = published(REFUSED);
            p.message = Some("not yours".into());
            p
        }]),
        generation: Some(1),
        now,
    };
    let first = status(&s, None, &outcome(at("2026-12-03T12:00:00Z")));
    let ready = conditions::find(&first.conditions, READY).expect("Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "PublishRefused")
    );
    assert!(ready.message.contains("not yours"), "{}", ready.message);
    let degraded = conditions::find(&first.conditions, DEGRADED).expect("Degraded");
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "Revoked")
    );
    let second = status(&s, Some(&first), &outcome(at("2026-12-03T13:00:00Z")));
    assert_eq!(
        conditions::find(&second.conditions, DEGRADED).map(|c| c.last_transition_time.clone()),
        Some(degraded.last_transition_time.clone())
    );
}

#[test]
fn the_next_look_is_the_soonest_of_a_soak_a_retry_and_the_check_interval() {
    let now = at("2026-12-03T12:00:00Z");
    let choice = Choice {
        image: Some("ami-new".into()),
        moved: None,
        blocked: None,
        degraded: None,
        wake: None,
    };
    let hour = Duration::from_secs(3600);
    let mut status = AmiChannelStatus {
        published: vec![published(PUBLISHED)],
        checked_at: Some(Time(at("2026-12-03T11:30:00Z"))),
        ..Default::default()
    };
    assert_eq!(
        requeue(&choice, &status, hour, now),
        Some(Duration::from_secs(1800))
    );
    status.published.push(published(FAILED));
    assert_eq!(requeue(&choice, &status, hour, now), Some(RETRY_FAILED));
    let soaking = Choice {
        wake: Some(Duration::from_secs(5)),
        ..choice.clone()
    };
    assert_eq!(
        requeue(&soaking, &status, hour, now),
        Some(Duration::from_secs(5))
    );
    assert_eq!(requeue(&choice, &AmiChannelStatus::default(), hour, now), None);
}

#[test]
fn a_bakes_regions_are_its_own_and_its_available_copies() {
    let bake: crate::api::BakeStatus = serde_json::from_value(serde_json::json!({
        "amiId": "ami-new",
        "artifacts": [
            {"region": "us-east-1", "imageId": "ami-new", "state": "Available"},
            {"region": "us-west-2", "imageId": "ami-copy", "state": "Available"},
            {"region": "eu-west-1", "imageId": "ami-slow", "state": "Copying"},
        ]
    }))
    .expect("a status");
    assert_eq!(regions_of_bake("us-east-1", "ami-new", &bake), regions());
}
