//! When Periodic and Nightly schedulers fire. Nightly uses Buildbot's cron fields — minute, hour,
//! dayOfMonth, month, dayOfWeek with 0 = Monday — on the wall clock of a time zone: the master's
//! local one, as in Buildbot, or one the scheduler names. Pure.

use jiff::civil::{DateTime, Time};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};
use serde::Deserialize;
/// One cron field: `*`, a number, a list of numbers, or a string such as `"1-5"`, `"*/15"` or
/// `"1,3,5"`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(untagged)]
pub enum CronField {
    Number(u32),
    List(Vec<u32>),
    Text(String),
}

impl Default for CronField {
    fn default() -> Self {
        CronField::Text("*".into())
    }
}

/// A parsed field: the allowed values, or every value.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Allowed {
    any: bool,
    values: Vec<u32>,
}

impl Allowed {
    fn contains(&self, value: u32) -> bool {
        self.any || self.values.contains(&value)
    }
}

fn parse(field: &CronField, min: u32, max: u32, name: &str) -> Result<Allowed, String> {
    let out_of_range = |v: u32| format!("{name}: {v} is outside {min}..={max}");
    let check = |v: u32| if (min..=max).contains(&v) { Ok(v) } else { Err(out_of_range(v)) };
    let values = match field {
        CronField::Number(n) => vec![check(*n)?],
        CronField::List(list) => list.iter().map(|v| check(*v)).collect::<Result<_, _>>()?,
        CronField::Text(text) if text.trim() == "*" => return Ok(Allowed { any: true, values: Vec::new() }),
        CronField::Text(text) => {
            let mut values = Vec::new();
            for part in text.split(',') {
                let part = part.trim();
                let (range, step) = match part.split_once('/') {
                    Some((range, step)) => {
                        (range, step.parse::<u32>().map_err(|_| format!("{name}: bad step in {part:?}"))?)
                    }
                    None => (part, 1),
                };
                if step == 0 {
                    return Err(format!("{name}: a step of 0 in {part:?}"));
                }
                let (low, high) = if range == "*" {
                    (min, max)
                } else if let Some((a, b)) = range.split_once('-') {
                    let a = a.parse().map_err(|_| format!("{name}: bad range {part:?}"))?;
                    let b = b.parse().map_err(|_| format!("{name}: bad range {part:?}"))?;
                    (check(a)?, check(b)?)
                } else {
                    let v = check(range.parse().map_err(|_| format!("{name}: bad value {part:?}"))?)?;
                    (v, if part.contains('/') { max } else { v })
                };
                values.extend((low..=high).step_by(step as usize));
            }
            values
        }
    };
    Ok(Allowed { any: false, values })
}

/// A Nightly scheduler's schedule: which wall-clock minutes match, and on whose wall clock.
#[derive(Clone, PartialEq, Eq)]
pub struct Cron {
    minute: Allowed,
    hour: Allowed,
    day_of_month: Allowed,
    month: Allowed,
    /// 0 = Monday, as in Buildbot.
    day_of_week: Allowed,
    zone: TimeZone,
    /// The zone's name, for logs and the schedule's fingerprint.
    zone_name: String,
}

impl std::fmt::Debug for Cron {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cron")
            .field("minute", &self.minute)
            .field("hour", &self.hour)
            .field("day_of_month", &self.day_of_month)
            .field("month", &self.month)
            .field("day_of_week", &self.day_of_week)
            .field("zone", &self.zone_name)
            .finish()
    }
}

/// The time zone a schedule follows: an IANA name (`Europe/Berlin`, `UTC`), or without one the
/// master's own (`TZ`, else `/etc/localtime`). The error is the reason.
pub fn zone(name: Option<&str>) -> Result<(TimeZone, String), String> {
    match name {
        Some(name) => TimeZone::get(name)
            .map(|zone| (zone, name.to_owned()))
            .map_err(|_| format!("unknown time zone {name:?}: give an IANA name such as Europe/Berlin or UTC")),
        None => {
            let zone = TimeZone::try_system().unwrap_or(TimeZone::UTC);
            let name = zone.iana_name().unwrap_or("local").to_owned();
            Ok((zone, name))
        }
    }
}

impl Cron {
    /// Parses Buildbot's fields; an error names the field and why.
    pub fn new(
        minute: &CronField,
        hour: &CronField,
        day_of_month: &CronField,
        month: &CronField,
        day_of_week: &CronField,
        (zone, zone_name): (TimeZone, String),
    ) -> Result<Cron, (&'static str, String)> {
        let field = |value, min, max, name: &'static str| parse(value, min, max, name).map_err(|e| (name, e));
        Ok(Cron {
            minute: field(minute, 0, 59, "minute")?,
            hour: field(hour, 0, 23, "hour")?,
            day_of_month: field(day_of_month, 1, 31, "dayOfMonth")?,
            month: field(month, 1, 12, "month")?,
            day_of_week: field(day_of_week, 0, 6, "dayOfWeek")?,
            zone,
            zone_name,
        })
    }

