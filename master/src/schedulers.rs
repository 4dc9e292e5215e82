//! What change schedulers decide: whether a change passes their filter, whether it is important,
//! which tree-stable timer it belongs to, and when that timer fires. Pure: the master stores
//! and acts on the answers.

use regex::Regex;

use crate::config::{ChangeFilterConfig, ChangeSchedulerConfig, OneOrMany};
use crate::domain::NewChange;

/// A compiled Buildbot ChangeFilter.
#[derive(Debug, Clone, Default)]
pub struct ChangeFilter {
    checks: Vec<(Field, Check)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Project,
    Repository,
    Branch,
    Category,
    Codebase,
}

#[derive(Debug, Clone)]
enum Check {
    Eq(Vec<String>),
    NotEq(Vec<String>),
    Re(Regex),
    NotRe(Regex),
}

impl Field {
    fn of(self, change: &NewChange) -> Option<&str> {
        match self {
            Field::Project => Some(&change.project),
            Field::Repository => Some(&change.repository),
            Field::Branch => change.branch.as_deref(),
            Field::Category => change.category.as_deref(),
            Field::Codebase => Some(&change.codebase),
        }
    }
}

impl ChangeFilter {
    /// Compiles a filter; an error names the key and the reason.
    pub fn compile(config: &ChangeFilterConfig) -> Result<ChangeFilter, (String, String)> {
        type Parts<'a> = (&'a Option<OneOrMany>, &'a Option<OneOrMany>, &'a Option<String>, &'a Option<String>);
        let fields: [(Field, &str, Parts); 5] = [
            (
                Field::Project,
                "project",
                (&config.project, &config.project_not_eq, &config.project_re, &config.project_not_re),
            ),
            (
                Field::Repository,
                "repository",
                (&config.repository, &config.repository_not_eq, &config.repository_re, &config.repository_not_re),
            ),
            (
                Field::Branch,
                "branch",
                (&config.branch, &config.branch_not_eq, &config.branch_re, &config.branch_not_re),
            ),
            (
                Field::Category,
                "category",
                (&config.category, &config.category_not_eq, &config.category_re, &config.category_not_re),
            ),
            (
                Field::Codebase,
                "codebase",
                (&config.codebase, &config.codebase_not_eq, &config.codebase_re, &config.codebase_not_re),
            ),
        ];
        let mut checks = Vec::new();
        for (field, name, (eq, not_eq, re, not_re)) in fields {
            if let Some(values) = eq {
                checks.push((field, Check::Eq(values.values())));
            }
            if let Some(values) = not_eq {
                checks.push((field, Check::NotEq(values.values())));
            }
            let compile = |key: String, pattern: &str| Regex::new(pattern).map_err(|e| (key, e.to_string()));
            if let Some(pattern) = re {
                checks.push((field, Check::Re(compile(format!("change_filter.{name}_re"), pattern)?)));
            }
            if let Some(pattern) = not_re {
                checks.push((field, Check::NotRe(compile(format!("change_filter.{name}_not_re"), pattern)?)));
            }
        }
        Ok(ChangeFilter { checks })
    }

    /// Whether a change passes every check. A missing value (no branch, no category) fails an
    /// equality or a pattern and passes their negations.
    pub fn accepts(&self, change: &NewChange) -> bool {
        self.checks.iter().all(|(field, check)| {
            let value = field.of(change);
            match check {
                Check::Eq(values) => value.is_some_and(|v| values.iter().any(|x| x == v)),
                Check::NotEq(values) => value.is_none_or(|v| !values.iter().any(|x| x == v)),
                Check::Re(re) => value.is_some_and(|v| re.is_match(v)),
                Check::NotRe(re) => value.is_none_or(|v| !re.is_match(v)),
            }
        })
    }
}

/// How a scheduler regards a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Classification {
    /// Not for this scheduler.
    Ignored,
    Important,
    /// Passes the filter, but touches no important file: built along with important changes, never
    /// on its own.
    Unimportant,
}

