//! GitLab webhook deliveries → changes, with Buildbot's field mapping. Pure.

use serde_json::Value;

use super::{HookError, iso_time_ms, person};
use crate::domain::NewChange;
use crate::properties::Properties;

/// The all-zero revision GitLab reports for a deleted ref.
const NO_REVISION: &str = "0000000000000000000000000000000000000000";

/// Checks `X-Gitlab-Token` against the configured secret: missing → `Unauthenticated`,
/// different → `Forbidden`.
pub fn verify_token(secret: Option<&str>, given: Option<&str>) -> Result<(), HookError> {
    let Some(secret) = secret else { return Ok(()) };
    match given {
        None => Err(HookError::Unauthenticated("missing X-Gitlab-Token; the hook has a secret")),
        Some(token) if crate::secrets::constant_time_eq(secret.as_bytes(), token.as_bytes()) => Ok(()),
        Some(_) => Err(HookError::Forbidden("Invalid secret")),
    }
}

fn text<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(value, |v, key| v.get(key)).and_then(Value::as_str)
}

/// The changes of a delivery. `event` is the payload's `object_kind` or, failing that, the
/// `X-Gitlab-Event` header.
pub fn changes(event: &str, payload: &Value, codebase: &str) -> Result<Vec<NewChange>, HookError> {
    match event {
        "push" | "tag_push" | "Push Hook" | "Tag Push Hook" => push(event, payload, codebase),
        "merge_request" | "Merge Request Hook" => {
            let attrs = payload
                .get("object_attributes")
                .ok_or_else(|| HookError::BadPayload("missing object_attributes".into()))?;
            if !merge_request_adds_code(attrs) {
                return Ok(Vec::new());
            }
            merge_request_change(attrs, "merge_request", None, codebase).map(|change| vec![change])
        }
        // A comment on a merge request is a change for the merge request, so a comment can ask
        // for a rebuild; comments on commits, issues and snippets are not.
        "note" | "Note Hook" => match payload.get("merge_request") {
            Some(merge_request) => {
                let note = text(payload, &["object_attributes", "note"]).unwrap_or_default();
                merge_request_change(merge_request, "note", Some(note), codebase).map(|change| vec![change])
            }
            None => Err(HookError::Ignored("ignored: a comment outside a merge request".into())),
        },
        // GitLab disables a webhook after four failed deliveries in a row: an extra event ticked
        // in its settings (Pipeline Hook, Job Hook, …) must not count as one.
        other => Err(HookError::Ignored(format!("ignored: Kiln does not act on {other:?} events"))),
    }
}

