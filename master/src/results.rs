//! Buildbot's result codes and how results combine.

use std::fmt;

/// The outcome of a step, build, build request or buildset, with Buildbot's numeric codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i64)]
pub enum Results {
    Success = 0,
    Warnings = 1,
    Failure = 2,
    Skipped = 3,
    Exception = 4,
    Retry = 5,
    Cancelled = 6,
}

impl Results {
    pub const ALL: [Results; 7] = [
        Results::Success,
        Results::Warnings,
        Results::Failure,
        Results::Skipped,
        Results::Exception,
        Results::Retry,
        Results::Cancelled,
    ];

    pub fn code(self) -> i64 {
        self as i64
    }

    pub fn from_code(code: i64) -> Option<Results> {
        Results::ALL.into_iter().find(|r| r.code() == code)
    }

    /// Buildbot's lower-case name, as in `build successful` or metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            Results::Success => "success",
            Results::Warnings => "warnings",
            Results::Failure => "failure",
            Results::Skipped => "skipped",
            Results::Exception => "exception",
            Results::Retry => "retry",
            Results::Cancelled => "cancelled",
        }
    }

    /// Rank for [`Results::worst`]: SKIPPED counts as better than SUCCESS, as in Buildbot.
    fn severity(self) -> u8 {
        match self {
            Results::Skipped => 0,
            Results::Success => 1,
            Results::Warnings => 2,
            Results::Failure => 3,
            Results::Exception => 4,
            Results::Retry => 5,
            Results::Cancelled => 6,
        }
    }

    /// The worse of two results.
    pub fn worst(self, other: Results) -> Results {
        if other.severity() > self.severity() { other } else { self }
    }
}

impl fmt::Display for Results {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::Results::*;
    use super::*;

    #[test]
    fn codes_are_buildbots() {
        let codes: Vec<i64> = Results::ALL.iter().map(|r| r.code()).collect();
        assert_eq!(codes, vec![0, 1, 2, 3, 4, 5, 6]);
        assert_eq!(Results::from_code(6), Some(Cancelled));
        assert_eq!(Results::from_code(-1), None);
    }

    #[test]
    fn skipped_is_better_than_success_and_cancelled_is_worst() {
        assert_eq!(Skipped.worst(Success), Success);
        assert_eq!(Success.worst(Warnings), Warnings);
        assert_eq!(Failure.worst(Warnings), Failure);
        assert_eq!(Exception.worst(Retry), Retry);
        assert_eq!(Cancelled.worst(Retry), Cancelled);
    }
}
