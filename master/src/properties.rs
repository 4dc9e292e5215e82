//! Build properties (name → value and source) and Buildbot's `Interpolate` syntax for rendering
//! them into step arguments. Pure: no IO.

use std::collections::BTreeMap;

use serde_json::Value;

/// Properties of a build, each a value and the source that set it (`Build`, `Scheduler`, …).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Properties {
    values: BTreeMap<String, (Value, String)>,
}

impl Properties {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set(&mut self, name: impl Into<String>, value: Value, source: impl Into<String>) {
        self.values.insert(name.into(), (value, source.into()));
    }

    pub fn get(&self, name: &str) -> Option<&Value> {
        self.values.get(name).map(|(v, _)| v)
    }

    /// Merges `other` over `self`.
    pub fn update(&mut self, other: &Properties) {
        for (k, v) in &other.values {
            self.values.insert(k.clone(), v.clone());
        }
    }

    /// Buildbot's JSON shape: `{"name": [value, "source"]}`.
    pub fn to_json(&self) -> Value {
        Value::Object(
            self.values
                .iter()
                .map(|(k, (v, s))| (k.clone(), Value::Array(vec![v.clone(), Value::String(s.clone())])))
                .collect(),
        )
    }

    /// Reads Buildbot's JSON shape back; entries of another shape are ignored.
    pub fn from_json(value: &Value) -> Properties {
        let mut props = Properties::new();
        if let Value::Object(map) = value {
            for (k, entry) in map {
                if let Value::Array(pair) = entry
                    && let [v, Value::String(source)] = pair.as_slice()
                {
                    props.set(k.clone(), v.clone(), source.clone());
                }
            }
        }
        props
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value, &str)> {
        self.values.iter().map(|(k, (v, s))| (k.as_str(), v, s.as_str()))
    }
}

/// What a source stamp offers to `%(src:<codebase>:<attr>)s`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SourceView {
    pub codebase: String,
    pub branch: Option<String>,
    pub revision: Option<String>,
    pub repository: String,
    pub project: String,
}

impl SourceView {
    fn attr(&self, name: &str) -> Option<Value> {
        let text = |s: &str| Some(Value::String(s.to_owned()));
        match name {
            "branch" => self.branch.as_deref().and_then(text),
            "revision" => self.revision.as_deref().and_then(text),
            "repository" => text(&self.repository),
            "project" => text(&self.project),
            "codebase" => text(&self.codebase),
            _ => None,
        }
    }
}

/// Why a template could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InterpolateError {
    #[error("unterminated %(...)s in {0:?}")]
    Unterminated(String),
    #[error("unknown selector {0:?}: use prop:, src: or kw:")]
    UnknownSelector(String),
    #[error("unknown source attribute {0:?}")]
    UnknownAttribute(String),
}

/// Renders a Buildbot `Interpolate` template: `%(prop:name)s`, `%(src:codebase:attr)s`, with the
/// modifiers `:-default`, `:~default`, `:+replacement`, `:?|present|missing` and
/// `:#?|true|false`. `%%` is a literal percent sign. A missing value without a modifier renders as
/// the empty string (Buildbot's behaviour for absent properties).
pub fn interpolate(template: &str, props: &Properties, sources: &[SourceView]) -> Result<String, InterpolateError> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(pos) = rest.find('%') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(stripped) = after.strip_prefix('%') {
            out.push('%');
            rest = stripped;
            continue;
        }
        let Some(body_start) = after.strip_prefix('(') else {
            out.push('%');
            rest = after;
            continue;
        };
        let Some(end) = find_close(body_start) else {
            return Err(InterpolateError::Unterminated(template.to_owned()));
        };
        let body = &body_start[..end];
        let tail = &body_start[end + 1..];
        let Some(tail) = tail.strip_prefix('s') else {
            return Err(InterpolateError::Unterminated(template.to_owned()));
        };
        out.push_str(&render_selector(body, props, sources)?);
        rest = tail;
    }
    out.push_str(rest);
    Ok(out)
}

/// Checks that a template can render at all — every `%(...)s` closed, every selector and source
/// attribute known — whatever properties a build has.
pub fn check_template(template: &str) -> Result<(), InterpolateError> {
    interpolate(template, &Properties::new(), &[]).map(drop)
}

/// Finds the `)` that closes a selector, allowing nested `%(...)s` in defaults.
fn find_close(body: &str) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in body.char_indices() {
        match c {
            '(' => depth += 1,
            ')' if depth == 0 => return Some(i),
            ')' => depth -= 1,
            _ => {}
        }
    }
    None
}

