use super::*;
use crate::api::VirtualizationType;
use crate::api::schedule::ScheduledBake;

fn at(s: &str) -> jiff::Timestamp {
    s.parse().unwrap_or(jiff::Timestamp::UNIX_EPOCH)
}

fn spec() -> BakeScheduleSpec {
    BakeScheduleSpec {
        bake: ScheduledBake {
            template: "svc-on-base".into(),
            service: "svc".into(),
            version: "1.0.0".into(),
            virtualization_type: VirtualizationType::Hvm,
            deregister_image_on_delete: false,
        },
        schedule: None,
        time_zone: None,
        on_source_change: true,
        mode: None,
        suspend: false,
        concurrency_policy: None,
        min_interval_seconds: None,
        successful_bakes_history_limit: None,
        failed_bakes_history_limit: None,
    }
}

fn bake(name: &str, created: &str, phase: BakePhase, source: &str) -> Owned {
    Owned {
        name: name.into(),
        created: at(created),
        phase: Some(phase),
        ami_id: (phase == BakePhase::Succeeded).then(|| format!("ami-of-{name}")),
        source_ami_id: Some(source.into()),
        finished: phase.is_terminal().then(|| at(created)),
    }
}

fn decide_with(
    spec: &BakeScheduleSpec,
    status: Option<&BakeScheduleStatus>,
    bakes: &[Owned],
    source: &str,
    now: &str,
) -> Decision {
    decide(&Facts {
        name: "svc",
        spec,
        status,
        generation: Some(1),
        created: at("2026-12-01T00:00:00Z"),
        bakes,
        source: Source::Image(source.into()),
        min_interval_floor: 0,
        now: at(now),
    })
}

