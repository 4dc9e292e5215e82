//! Change sources: what each hook dialect's payload means as changes. Pure mapping; the HTTP
//! layer reads requests and the master stores the results.

pub mod base;
pub mod github;
pub mod gitlab;

use serde_json::Value;

/// Why a delivery was refused, or left alone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HookError {
    /// A well-formed delivery of an event Kiln does not act on (200, so that the sender does not
    /// count it as a failed delivery).
    #[error("{0}")]
    Ignored(String),
    /// The body or a field could not be read (400).
    #[error("{0}")]
    BadPayload(String),
    /// A secret is configured and the delivery carries no credential (401).
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// The credential does not match the secret (403).
    #[error("{0}")]
    Forbidden(&'static str),
}

/// Buildbot's `Name <email>` from a `{name, email}` object.
pub fn person(value: Option<&Value>) -> String {
    let Some(value) = value else { return String::new() };
    let name = value.get("name").and_then(Value::as_str).unwrap_or_default();
    match value.get("email").and_then(Value::as_str) {
        Some(email) if !email.is_empty() => format!("{name} <{email}>"),
        _ => name.to_owned(),
    }
}

/// Milliseconds since the epoch of an RFC 3339 timestamp such as `2026-01-02T03:04:05+02:00`.
pub fn iso_time_ms(text: &str) -> Result<i64, HookError> {
    let parsed = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|e| HookError::BadPayload(format!("invalid timestamp {text:?}: {e}")))?;
    Ok((parsed.unix_timestamp_nanos() / 1_000_000) as i64)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn people_and_times_read_like_buildbot() {
        assert_eq!(person(Some(&json!({ "name": "Ada", "email": "a@e" }))), "Ada <a@e>");
        assert_eq!(person(Some(&json!({ "name": "Ada" }))), "Ada");
        assert_eq!(iso_time_ms("1970-01-01T00:00:01Z").unwrap(), 1000);
        assert_eq!(iso_time_ms("1970-01-01T01:00:01+01:00").unwrap(), 1000);
        assert!(iso_time_ms("yesterday").is_err());
    }
}