/// A push or tag push: one change per distinct commit. As in Buildbot, the repository is the
/// project's `repository.url` (its SSH URL) and the project is its display name.
fn push(event: &str, payload: &Value, codebase: &str) -> Result<Vec<NewChange>, HookError> {
    let category = if event.starts_with("tag") || event.starts_with("Tag") { "tag_push" } else { "push" };
    let reference = text(payload, &["ref"]).ok_or_else(|| HookError::BadPayload("missing ref".into()))?;
    let branch =
        reference.strip_prefix("refs/heads/").or_else(|| reference.strip_prefix("refs/tags/")).unwrap_or(reference);
    if text(payload, &["after"]) == Some(NO_REVISION) {
        return Ok(Vec::new());
    }
    let repository = text(payload, &["repository", "url"])
        .or_else(|| text(payload, &["repository", "git_ssh_url"]))
        .ok_or_else(|| HookError::BadPayload("missing repository.url".into()))?
        .to_owned();
    let project = text(payload, &["repository", "name"])
        .or_else(|| text(payload, &["project", "name"]))
        .unwrap_or_default()
        .to_owned();
    let commits = payload.get("commits").and_then(Value::as_array).cloned().unwrap_or_default();
    let mut changes = Vec::new();
    let make = |revision: &str, commit: Option<&Value>| -> Result<NewChange, HookError> {
        let mut files = Vec::new();
        for kind in ["added", "modified", "removed"] {
            if let Some(list) = commit.and_then(|c| c.get(kind)).and_then(Value::as_array) {
                files.extend(list.iter().filter_map(Value::as_str).map(str::to_owned));
            }
        }
        let mut properties = Properties::new();
        properties.set("event", Value::from(category), "Change");
        Ok(NewChange {
            author: commit
                .map(|c| person(c.get("author")))
                .unwrap_or_else(|| text(payload, &["user_name"]).unwrap_or_default().to_owned()),
            committer: None,
            comments: commit.and_then(|c| text(c, &["message"])).unwrap_or_default().to_owned(),
            branch: Some(branch.to_owned()),
            revision: Some(revision.to_owned()),
            revlink: commit.and_then(|c| text(c, &["url"])).map(str::to_owned),
            when_ms: commit.and_then(|c| text(c, &["timestamp"])).map(iso_time_ms).transpose()?,
            category: Some(category.to_owned()),
            repository: repository.clone(),
            codebase: codebase.to_owned(),
            project: project.clone(),
            files,
            properties,
        })
    };
    // A commit already pushed to another branch is not new (Buildbot skips it too).
    for commit in commits.iter().filter(|c| c.get("distinct").and_then(Value::as_bool) != Some(false)) {
        let revision = text(commit, &["id"]).ok_or_else(|| HookError::BadPayload("missing commits[].id".into()))?;
        changes.push(make(revision, Some(commit))?);
    }
    // A tag push names no commits; build what the tag points at (Buildbot ignores it).
    if commits.is_empty()
        && let Some(revision) = text(payload, &["checkout_sha"]).filter(|r| *r != NO_REVISION)
    {
        changes.push(make(revision, None)?);
    }
    Ok(changes)
}

/// Whether a merge request event brings code to build: opened, reopened, or updated with new
/// commits (`oldrev`), and neither closed, merged nor merely approved.
fn merge_request_adds_code(attrs: &Value) -> bool {
    let state = text(attrs, &["state"]).unwrap_or_default();
    let action = text(attrs, &["action"]).unwrap_or_default();
    let new_commits = attrs.get("oldrev").is_some_and(|rev| !rev.is_null());
    !matches!(state, "closed" | "merged" | "approved")
        && (matches!(action, "open" | "reopen") || (action == "update" && new_commits))
}

