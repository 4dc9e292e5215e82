//! GitHub webhook deliveries → changes, with Buildbot's field mapping, and the signature check.
//! Pure: the HTTP layer hands in headers and body.

use hmac::{Hmac, Mac};
use regex::Regex;
use serde_json::Value;

use super::{HookError, iso_time_ms, person};
use crate::domain::NewChange;
use crate::properties::Properties;

/// How a GitHub hook is set up.
#[derive(Debug, Clone)]
pub struct GithubHook {
    /// Shared secret of the webhook; when set, every delivery must be signed with it.
    pub secret: Option<String>,
    /// Commit messages matching any of these are not built.
    pub skips: Vec<Regex>,
    pub codebase: String,
    /// `merge` or `head`: which `refs/pull/<n>/…` ref a pull request builds.
    pub pullrequest_ref: String,
}

/// Buildbot's default skip patterns.
pub fn default_skips() -> Vec<Regex> {
    vec![Regex::new(r"\[ *skip *ci *\]").expect("valid"), Regex::new(r"\[ *ci *skip *\]").expect("valid")]
}

/// Checks a delivery's signature. With a secret configured, an unsigned delivery is refused
/// (`Unauthenticated`) and a wrongly signed one rejected (`Forbidden`); `X-Hub-Signature-256`
/// (HMAC-SHA256) is preferred, the legacy `X-Hub-Signature` (HMAC-SHA1) accepted.
pub fn verify_signature(
    secret: Option<&str>,
    body: &[u8],
    sha256: Option<&str>,
    sha1: Option<&str>,
) -> Result<(), HookError> {
    let Some(secret) = secret else { return Ok(()) };
    let valid = if let Some(signature) = sha256 {
        let hex = signature.strip_prefix("sha256=").ok_or(HookError::Forbidden("malformed X-Hub-Signature-256"))?;
        let expected = hex::decode(hex).map_err(|_| HookError::Forbidden("malformed X-Hub-Signature-256"))?;
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
        mac.update(body);
        mac.verify_slice(&expected).is_ok()
    } else if let Some(signature) = sha1 {
        let hex = signature.strip_prefix("sha1=").ok_or(HookError::Forbidden("malformed X-Hub-Signature"))?;
        let expected = hex::decode(hex).map_err(|_| HookError::Forbidden("malformed X-Hub-Signature"))?;
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
        mac.update(body);
        mac.verify_slice(&expected).is_ok()
    } else {
        return Err(HookError::Unauthenticated("the delivery is not signed; the hook has a secret"));
    };
    if valid { Ok(()) } else { Err(HookError::Forbidden("the signature does not match the secret")) }
}

fn text<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(value, |v, key| v.get(key)).and_then(Value::as_str)
}

fn required<'a>(value: &'a Value, path: &[&str]) -> Result<&'a str, HookError> {
    text(value, path).ok_or_else(|| HookError::BadPayload(format!("missing {}", path.join("."))))
}

impl GithubHook {
    fn skipped(&self, message: &str) -> bool {
        self.skips.iter().any(|r| r.is_match(message))
    }

    /// The changes a delivery of event `event` describes.
    pub fn changes(&self, event: &str, payload: &Value) -> Result<Vec<NewChange>, HookError> {
        match event {
            "ping" => Ok(Vec::new()),
            "push" => self.push(payload),
            "pull_request" => self.pull_request(payload),
            other => Err(HookError::BadPayload(format!("Unknown event: {other}"))),
        }
    }

