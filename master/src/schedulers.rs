//! Which changes a scheduler accepts. Pure: the master acts on the answers.

use crate::config::SchedulerConfig;
use crate::store::NewChange;

/// Whether a single-branch scheduler builds this change: every filter it sets must match.
pub fn single_branch_accepts(scheduler: &SchedulerConfig, change: &NewChange) -> bool {
    let SchedulerConfig::SingleBranch { branch, project, repository, .. } = scheduler else {
        return false;
    };
    let branch_ok = branch.as_ref().is_none_or(|b| change.branch.as_deref() == Some(b.as_str()));
    let project_ok = project.as_ref().is_none_or(|p| &change.project == p);
    let repository_ok = repository.as_ref().is_none_or(|r| &change.repository == r);
    branch_ok && project_ok && repository_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scheduler(branch: Option<&str>, project: Option<&str>) -> SchedulerConfig {
        SchedulerConfig::SingleBranch {
            name: "s".into(),
            builder_names: vec!["b".into()],
            branch: branch.map(str::to_owned),
            project: project.map(str::to_owned),
            repository: None,
            tree_stable_timer: None,
            priority: 0,
            properties: Default::default(),
        }
    }

    #[test]
    fn a_change_on_another_branch_is_ignored() {
        let change = NewChange { branch: Some("dev".into()), ..Default::default() };
        assert!(!single_branch_accepts(&scheduler(Some("main"), None), &change));
        assert!(single_branch_accepts(&scheduler(Some("dev"), None), &change));
        assert!(single_branch_accepts(&scheduler(None, None), &change));
    }

    #[test]
    fn every_filter_must_match() {
        let change = NewChange { branch: Some("main".into()), project: "a".into(), ..Default::default() };
        assert!(!single_branch_accepts(&scheduler(Some("main"), Some("b")), &change));
        assert!(single_branch_accepts(&scheduler(Some("main"), Some("a")), &change));
    }
}