/// The change for a merge request (`mr` holds its attributes: the event's `object_attributes`,
/// or a comment's `merge_request`), mapped as Buildbot does: the target's HTTP URL and name as
/// repository and project, both sides' branches, projects and URLs as properties, and for a
/// comment its text as the `comments` property.
fn merge_request_change(mr: &Value, event: &str, note: Option<&str>, codebase: &str) -> Result<NewChange, HookError> {
    let commit = mr.get("last_commit").ok_or_else(|| HookError::BadPayload("missing last_commit".into()))?;
    let mut properties = Properties::new();
    properties.set("event", Value::from(event), "Change");
    for side in ["source", "target"] {
        let mut set = |name: String, value: Value| properties.set(name, value, "Change");
        set(format!("{side}_branch"), Value::from(text(mr, &[&format!("{side}_branch")]).unwrap_or_default()));
        set(format!("{side}_repository"), Value::from(text(mr, &[side, "git_http_url"]).unwrap_or_default()));
        set(format!("{side}_git_ssh_url"), Value::from(text(mr, &[side, "git_ssh_url"]).unwrap_or_default()));
        set(format!("{side}_project_id"), mr.get(format!("{side}_project_id")).cloned().unwrap_or(Value::Null));
    }
    if let Some(note) = note {
        properties.set("comments", Value::from(note), "Change");
    }
    let iid = mr.get("iid").and_then(Value::as_i64).unwrap_or_default();
    Ok(NewChange {
        author: person(commit.get("author")),
        committer: None,
        comments: format!(
            "MR#{iid}: {}\n\n{}",
            text(mr, &["title"]).unwrap_or_default(),
            text(mr, &["description"]).unwrap_or_default()
        ),
        branch: text(mr, &["target_branch"]).map(str::to_owned),
        revision: Some(
            text(commit, &["id"]).ok_or_else(|| HookError::BadPayload("missing last_commit.id".into()))?.to_owned(),
        ),
        revlink: text(mr, &["url"]).map(str::to_owned),
        when_ms: text(commit, &["timestamp"]).map(iso_time_ms).transpose()?,
        category: Some(event.into()),
        repository: text(mr, &["target", "git_http_url"]).unwrap_or_default().to_owned(),
        codebase: codebase.to_owned(),
        project: text(mr, &["target", "name"]).unwrap_or_default().to_owned(),
        files: Vec::new(),
        properties,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_push_maps_each_commit_and_a_deleted_branch_nothing() {
        let payload = json!({
            "object_kind": "push", "ref": "refs/heads/main", "after": "b", "user_name": "Ada",
            "project": { "path_with_namespace": "g/p" },
            "repository": { "name": "p", "url": "git@gitlab.example.org:g/p.git", "git_http_url": "https://gitlab.example.org/g/p.git" },
            "commits": [ { "id": "a", "message": "m", "timestamp": "2026-01-02T03:04:05+00:00",
                           "author": { "name": "Ada", "email": "ada@example.org" }, "added": ["f"], "modified": [], "removed": [] } ]
        });
        let changes = changes("push", &payload, "").unwrap();
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].author, "Ada <ada@example.org>");
        assert_eq!(changes[0].repository, "git@gitlab.example.org:g/p.git", "the SSH URL, as in Buildbot");
        assert_eq!(changes[0].project, "p", "the display name, as in Buildbot");
        assert_eq!(changes[0].category.as_deref(), Some("push"));
        let mut deleted = payload.clone();
        deleted["after"] = json!(NO_REVISION);
        assert!(super::changes("push", &deleted, "").unwrap().is_empty());
    }

    #[test]
    fn a_tag_push_without_commits_builds_the_tagged_revision() {
        let payload = json!({
            "object_kind": "tag_push", "ref": "refs/tags/v1", "after": "c", "checkout_sha": "c", "user_name": "Ada",
            "repository": { "name": "p", "url": "https://gitlab.example.org/g/p.git" }, "commits": []
        });
        let changes = changes("tag_push", &payload, "cb").unwrap();
        assert_eq!((changes[0].branch.as_deref(), changes[0].revision.as_deref()), (Some("v1"), Some("c")));
        assert_eq!(changes[0].category.as_deref(), Some("tag_push"));
        assert_eq!(changes[0].codebase, "cb");
    }

    #[test]
    fn merge_requests_build_when_opened_or_given_commits() {
        let payload = |action: &str, oldrev: Value| {
            json!({ "object_kind": "merge_request", "object_attributes": {
                "iid": 3, "title": "T", "description": "D", "state": "opened", "action": action, "oldrev": oldrev,
                "source_branch": "fix", "target_branch": "main", "url": "https://gitlab.example.org/g/p/-/merge_requests/3",
                "source": { "git_http_url": "https://gitlab.example.org/f/p.git", "git_ssh_url": "git@gitlab.example.org:f/p.git" },
                "target": { "name": "P", "git_http_url": "https://gitlab.example.org/g/p.git", "git_ssh_url": "git@gitlab.example.org:g/p.git" },
                "last_commit": { "id": "d", "timestamp": "2026-01-02T03:04:05Z", "author": { "name": "Ada", "email": "a@e" } } } })
        };
        let opened = changes("merge_request", &payload("open", Value::Null), "").unwrap();
        assert_eq!(opened[0].revision.as_deref(), Some("d"));
        assert_eq!(opened[0].branch.as_deref(), Some("main"));
        assert_eq!(opened[0].properties.get("source_branch"), Some(&json!("fix")));
        assert_eq!(opened[0].properties.get("source_git_ssh_url"), Some(&json!("git@gitlab.example.org:f/p.git")));
        assert_eq!(opened[0].properties.get("target_git_ssh_url"), Some(&json!("git@gitlab.example.org:g/p.git")));
        assert_eq!(
            (opened[0].repository.as_str(), opened[0].project.as_str()),
            ("https://gitlab.example.org/g/p.git", "P")
        );
        assert!(changes("merge_request", &payload("update", Value::Null), "").unwrap().is_empty());
        assert_eq!(changes("merge_request", &payload("update", json!("c")), "").unwrap().len(), 1);
        assert!(changes("merge_request", &payload("close", Value::Null), "").unwrap().is_empty());
    }

    #[test]
    fn a_comment_on_a_merge_request_is_a_change_for_it_and_other_comments_are_ignored() {
        let merge_request = json!({
            "iid": 3, "title": "T", "description": "D", "source_branch": "fix", "target_branch": "main",
            "source_project_id": 5, "target_project_id": 4, "url": "https://gitlab.example.org/g/p/-/merge_requests/3",
            "source": { "git_http_url": "https://gitlab.example.org/f/p.git", "git_ssh_url": "git@gitlab.example.org:f/p.git" },
            "target": { "name": "P", "git_http_url": "https://gitlab.example.org/g/p.git", "git_ssh_url": "git@gitlab.example.org:g/p.git" },
            "last_commit": { "id": "d", "timestamp": "2026-01-02T03:04:05Z", "author": { "name": "Ada", "email": "a@e" } } });
        let note = json!({ "object_kind": "note", "object_attributes": { "id": 9, "note": "please rebuild" },
                           "merge_request": merge_request });
        let change = changes("note", &note, "").unwrap().remove(0);
        assert_eq!((change.revision.as_deref(), change.branch.as_deref()), (Some("d"), Some("main")));
        assert_eq!(change.category.as_deref(), Some("note"));
        assert_eq!(change.properties.get("comments"), Some(&json!("please rebuild")));
        assert_eq!(change.properties.get("event"), Some(&json!("note")));
        assert_eq!(change.comments, "MR#3: T\n\nD");
        let on_a_commit =
            json!({ "object_kind": "note", "object_attributes": { "id": 9, "note": "nice" }, "commit": {} });
        assert!(matches!(changes("note", &on_a_commit, ""), Err(HookError::Ignored(_))));
    }

    #[test]
    fn pushed_commits_already_on_another_branch_and_approvals_build_nothing() {
        let commit = |id: &str, distinct: bool| {
            json!({ "id": id, "distinct": distinct, "message": "m",
            "timestamp": "2026-01-02T03:04:05Z", "author": { "name": "Ada", "email": "a@e" } })
        };
        let payload = json!({ "object_kind": "push", "ref": "refs/heads/release", "after": "b",
            "repository": { "name": "p", "url": "git@gitlab.example.org:g/p.git" },
            "commits": [commit("a", false), commit("b", true)] });
        let revisions: Vec<_> = changes("push", &payload, "").unwrap().into_iter().map(|c| c.revision).collect();
        assert_eq!(revisions, [Some("b".to_owned())]);
        let approved = json!({ "object_kind": "merge_request", "object_attributes": {
            "state": "approved", "action": "open", "last_commit": { "id": "d" } } });
        assert!(changes("merge_request", &approved, "").unwrap().is_empty());
    }

    #[test]
    fn the_token_must_match_when_a_secret_is_set() {
        assert!(verify_token(None, None).is_ok());
        assert!(verify_token(Some("s"), Some("s")).is_ok());
        assert!(matches!(verify_token(Some("s"), None), Err(HookError::Unauthenticated(_))));
        assert!(matches!(verify_token(Some("s"), Some("t")), Err(HookError::Forbidden(_))));
    }
}