    fn push(&self, payload: &Value) -> Result<Vec<NewChange>, HookError> {
        let reference = required(payload, &["ref"])?;
        let (branch, category) = if let Some(branch) = reference.strip_prefix("refs/heads/") {
            (branch, None)
        } else if let Some(tag) = reference.strip_prefix("refs/tags/") {
            (tag, Some("tag".to_owned()))
        } else {
            return Ok(Vec::new());
        };
        if payload.get("deleted").and_then(Value::as_bool).unwrap_or(false) {
            return Ok(Vec::new());
        }
        if let Some(message) = text(payload, &["head_commit", "message"])
            && self.skipped(message)
        {
            return Ok(Vec::new());
        }
        let repository = required(payload, &["repository", "html_url"])?.to_owned();
        let project = text(payload, &["repository", "full_name"]).unwrap_or_default().to_owned();
        // A newly created ref reports its whole history in `commits`; only its head is new work.
        let created = payload.get("created").and_then(Value::as_bool).unwrap_or(false);
        let commits: Vec<&Value> = if created {
            payload.get("head_commit").filter(|c| !c.is_null()).into_iter().collect()
        } else {
            payload.get("commits").and_then(Value::as_array).map(|c| c.iter().collect()).unwrap_or_default()
        };
        commits
            .into_iter()
            .map(|commit| {
                let mut files = Vec::new();
                for kind in ["added", "modified", "removed"] {
                    if let Some(list) = commit.get(kind).and_then(Value::as_array) {
                        files.extend(list.iter().filter_map(Value::as_str).map(str::to_owned));
                    }
                }
                let mut properties = Properties::new();
                properties.set("event", Value::from("push"), "Change");
                if let Some(distinct) = commit.get("distinct").and_then(Value::as_bool) {
                    properties.set("github_distinct", Value::from(distinct), "Change");
                }
                Ok(NewChange {
                    author: person(commit.get("author")),
                    committer: Some(person(commit.get("committer"))).filter(|c| !c.is_empty()),
                    comments: text(commit, &["message"]).unwrap_or_default().to_owned(),
                    branch: Some(branch.to_owned()),
                    revision: Some(required(commit, &["id"])?.to_owned()),
                    revlink: text(commit, &["url"]).map(str::to_owned),
                    when_ms: text(commit, &["timestamp"]).map(iso_time_ms).transpose()?,
                    category: category.clone(),
                    repository: repository.clone(),
                    codebase: self.codebase.clone(),
                    project: project.clone(),
                    files,
                    properties,
                })
            })
            .collect()
    }

