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
        "merge_request" | "Merge Request Hook" => merge_request(payload, codebase),
        // GitLab disables a webhook after four failed deliveries in a row: an extra event ticked
        // in its settings (Pipeline Hook, Job Hook, …) must not count as one.
        other => Err(HookError::Ignored(format!("ignored: Kiln does not act on {other:?} events"))),
    }
}

fn push(event: &str, payload: &Value, codebase: &str) -> Result<Vec<NewChange>, HookError> {
    let category = if event.starts_with("tag") || event.starts_with("Tag") { "tag_push" } else { "push" };
    let reference = text(payload, &["ref"]).ok_or_else(|| HookError::BadPayload("missing ref".into()))?;
    let branch =
        reference.strip_prefix("refs/heads/").or_else(|| reference.strip_prefix("refs/tags/")).unwrap_or(reference);
    if text(payload, &["after"]) == Some(NO_REVISION) {
        return Ok(Vec::new());
    }
    let repository = text(payload, &["repository", "git_http_url"])
        .or_else(|| text(payload, &["repository", "url"]))
        .ok_or_else(|| HookError::BadPayload("missing repository.url".into()))?
        .to_owned();
    let project = text(payload, &["project", "path_with_namespace"])
        .or_else(|| text(payload, &["repository", "name"]))
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
    for commit in &commits {
        let revision = text(commit, &["id"]).ok_or_else(|| HookError::BadPayload("missing commits[].id".into()))?;
        changes.push(make(revision, Some(commit))?);
    }
    // A tag push names no commits; build what the tag points at.
    if changes.is_empty()
        && let Some(revision) = text(payload, &["checkout_sha"]).filter(|r| *r != NO_REVISION)
    {
        changes.push(make(revision, None)?);
    }
    Ok(changes)
}

fn merge_request(payload: &Value, codebase: &str) -> Result<Vec<NewChange>, HookError> {
    let attrs =
        payload.get("object_attributes").ok_or_else(|| HookError::BadPayload("missing object_attributes".into()))?;
    let state = text(attrs, &["state"]).unwrap_or_default();
    let action = text(attrs, &["action"]).unwrap_or_default();
    if matches!(state, "closed" | "merged") || !matches!(action, "open" | "reopen" | "update") {
        return Ok(Vec::new());
    }
    // An update that adds no commits (a new label, a new title) builds nothing.
    if action == "update" && attrs.get("oldrev").is_none_or(Value::is_null) {
        return Ok(Vec::new());
    }
    let commit = attrs.get("last_commit").ok_or_else(|| HookError::BadPayload("missing last_commit".into()))?;
    let mut properties = Properties::new();
    properties.set("event", Value::from("merge_request"), "Change");
    for side in ["source", "target"] {
        properties.set(
            format!("{side}_branch"),
            Value::from(text(attrs, &[&format!("{side}_branch")]).unwrap_or_default()),
            "Change",
        );
        properties.set(
            format!("{side}_repository"),
            Value::from(text(attrs, &[side, "git_http_url"]).unwrap_or_default()),
            "Change",
        );
        properties.set(
            format!("{side}_project_id"),
            attrs.get(format!("{side}_project_id")).cloned().unwrap_or(Value::Null),
            "Change",
        );
    }
    let iid = attrs.get("iid").and_then(Value::as_i64).unwrap_or_default();
    Ok(vec![NewChange {
        author: person(commit.get("author")),
        committer: None,
        comments: format!(
            "MR#{iid}: {}\n\n{}",
            text(attrs, &["title"]).unwrap_or_default(),
            text(attrs, &["description"]).unwrap_or_default()
        ),
        branch: text(attrs, &["target_branch"]).map(str::to_owned),
        revision: Some(
            text(commit, &["id"]).ok_or_else(|| HookError::BadPayload("missing last_commit.id".into()))?.to_owned(),
        ),
        revlink: text(attrs, &["url"]).map(str::to_owned),
        when_ms: text(commit, &["timestamp"]).map(iso_time_ms).transpose()?,
        category: Some("merge_request".into()),
        repository: text(attrs, &["target", "git_http_url"]).unwrap_or_default().to_owned(),
        codebase: codebase.to_owned(),
        project: text(attrs, &["target", "path_with_namespace"]).unwrap_or_default().to_owned(),
        files: Vec::new(),
        properties,
    }])
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
        assert_eq!(changes[0].repository, "https://gitlab.example.org/g/p.git");
        assert_eq!(changes[0].project, "g/p");
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
                "source": { "git_http_url": "https://gitlab.example.org/f/p.git" },
                "target": { "git_http_url": "https://gitlab.example.org/g/p.git", "path_with_namespace": "g/p" },
                "last_commit": { "id": "d", "timestamp": "2026-01-02T03:04:05Z", "author": { "name": "Ada", "email": "a@e" } } } })
        };
        let opened = changes("merge_request", &payload("open", Value::Null), "").unwrap();
        assert_eq!(opened[0].revision.as_deref(), Some("d"));
        assert_eq!(opened[0].branch.as_deref(), Some("main"));
        assert_eq!(opened[0].properties.get("source_branch"), Some(&json!("fix")));
        assert!(changes("merge_request", &payload("update", Value::Null), "").unwrap().is_empty());
        assert_eq!(changes("merge_request", &payload("update", json!("c")), "").unwrap().len(), 1);
        assert!(changes("merge_request", &payload("close", Value::Null), "").unwrap().is_empty());
    }

    #[test]
    fn the_token_must_match_when_a_secret_is_set() {
        assert!(verify_token(None, None).is_ok());
        assert!(verify_token(Some("s"), Some("s")).is_ok());
        assert!(matches!(verify_token(Some("s"), None), Err(HookError::Unauthenticated(_))));
        assert!(matches!(verify_token(Some("s"), Some("t")), Err(HookError::Forbidden(_))));
    }
}
