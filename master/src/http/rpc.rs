//! Buildbot's control API: JSON-RPC 2.0 requests POSTed to data API paths.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::errors::{ApiError, INVALID_PARAMS, INVALID_REQUEST, METHOD_NOT_FOUND, PARSE_ERROR, rpc_error};
use super::login::Sessions;
use crate::config::ControlAccess;
use crate::domain::{SourceStamp, Submitted};
use crate::master::{ControlError, ForceRequest, Master, SubmitError, WorkerAction};
use crate::secrets;

pub async fn post(
    State(master): State<Arc<Master>>,
    axum::Extension(sessions): axum::Extension<Arc<Sessions>>,
    Path(path): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let call = match call(&headers, &body) {
        Ok(call) => call,
        Err(refusal) => return *refusal,
    };
    if !same_origin(&headers) {
        // A page of another site making the user's browser act here (cross-site request
        // forgery), as Buildbot refuses it.
        return rpc_error(StatusCode::FORBIDDEN, &call.id, INVALID_REQUEST, "invalid origin");
    }
    if let Some(refusal) = refuse_unauthorized(&master, &sessions, &headers, &call.id) {
        return refusal;
    }
    let id = &call.id;
    let action = match Action::decode(&path, &call.method, &call.params) {
        Ok(action) => action,
        Err(refusal) => return refusal.answer(id),
    };
    match action {
        Action::Force { scheduler, mut request } => {
            // Logged in to the UI, which then hides "Your name": the session's user owns it.
            let named = ["username", "owner"]
                .iter()
                .any(|k| call.params.get(*k).and_then(Value::as_str).is_some_and(|v| !v.trim().is_empty()));
            if !named && let Some(user) = sessions.user(&headers) {
                request.owner = user;
            }
            force(&master, &scheduler, *request, id).await
        }
        Action::StopBuild(buildid) => reply(id, master.stop_build_by_id(buildid).await.map(|()| Value::Null)),
        Action::Rebuild(buildid) => reply(id, master.rebuild(buildid).await.map(submitted)),
        Action::CancelRequest(brid) => reply(id, master.cancel_request(brid).await.map(|()| Value::Null)),
        Action::SetPriority { brid, priority } => {
            reply(id, master.set_priority(brid, priority).await.map(|()| Value::Null))
        }
        Action::EnableScheduler { schedulerid, enabled } => {
            match master.store.set_scheduler_enabled(schedulerid, enabled).await {
                Ok(Some(name)) => {
                    tracing::info!(scheduler = %name, enabled, "scheduler enabled state changed");
                    reply(id, Ok(Value::Null))
                }
                Ok(None) => Refusal::not_found("scheduler").answer(id),
                Err(error) => reply(id, Err(ControlError::from(error))),
            }
        }
        Action::Worker { worker, action, reason } => {
            let name = match worker {
                WorkerRef::Id(workerid) => match master.store.worker_name(workerid).await {
                    Ok(Some(name)) => name,
                    Ok(None) => return Refusal::not_found("worker").answer(id),
                    Err(error) => return reply(id, Err(ControlError::from(error))),
                },
                WorkerRef::Name(name) => name,
            };
            reply(id, master.worker_action(&name, action, &reason).await.map(|()| Value::Null))
        }
    }
}

/// A control action, decoded from the path it was posted to, its method and its params; nothing
/// has been looked up yet.
#[derive(Debug)]
pub enum Action {
    Force { scheduler: String, request: Box<ForceRequest> },
    StopBuild(i64),
    Rebuild(i64),
    CancelRequest(i64),
    SetPriority { brid: i64, priority: i64 },
    EnableScheduler { schedulerid: i64, enabled: bool },
    Worker { worker: WorkerRef, action: WorkerAction, reason: String },
}

/// A worker named in a path, by id or by name.
#[derive(Debug)]
pub enum WorkerRef {
    Id(i64),
    Name(String),
}