/// A change scheduler (single-branch or any-branch), compiled from its configuration.
#[derive(Debug, Clone)]
pub struct ChangeScheduler {
    pub name: String,
    /// One timer per branch (any-branch) rather than one for the scheduler.
    pub per_branch: bool,
    filter: ChangeFilter,
    important: Option<Vec<glob::Pattern>>,
    /// Milliseconds the tree must be stable; `None` builds each important change at once.
    pub tree_stable_ms: Option<i64>,
}

impl ChangeScheduler {
    /// Compiles a scheduler; errors name the key (relative to the scheduler) and the reason.
    pub fn compile(config: &ChangeSchedulerConfig, per_branch: bool) -> Result<ChangeScheduler, (String, String)> {
        let mut filter_config = config.change_filter.clone();
        if let Some(branch) = &config.branch {
            if filter_config.branch.is_some() {
                return Err(("branch".into(), "give the branch here or in change_filter, not both".into()));
            }
            filter_config.branch = Some(OneOrMany::One(branch.clone()));
        }
        let filter = ChangeFilter::compile(&filter_config)?;
        let important = match &config.file_is_important {
            None => None,
            Some(patterns) => Some(
                patterns
                    .iter()
                    .enumerate()
                    .map(|(i, p)| glob::Pattern::new(p).map_err(|e| (format!("fileIsImportant[{i}]"), e.to_string())))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        let tree_stable_ms = match config.tree_stable_timer {
            None => None,
            Some(seconds) if (0.0..=crate::config::LONGEST_SECONDS).contains(&seconds) => {
                Some((seconds * 1000.0) as i64)
            }
            Some(_) => {
                return Err((
                    "treeStableTimer".into(),
                    "must be a number of seconds, 0 or more and at most a year".into(),
                ));
            }
        };
        Ok(ChangeScheduler { name: config.name.clone(), per_branch, filter, important, tree_stable_ms })
    }

    pub fn classify(&self, change: &NewChange) -> Classification {
        if !self.filter.accepts(change) {
            return Classification::Ignored;
        }
        match &self.important {
            None => Classification::Important,
            // A change that names no files cannot be judged; build it.
            Some(_) if change.files.is_empty() => Classification::Important,
            Some(patterns) if change.files.iter().any(|f| patterns.iter().any(|p| p.matches(f))) => {
                Classification::Important
            }
            Some(_) => Classification::Unimportant,
        }
    }

    /// The tree-stable timer a change belongs to: one per scheduler, or one per
    /// (codebase, project, repository, branch) for any-branch schedulers.
    pub fn timer_key(&self, change: &NewChange) -> String {
        if !self.per_branch {
            return String::new();
        }
        [change.codebase.as_str(), &change.project, &change.repository, change.branch.as_deref().unwrap_or("")]
            .join("\u{1f}")
    }
}

/// When a tree-stable timer fires after a change arrives at `now`: an important change
/// (re)starts it; an unimportant one only pushes back a timer already running.
pub fn next_fire(running: Option<i64>, classification: Classification, now: i64, stable_ms: i64) -> Option<i64> {
    match classification {
        Classification::Important => Some(now + stable_ms),
        Classification::Unimportant => running.map(|_| now + stable_ms),
        Classification::Ignored => running,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(branch: Option<&str>, files: &[&str]) -> NewChange {
        NewChange {
            branch: branch.map(str::to_owned),
            project: "kiln".into(),
            repository: "https://example.org/kiln.git".into(),
            category: Some("push".into()),
            files: files.iter().map(|f| f.to_string()).collect(),
            ..Default::default()
        }
    }

    fn filter(yaml: &str) -> ChangeFilter {
        ChangeFilter::compile(&serde_yaml_ng::from_str(yaml).unwrap()).unwrap()
    }

    #[test]
    fn filters_combine_equality_patterns_and_negations() {
        let table: &[(&str, Option<&str>, bool)] = &[
            ("{}", Some("main"), true),
            ("{branch: main}", Some("main"), true),
            ("{branch: main}", Some("dev"), false),
            ("{branch: main}", None, false),
            ("{branch: [main, dev]}", Some("dev"), true),
            ("{branch_not_eq: main}", Some("dev"), true),
            ("{branch_not_eq: main}", Some("main"), false),
            ("{branch_not_eq: main}", None, true),
            ("{branch_re: '^release/'}", Some("release/1.0"), true),
            ("{branch_re: '^release/'}", Some("main"), false),
            ("{branch_not_re: '^wip/'}", Some("wip/x"), false),
            ("{branch_re: '^r', branch_not_eq: rc}", Some("rc"), false),
            ("{project: kiln, category: push}", Some("main"), true),
            ("{project: other}", Some("main"), false),
            ("{repository_re: 'example\\.org'}", Some("main"), true),
            ("{codebase: ''}", Some("main"), true),
            ("{category_not_eq: tag}", Some("main"), true),
        ];
        for (yaml, branch, expected) in table {
            assert_eq!(filter(yaml).accepts(&change(*branch, &[])), *expected, "{yaml} on {branch:?}");
        }
    }

    fn scheduler(yaml: &str, per_branch: bool) -> ChangeScheduler {
        let config: ChangeSchedulerConfig = serde_yaml_ng::from_str(yaml).unwrap();
        ChangeScheduler::compile(&config, per_branch).unwrap()
    }

    #[test]
    fn important_files_decide_importance() {
        let s = scheduler("{name: s, builderNames: [b], fileIsImportant: ['src/*', '*.toml']}", false);
        assert_eq!(s.classify(&change(Some("main"), &["src/lib.rs"])), Classification::Important);
        assert_eq!(s.classify(&change(Some("main"), &["README.md", "Cargo.toml"])), Classification::Important);
        assert_eq!(s.classify(&change(Some("main"), &["docs/x.md"])), Classification::Unimportant);
        assert_eq!(s.classify(&change(Some("main"), &[])), Classification::Important);
        let main_only = scheduler("{name: s, builderNames: [b], branch: main}", false);
        assert_eq!(main_only.classify(&change(Some("dev"), &[])), Classification::Ignored);
    }

    #[test]
    fn any_branch_schedulers_keep_a_timer_per_branch() {
        let single = scheduler("{name: s, builderNames: [b]}", false);
        let any = scheduler("{name: a, builderNames: [b]}", true);
        assert_eq!(single.timer_key(&change(Some("main"), &[])), single.timer_key(&change(Some("dev"), &[])));
        assert_ne!(any.timer_key(&change(Some("main"), &[])), any.timer_key(&change(Some("dev"), &[])));
    }

    #[test]
    fn important_changes_restart_the_timer_and_unimportant_ones_only_delay_it() {
        use Classification::*;
        let table = [
            (None, Important, Some(1500)),
            (Some(1200), Important, Some(1500)),
            (None, Unimportant, None),
            (Some(1200), Unimportant, Some(1500)),
            (Some(1200), Ignored, Some(1200)),
            (None, Ignored, None),
        ];
        for (running, classification, expected) in table {
            assert_eq!(next_fire(running, classification, 1000, 500), expected, "{running:?} {classification:?}");
        }
    }

    #[test]
    fn bad_patterns_are_named() {
        let config: ChangeSchedulerConfig =
            serde_yaml_ng::from_str("{name: s, builderNames: [b], change_filter: {branch_re: '('}}").unwrap();
        assert_eq!(ChangeScheduler::compile(&config, false).unwrap_err().0, "change_filter.branch_re");
        let both: ChangeSchedulerConfig =
            serde_yaml_ng::from_str("{name: s, builderNames: [b], branch: a, change_filter: {branch: b}}").unwrap();
        assert_eq!(ChangeScheduler::compile(&both, false).unwrap_err().0, "branch");
    }
}
