//! Deciding whether a Bake may start its pod now: deduplication against identical bakes, and the
//! operator-wide and per-namespace concurrency limits, first come first served. Pure: it sees the
//! cached Bakes, with this process's own launches laid over them ([`Expectations`]), and returns a
//! decision.
//!
//! Everything the gate reads comes from status Baker wrote (the key, the launch record), never
//! from labels or annotations a tenant could set.

use std::collections::{HashMap, HashSet};

use crate::api::{Bake, BakePhase};
use crate::config::Scope;
use kube::ResourceExt;

/// What the gate needs to know about a Bake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BakeView {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// Creation time in seconds, for first-come-first-served (ties broken by namespace and name).
    pub created: i64,
    pub phase: Option<BakePhase>,
    /// The Ready condition's reason, if any.
    pub reason: Option<String>,
    /// A pod was recorded for it: it counts against the limits until it ends.
    pub launched: bool,
    pub key: Option<String>,
    pub ami_id: Option<String>,
}

impl BakeView {
    pub fn from_bake(bake: &Bake) -> Self {
        let status = bake.status.as_ref();
        BakeView {
            uid: bake.uid().unwrap_or_default(),
            namespace: bake.namespace().unwrap_or_default(),
            name: bake.name_any(),
            created: bake
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.as_second())
                .unwrap_or_default(),
            phase: status.and_then(|s| s.phase),
            reason: status
                .and_then(|s| crate::api::conditions::find(&s.conditions, crate::api::conditions::READY))
                .map(|c| c.reason.clone()),
            launched: status.is_some_and(|s| s.pod_name.is_some()),
            key: status.and_then(|s| s.bake_key.clone()),
            ami_id: status.and_then(|s| s.ami_id.clone()),
        }
    }

    pub fn order(&self) -> (i64, &str, &str) {
        (self.created, &self.namespace, &self.name)
    }

    fn terminal(&self) -> bool {
        self.phase.is_some_and(|p| p.is_terminal())
    }

    /// Running or about to: holds a slot.
    fn active(&self) -> bool {
        self.launched && !self.terminal()
    }

    /// Not started, and will start as soon as the gate lets it: new, launching or queued, but not
    /// held up by a missing template or source image, which would block the queue for nothing.
    fn waiting(&self) -> bool {
        !self.launched
            && !self.terminal()
            && !matches!(
                self.reason.as_deref(),
                Some(
                    "TemplateNotFound"
                        | "SourceImageNotFound"
                        | "SourceCatalogEmpty"
                        | "Ec2Unavailable"
                        | "InvalidTemplate"
                )
            )
    }
}

/// The operator's concurrency limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub global: usize,
    pub per_namespace: Option<usize>,
}

impl Limits {
    /// The admin's limits; a limit below one would stop every Bake, so it counts as one.
    pub fn from_config(config: &crate::config::OperatorConfig) -> Self {
        Limits {
            global: config.max_concurrent_bakes.max(1),
            per_namespace: config.max_concurrent_bakes_per_namespace.map(|n| n.max(1)),
        }
    }
}

/// What the Bake should do now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Launch,
    /// An identical Bake already has the AMI.
    Reuse {
        ami_id: String,
        from: String,
    },
    /// An identical Bake is under way (or ahead in the queue): wait for it, then reuse its AMI.
    WaitForIdentical {
        other: String,
    },
    /// Over a limit: wait in the queue.
    Queued {
        message: String,
    },
}

