//! Buildbot's `base` hook: a change given field by field, as form fields or a JSON object.

use std::collections::HashMap;

use serde_json::Value;

use crate::domain::NewChange;
use crate::properties::Properties;

/// Maps Buildbot's base-hook fields to a change.
pub fn change(fields: &HashMap<String, String>) -> Result<NewChange, String> {
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
        None => None,
        Some(text) => {
            let seconds: f64 =
                text.parse().map_err(|_| format!("when_timestamp: expected epoch seconds, got {text:?}"))?;
            if !seconds.is_finite() || seconds < 0.0 {
                return Err(format!("when_timestamp: expected epoch seconds, got {text:?}"));
            }
            Some((seconds * 1000.0) as i64)
        }
    };
    // Buildbot's database holds no change without an author: its hook fails on one, storing
    // nothing. Say so instead of storing an empty change.
    let Some(author) = get("author").or_else(|| get("who")) else {
        return Err("author: a change needs an author (the field author, or who)".into());
    };
    Ok(NewChange {
        author,
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
        let change = change(&fields(&[
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
        assert_eq!(change.when_ms, Some(1_700_000_000_000));
    }

    #[test]
    fn malformed_fields_give_a_reason() {
        let with_author = |pairs: &[(&str, &str)]| fields(&[pairs, &[("author", "a")]].concat());
        assert!(change(&with_author(&[("files", "a.c")])).unwrap_err().starts_with("files:"));
        assert!(change(&with_author(&[("properties", "[1]")])).unwrap_err().starts_with("properties:"));
        assert!(change(&with_author(&[("when_timestamp", "soon")])).unwrap_err().starts_with("when_timestamp:"));
    }

    #[test]
    fn a_change_without_an_author_is_refused() {
        assert!(change(&fields(&[])).unwrap_err().starts_with("author:"));
        assert!(change(&fields(&[("branch", "main"), ("author", "")])).unwrap_err().starts_with("author:"));
        assert_eq!(change(&fields(&[("who", "w")])).unwrap().author, "w");
    }
}
