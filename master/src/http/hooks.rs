//! Buildbot's change hooks (`/change_hook/<dialect>`: base, github, gitlab). A hook answers 2xx
//! only after every change of the delivery is stored; a body it cannot read gets 400 with the
//! reason and stores nothing; a delivery that fails the hook's secret gets 401 or 403.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Extension;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::ApiError;
use crate::changes::github::{self, GithubHook};
use crate::changes::{HookError, base, gitlab};
use crate::config::ChangeHooksConfig;
use crate::domain::{Delivery, NewChange};
use crate::master::{Delivered, Master, SubmitError};

/// The hooks a master serves, ready to use (patterns compiled, secrets resolved).
#[derive(Debug)]
pub struct Hooks {
    base: bool,
    github: Option<GithubHook>,
    /// `Some(secret)` when the GitLab hook is enabled.
    gitlab: Option<Option<String>>,
    poller: bool,
}

impl Hooks {
    /// Builds the hooks from a validated configuration.
    pub fn from_config(config: &ChangeHooksConfig) -> Hooks {
        let github = config.github.as_ref().map(|g| GithubHook {
            secret: g.secret(),
            skips: match &g.skips {
                Some(patterns) => patterns.iter().filter_map(|p| regex::Regex::new(p).ok()).collect(),
                None => github::default_skips(),
            },
            codebase: g.codebase.clone(),
            pullrequest_ref: g.pullrequest_ref.clone(),
        });
        Hooks { base: config.base, github, gitlab: config.gitlab.as_ref().map(|g| g.secret()), poller: config.poller }
    }
}

pub async fn base_dialect(
    state: State<Arc<Master>>,
    hooks: Extension<Arc<Hooks>>,
    query: RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(state, hooks, "base", query, headers, body).await
}

pub async fn dialect(
    state: State<Arc<Master>>,
    hooks: Extension<Arc<Hooks>>,
    Path(dialect): Path<String>,
    query: RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(state, hooks, &dialect, query, headers, body).await
}

async fn handle(
    State(master): State<Arc<Master>>,
    Extension(hooks): Extension<Arc<Hooks>>,
    dialect: &str,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if dialect == "poller" && hooks.poller {
        return poll_now(&master, query.as_deref()).await;
    }
    let parsed = match dialect {
        "base" if hooks.base => base_changes(query.as_deref(), &headers, &body),
        "github" => match &hooks.github {
            Some(hook) => github_changes(hook, &headers, &body),
            None => Err(not_enabled(dialect)),
        },
        "gitlab" => match &hooks.gitlab {
            Some(secret) => gitlab_changes(secret.as_deref(), query.as_deref(), &headers, &body),
            None => Err(not_enabled(dialect)),
        },
        _ => Err(not_enabled(dialect)),
    };
    let changes = match parsed {
        Ok(changes) => changes,
        Err(HookError::Ignored(reason)) => {
            tracing::info!(dialect, %reason, "change hook delivery ignored");
            return (StatusCode::OK, reason).into_response();
        }
        Err(error) => {
            tracing::warn!(dialect, %error, "change hook delivery refused");
            let refusal = match error {
                HookError::BadPayload(_) | HookError::Ignored(_) => ApiError::BadRequest(error.to_string()),
                HookError::Unauthenticated(_) => ApiError::Unauthorized(error.to_string()),
                HookError::Forbidden(_) => ApiError::Forbidden(error.to_string()),
            };
            return refusal.text("");
        }
    };
    if let Some((index, field)) = changes.iter().enumerate().find_map(|(i, c)| c.nul_field().map(|f| (i, f))) {
        tracing::warn!(dialect, index, field, "change hook delivery refused: a NUL byte in the text");
        return (StatusCode::BAD_REQUEST, format!("change {index}: {field} must not contain NUL bytes"))
            .into_response();
    }
    if changes.is_empty() {
        return (StatusCode::OK, "no change found").into_response();
    }
    let count = changes.len();
    let added = match delivery(dialect, &headers) {
        Some(delivery) => master.add_delivered_changes(&delivery, changes).await,
        None => master.add_changes(changes).await.map(Delivered::Now),
    };
    match added {
        Ok(Delivered::Now(_)) => (StatusCode::OK, format!("{count} change found")).into_response(),
        Ok(Delivered::Before) => (StatusCode::OK, "already processed").into_response(),
        Err(SubmitError::Store(error)) => {
            ApiError::from_store(&error, "storing a hook's changes").text("Error processing changes: ")
        }
        Err(error) => (StatusCode::BAD_REQUEST, error.to_string()).into_response(),
    }
}

/// The id a sender gives a delivery and repeats when it redelivers it: GitHub's
/// `X-GitHub-Delivery`; GitLab's `Idempotency-Key` (GitLab 17.4 and later), else its
/// `X-Gitlab-Event-UUID`. The base dialect has none.
fn delivery(dialect: &str, headers: &HeaderMap) -> Option<Delivery> {
    let names: &[&str] = match dialect {
        "github" => &["x-github-delivery"],
        "gitlab" => &["idempotency-key", "x-gitlab-event-uuid"],
        _ => &[],
    };
    let id =
        names.iter().find_map(|name| headers.get(*name)?.to_str().ok().map(str::trim).filter(|v| !v.is_empty()))?;
    // An id is a UUID; anything much longer is not one and is not kept.
    (id.len() <= 200).then(|| Delivery { source: dialect.to_owned(), id: id.to_owned() })
}

