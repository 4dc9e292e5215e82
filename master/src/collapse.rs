//! Buildbot's rule for collapsing build requests: a new request makes older, still unclaimed
//! requests of the same builder redundant when they would build the same thing. Pure.

use crate::domain::SourceStamp;
use crate::properties::Properties;

/// What the rule looks at in a buildset.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CollapseView {
    pub sourcestamps: Vec<(SourceStamp, bool)>,
    pub properties: Properties,
}

/// Whether an older request (`old`) may be completed as SKIPPED because of a newer one (`new`):
/// the same codebases, each with the same repository, branch and project; either both built from
/// changes or, if neither, the same revision; and the same scheduler-set properties.
pub fn can_collapse(new: &CollapseView, old: &CollapseView) -> bool {
    if new.sourcestamps.len() != old.sourcestamps.len() {
        return false;
    }
    for (new_ss, new_has_changes) in &new.sourcestamps {
        let Some((old_ss, old_has_changes)) = old.sourcestamps.iter().find(|(ss, _)| ss.codebase == new_ss.codebase)
        else {
            return false;
        };
        if new_ss.repository != old_ss.repository || new_ss.branch != old_ss.branch || new_ss.project != old_ss.project
        {
            return false;
        }
        if new_has_changes != old_has_changes {
            return false;
        }
        if !new_has_changes && new_ss.revision != old_ss.revision {
            return false;
        }
    }
    scheduler_properties(&new.properties) == scheduler_properties(&old.properties)
}

/// A digest of what [`can_collapse`] requires to be equal in the source stamps: two buildsets may
/// collapse only if their keys are equal (the converse is checked by `can_collapse`).
pub fn key(sourcestamps: &[SourceStamp]) -> String {
    use sha2::{Digest, Sha256};
    let mut parts: Vec<[&str; 4]> = sourcestamps
        .iter()
        .map(|ss| [ss.codebase.as_str(), &ss.repository, ss.branch.as_deref().unwrap_or("\u{1}"), &ss.project])
        .collect();
    parts.sort();
    let mut hasher = Sha256::new();
    for part in parts {
        for field in part {
            hasher.update(field.as_bytes());
            hasher.update([0u8]);
        }
        hasher.update([1u8]);
    }
    hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn scheduler_properties(properties: &Properties) -> Vec<(&str, &serde_json::Value)> {
    properties
        .iter()
        .filter(|(name, _, source)| *source == "Scheduler" && *name != "scheduler")
        .map(|(n, v, _)| (n, v))
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn view(branch: &str, revision: Option<&str>, has_changes: bool) -> CollapseView {
        let ss = SourceStamp {
            branch: Some(branch.into()),
            revision: revision.map(str::to_owned),
            repository: "r".into(),
            ..Default::default()
        };
        CollapseView { sourcestamps: vec![(ss, has_changes)], properties: Properties::new() }
    }

    #[test]
    fn changes_on_one_branch_collapse_whatever_their_revisions() {
        assert!(can_collapse(&view("main", Some("b"), true), &view("main", Some("a"), true)));
    }

    #[test]
    fn different_branches_or_mixed_origins_do_not() {
        assert!(!can_collapse(&view("main", Some("b"), true), &view("dev", Some("a"), true)));
        assert!(!can_collapse(&view("main", Some("b"), true), &view("main", Some("b"), false)));
    }

    #[test]
    fn forced_builds_collapse_only_on_the_same_revision() {
        assert!(can_collapse(&view("main", None, false), &view("main", None, false)));
        assert!(!can_collapse(&view("main", Some("b"), false), &view("main", Some("a"), false)));
    }

    #[test]
    fn keys_agree_exactly_when_the_sources_may_collapse() {
        let ss = |branch: Option<&str>, revision: &str| SourceStamp {
            branch: branch.map(str::to_owned),
            revision: Some(revision.into()),
            repository: "r".into(),
            ..Default::default()
        };
        assert_eq!(key(&[ss(Some("main"), "a")]), key(&[ss(Some("main"), "b")]), "revisions do not matter");
        assert_ne!(key(&[ss(Some("main"), "a")]), key(&[ss(Some("dev"), "a")]));
        assert_ne!(key(&[ss(None, "a")]), key(&[ss(Some(""), "a")]));
    }

    #[test]
    fn scheduler_properties_must_agree_but_the_scheduler_name_may_differ() {
        let mut a = view("main", None, false);
        let mut b = view("main", None, false);
        a.properties.set("scheduler", json!("x"), "Scheduler");
        b.properties.set("scheduler", json!("y"), "Scheduler");
        a.properties.set("owner", json!("ada"), "Force Build Form");
        assert!(can_collapse(&a, &b));
        a.properties.set("flavour", json!("debug"), "Scheduler");
        assert!(!can_collapse(&a, &b));
    }
}