    /// The zone the schedule follows.
    pub fn zone_name(&self) -> &str {
        &self.zone_name
    }

    fn day_matches(&self, t: DateTime) -> bool {
        let dom = self.day_of_month.contains(t.day() as u32);
        let dow = self.day_of_week.contains(t.weekday().to_monday_zero_offset() as u32);
        // Standard cron: when both day fields are restricted, either one matching is enough.
        match (self.day_of_month.any, self.day_of_week.any) {
            (false, false) => dom || dow,
            _ => dom && dow,
        }
    }

    /// The first matching wall-clock minute strictly after `after_ms`, in milliseconds; `None`
    /// when nothing matches within five years (e.g. 31 February).
    ///
    /// Across daylight-saving changes each matching wall-clock time fires once: one the clocks
    /// skip (02:30 when they jump from 02:00 to 03:00) fires as far after the jump as it was
    /// after the hour (03:30, RFC 5545's rule), and one they repeat fires at its first occurrence.
    pub fn next_after(&self, after_ms: i64) -> Option<i64> {
        let after = Timestamp::from_millisecond(after_ms).ok()?;
        let start = self.zone.to_datetime(after);
        let mut t = start.with().second(0).subsec_nanosecond(0).build().ok()?.checked_add(1.minute()).ok()?;
        let limit = start.checked_add((5 * 366).days()).ok()?;
        while t <= limit {
            if !self.month.contains(t.month() as u32) || !self.day_matches(t) {
                t = t.date().tomorrow().ok()?.to_datetime(Time::midnight());
            } else if !self.hour.contains(t.hour() as u32) {
                t = t.with().minute(0).build().ok()?.checked_add(1.hour()).ok()?;
            } else if !self.minute.contains(t.minute() as u32) {
                t = t.checked_add(1.minute()).ok()?;
            } else {
                // The earlier of a repeated time; for a skipped one, the offset before the jump.
                let instant = self.zone.to_ambiguous_timestamp(t).compatible().ok()?;
                if instant > after {
                    return Some(instant.as_millisecond());
                }
                // Already passed: the second occurrence of a repeated time.
                t = t.checked_add(1.minute()).ok()?;
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> i64 {
        text.parse::<Timestamp>().unwrap().as_millisecond()
    }

    fn cron_in(zone_name: &str, fields: [CronField; 5]) -> Cron {
        let [minute, hour, dom, month, dow] = fields;
        Cron::new(&minute, &hour, &dom, &month, &dow, zone(Some(zone_name)).unwrap()).unwrap()
    }

    fn cron(minute: CronField, hour: CronField, dom: CronField, month: CronField, dow: CronField) -> Cron {
        cron_in("UTC", [minute, hour, dom, month, dow])
    }

    use CronField::{List, Number, Text};

    fn any() -> CronField {
        Text("*".into())
    }

    /// Every firing from `from` until `until`.
    fn firings(schedule: &Cron, from: &str, until: &str) -> Vec<String> {
        let (mut t, until) = (at(from), at(until));
        let mut out = Vec::new();
        while let Some(next) = schedule.next_after(t).filter(|n| *n <= until) {
            out.push(Timestamp::from_millisecond(next).unwrap().to_string());
            t = next;
            assert!(out.len() < 1000, "bounded");
        }
        out
    }

    #[test]
    fn the_next_matching_minute_is_found() {
        // 2026-11-21 is a Saturday.
        let table: Vec<(Cron, &str, &str)> = vec![
            (cron(Number(0), Number(3), any(), any(), any()), "2026-11-21T02:59:30Z", "2026-11-21T03:00:00Z"),
            (cron(Number(0), Number(3), any(), any(), any()), "2026-11-21T03:00:00Z", "2026-11-22T03:00:00Z"),
            (cron(Text("*/15".into()), any(), any(), any(), any()), "2026-11-21T10:07:00Z", "2026-11-21T10:15:00Z"),
            (cron(List(vec![5, 35]), any(), any(), any(), any()), "2026-11-21T10:36:00Z", "2026-11-21T11:05:00Z"),
            // dayOfWeek 0 is Monday.
            (cron(Number(0), Number(1), any(), any(), Number(0)), "2026-11-21T00:00:00Z", "2026-11-23T01:00:00Z"),
            (
                cron(Number(0), Number(1), any(), any(), Text("0-4".into())),
                "2026-11-21T00:00:00Z",
                "2026-11-23T01:00:00Z",
            ),
            // Both day fields restricted: either matches (the 1st, or a Monday).
            (cron(Number(0), Number(0), Number(1), any(), Number(0)), "2026-11-24T00:00:00Z", "2026-11-30T00:00:00Z"),
            (cron(Number(30), Number(12), Number(1), Number(1), any()), "2026-11-21T00:00:00Z", "2027-01-01T12:30:00Z"),
        ];
        for (schedule, after, expected) in table {
            assert_eq!(schedule.next_after(at(after)), Some(at(expected)), "after {after}");
        }
    }

    #[test]
    fn a_schedule_follows_the_wall_clock_of_its_zone() {
        // 03:00 in Berlin is 02:00 UTC in winter and 01:00 UTC in summer; in New York the day's
        // weekday is its own.
        let berlin = cron_in("Europe/Berlin", [Number(0), Number(3), any(), any(), any()]);
        assert_eq!(berlin.next_after(at("2026-12-01T12:00:00Z")), Some(at("2026-12-02T02:00:00Z")));
        assert_eq!(berlin.next_after(at("2026-07-01T12:00:00Z")), Some(at("2026-07-02T01:00:00Z")));
        let monday_in_new_york = cron_in("America/New_York", [Number(0), Number(22), any(), any(), Number(0)]);
        // 2026-11-23 is a Monday; 22:00 there is 03:00 UTC on the Tuesday.
        assert_eq!(monday_in_new_york.next_after(at("2026-11-21T00:00:00Z")), Some(at("2026-11-24T03:00:00Z")));
        assert_eq!(berlin.zone_name(), "Europe/Berlin");
    }

    #[test]
    fn across_daylight_saving_changes_each_wall_clock_time_fires_once() {
        // Berlin springs forward on 2026-03-29 (02:00 → 03:00 CEST, at 01:00 UTC) and falls back
        // on 2026-10-25 (03:00 CEST → 02:00 CET, at 01:00 UTC).
        let at_0230 = cron_in("Europe/Berlin", [Number(30), Number(2), any(), any(), any()]);
        assert_eq!(
            firings(&at_0230, "2026-03-27T12:00:00Z", "2026-03-30T12:00:00Z"),
            [
                "2026-03-28T01:30:00Z", // 02:30 CET
                "2026-03-29T01:30:00Z", // 02:30 does not exist: 03:30 CEST
                "2026-03-30T00:30:00Z", // 02:30 CEST
            ]
        );
        assert_eq!(
            firings(&at_0230, "2026-10-23T12:00:00Z", "2026-10-26T12:00:00Z"),
            [
                "2026-10-24T00:30:00Z", // 02:30 CEST
                "2026-10-25T00:30:00Z", // the first of two 02:30s; not again at 01:30 UTC
                "2026-10-26T01:30:00Z", // 02:30 CET
            ]
        );
        // Starting inside the repeated hour, after the first 02:30: nothing more that day.
        assert_eq!(at_0230.next_after(at("2026-10-25T01:10:00Z")), Some(at("2026-10-26T01:30:00Z")));
        // An hourly schedule loses the skipped hour and does not repeat the doubled one.
        let hourly = cron_in("Europe/Berlin", [Number(0), any(), any(), any(), any()]);
        assert_eq!(
            firings(&hourly, "2026-03-28T23:30:00Z", "2026-03-29T02:00:00Z"),
            ["2026-03-29T00:00:00Z", "2026-03-29T01:00:00Z", "2026-03-29T02:00:00Z"],
            "01:00 CET, 03:00 CEST, 04:00 CEST"
        );
        assert_eq!(
            firings(&hourly, "2026-10-24T23:30:00Z", "2026-10-25T02:00:00Z"),
            ["2026-10-25T00:00:00Z", "2026-10-25T02:00:00Z"],
            "02:00 CEST, then 03:00 CET; the second 02:00 CET is not repeated"
        );
    }

    #[test]
    fn impossible_dates_never_fire_and_bad_fields_and_zones_are_named() {
        assert_eq!(
            cron(Number(0), Number(0), Number(31), Number(2), any()).next_after(at("2026-01-01T00:00:00Z")),
            None
        );
        let utc = || zone(Some("UTC")).unwrap();
        assert_eq!(Cron::new(&Number(60), &any(), &any(), &any(), &any(), utc()).unwrap_err().0, "minute");
        assert_eq!(Cron::new(&any(), &Text("x".into()), &any(), &any(), &any(), utc()).unwrap_err().0, "hour");
        assert_eq!(Cron::new(&any(), &any(), &any(), &any(), &Number(7), utc()).unwrap_err().0, "dayOfWeek");
        assert!(zone(Some("Europe/Atlantis")).unwrap_err().contains("Europe/Atlantis"));
        assert!(zone(None).is_ok(), "the master's own zone, or UTC without one");
    }
}