/// Why a call names no action: the JSON-RPC error to answer.
#[derive(Debug)]
pub struct Refusal {
    pub status: StatusCode,
    pub code: i64,
    pub message: String,
}

impl Refusal {
    fn new(status: StatusCode, code: i64, message: impl Into<String>) -> Refusal {
        Refusal { status, code, message: message.into() }
    }

    fn not_found(what: &str) -> Refusal {
        Refusal::new(StatusCode::NOT_FOUND, INVALID_REQUEST, format!("no such {what}"))
    }

    fn invalid(message: impl Into<String>) -> Refusal {
        Refusal::new(StatusCode::BAD_REQUEST, INVALID_PARAMS, message)
    }

    /// The JSON-RPC error answering call `id`.
    fn answer(self, id: &Value) -> Response {
        rpc_error(self.status, id, self.code, self.message)
    }
}

impl Action {
    /// Decodes a call as Buildbot's control endpoints read it.
    pub fn decode(path: &str, method: &str, params: &Value) -> Result<Action, Refusal> {
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let undefined =
            || Refusal::new(StatusCode::BAD_REQUEST, METHOD_NOT_FOUND, format!("action '{method}' is not defined"));
        let number = |text: &str, what: &str| text.parse::<i64>().map_err(|_| Refusal::not_found(what));
        Ok(match (segments.as_slice(), method) {
            (["forceschedulers", name], "force") => Action::Force {
                scheduler: (*name).to_owned(),
                request: Box::new(decode_force(params).map_err(Refusal::invalid)?),
            },
            (["builds", build], "stop") => Action::StopBuild(number(build, "build")?),
            (["builds", build], "rebuild") => Action::Rebuild(number(build, "build")?),
            (["buildrequests", request], "cancel") => Action::CancelRequest(number(request, "build request")?),
            (["buildrequests", request], "set_priority") => {
                let priority = match params.get("priority") {
                    Some(Value::Number(n)) if n.is_i64() => n.as_i64().unwrap_or_default(),
                    Some(Value::String(s)) if s.parse::<i64>().is_ok() => s.parse().unwrap_or_default(),
                    _ => return Err(Refusal::invalid("priority: expected an integer")),
                };
                Action::SetPriority { brid: number(request, "build request")?, priority }
            }
            (["schedulers", scheduler], "enable") => {
                let Some(enabled) = params.get("enabled").and_then(Value::as_bool) else {
                    return Err(Refusal::invalid("enabled: expected true or false"));
                };
                Action::EnableScheduler { schedulerid: number(scheduler, "scheduler")?, enabled }
            }
            (["workers", worker], method) => {
                let action = WorkerAction::parse(method).ok_or_else(undefined)?;
                let worker = match worker.parse::<i64>() {
                    Ok(workerid) => WorkerRef::Id(workerid),
                    Err(_) => WorkerRef::Name((*worker).to_owned()),
                };
                let reason = text_param(params, "reason").ok().flatten().unwrap_or_else(|| "no reason given".into());
                Action::Worker { worker, action, reason }
            }
            (["forceschedulers" | "builds" | "buildrequests" | "schedulers", _], _) => return Err(undefined()),
            _ => {
                return Err(Refusal::new(
                    StatusCode::NOT_FOUND,
                    INVALID_REQUEST,
                    format!("no control endpoint for /{path}"),
                ));
            }
        })
    }
}

/// Whether a request comes from a page of this master, or from no page at all: a browser names
/// the page's origin in `Origin`, whose host and port must be those the request was sent to.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else { return true };
    let origin = origin.to_str().unwrap_or_default();
    let authority = origin.split_once("://").map_or("", |(_, rest)| rest).trim_end_matches('/');
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or_default();
    !authority.is_empty() && authority.eq_ignore_ascii_case(host)
}