/// Decides for `me` (its key already computed), given every Bake in the operator's scope. Only
/// identical Bakes within `reuse` of `me` count as identical: by default those of its own
/// namespace.
pub fn decide(
    me: &BakeView,
    key: &str,
    rebake: bool,
    reuse: Scope,
    all: &[BakeView],
    limits: Limits,
) -> Decision {
    let others: Vec<&BakeView> = all.iter().filter(|b| b.uid != me.uid).collect();
    if !rebake {
        let identical: Vec<&&BakeView> = others
            .iter()
            .filter(|b| b.key.as_deref() == Some(key) && reuse.reaches(&me.namespace, Some(&b.namespace)))
            .collect();
        if let Some(done) = identical
            .iter()
            .find(|b| b.phase == Some(BakePhase::Succeeded) && b.ami_id.is_some())
        {
            return Decision::Reuse {
                ami_id: done.ami_id.clone().unwrap_or_default(),
                from: format!("{}/{}", done.namespace, done.name),
            };
        }
        if let Some(running) = identical
            .iter()
            .find(|b| b.active() || (b.waiting() && b.order() < me.order()))
        {
            return Decision::WaitForIdentical {
                other: format!("{}/{}", running.namespace, running.name),
            };
        }
    }
    // Counted once: the first-come check below asks for every older waiting Bake's namespace.
    let mut active_by_namespace: HashMap<&str, usize> = HashMap::new();
    for b in others.iter().filter(|b| b.active()) {
        *active_by_namespace.entry(b.namespace.as_str()).or_default() += 1;
    }
    let active: usize = active_by_namespace.values().sum();
    let active_in = |ns: &str| active_by_namespace.get(ns).copied().unwrap_or(0);
    // One message for every way of being queued, naming the limits only: a queued Bake's status
    // changes only when its own situation does, not whenever another Bake starts or ends (which
    // moves it between "a limit is reached" and "an older Bake goes first").
    let queued = || Decision::Queued {
        message: match limits.per_namespace {
            Some(cap) => format!(
                "queued: at most {} bake(s) run at once, {cap} per namespace; this Bake starts when a slot frees, oldest first",
                limits.global
            ),
            None => format!(
                "queued: at most {} bake(s) run at once; this Bake starts when a slot frees, oldest first",
                limits.global
            ),
        },
    };
    if active >= limits.global {
        return queued();
    }
    if let Some(cap) = limits.per_namespace
        && active_in(&me.namespace) >= cap
    {
        return queued();
    }
    // First come, first served: an older Bake that could start now goes first. One held back by
    // its own namespace's limit does not hold up others.
    let ahead = others
        .iter()
        .filter(|b| b.waiting() && b.order() < me.order())
        .filter(|b| {
            limits
                .per_namespace
                .is_none_or(|cap| active_in(&b.namespace) < cap)
        })
        .count();
    if ahead > 0 {
        return queued();
    }
    Decision::Launch
}

/// How many queued Bakes to wake when one ends: the oldest first, a few in case one of them is
/// held back by its namespace's limit.
const WAKE_QUEUED: usize = 3;

/// The Bakes to look at again when `ended` reached a terminal phase: those waiting for an
/// identical image (they can reuse it now) and the oldest few queued for a slot.
pub fn wake_on_end<B: std::ops::Deref<Target = Bake> + Clone>(ended: &Bake, all: &[B]) -> Vec<B> {
    let key_of = |b: &Bake| b.status.as_ref().and_then(|s| s.bake_key.clone());
    let key = key_of(ended);
    let queued: Vec<&B> = all
        .iter()
        .filter(|b| b.phase() == Some(BakePhase::Queued))
        .collect();
    let mut wake: Vec<B> = queued
        .iter()
        .filter(|b| key.is_some() && key_of(b) == key)
        .map(|b| (*b).clone())
        .collect();
    let mut by_age: Vec<(BakeView, &B)> = queued.iter().map(|b| (BakeView::from_bake(b), *b)).collect();
    by_age.sort_by(|(a, _), (b, _)| a.order().cmp(&b.order()));
    for (_, b) in by_age.into_iter().take(WAKE_QUEUED) {
        if !wake.iter().any(|w| w.uid() == b.uid()) {
            wake.push((*b).clone());
        }
    }
    wake
}

/// Launches and releases this process made that the shared cache may not show yet: the
/// "expectations" of controller-runtime. Decisions read the cache through it, so a launch recorded
/// a moment ago holds its slot (and its key) even before its watch event arrives, and decisions
/// need no fresh LIST.
#[derive(Debug, Default)]
pub struct Expectations {
    launched: HashMap<String, BakeView>,
    released: HashSet<String>,
    /// Bakes this process wrote a terminal status for that the cache may still show unfinished.
    finished: HashSet<String>,
}

impl Expectations {
    /// This process recorded the launch of `view` (launched, with its key).
    pub fn launched(&mut self, view: BakeView) {
        self.released.remove(&view.uid);
        self.launched.insert(view.uid.clone(), view);
    }

