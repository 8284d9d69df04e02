//! Status conditions following the kstatus conventions (`Ready`, `Reconciling`, `Stalled`), with
//! `lastTransitionTime` moved only when a condition's status really changes.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};

pub const READY: &str = "Ready";
pub const RECONCILING: &str = "Reconciling";
pub const STALLED: &str = "Stalled";
/// Whether the image is everywhere its template says (only for templates that distribute it).
pub const DISTRIBUTED: &str = "Distributed";

/// Schema for a `conditions` list: a list-map keyed by `type`, so server-side apply merges
/// conditions by type instead of replacing the list.
pub fn conditions_schema(generator: &mut SchemaGenerator) -> Schema {
    let item = Condition::json_schema(generator);
    json_schema!({
        "type": "array",
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
        "items": item,
    })
}

/// What a condition should say now; [`merge`] turns it into a `Condition` with a correct
/// `lastTransitionTime`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub type_: &'static str,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

impl Desired {
    pub fn new(
        type_: &'static str,
        status: bool,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status,
            reason: reason.into(),
            message: message.into(),
        }
    }
}

fn status_str(status: bool) -> &'static str {
    if status { "True" } else { "False" }
}

/// Builds the new condition list from the desired conditions. A condition keeps its previous
/// `lastTransitionTime` unless its status changed; reason, message and observedGeneration are
/// always brought up to date. Conditions of other types that were present are kept.
pub fn merge(
    previous: &[Condition],
    desired: &[Desired],
    generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    let mut out: Vec<Condition> = previous
        .iter()
        .filter(|c| !desired.iter().any(|d| d.type_ == c.type_))
        .cloned()
        .collect();
    for d in desired {
        let status = status_str(d.status);
        let last_transition_time = match previous.iter().find(|c| c.type_ == d.type_) {
            Some(old) if old.status == status => old.last_transition_time.clone(),
            _ => now.clone(),
        };
        out.push(Condition {
            type_: d.type_.to_string(),
            status: status.to_string(),
            reason: d.reason.clone(),
            message: d.message.clone(),
            observed_generation: generation,
            last_transition_time,
        });
    }
    out.sort_by(|a, b| {
        order(&a.type_)
            .cmp(&order(&b.type_))
            .then_with(|| a.type_.cmp(&b.type_))
    });
    out
}

/// Ready first, then the kstatus abnormal-true conditions, then anything else.
fn order(type_: &str) -> u8 {
    match type_ {
        READY => 0,
        RECONCILING => 1,
        STALLED => 2,
        _ => 3,
    }
}

/// The condition of a type, if present.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Time {
        Time(jiff::Timestamp::from_second(secs).unwrap_or(jiff::Timestamp::UNIX_EPOCH))
    }

    #[test]
    fn new_condition_gets_current_time() {
        let out = merge(
            &[],
            &[Desired::new(READY, false, "Pending", "waiting")],
            Some(1),
            &t(100),
        );
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].last_transition_time, t(100));
        assert_eq!(out[0].status, "False");
        assert_eq!(out[0].observed_generation, Some(1));
    }

    #[test]
    fn unchanged_status_keeps_transition_time_even_when_reason_changes() {
        let first = merge(
            &[],
            &[Desired::new(READY, false, "Pending", "a")],
            Some(1),
            &t(100),
        );
        let second = merge(
            &first,
            &[Desired::new(READY, false, "Running", "b")],
            Some(1),
            &t(200),
        );
        assert_eq!(second[0].last_transition_time, t(100));
        assert_eq!(second[0].reason, "Running");
        assert_eq!(second[0].message, "b");
    }

    #[test]
    fn status_flip_moves_transition_time() {
        let first = merge(
            &[],
            &[Desired::new(READY, false, "Running", "")],
            Some(1),
            &t(100),
        );
        let second = merge(
            &first,
            &[Desired::new(READY, true, "Succeeded", "")],
            Some(1),
            &t(300),
        );
        assert_eq!(second[0].last_transition_time, t(300));
        assert_eq!(second[0].status, "True");
    }

    #[test]
    fn conditions_of_other_types_are_kept_and_order_is_stable() {
        let foreign = Condition {
            type_: "Custom".into(),
            status: "True".into(),
            reason: "X".into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: t(5),
        };
        let out = merge(
            std::slice::from_ref(&foreign),
            &[
                Desired::new(STALLED, false, "A", ""),
                Desired::new(READY, true, "B", ""),
            ],
            Some(2),
            &t(10),
        );
        let types: Vec<_> = out.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, vec![READY, STALLED, "Custom"]);
        assert_eq!(find(&out, "Custom"), Some(&foreign));
    }

    #[test]
    fn schema_is_a_list_map_keyed_by_type() {
        let mut generator = SchemaGenerator::default();
        let schema = serde_json::to_value(conditions_schema(&mut generator)).unwrap_or_default();
        assert_eq!(schema["x-kubernetes-list-type"], "map");
        assert_eq!(schema["x-kubernetes-list-map-keys"][0], "type");
    }
}