/// `/change_hook/poller?poller=NAME…`: polls the named pollers (all of them when none is named)
/// before answering, so a 200 means their new commits are stored.
async fn poll_now(master: &Master, query: Option<&str>) -> Response {
    let pairs = match query.map(|q| form_pairs(q.as_bytes())).transpose() {
        Ok(pairs) => pairs.unwrap_or_default(),
        Err(reason) => return (StatusCode::BAD_REQUEST, reason).into_response(),
    };
    let mut names: Vec<String> = pairs.into_iter().filter(|(k, _)| k == "poller").map(|(_, v)| v).collect();
    if names.is_empty() {
        names = master.poller_names();
    }
    let known = master.poller_names();
    if let Some(unknown) = names.iter().find(|n| !known.contains(n)) {
        return (StatusCode::BAD_REQUEST, format!("Could not find pollers: {unknown}")).into_response();
    }
    let mut found = 0;
    for name in &names {
        match master.poll(name).await {
            Ok(count) => found += count,
            Err(error) => {
                return ApiError::upstream(&format!("a forced poll of {name}"), &error)
                    .text(&format!("polling {name} failed: "));
            }
        }
    }
    (StatusCode::OK, format!("{found} change found")).into_response()
}

fn not_enabled(dialect: &str) -> HookError {
    HookError::BadPayload(format!("The dialect specified, '{dialect}', wasn't whitelisted in change_hook"))
}

fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn content_type(headers: &HeaderMap) -> &str {
    header_text(headers, header::CONTENT_TYPE.as_str()).unwrap_or("")
}

pub(crate) fn base_changes(query: Option<&str>, headers: &HeaderMap, body: &[u8]) -> Result<Vec<NewChange>, HookError> {
    let fields = read_fields(query, headers, body).map_err(HookError::BadPayload)?;
    Ok(vec![base::change(&fields).map_err(HookError::BadPayload)?])
}

/// GitHub sends JSON, or a form whose `payload` field holds the JSON.
fn json_payload(headers: &HeaderMap, body: &[u8]) -> Result<Value, HookError> {
    let kind = content_type(headers);
    let json = if kind.starts_with("application/json") {
        body.to_vec()
    } else if kind.starts_with("application/x-www-form-urlencoded") {
        let fields: HashMap<String, String> = form_pairs(body).map_err(HookError::BadPayload)?.into_iter().collect();
        fields
            .get("payload")
            .ok_or_else(|| HookError::BadPayload("the form has no payload field".into()))?
            .clone()
            .into_bytes()
    } else {
        return Err(HookError::BadPayload(format!("unsupported content type {kind:?}")));
    };
    serde_json::from_slice(&json).map_err(|e| HookError::BadPayload(format!("invalid JSON payload: {e}")))
}

pub(crate) fn github_changes(hook: &GithubHook, headers: &HeaderMap, body: &[u8]) -> Result<Vec<NewChange>, HookError> {
    github::verify_signature(
        hook.secret.as_deref(),
        body,
        header_text(headers, "x-hub-signature-256"),
        header_text(headers, "x-hub-signature"),
    )?;
    let event =
        header_text(headers, "x-github-event").ok_or_else(|| HookError::BadPayload("missing X-GitHub-Event".into()))?;
    let payload = json_payload(headers, body)?;
    hook.changes(event, &payload)
}

pub(crate) fn gitlab_changes(
    secret: Option<&str>,
    query: Option<&str>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Vec<NewChange>, HookError> {
    gitlab::verify_token(secret, header_text(headers, "x-gitlab-token"))?;
    let payload: Value =
        serde_json::from_slice(body).map_err(|e| HookError::BadPayload(format!("invalid JSON payload: {e}")))?;
    let event = payload
        .get("object_kind")
        .and_then(Value::as_str)
        .or_else(|| header_text(headers, "x-gitlab-event"))
        .ok_or_else(|| HookError::BadPayload("no object_kind and no X-Gitlab-Event".into()))?
        .to_owned();
    let codebase: String = match query {
        Some(q) => form_pairs(q.as_bytes())
            .map_err(HookError::BadPayload)?
            .into_iter()
            .find(|(k, _)| k == "codebase")
            .map(|(_, v)| v)
            .unwrap_or_default(),
        None => String::new(),
    };
    gitlab::changes(&event, &payload, &codebase)
}

/// The base hook's fields from the query string and a form or JSON body, as Buildbot reads them.
fn read_fields(query: Option<&str>, headers: &HeaderMap, body: &[u8]) -> Result<HashMap<String, String>, String> {
    let mut fields = HashMap::new();
    if let Some(query) = query {
        fields.extend(form_pairs(query.as_bytes())?);
    }
    if body.is_empty() {
        return Ok(fields);
    }
    let kind = content_type(headers);
    if kind.starts_with("application/json") {
        let value: Value = serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))?;
        let Value::Object(map) = value else { return Err("the JSON body must be an object".into()) };
        for (k, v) in map {
            let text = match v {
                Value::String(s) => s,
                Value::Null => continue,
                other => other.to_string(),
            };
            fields.insert(k, text);
        }
    } else if kind.starts_with("application/x-www-form-urlencoded") || kind.is_empty() {
        fields.extend(form_pairs(body)?);
    } else {
        return Err(format!("unsupported content type {kind:?}: send a form or JSON"));
    }
    Ok(fields)
}

fn form_pairs(input: &[u8]) -> Result<Vec<(String, String)>, String> {
    serde_urlencoded::from_bytes(input).map_err(|e| format!("the form body is malformed: {e}"))
}