fn condition(d: &Decision, type_: &str) -> (String, String) {
    conditions::find(&d.status.conditions, type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
        .unwrap_or_default()
}

#[test]
fn a_new_schedule_bakes_its_source_once_under_a_name_the_source_decides() {
    let s = spec();
    let d = decide_with(&s, None, &[], "ami-base1", "2026-12-02T00:00:00Z");
    let new = d.create.clone().expect("a Bake");
    assert_eq!(new.name, "svc-ami-base1-1");
    assert_eq!(new.trigger.kind, SOURCE_CHANGE);
    assert!(!new.spec.rebake);
    assert_eq!(condition(&d, OUTDATED), ("True".into(), "NeverBaked".into()));
    // Decided again before the cache shows the Bake: the status remembers the trigger.
    let again = decide_with(&s, Some(&d.status), &[], "ami-base1", "2026-12-02T00:00:01Z");
    assert_eq!(again.create, None);
    // And once the Bake is seen, nothing more.
    let running = [bake(
        "svc-ami-base1-1",
        "2026-12-02T00:00:00Z",
        BakePhase::Running,
        "ami-base1",
    )];
    let seen = decide_with(&s, None, &running, "ami-base1", "2026-12-02T00:00:05Z");
    assert_eq!(seen.create, None);
}

#[test]
fn a_newer_source_bakes_again_within_the_rate_limit_and_an_image_on_the_newest_source_is_up_to_date() {
    let s = spec();
    let done = [bake(
        "svc-ami-base1-1",
        "2026-12-02T00:00:00Z",
        BakePhase::Succeeded,
        "ami-base1",
    )];
    let current = decide_with(&s, None, &done, "ami-base1", "2026-12-02T01:00:00Z");
    assert_eq!(current.create, None);
    assert_eq!(condition(&current, OUTDATED), ("False".into(), "UpToDate".into()));
    assert_eq!(
        current.status.latest.as_ref().map(|l| l.ami_id.as_str()),
        Some("ami-of-svc-ami-base1-1")
    );

    let moved = decide_with(&s, None, &done, "ami-base2", "2026-12-02T00:01:00Z");
    assert_eq!(moved.create, None, "within minIntervalSeconds of the last Bake");
    assert_eq!(condition(&moved, OUTDATED), ("True".into(), "NewSource".into()));
    assert!(
        moved
            .status
            .message
            .as_deref()
            .is_some_and(|m| m.contains("minIntervalSeconds"))
    );
    assert_eq!(moved.requeue, Some(Duration::from_secs(9 * 60 + 1)));

    let later = decide_with(&s, None, &done, "ami-base2", "2026-12-02T00:30:00Z");
    let new = later.create.expect("a Bake for the new source");
    assert_eq!(new.name, "svc-ami-base2-1");
    assert!(new.trigger.message.contains("from ami-base1 to ami-base2"));
}

#[test]
fn a_failed_bake_of_a_source_is_not_retried_until_the_source_or_the_clock_moves() {
    let s = spec();
    let failed = [bake(
        "svc-ami-base1-1",
        "2026-12-02T00:00:00Z",
        BakePhase::Failed,
        "ami-base1",
    )];
    let tried = BakeScheduleStatus {
        last_trigger: Some(ScheduleTrigger {
            kind: SOURCE_CHANGE.into(),
            bake: "svc-ami-base1-1".into(),
            source_ami_id: Some("ami-base1".into()),
            ..Default::default()
        }),
        source_triggers: Some(1),
        last_source_trigger: Some("ami-base1".into()),
        ..Default::default()
    };
    let d = decide_with(&s, Some(&tried), &failed, "ami-base1", "2026-12-02T02:00:00Z");
    assert_eq!(d.create, None);
    assert_eq!(condition(&d, OUTDATED).0, "True");
}

#[test]
fn forbid_waits_for_the_unfinished_bake_and_allow_does_not() {
    let mut s = spec();
    s.min_interval_seconds = Some(0);
    let running = [bake(
        "svc-ami-base1-1",
        "2026-12-02T00:00:00Z",
        BakePhase::Running,
        "ami-base1",
    )];
    let d = decide_with(&s, None, &running, "ami-base2", "2026-12-02T00:10:00Z");
    assert_eq!(d.create, None);
    assert!(
        d.status
            .message
            .as_deref()
            .is_some_and(|m| m.contains("waiting for Bake svc-ami-base1"))
    );
    s.concurrency_policy = Some(ConcurrencyPolicy::Allow);
    let d = decide_with(&s, None, &running, "ami-base2", "2026-12-02T00:10:00Z");
    assert_eq!(d.create.map(|c| c.name), Some("svc-ami-base2-1".to_string()));
}

#[test]
fn the_cron_time_makes_one_bake_for_all_missed_times_and_always_mode_rebakes() {
    let mut s = spec();
    s.on_source_change = false;
    s.schedule = Some("0 3 * * *".into());
    s.mode = Some(ScheduleMode::Always);
    let done = [bake(
        "svc-x",
        "2026-12-01T00:00:00Z",
        BakePhase::Succeeded,
        "ami-base1",
    )];
    let d = decide_with(&s, None, &done, "ami-base1", "2026-12-03T10:00:00Z");
    let new = d.create.clone().expect("the cron Bake");
    assert_eq!(new.name, "svc-20261203030000");
    assert!(new.spec.rebake);
    assert_eq!(
        d.status.last_schedule_time.as_ref().map(|t| t.0),
        Some(at("2026-12-03T03:00:00Z"))
    );
    assert_eq!(
        d.status.next_schedule_time.as_ref().map(|t| t.0),
        Some(at("2026-12-04T03:00:00Z"))
    );
    let again = decide_with(&s, Some(&d.status), &done, "ami-base1", "2026-12-03T10:00:01Z");
    assert_eq!(again.create, None, "a cron time is acted on once");
    // Suspended: the time passes and is dropped.
    s.suspend = true;
    let suspended = decide_with(&s, Some(&d.status), &done, "ami-base1", "2026-12-04T04:00:00Z");
    assert_eq!(suspended.create, None);
    assert_eq!(
        suspended.status.last_schedule_time.as_ref().map(|t| t.0),
        Some(at("2026-12-04T03:00:00Z"))
    );
}

#[test]
fn history_keeps_the_newest_succeeded_and_failed_bakes_within_the_limits() {
    let mut s = spec();
    s.successful_bakes_history_limit = Some(2);
    s.failed_bakes_history_limit = Some(0);
    let bakes = [
        bake("ok-1", "2026-12-01T01:00:00Z", BakePhase::Succeeded, "a"),
        bake("ok-2", "2026-12-01T02:00:00Z", BakePhase::Succeeded, "a"),
        bake("ok-3", "2026-12-01T03:00:00Z", BakePhase::Succeeded, "a"),
        bake("bad-1", "2026-12-01T04:00:00Z", BakePhase::Failed, "a"),
        bake("running", "2026-12-01T05:00:00Z", BakePhase::Running, "a"),
    ];
    let d = decide_with(&s, None, &bakes, "a", "2026-12-02T00:00:00Z");
    assert_eq!(d.delete, vec!["ok-1".to_string(), "bad-1".to_string()]);
}

#[test]
fn a_bad_cron_expression_or_an_unknown_source_is_said_in_status() {
    let mut s = spec();
    s.schedule = Some("every monday".into());
    let d = decide_with(&s, None, &[], "ami-base1", "2026-12-02T00:00:00Z");
    assert_eq!(condition(&d, READY), ("False".into(), "InvalidSchedule".into()));
    let s = spec();
    let unknown = decide(&Facts {
        name: "svc",
        spec: &s,
        status: None,
        generation: Some(1),
        created: at("2026-12-01T00:00:00Z"),
        bakes: &[],
        source: Source::Unknown {
            reason: "SourceCatalogEmpty",
            message: "AmiCatalog \"base\" lists no image to start from yet".into(),
        },
        min_interval_floor: 0,
        now: at("2026-12-02T00:00:00Z"),
    });
    assert_eq!(unknown.create, None);
    assert_eq!(condition(&unknown, OUTDATED).1, "SourceCatalogEmpty");
    assert!(
        unknown
            .status
            .message
            .as_deref()
            .is_some_and(|m| m.contains("lists no image"))
    );
}

#[test]
fn the_operators_floor_holds_a_schedule_that_asks_for_no_interval() {
    let mut s = spec();
    s.min_interval_seconds = Some(0);
    let done = [bake(
        "svc-ami-base1-1",
        "2026-12-02T00:00:00Z",
        BakePhase::Succeeded,
        "ami-base1",
    )];
    let d = decide(&Facts {
        name: "svc",
        spec: &s,
        status: None,
        generation: Some(1),
        created: at("2026-12-01T00:00:00Z"),
        bakes: &done,
        source: Source::Image("ami-base2".into()),
        min_interval_floor: 60,
        now: at("2026-12-02T00:00:30Z"),
    });
    assert_eq!(d.create, None);
    assert_eq!(d.requeue, Some(Duration::from_secs(31)));
}

#[test]
fn a_source_seen_again_after_a_revocation_is_a_new_trigger_with_a_new_name() {
    let s = spec();
    // Built on base1, then on base2; base2 is revoked, so the source is base1 again.
    let bakes = [
        bake(
            "svc-ami-base1-1",
            "2026-12-01T00:00:00Z",
            BakePhase::Succeeded,
            "ami-base1",
        ),
        bake(
            "svc-ami-base2-2",
            "2026-12-02T00:00:00Z",
            BakePhase::Succeeded,
            "ami-base2",
        ),
    ];
    let status = BakeScheduleStatus {
        last_trigger: Some(ScheduleTrigger {
            kind: SOURCE_CHANGE.into(),
            bake: "svc-ami-base2-2".into(),
            source_ami_id: Some("ami-base2".into()),
            ..Default::default()
        }),
        source_triggers: Some(2),
        last_source_trigger: Some("ami-base2".into()),
        ..Default::default()
    };
    let d = decide_with(&s, Some(&status), &bakes, "ami-base1", "2026-12-03T00:00:00Z");
    assert_eq!(d.create.map(|c| c.name), Some("svc-ami-base1-3".to_string()));
    assert_eq!(d.status.source_triggers, Some(3));
}

#[test]
fn the_rate_limit_counts_from_the_last_trigger_even_when_its_bake_is_gone() {
    let mut s = spec();
    s.min_interval_seconds = Some(600);
    let status = BakeScheduleStatus {
        last_trigger: Some(ScheduleTrigger {
            kind: SOURCE_CHANGE.into(),
            bake: "svc-ami-base1-1".into(),
            source_ami_id: Some("ami-base1".into()),
            at: Some(Time(at("2026-12-02T00:00:00Z"))),
            ..Default::default()
        }),
        source_triggers: Some(1),
        last_source_trigger: Some("ami-base1".into()),
        ..Default::default()
    };
    // The failed Bake was deleted by the history limit; a new source came a minute later.
    let d = decide_with(&s, Some(&status), &[], "ami-base2", "2026-12-02T00:01:00Z");
    assert_eq!(d.create, None);
    assert!(d.requeue.is_some());
}