    fn pull_request(&self, payload: &Value) -> Result<Vec<NewChange>, HookError> {
        let action = required(payload, &["action"])?;
        if !matches!(action, "opened" | "reopened" | "synchronize") {
            return Ok(Vec::new());
        }
        let pr = payload.get("pull_request").ok_or_else(|| HookError::BadPayload("missing pull_request".into()))?;
        let number = payload.get("number").or_else(|| pr.get("number")).and_then(Value::as_i64).unwrap_or_default();
        let title = text(pr, &["title"]).unwrap_or_default();
        let body = text(pr, &["body"]).unwrap_or_default();
        if self.skipped(title) || self.skipped(body) {
            return Ok(Vec::new());
        }
        let commits = pr.get("commits").and_then(Value::as_i64).unwrap_or(0);
        let mut properties = Properties::new();
        properties.set("event", Value::from("pull_request"), "Change");
        properties.set("pullrequesturl", Value::from(text(pr, &["html_url"]).unwrap_or_default()), "Change");
        properties.set("basename", Value::from(text(pr, &["base", "ref"]).unwrap_or_default()), "Change");
        properties.set("headname", Value::from(text(pr, &["head", "ref"]).unwrap_or_default()), "Change");
        properties.set(
            "headrepository",
            Value::from(text(pr, &["head", "repo", "clone_url"]).unwrap_or_default()),
            "Change",
        );
        let login = text(payload, &["sender", "login"]).or_else(|| text(pr, &["user", "login"])).unwrap_or_default();
        Ok(vec![NewChange {
            author: login.to_owned(),
            committer: None,
            comments: format!(
                "GitHub Pull Request #{number} ({commits} commit{})\n{title}\n{body}",
                if commits == 1 { "" } else { "s" }
            ),
            branch: Some(format!("refs/pull/{number}/{}", self.pullrequest_ref)),
            revision: Some(required(pr, &["head", "sha"])?.to_owned()),
            revlink: text(pr, &["html_url"]).map(str::to_owned),
            when_ms: text(pr, &["updated_at"]).map(iso_time_ms).transpose()?,
            category: Some("pull".into()),
            repository: required(payload, &["repository", "html_url"])?.to_owned(),
            codebase: self.codebase.clone(),
            project: text(pr, &["base", "repo", "full_name"]).unwrap_or_default().to_owned(),
            files: Vec::new(),
            properties,
        }])
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn hook() -> GithubHook {
        GithubHook { secret: None, skips: default_skips(), codebase: String::new(), pullrequest_ref: "merge".into() }
    }

    fn push(extra: Value) -> Value {
        let mut payload = json!({
            "ref": "refs/heads/main",
            "created": false,
            "deleted": false,
            "repository": { "html_url": "https://github.com/o/r", "full_name": "o/r" },
            "head_commit": { "id": "b", "message": "second" },
            "commits": [
                { "id": "a", "message": "first", "timestamp": "2026-01-02T03:04:05Z", "url": "https://github.com/o/r/commit/a",
                  "author": { "name": "Ada", "email": "ada@example.org" }, "committer": { "name": "Ada", "email": "ada@example.org" },
                  "added": ["x.c"], "modified": ["y.c"], "removed": [], "distinct": true },
                { "id": "b", "message": "second", "timestamp": "2026-01-02T05:04:05+02:00",
                  "author": { "name": "Bob", "email": "bob@example.org" }, "added": [], "modified": [], "removed": ["z.c"], "distinct": true }
            ]
        });
        if let (Value::Object(base), Value::Object(extra)) = (&mut payload, extra) {
            base.extend(extra);
        }
        payload
    }

    #[test]
    fn a_push_gives_one_change_per_commit_in_order() {
        let changes = hook().changes("push", &push(json!({}))).unwrap();
        assert_eq!(changes.len(), 2);
        assert_eq!(changes[0].revision.as_deref(), Some("a"));
        assert_eq!(changes[0].author, "Ada <ada@example.org>");
        assert_eq!(changes[0].files, vec!["x.c", "y.c"]);
        assert_eq!(changes[0].branch.as_deref(), Some("main"));
        assert_eq!(changes[0].repository, "https://github.com/o/r");
        assert_eq!(changes[0].project, "o/r");
        assert_eq!(changes[0].when_ms, Some(1_767_323_045_000));
        assert_eq!(changes[1].when_ms, Some(1_767_323_045_000), "offsets are honoured");
        assert_eq!(changes[1].files, vec!["z.c"]);
    }

    #[test]
    fn tags_deletions_creations_and_skips_follow_buildbot() {
        let tag = hook().changes("push", &push(json!({ "ref": "refs/tags/v1" }))).unwrap();
        assert_eq!((tag[0].branch.as_deref(), tag[0].category.as_deref()), (Some("v1"), Some("tag")));
        assert!(hook().changes("push", &push(json!({ "deleted": true }))).unwrap().is_empty());
        let created = hook().changes("push", &push(json!({ "created": true }))).unwrap();
        assert_eq!(created.len(), 1);
        assert_eq!(created[0].revision.as_deref(), Some("b"));
        let skipped = push(json!({ "head_commit": { "id": "b", "message": "docs [ci skip]" } }));
        assert!(hook().changes("push", &skipped).unwrap().is_empty());
        assert!(hook().changes("push", &push(json!({ "ref": "refs/notes/x" }))).unwrap().is_empty());
    }

    #[test]
    fn an_opened_pull_request_builds_its_merge_ref() {
        let payload = json!({
            "action": "opened", "number": 7,
            "sender": { "login": "ada" },
            "repository": { "html_url": "https://github.com/o/r" },
            "pull_request": { "title": "Fix", "body": "Details", "commits": 2, "html_url": "https://github.com/o/r/pull/7",
                              "head": { "sha": "abc", "ref": "fix" }, "base": { "ref": "main", "repo": { "full_name": "o/r" } } }
        });
        let changes = hook().changes("pull_request", &payload).unwrap();
        assert_eq!(changes[0].branch.as_deref(), Some("refs/pull/7/merge"));
        assert_eq!(changes[0].revision.as_deref(), Some("abc"));
        assert_eq!(changes[0].category.as_deref(), Some("pull"));
        assert!(changes[0].comments.starts_with("GitHub Pull Request #7 (2 commits)\nFix"));
        let mut one = payload.clone();
        one["pull_request"]["commits"] = json!(1);
        let changes = hook().changes("pull_request", &one).unwrap();
        assert!(changes[0].comments.starts_with("GitHub Pull Request #7 (1 commit)\nFix"), "{}", changes[0].comments);
        let closed = json!({ "action": "closed", "pull_request": {} });
        assert!(hook().changes("pull_request", &closed).unwrap().is_empty());
    }

    #[test]
    fn signatures_are_required_and_checked_when_a_secret_is_set() {
        let body = b"{}";
        let sign256 = |key: &[u8]| {
            let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
            mac.update(body);
            format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
        };
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(b"s").unwrap();
        mac.update(body);
        let legacy = format!("sha1={}", hex::encode(mac.finalize().into_bytes()));
        assert!(verify_signature(None, body, None, None).is_ok());
        assert!(verify_signature(Some("s"), body, Some(&sign256(b"s")), None).is_ok());
        assert!(verify_signature(Some("s"), body, None, Some(&legacy)).is_ok());
        assert!(matches!(verify_signature(Some("s"), body, None, None), Err(HookError::Unauthenticated(_))));
        assert!(matches!(verify_signature(Some("s"), body, Some(&sign256(b"t")), None), Err(HookError::Forbidden(_))));
        assert!(matches!(verify_signature(Some("s"), body, Some("sha256=zz"), None), Err(HookError::Forbidden(_))));
    }
}
