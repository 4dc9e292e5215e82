//! Buildbot's change hooks (`/change_hook/<dialect>`). A hook answers 2xx only after the change is
//! stored; a body it cannot read gets 400 with the reason and stores nothing.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::master::{Master, SubmitError};
use crate::properties::Properties;
use crate::store::{NewChange, now_ms};

fn bad_request(reason: impl Into<String>) -> Response {
    (StatusCode::BAD_REQUEST, reason.into()).into_response()
}

pub async fn base(state: State<Arc<Master>>, query: RawQuery, headers: HeaderMap, body: Bytes) -> Response {
    handle(state, "base", query, headers, body).await
}

pub async fn dialect(
    state: State<Arc<Master>>,
    Path(dialect): Path<String>,
    query: RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(state, &dialect, query, headers, body).await
}

async fn handle(
    State(master): State<Arc<Master>>,
    dialect: &str,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let enabled = match dialect {
        "base" => master.config.change_hooks.base,
        _ => false,
    };
    if !enabled {
        return bad_request(format!("The dialect specified, '{dialect}', wasn't whitelisted in change_hook"));
    }
    let fields = match read_fields(query.as_deref(), &headers, &body) {
        Ok(fields) => fields,
        Err(reason) => return bad_request(reason),
    };
    let change = match base_change(&fields) {
        Ok(change) => change,
        Err(reason) => return bad_request(reason),
    };
    match master.add_change(change).await {
        Ok(_) => (StatusCode::OK, "1 change found").into_response(),
        Err(SubmitError::Store(error)) => {
            tracing::error!(%error, "could not store a change");
            (StatusCode::SERVICE_UNAVAILABLE, "Error processing changes: the database is unavailable").into_response()
        }
        Err(error) => bad_request(error.to_string()),
    }
}

/// The hook's fields from the query string and a form or JSON body, as Buildbot reads them.
fn read_fields(query: Option<&str>, headers: &HeaderMap, body: &[u8]) -> Result<HashMap<String, String>, String> {
    let mut fields = HashMap::new();
    if let Some(query) = query {
        let pairs: Vec<(String, String)> = serde_urlencoded_pairs(query.as_bytes())?;
        fields.extend(pairs);
    }
    if body.is_empty() {
        return Ok(fields);
    }
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if content_type.starts_with("application/json") {
        let value: Value = serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))?;
        let Value::Object(map) = value else {
            return Err("the JSON body must be an object".into());
        };
        for (k, v) in map {
            let text = match v {
                Value::String(s) => s,
                Value::Null => continue,
                other => other.to_string(),
            };
            fields.insert(k, text);
        }
    } else if content_type.starts_with("application/x-www-form-urlencoded") || content_type.is_empty() {
        fields.extend(serde_urlencoded_pairs(body)?);
    } else {
        return Err(format!("unsupported content type {content_type:?}: send a form or JSON"));
    }
    Ok(fields)
}

fn serde_urlencoded_pairs(input: &[u8]) -> Result<Vec<(String, String)>, String> {
    serde_urlencoded::from_bytes(input).map_err(|e| format!("the form body is malformed: {e}"))
}

/// Maps Buildbot's base-hook fields to a change.
pub fn base_change(fields: &HashMap<String, String>) -> Result<NewChange, String> {
    let get = |name: &str| fields.get(name).filter(|v| !v.is_empty()).cloned();
    let files = match get("files") {
        None => Vec::new(),
        Some(text) => serde_json::from_str::<Vec<String>>(&text)
            .map_err(|e| format!("files: expected a JSON list of strings: {e}"))?,
    };
    let mut properties = Properties::new();
    if let Some(text) = get("properties") {
        let value: Value =
            serde_json::from_str(&text).map_err(|e| format!("properties: expected a JSON object: {e}"))?;
        let Value::Object(map) = value else {
            return Err("properties: expected a JSON object".into());
        };
        for (k, v) in map {
            properties.set(k, v, "Change");
        }
    }
    let when_ms = match get("when_timestamp").or_else(|| get("when")) {
        None => now_ms(),
        Some(text) => {
            let seconds: f64 =
                text.parse().map_err(|_| format!("when_timestamp: expected epoch seconds, got {text:?}"))?;
            if !seconds.is_finite() || seconds < 0.0 {
                return Err(format!("when_timestamp: expected epoch seconds, got {text:?}"));
            }
            (seconds * 1000.0) as i64
        }
    };
    Ok(NewChange {
        author: get("author").or_else(|| get("who")).unwrap_or_default(),
        committer: get("committer"),
        comments: get("comments").unwrap_or_default(),
        branch: get("branch"),
        revision: get("revision"),
        revlink: get("revlink"),
        when_ms,
        category: get("category"),
        repository: get("repository").unwrap_or_default(),
        codebase: get("codebase").unwrap_or_default(),
        project: get("project").unwrap_or_default(),
        files,
        properties,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn buildbot_fields_map_to_a_change() {
        let change = base_change(&fields(&[
            ("who", "Ada <ada@example.org>"),
            ("revision", "abc"),
            ("branch", "main"),
            ("files", "[\"a.c\", \"b.c\"]"),
            ("properties", "{\"x\": 1}"),
            ("when_timestamp", "1700000000"),
        ]))
        .unwrap();
        assert_eq!(change.author, "Ada <ada@example.org>");
        assert_eq!(change.files, vec!["a.c", "b.c"]);
        assert_eq!(change.properties.get("x"), Some(&Value::from(1)));
        assert_eq!(change.when_ms, 1_700_000_000_000);
    }

    #[test]
    fn malformed_fields_give_a_reason() {
        assert!(base_change(&fields(&[("files", "a.c")])).unwrap_err().starts_with("files:"));
        assert!(base_change(&fields(&[("properties", "[1]")])).unwrap_err().starts_with("properties:"));
        assert!(base_change(&fields(&[("when_timestamp", "soon")])).unwrap_err().starts_with("when_timestamp:"));
    }
}