    /// A deleted Bake finished its cleanup: it holds no slot and offers no image any more, whatever
    /// the cache still says.
    pub fn released(&mut self, uid: &str) {
        self.launched.remove(uid);
        self.released.insert(uid.to_string());
    }

    /// This process wrote a terminal status for the Bake.
    pub fn finished(&mut self, uid: &str) {
        self.finished.insert(uid.to_string());
    }

    /// Whether the Bake's cached copy, not terminal, is older than the terminal status this
    /// process wrote. Call only with a cached copy that is not terminal; a terminal one confirms
    /// the write, see [`Expectations::overlay`].
    pub fn finished_unseen(&self, uid: &str) -> bool {
        self.finished.contains(uid)
    }

    /// Expectations not yet confirmed by the cache.
    pub fn pending(&self) -> usize {
        self.launched.len() + self.released.len() + self.finished.len()
    }

    /// `cached` with this process's unseen writes laid over it. Forgets what the cache has caught
    /// up with: a launch it shows (or a Bake already finished), a released Bake it no longer lists.
    pub fn overlay(&mut self, cached: Vec<BakeView>) -> Vec<BakeView> {
        let listed: HashSet<&str> = cached.iter().map(|v| v.uid.as_str()).collect();
        let unfinished: HashSet<&str> = cached
            .iter()
            .filter(|v| !v.terminal())
            .map(|v| v.uid.as_str())
            .collect();
        self.released.retain(|uid| listed.contains(uid.as_str()));
        self.launched.retain(|uid, _| listed.contains(uid.as_str()));
        self.finished.retain(|uid| unfinished.contains(uid.as_str()));
        let mut seen = Vec::new();
        let views = cached
            .into_iter()
            .filter(|v| !self.released.contains(&v.uid))
            .map(|v| match self.launched.get(&v.uid) {
                Some(_) if v.launched || v.terminal() => {
                    seen.push(v.uid.clone());
                    v
                }
                Some(expected) => expected.clone(),
                None => v,
            })
            .collect();
        for uid in seen {
            self.launched.remove(&uid);
        }
        views
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(name: &str, created: i64) -> BakeView {
        BakeView {
            uid: name.into(),
            namespace: "ns".into(),
            name: name.into(),
            created,
            phase: None,
            reason: None,
            launched: false,
            key: Some(format!("key-{name}")),
            ami_id: None,
        }
    }

    fn running(name: &str, created: i64) -> BakeView {
        BakeView {
            phase: Some(BakePhase::Running),
            launched: true,
            ..view(name, created)
        }
    }

    const ONE: Limits = Limits {
        global: 1,
        per_namespace: None,
    };
    const TWO: Limits = Limits {
        global: 2,
        per_namespace: None,
    };

    #[test]
    fn first_bake_launches() {
        let me = view("a", 1);
        assert_eq!(
            decide(
                &me,
                "key-a",
                false,
                Scope::Namespace,
                std::slice::from_ref(&me),
                TWO
            ),
            Decision::Launch
        );
    }

    #[test]
    fn bakes_over_the_global_limit_queue() {
        let me = view("c", 3);
        let all = vec![running("a", 1), running("b", 2), me.clone()];
        assert!(matches!(
            decide(&me, "key-c", false, Scope::Namespace, &all, TWO),
            Decision::Queued { .. }
        ));
    }

    #[test]
    fn a_younger_bake_never_overtakes_an_older_waiting_one() {
        let all = vec![view("a", 1), view("b", 2), view("c", 3)];
        let limits = ONE;
        assert_eq!(
            decide(&all[0], "key-a", false, Scope::Namespace, &all, limits),
            Decision::Launch
        );
        assert!(matches!(
            decide(&all[2], "key-c", false, Scope::Namespace, &all, limits),
            Decision::Queued { .. }
        ));
        // Same second: namespace then name decide.
        let tie = vec![view("x-1", 5), view("x-2", 5)];
        assert_eq!(
            decide(&tie[0], "key-x-1", false, Scope::Namespace, &tie, limits),
            Decision::Launch
        );
        assert!(matches!(
            decide(&tie[1], "key-x-2", false, Scope::Namespace, &tie, limits),
            Decision::Queued { .. }
        ));
    }

    #[test]
    fn bakes_stuck_on_a_missing_template_or_an_empty_source_catalog_do_not_block_the_queue() {
        for reason in ["TemplateNotFound", "SourceCatalogEmpty"] {
            let stuck = BakeView {
                reason: Some(reason.into()),
                phase: Some(BakePhase::Pending),
                ..view("a", 1)
            };
            let me = view("b", 2);
            assert_eq!(
                decide(&me, "key-b", false, Scope::Namespace, &[stuck, me.clone()], ONE),
                Decision::Launch,
                "{reason}"
            );
        }
    }

    #[test]
    fn per_namespace_limit_counts_only_that_namespace() {
        let other_ns = BakeView {
            namespace: "other".into(),
            ..running("a", 1)
        };
        let same_ns = running("b", 2);
        let me = view("c", 3);
        let limits = Limits {
            global: 10,
            per_namespace: Some(1),
        };
        let all = vec![other_ns.clone(), same_ns, me.clone()];
        assert!(
            matches!(decide(&me, "key-c", false, Scope::Namespace, &all, limits), Decision::Queued { message } if message.contains("1 per namespace"))
        );
        assert_eq!(
            decide(
                &me,
                "key-c",
                false,
                Scope::Namespace,
                &[other_ns, me.clone()],
                limits
            ),
            Decision::Launch
        );
    }

    #[test]
    fn identical_bake_under_way_is_waited_for_and_a_finished_one_reused() {
        let first = BakeView {
            key: Some("k".into()),
            ..running("a", 1)
        };
        let me = BakeView {
            key: Some("k".into()),
            ..view("b", 2)
        };
        assert_eq!(
            decide(
                &me,
                "k",
                false,
                Scope::Namespace,
                &[first.clone(), me.clone()],
                TWO
            ),
            Decision::WaitForIdentical { other: "ns/a".into() }
        );
        let done = BakeView {
            phase: Some(BakePhase::Succeeded),
            ami_id: Some("ami-1".into()),
            ..first
        };
        assert_eq!(
            decide(
                &me,
                "k",
                false,
                Scope::Namespace,
                &[done.clone(), me.clone()],
                TWO
            ),
            Decision::Reuse {
                ami_id: "ami-1".into(),
                from: "ns/a".into()
            }
        );
        assert_eq!(
            decide(&me, "k", true, Scope::Namespace, &[done, me.clone()], TWO),
            Decision::Launch,
            "rebake skips reuse"
        );
    }

    #[test]
    fn an_identical_bake_of_another_namespace_is_reused_only_with_cluster_scope() {
        let theirs = BakeView {
            namespace: "team-b".into(),
            key: Some("k".into()),
            phase: Some(BakePhase::Succeeded),
            ami_id: Some("ami-theirs".into()),
            ..view("a", 1)
        };
        let mine = BakeView {
            key: Some("k".into()),
            ..view("b", 2)
        };
        let all = [theirs, mine.clone()];
        assert_eq!(
            decide(&mine, "k", false, Scope::Namespace, &all, TWO),
            Decision::Launch
        );
        assert_eq!(
            decide(&mine, "k", false, Scope::Cluster, &all, TWO),
            Decision::Reuse {
                ami_id: "ami-theirs".into(),
                from: "team-b/a".into()
            }
        );
    }

    #[test]
    fn an_older_identical_bake_goes_first_even_before_it_launched() {
        let older = BakeView {
            key: Some("k".into()),
            ..view("a", 1)
        };
        let me = BakeView {
            key: Some("k".into()),
            ..view("b", 2)
        };
        assert!(matches!(
            decide(
                &me,
                "k",
                false,
                Scope::Namespace,
                &[older.clone(), me.clone()],
                TWO
            ),
            Decision::WaitForIdentical { .. }
        ));
        assert_eq!(
            decide(&older, "k", false, Scope::Namespace, &[older.clone(), me], TWO),
            Decision::Launch
        );
    }

    fn bake(name: &str, created: i64, phase: Option<BakePhase>, key: &str) -> std::sync::Arc<Bake> {
        use crate::api::{BakeSpec, BakeStatus, VirtualizationType};
        let mut b = Bake::new(
            name,
            BakeSpec {
                template: "t".into(),
                service: "s".into(),
                version: "1".into(),
                virtualization_type: VirtualizationType::Hvm,
                rebake: false,
                deregister_image_on_delete: false,
            },
        );
        b.metadata.uid = Some(name.into());
        b.metadata.namespace = Some("ns".into());
        b.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            jiff::Timestamp::from_second(created).unwrap_or(jiff::Timestamp::UNIX_EPOCH),
        ));
        b.status = Some(BakeStatus {
            phase,
            bake_key: Some(key.into()),
            ..Default::default()
        });
        std::sync::Arc::new(b)
    }

    #[test]
    fn an_ended_bake_wakes_its_identical_waiters_and_the_oldest_queued() {
        let ended = bake("done", 0, Some(BakePhase::Succeeded), "k");
        let all = vec![
            bake("same-key", 9, Some(BakePhase::Queued), "k"),
            bake("q4", 4, Some(BakePhase::Queued), "x4"),
            bake("q1", 1, Some(BakePhase::Queued), "x1"),
            bake("q3", 3, Some(BakePhase::Queued), "x3"),
            bake("q2", 2, Some(BakePhase::Queued), "x2"),
            bake("running", 0, Some(BakePhase::Running), "x0"),
        ];
        let woken: Vec<String> = wake_on_end(&ended, &all).iter().map(|b| b.name_any()).collect();
        assert_eq!(woken, ["same-key", "q1", "q2", "q3"]);
    }

    #[test]
    fn a_launch_not_yet_in_the_cache_holds_its_slot_and_key() {
        let mut expect = Expectations::default();
        let cached = vec![view("a", 1), view("b", 2)];
        expect.launched(BakeView {
            key: Some("k".into()),
            ..running("a", 1)
        });
        let all = expect.overlay(cached.clone());
        let me = BakeView {
            key: Some("k".into()),
            ..view("b", 2)
        };
        assert_eq!(
            decide(&me, "k", false, Scope::Namespace, &all, TWO),
            Decision::WaitForIdentical { other: "ns/a".into() },
            "the unseen launch is identical and under way"
        );
        assert!(matches!(
            decide(&view("b", 2), "key-b", false, Scope::Namespace, &all, ONE),
            Decision::Queued { .. }
        ));
        assert_eq!(expect.pending(), 1, "the cache has not shown the launch yet");
    }

    #[test]
    fn an_expectation_is_forgotten_once_the_cache_shows_the_launch_or_the_bake_is_gone() {
        let mut expect = Expectations::default();
        expect.launched(running("a", 1));
        expect.overlay(vec![running("a", 1)]);
        assert_eq!(expect.pending(), 0, "the cache shows the launch");
        expect.launched(running("b", 2));
        expect.overlay(vec![view("a", 1)]);
        assert_eq!(expect.pending(), 0, "b is no longer listed");
    }

    #[test]
    fn a_released_bake_frees_its_slot_before_the_cache_drops_it() {
        let mut expect = Expectations::default();
        expect.released("a");
        let all = expect.overlay(vec![running("a", 1), view("b", 2)]);
        assert_eq!(
            decide(&all[0], "key-b", false, Scope::Namespace, &all, ONE),
            Decision::Launch
        );
        assert_eq!(expect.pending(), 1);
        expect.overlay(vec![view("b", 2)]);
        assert_eq!(expect.pending(), 0, "forgotten once the Bake is gone");
    }

    #[test]
    fn queued_messages_do_not_change_as_other_bakes_start_and_end() {
        let me = view("z", 9);
        let one = decide(
            &me,
            "key-z",
            false,
            Scope::Namespace,
            &[running("a", 1), view("b", 2), me.clone()],
            TWO,
        );
        let two = decide(
            &me,
            "key-z",
            false,
            Scope::Namespace,
            &[running("a", 1), running("b", 2), view("c", 3), me.clone()],
            TWO,
        );
        let three = decide(
            &me,
            "key-z",
            false,
            Scope::Namespace,
            &[running("c", 3), running("d", 4), me.clone()],
            TWO,
        );
        assert!(matches!(one, Decision::Queued { .. }));
        // Over the limit, and under it with an older Bake first: the same words.
        assert_eq!(one, two);
        assert_eq!(two, three);
    }
}