/// Checks the credentials of a control action when the configuration asks for them (a token, a
/// user's password, or a user's session from the web UI); returns the refusal to send when they
/// are missing or wrong.
fn refuse_unauthorized(master: &Master, sessions: &Sessions, headers: &HeaderMap, id: &Value) -> Option<Response> {
    let (tokens, users) = match master.config.control_access() {
        ControlAccess::Open => return None,
        ControlAccess::Closed => {
            let reason = "control actions are closed: this master's configuration gives no http.auth";
            return Some(rpc_error(StatusCode::FORBIDDEN, id, INVALID_REQUEST, reason));
        }
        ControlAccess::Credentials { tokens, users } => (tokens, users),
    };
    let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("");
    let admitted = if given.is_empty() {
        // The web UI, logged in: its session cookie (the origin was checked above).
        sessions.user(headers).is_some()
    } else if let Some(token) = given.strip_prefix("Bearer ") {
        secrets::matches_any(&tokens, token.trim())
    } else if let Some(encoded) = given.strip_prefix("Basic ") {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .is_some_and(|pair| secrets::matches_any(&users, &pair))
    } else {
        false
    };
    if admitted {
        return None;
    }
    if headers.contains_key(header::ORIGIN) {
        // A page (the web UI): a challenge would make the browser ask for a password for this
        // one call; the UI's own Login link is the way in.
        let reason = "control actions need valid credentials: log in first";
        return Some(rpc_error(StatusCode::FORBIDDEN, id, INVALID_REQUEST, reason));
    }
    let status = if given.is_empty() { StatusCode::UNAUTHORIZED } else { StatusCode::FORBIDDEN };
    let mut response = rpc_error(status, id, INVALID_REQUEST, "control actions need valid credentials");
    response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Basic realm=\"kiln\""));
    Some(response)
}

/// A JSON-RPC call, decoded.
#[derive(Debug)]
pub struct Call {
    pub id: Value,
    pub method: String,
    pub params: Value,
}

/// Decodes a JSON-RPC request body, or answers why it cannot be.
pub fn call(headers: &HeaderMap, body: &[u8]) -> Result<Call, Box<Response>> {
    let json_body = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json_body {
        return Err(Box::new(rpc_error(
            StatusCode::BAD_REQUEST,
            &Value::Null,
            INVALID_REQUEST,
            "the request body must be application/json",
        )));
    }
    let request: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return Err(Box::new(rpc_error(
                StatusCode::BAD_REQUEST,
                &Value::Null,
                PARSE_ERROR,
                format!("invalid JSON: {e}"),
            )));
        }
    };
    let id = request.get("id").cloned().unwrap_or(Value::Null);
    if let Some(place) = nul_in(&request, String::new()) {
        return Err(Box::new(rpc_error(
            StatusCode::BAD_REQUEST,
            &id,
            INVALID_PARAMS,
            format!("{place}: text must not contain NUL bytes"),
        )));
    }
    let Some(method) = request.get("method").and_then(Value::as_str).map(str::to_owned) else {
        return Err(Box::new(rpc_error(StatusCode::BAD_REQUEST, &id, INVALID_REQUEST, "missing method")));
    };
    let params = request.get("params").cloned().unwrap_or_else(|| json!({}));
    if !params.is_object() {
        return Err(Box::new(rpc_error(StatusCode::BAD_REQUEST, &id, INVALID_PARAMS, "params must be an object")));
    }
    Ok(Call { id, method, params })
}

fn submitted(submitted: Submitted) -> Value {
    let map: serde_json::Map<String, Value> =
        submitted.requests.into_iter().map(|r| (r.builderid.to_string(), Value::from(r.brid))).collect();
    json!([submitted.bsid, map])
}

fn reply(id: &Value, outcome: Result<Value, ControlError>) -> Response {
    match outcome {
        Ok(result) => Json(json!({ "jsonrpc": "2.0", "id": id, "result": result })).into_response(),
        Err(ControlError::NotFound(what)) => Refusal::not_found(&what).answer(id),
        Err(ControlError::Finished(why)) => rpc_error(StatusCode::BAD_REQUEST, id, INVALID_PARAMS, why),
        Err(ControlError::Store(error)) => ApiError::from_store(&error, "a control action").rpc(id),
    }
}

