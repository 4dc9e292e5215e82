//! How failures become HTTP responses: one mapping from store errors to a status and a message a
//! client may read, and the three envelopes the port answers in (the data API's `{"error"}`,
//! JSON-RPC's error object, the change hooks' plain text). Internal causes are logged here and
//! never sent to a client.

use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::store::{DataError, StoreError};

/// JSON-RPC 2.0 error codes.
pub(super) const INVALID_REQUEST: i64 = -32600;
pub(super) const METHOD_NOT_FOUND: i64 = -32601;
pub(super) const INVALID_PARAMS: i64 = -32602;
pub(super) const INTERNAL_ERROR: i64 = -32603;
pub(super) const PARSE_ERROR: i64 = -32700;

/// A failure as a client sees it. Only the client's own mistakes carry text; the rest say what
/// to do, not what went wrong inside.
#[derive(Debug)]
pub enum ApiError {
    NotFound(String),
    BadRequest(String),
    Unauthorized(String),
    Forbidden(String),
    /// The database cannot be reached: try again later.
    Unavailable,
    /// Something failed that the client cannot fix; the cause is in the master's log.
    Internal,
    /// A system the master depends on (a polled repository) failed; the cause is in the log.
    Upstream,
}

impl ApiError {
    /// The meaning of a store failure during `what`, logging what a client must not see.
    pub fn from_store(error: &StoreError, what: &str) -> ApiError {
        match error {
            StoreError::NotFound(thing) => ApiError::NotFound(thing.clone()),
            StoreError::Invalid(reason) => ApiError::BadRequest(reason.clone()),
            error if error.is_unavailable() => {
                tracing::warn!(%error, "{what}: the database is unavailable");
                ApiError::Unavailable
            }
            error => {
                tracing::error!(%error, "{what} failed in the database");
                ApiError::Internal
            }
        }
    }

    /// A failure of a system the master depends on, logged with its cause.
    pub fn upstream(what: &str, cause: &dyn std::fmt::Display) -> ApiError {
        tracing::warn!(%cause, "{what} failed");
        ApiError::Upstream
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Upstream => StatusCode::BAD_GATEWAY,
        }
    }

    /// The text a client reads.
    pub fn message(&self) -> String {
        match self {
            ApiError::NotFound(m) | ApiError::BadRequest(m) | ApiError::Unauthorized(m) | ApiError::Forbidden(m) => {
                m.clone()
            }
            ApiError::Unavailable => "the database is unavailable; try again".into(),
            ApiError::Internal | ApiError::Upstream => "the master's log says why".into(),
        }
    }

    /// As a JSON-RPC error answering request `id`.
    pub fn rpc(&self, id: &Value) -> Response {
        let code = match self {
            ApiError::NotFound(_) | ApiError::Unauthorized(_) | ApiError::Forbidden(_) => INVALID_REQUEST,
            ApiError::BadRequest(_) => INVALID_PARAMS,
            ApiError::Unavailable | ApiError::Internal | ApiError::Upstream => INTERNAL_ERROR,
        };
        rpc_error(self.status(), id, code, self.message())
    }

    /// As plain text (the change hooks' envelope), after `prefix`.
    pub fn text(&self, prefix: &str) -> Response {
        (self.status(), format!("{prefix}{}", self.message())).into_response()
    }
}

/// A JSON-RPC error object with its HTTP status.
pub(super) fn rpc_error(status: StatusCode, id: &Value, code: i64, message: impl Into<String>) -> Response {
    let body = json!({ "jsonrpc": "2.0", "id": id, "error": { "code": code, "message": message.into() } });
    (status, Json(body)).into_response()
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        ApiError::from_store(&error, "the data API")
    }
}

impl From<DataError> for ApiError {
    fn from(error: DataError) -> Self {
        match error {
            DataError::Store(inner) => ApiError::from(StoreError::from(inner)),
            other => ApiError::BadRequest(other.to_string()),
        }
    }
}

/// The data API's envelope, as Buildbot answers: `{"error": "..."}`.
impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": self.message() }).to_string();
        (self.status(), [(header::CONTENT_TYPE, "application/json")], body).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_causes_never_reach_the_client() {
        let corrupt = StoreError::Corrupt("row 7 of secret_table: bad utf-8".into());
        let error = ApiError::from_store(&corrupt, "test");
        assert_eq!(error.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!error.message().contains("secret_table"), "{}", error.message());
        assert!(!ApiError::upstream("polling", &"git: auth failed for https://u:pw@host").message().contains("pw"));
    }

    #[test]
    fn a_clients_mistake_is_a_4xx_with_its_reason() {
        let error = ApiError::from_store(&StoreError::Invalid("priority out of range".into()), "test");
        assert_eq!(error.status(), StatusCode::BAD_REQUEST);
        assert_eq!(error.message(), "priority out of range");
    }
}
