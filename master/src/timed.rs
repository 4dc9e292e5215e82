//! When Periodic and Nightly schedulers fire. Nightly uses Buildbot's cron fields — minute, hour,
//! dayOfMonth, month, dayOfWeek with 0 = Monday — evaluated in UTC. Pure.

use serde::Deserialize;
use time::{Duration, OffsetDateTime};

/// One cron field: `*`, a number, a list of numbers, or a string such as `"1-5"`, `"*/15"` or
/// `"1,3,5"`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
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

/// A Nightly scheduler's schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    minute: Allowed,
    hour: Allowed,
    day_of_month: Allowed,
    month: Allowed,
    /// 0 = Monday, as in Buildbot.
    day_of_week: Allowed,
}

impl Cron {
    /// Parses Buildbot's fields; errors name the field.
    pub fn new(
        minute: &CronField,
        hour: &CronField,
        day_of_month: &CronField,
        month: &CronField,
        day_of_week: &CronField,
    ) -> Result<Cron, String> {
        Ok(Cron {
            minute: parse(minute, 0, 59, "minute")?,
            hour: parse(hour, 0, 23, "hour")?,
            day_of_month: parse(day_of_month, 1, 31, "dayOfMonth")?,
            month: parse(month, 1, 12, "month")?,
            day_of_week: parse(day_of_week, 0, 6, "dayOfWeek")?,
        })
    }

    fn day_matches(&self, t: OffsetDateTime) -> bool {
        let dom = self.day_of_month.contains(u32::from(t.day()));
        let dow = self.day_of_week.contains(u32::from(t.weekday().number_days_from_monday()));
        // Standard cron: when both day fields are restricted, either one matching is enough.
        match (self.day_of_month.any, self.day_of_week.any) {
            (false, false) => dom || dow,
            _ => dom && dow,
        }
    }

    /// The first whole minute strictly after `after_ms` that matches, in milliseconds; `None`
    /// when nothing matches within five years (e.g. 31 February).
    pub fn next_after(&self, after_ms: i64) -> Option<i64> {
        let start = OffsetDateTime::from_unix_timestamp(after_ms.div_euclid(1000)).ok()?;
        let mut t = start.replace_second(0).ok()?.replace_nanosecond(0).ok()? + Duration::minutes(1);
        let limit = start + Duration::days(5 * 366);
        while t <= limit {
            if !self.month.contains(u32::from(u8::from(t.month()))) || !self.day_matches(t) {
                t = t.replace_time(time::Time::MIDNIGHT) + Duration::days(1);
            } else if !self.hour.contains(u32::from(t.hour())) {
                t = t.replace_minute(0).ok()? + Duration::hours(1);
            } else if !self.minute.contains(u32::from(t.minute())) {
                t += Duration::minutes(1);
            } else {
                return Some(t.unix_timestamp() * 1000);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> i64 {
        let t = OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).unwrap();
        t.unix_timestamp() * 1000
    }

    fn cron(minute: CronField, hour: CronField, dom: CronField, month: CronField, dow: CronField) -> Cron {
        Cron::new(&minute, &hour, &dom, &month, &dow).unwrap()
    }

    use CronField::{List, Number, Text};

    fn any() -> CronField {
        Text("*".into())
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
    fn impossible_dates_never_fire_and_bad_fields_are_named() {
        assert_eq!(
            cron(Number(0), Number(0), Number(31), Number(2), any()).next_after(at("2026-01-01T00:00:00Z")),
            None
        );
        let error = Cron::new(&Number(60), &any(), &any(), &any(), &any()).unwrap_err();
        assert!(error.starts_with("minute"), "{error}");
        assert!(Cron::new(&any(), &Text("x".into()), &any(), &any(), &any()).unwrap_err().starts_with("hour"));
        assert!(Cron::new(&any(), &any(), &any(), &any(), &Number(7)).unwrap_err().starts_with("dayOfWeek"));
    }
}
