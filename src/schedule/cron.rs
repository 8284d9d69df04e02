//! A schedule's cron expression in its time zone, on `jiff` timestamps (croner and chrono-tz do
//! the calendar work: DST gaps and repeats, `L`, `W`, `#`).

use chrono::TimeZone as _;

/// A parsed cron expression and the zone it is read in.
#[derive(Clone, Debug)]
pub struct CronSchedule {
    cron: croner::Cron,
    zone: chrono_tz::Tz,
}

/// Parses `expr` (five fields, or six with seconds first) for `zone` (IANA, default UTC); the
/// error says what is wrong, for the schedule's status.
pub fn parse(expr: &str, zone: Option<&str>) -> Result<CronSchedule, String> {
    let cron = croner::parser::CronParser::new()
        .parse(expr)
        .map_err(|e| format!("schedule {expr:?} is not a cron expression: {e}"))?;
    let zone = match zone {
        None => chrono_tz::UTC,
        Some(z) => z
            .parse::<chrono_tz::Tz>()
            .map_err(|_| format!("timeZone {z:?} is not an IANA time zone"))?,
    };
    Ok(CronSchedule { cron, zone })
}

fn to_zone(zone: chrono_tz::Tz, t: jiff::Timestamp) -> Option<chrono::DateTime<chrono_tz::Tz>> {
    let secs = t.as_second();
    zone.timestamp_opt(secs, 0).single()
}

fn from_zone(t: &chrono::DateTime<chrono_tz::Tz>) -> Option<jiff::Timestamp> {
    jiff::Timestamp::from_second(t.timestamp()).ok()
}

impl CronSchedule {
    /// The latest time the schedule fired at or before `now` and after `after`: one trigger for
    /// any number of times missed.
    pub fn due(&self, after: jiff::Timestamp, now: jiff::Timestamp) -> Option<jiff::Timestamp> {
        let now = to_zone(self.zone, now)?;
        let previous = self.cron.find_previous_occurrence(&now, true).ok()?;
        from_zone(&previous).filter(|p| *p > after)
    }

    /// The next time the schedule fires after `now`.
    pub fn next(&self, now: jiff::Timestamp) -> Option<jiff::Timestamp> {
        let now = to_zone(self.zone, now)?;
        from_zone(&self.cron.find_next_occurrence(&now, false).ok()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> jiff::Timestamp {
        s.parse().unwrap_or(jiff::Timestamp::UNIX_EPOCH)
    }

    #[test]
    fn missed_times_make_one_trigger_at_the_latest_and_the_next_is_after_now() {
        let c = parse("0 3 * * *", None).expect("parses");
        let due = c.due(at("2026-12-01T00:00:00Z"), at("2026-12-03T10:00:00Z"));
        assert_eq!(due, Some(at("2026-12-03T03:00:00Z")));
        assert_eq!(
            c.due(at("2026-12-03T03:00:00Z"), at("2026-12-03T10:00:00Z")),
            None
        );
        assert_eq!(
            c.next(at("2026-12-03T10:00:00Z")),
            Some(at("2026-12-04T03:00:00Z"))
        );
    }

    #[test]
    fn a_time_zone_moves_the_times_and_seconds_are_allowed() {
        let c = parse("0 3 * * *", Some("Europe/Berlin")).expect("parses");
        assert_eq!(
            c.next(at("2026-12-03T10:00:00Z")),
            Some(at("2026-12-04T02:00:00Z"))
        );
        let s = parse("*/20 * * * * *", None).expect("six fields parse");
        assert_eq!(
            s.next(at("2026-12-03T10:00:05Z")),
            Some(at("2026-12-03T10:00:20Z"))
        );
    }

    #[test]
    fn bad_expressions_and_zones_say_what_is_wrong() {
        assert!(parse("every day", None).is_err_and(|e| e.contains("not a cron expression")));
        assert!(parse("0 3 * * *", Some("Mars/Olympus")).is_err_and(|e| e.contains("IANA")));
    }
}