/// Where in a JSON value a string (or a key) holds a NUL byte, as a dotted path.
fn nul_in(value: &Value, path: String) -> Option<String> {
    let at = |key: &str| if path.is_empty() { key.to_owned() } else { format!("{path}.{key}") };
    match value {
        Value::String(text) if text.contains('\0') => Some(if path.is_empty() { "body".into() } else { path }),
        Value::Array(items) => items.iter().enumerate().find_map(|(i, item)| nul_in(item, format!("{path}[{i}]"))),
        Value::Object(map) => map.iter().find_map(|(key, item)| {
            if key.contains('\0') { Some(at(&key.replace('\0', "\\0"))) } else { nul_in(item, at(key)) }
        }),
        _ => None,
    }
}

fn text_param(params: &Value, name: &str) -> Result<Option<String>, String> {
    match params.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone()).filter(|s| !s.is_empty())),
        Some(other) => Err(format!("{name}: expected a string, got {other}")),
    }
}

fn decode_force(params: &Value) -> Result<ForceRequest, String> {
    let builderid = match params.get("builderid") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(n.as_i64().ok_or("builderid: expected an integer")?),
        Some(Value::String(s)) => Some(s.parse().map_err(|_| "builderid: expected an integer")?),
        Some(other) => return Err(format!("builderid: expected an integer, got {other}")),
    };
    let builder_names = match params.get("builderNames") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned).ok_or_else(|| "builderNames: expected a list of strings".to_owned()))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err("builderNames: expected a list of strings".into()),
    };
    let priority = match params.get("priority") {
        None | Some(Value::Null) => 0,
        Some(Value::Number(n)) => n.as_i64().ok_or("priority: expected an integer")?,
        Some(Value::String(s)) if s.is_empty() => 0,
        Some(Value::String(s)) => s.parse().map_err(|_| "priority: expected an integer")?,
        Some(other) => return Err(format!("priority: expected an integer, got {other}")),
    };
    let known = [
        "builderid",
        "builderNames",
        "priority",
        "username",
        "owner",
        "reason",
        "branch",
        "revision",
        "repository",
        "project",
        "codebase",
    ];
    let properties = params
        .as_object()
        .map(|o| o.iter().filter(|(k, _)| !known.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    Ok(ForceRequest {
        builder_names,
        builderid,
        reason: text_param(params, "reason")?.unwrap_or_else(|| "force build".into()),
        owner: text_param(params, "username")?.or(text_param(params, "owner")?).unwrap_or_else(|| "anonymous".into()),
        priority,
        sourcestamp: SourceStamp {
            branch: text_param(params, "branch")?,
            revision: text_param(params, "revision")?,
            repository: text_param(params, "repository")?.unwrap_or_default(),
            project: text_param(params, "project")?.unwrap_or_default(),
            codebase: text_param(params, "codebase")?.unwrap_or_default(),
        },
        properties,
    })
}

async fn force(master: &Master, scheduler: &str, request: ForceRequest, id: &Value) -> Response {
    match master.force(scheduler, request).await {
        Ok(buildset) => Json(json!({ "jsonrpc": "2.0", "id": id, "result": submitted(buildset) })).into_response(),
        Err(SubmitError::InvalidParameters(errors)) => {
            // Buildbot reports each bad field in the error's message, as an object.
            let body = json!({ "jsonrpc": "2.0", "id": id, "error": { "code": INVALID_PARAMS, "message": errors } });
            (StatusCode::BAD_REQUEST, Json(body)).into_response()
        }
        Err(SubmitError::UnknownScheduler(name)) => {
            rpc_error(StatusCode::NOT_FOUND, id, INVALID_REQUEST, format!("no force scheduler named {name:?}"))
        }
        Err(SubmitError::Store(error)) => ApiError::from_store(&error, "force").rpc(id),
        Err(other) => rpc_error(StatusCode::BAD_REQUEST, id, INVALID_PARAMS, other.to_string()),
    }
}