fn render_selector(body: &str, props: &Properties, sources: &[SourceView]) -> Result<String, InterpolateError> {
    let (selector, rest) = body.split_once(':').ok_or_else(|| InterpolateError::UnknownSelector(body.to_owned()))?;
    // `rest` is `key` then an optional modifier introduced by one of `:-`, `:~`, `:+`, `:?`, `:#?`.
    let (value, modifier) = match selector {
        "prop" => {
            let (key, modifier) = split_modifier(rest);
            (props.get(key).cloned(), modifier)
        }
        "src" => {
            let (codebase, attr_and_mod) = rest.split_once(':').unwrap_or((rest, ""));
            let (attr, modifier) = split_modifier(attr_and_mod);
            let source = sources.iter().find(|s| s.codebase == codebase);
            if !matches!(attr, "branch" | "revision" | "repository" | "project" | "codebase") {
                return Err(InterpolateError::UnknownAttribute(attr.to_owned()));
            }
            (source.and_then(|s| s.attr(attr)), modifier)
        }
        "kw" => {
            let (_, modifier) = split_modifier(rest);
            (None, modifier)
        }
        other => return Err(InterpolateError::UnknownSelector(other.to_owned())),
    };
    let render = |text: &str| interpolate(text, props, sources);
    Ok(match modifier {
        None => value.map(|v| value_to_string(&v)).unwrap_or_default(),
        Some(m) => {
            if let Some(default) = m.strip_prefix('-') {
                match value {
                    Some(v) => value_to_string(&v),
                    None => render(default)?,
                }
            } else if let Some(default) = m.strip_prefix('~') {
                match value {
                    Some(v) if truthy(&v) => value_to_string(&v),
                    _ => render(default)?,
                }
            } else if let Some(replacement) = m.strip_prefix('+') {
                if value.is_some() { render(replacement)? } else { String::new() }
            } else if let Some(alternatives) = m.strip_prefix("#?") {
                let (yes, no) = split_alternatives(alternatives);
                if value.as_ref().is_some_and(truthy) { render(yes)? } else { render(no)? }
            } else if let Some(alternatives) = m.strip_prefix('?') {
                let (yes, no) = split_alternatives(alternatives);
                if value.is_some() { render(yes)? } else { render(no)? }
            } else {
                value.map(|v| value_to_string(&v)).unwrap_or_default()
            }
        }
    })
}

fn split_modifier(text: &str) -> (&str, Option<&str>) {
    match text.find(':') {
        Some(i) => (&text[..i], Some(&text[i + 1..])),
        None => (text, None),
    }
}

/// `|yes|no` → (`yes`, `no`); the first character is the delimiter, as in Buildbot.
fn split_alternatives(text: &str) -> (&str, &str) {
    let mut chars = text.chars();
    let Some(delimiter) = chars.next() else {
        return ("", "");
    };
    let mut parts = chars.as_str().splitn(2, delimiter);
    let yes = parts.next().unwrap_or("");
    let no = parts.next().unwrap_or("").trim_end_matches(delimiter);
    (yes, no)
}

fn truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// How a property value appears inside a rendered string: strings bare, the rest as JSON.
pub fn value_to_string(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn fixture() -> (Properties, Vec<SourceView>) {
        let mut props = Properties::new();
        props.set("name", json!("kiln"), "Builder");
        props.set("count", json!(3), "Build");
        props.set("empty", json!(""), "Build");
        let source = SourceView {
            codebase: String::new(),
            branch: Some("main".into()),
            revision: Some("abc123".into()),
            repository: "https://example.org/r.git".into(),
            project: "p".into(),
        };
        (props, vec![source])
    }

    fn render(template: &str) -> String {
        let (props, sources) = fixture();
        interpolate(template, &props, &sources).unwrap()
    }

    #[test]
    fn properties_and_source_attributes_render() {
        assert_eq!(render("hello %(prop:name)s #%(prop:count)s"), "hello kiln #3");
        assert_eq!(render("%(src::branch)s@%(src::revision)s"), "main@abc123");
        assert_eq!(render("100%% sure"), "100% sure");
    }

    #[test]
    fn defaults_apply_only_when_missing_or_falsy() {
        assert_eq!(render("%(prop:got_revision:-none)s"), "none");
        assert_eq!(render("%(prop:name:-none)s"), "kiln");
        assert_eq!(render("%(prop:empty:-none)s"), "");
        assert_eq!(render("%(prop:empty:~none)s"), "none");
        assert_eq!(render("%(prop:name:+set)s|%(prop:nope:+set)s"), "set|");
        assert_eq!(render("%(prop:name:?|yes|no)s %(prop:nope:?|yes|no)s"), "yes no");
        assert_eq!(render("%(prop:empty:#?|t|f)s"), "f");
        assert_eq!(render("%(prop:nope:-%(prop:name)s)s"), "kiln");
    }

    #[test]
    fn a_missing_property_renders_empty_and_bad_selectors_fail() {
        assert_eq!(render("[%(prop:nope)s]"), "[]");
        let (props, sources) = fixture();
        assert!(matches!(interpolate("%(bogus:x)s", &props, &sources), Err(InterpolateError::UnknownSelector(_))));
        assert!(matches!(interpolate("%(prop:x", &props, &sources), Err(InterpolateError::Unterminated(_))));
        assert!(matches!(interpolate("%(src::colour)s", &props, &sources), Err(InterpolateError::UnknownAttribute(_))));
    }

    #[test]
    fn properties_round_trip_through_buildbots_json_shape() {
        let (props, _) = fixture();
        let json = props.to_json();
        assert_eq!(json["name"], json!(["kiln", "Builder"]));
        assert_eq!(Properties::from_json(&json), props);
    }
}
