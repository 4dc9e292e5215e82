//! The configuration's reference, generated from its types: a JSON Schema that editors validate
//! YAML with, and a Markdown page of every key, so that neither can drift from what the master
//! reads. `docs/configuration.schema.json` and `docs/configuration.md` are their committed copies.

use std::collections::BTreeSet;

use schemars::generate::SchemaSettings;
use serde_json::Value;

use super::Config;

/// The JSON Schema (draft 7, which YAML editors support) of a configuration file.
pub fn schema() -> Value {
    let mut schema = SchemaSettings::draft07().into_generator().into_root_schema_for::<Config>().to_value();
    schema["title"] = Value::from("Kiln master configuration");
    schema
}

/// One key of the reference.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The key's path; `[]` stands for any item of a list, `(type: x)` for one kind of item.
    pub key: String,
    pub kind: String,
    pub default: Option<String>,
    pub description: String,
}

/// Every key the schema allows, depth first, keys of one mapping in alphabetical order.
pub fn entries(schema: &Value) -> Vec<Entry> {
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    walk(schema, schema, "", &mut out, &mut seen);
    out
}

/// The definition a `$ref` (or a lone `allOf` wrapper, draft 7's way to annotate one) points at.
fn resolve<'a>(root: &'a Value, node: &'a Value) -> &'a Value {
    let mut node = node;
    for _ in 0..8 {
        if let Some(reference) = node.get("$ref").and_then(Value::as_str) {
            let name = reference.trim_start_matches("#/definitions/");
            match root["definitions"].get(name) {
                Some(target) => node = target,
                None => return node,
            }
        } else if let Some([only]) = node.get("allOf").and_then(Value::as_array).map(Vec::as_slice) {
            node = only;
        } else {
            return node;
        }
    }
    node
}

fn description(root: &Value, node: &Value) -> String {
    let text = node.get("description").or_else(|| resolve(root, node).get("description"));
    text.and_then(Value::as_str).unwrap_or_default().split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A short human name of a schema's type.
fn kind(root: &Value, node: &Value) -> String {
    let node = resolve(root, node);
    if let Some(values) = node.get("enum").and_then(Value::as_array) {
        let values: Vec<String> = values.iter().filter(|v| !v.is_null()).map(scalar).collect();
        return format!("one of {}", values.join(", "));
    }
    if let Some(constant) = node.get("const") {
        return scalar(constant);
    }
    for combinator in ["oneOf", "anyOf"] {
        if let Some(variants) = node.get(combinator).and_then(Value::as_array) {
            let kinds: Vec<String> = variants
                .iter()
                .filter(|v| v.get("type").and_then(Value::as_str) != Some("null"))
                .map(|v| kind(root, v))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            return kinds.join(" or ");
        }
    }
    let types: Vec<&str> = match node.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).filter(|t| *t != "null").collect(),
        _ => Vec::new(),
    };
    let named = |t: &str| match t {
        "array" => format!("list of {}", node.get("items").map(|i| kind(root, i)).unwrap_or_else(|| "values".into())),
        "object" if node.get("properties").is_none() => match node.get("additionalProperties") {
            Some(Value::Object(_)) => format!("map of {}", kind(root, &node["additionalProperties"])),
            _ => "mapping".into(),
        },
        "object" => "mapping".into(),
        "integer" => match node.get("minimum").and_then(Value::as_f64) {
            Some(min) if min >= 0.0 => "non-negative integer".into(),
            _ => "integer".into(),
        },
        other => other.to_owned(),
    };
    match types.as_slice() {
        [] => "any".into(),
        types => types.iter().map(|t| named(t)).collect::<Vec<_>>().join(" or "),
    }
}

fn scalar(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The object variants of a node: itself, its list items, or the variants of its `oneOf`.
fn objects<'a>(root: &'a Value, node: &'a Value, path: &str) -> Vec<(String, &'a Value)> {
    let node = resolve(root, node);
    if node.get("properties").is_some() {
        return vec![(path.to_owned(), node)];
    }
    if let Some(items) = node.get("items") {
        return objects(root, items, &format!("{path}[]"));
    }
    if let Some(Value::Object(_)) = node.get("additionalProperties") {
        return objects(root, &node["additionalProperties"], &format!("{path}.<name>"));
    }
    let mut out = Vec::new();
    for combinator in ["oneOf", "anyOf"] {
        for variant in node.get(combinator).and_then(Value::as_array).into_iter().flatten() {
            let variant = resolve(root, variant);
            // An internally tagged variant: name it by its tag.
            let tag = variant.get("properties").and_then(Value::as_object).and_then(|properties| {
                properties
                    .iter()
                    .find_map(|(name, p)| p.get("const").map(|c| format!("{path} ({name}: {})", scalar(c))))
            });
            out.extend(objects(root, variant, &tag.unwrap_or_else(|| path.to_owned())));
        }
    }
    out
}

fn walk(root: &Value, node: &Value, path: &str, out: &mut Vec<Entry>, seen: &mut BTreeSet<String>) {
    for (at, object) in objects(root, node, path) {
        let Some(properties) = object.get("properties").and_then(Value::as_object) else { continue };
        for (name, property) in properties {
            let key = if at.is_empty() { name.clone() } else { format!("{at}.{name}") };
            if property.get("const").is_some() || !seen.insert(key.clone()) {
                continue;
            }
            let default = property.get("default").filter(|d| !d.is_null()).map(|d| match d {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            });
            out.push(Entry {
                key: key.clone(),
                kind: kind(root, property),
                default,
                description: description(root, property),
            });
            walk(root, property, &key, out, seen);
        }
    }
}

/// The value `key` has in one of the example configurations, as YAML flow text.
fn example(examples: &[Value], key: &str) -> Option<String> {
    examples.iter().find_map(|document| find(document, &segments(key))).map(|value| {
        let text = serde_json::to_string(&value).unwrap_or_default();
        if text.len() > 60 { format!("{}…", text.chars().take(57).collect::<String>()) } else { text }
    })
}

/// A reference key's steps: names, `[]` for any item, `(tag: value)` for an item of that kind.
fn segments(key: &str) -> Vec<String> {
    let mut out = Vec::new();
    for part in key.split('.') {
        let (name, tag) = match part.split_once(" (") {
            Some((name, tag)) => (name, Some(tag.trim_end_matches(')'))),
            None => (part, None),
        };
        let (name, list) = match name.strip_suffix("[]") {
            Some(name) => (name, true),
            None => (name, false),
        };
        out.push(name.to_owned());
        if list {
            out.push(match tag {
                Some(tag) => format!("[{tag}]"),
                None => "[]".to_owned(),
            });
        }
    }
    out
}

fn find(value: &Value, segments: &[String]) -> Option<Value> {
    let Some((first, rest)) = segments.split_first() else { return Some(value.clone()) };
    if let Some(tag) = first.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
        let items = value.as_array()?;
        let matches = |item: &&Value| match tag.split_once(": ") {
            Some((name, wanted)) => item.get(name).map(scalar).as_deref() == Some(wanted),
            None => true,
        };
        return items.iter().filter(matches).find_map(|item| find(item, rest));
    }
    if first == "<name>" {
        return value.as_object()?.values().find_map(|v| find(v, rest));
    }
    find(value.get(first)?, rest)
}

/// The reference page: a table per top-level key, each row a key with its type, default,
/// meaning and an example taken from `examples` (the example configurations) when one has it.
pub fn markdown(schema: &Value, examples: &[Value]) -> String {
    let mut out = String::from(
        "# Configuration reference\n\nGenerated from the master's configuration types; edit their doc comments, not this file.\n\
         The same keys as a JSON Schema, for editors: [`configuration.schema.json`](configuration.schema.json).\n\
         Examples come from the configurations in [`config/`](../config/). Durations are in seconds and sizes in bytes\n\
         unless a key says otherwise; `[]` stands for any item of a list.\n",
    );
    let entries = entries(schema);
    let top = |key: &str| key.split(['.', '[', ' ']).next().unwrap_or_default().to_owned();
    // Keys with keys below them get a section each; the plain settings share the first.
    let sectioned: BTreeSet<String> = entries.iter().filter(|e| top(&e.key) != e.key).map(|e| top(&e.key)).collect();
    let mut ordered: Vec<&Entry> = entries.iter().filter(|e| !sectioned.contains(&top(&e.key))).collect();
    ordered.extend(entries.iter().filter(|e| sectioned.contains(&top(&e.key))));
    let mut section = None;
    for entry in ordered {
        let this =
            if sectioned.contains(&top(&entry.key)) { format!("`{}`", top(&entry.key)) } else { "Settings".into() };
        if section.as_ref() != Some(&this) {
            out.push_str(&format!(
                "\n## {this}\n\n| Key | Type | Default | Meaning | Example |\n|---|---|---|---|---|\n"
            ));
            section = Some(this);
        }
        let cell = |text: &str| text.replace('|', "\\|");
        let code = |text: Option<String>| {
            text.map(|t| if t.is_empty() { "`\"\"`".to_owned() } else { format!("`{}`", cell(&t)) }).unwrap_or_default()
        };
        out.push_str(&format!(
            "| `{}` | {} | {} | {} | {} |\n",
            cell(&entry.key),
            cell(&entry.kind),
            code(entry.default.clone()),
            cell(&entry.description),
            code(example(examples, &entry.key)),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docs(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs").join(name)
    }

    fn examples() -> Vec<Value> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
        let mut paths: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        paths.sort();
        paths
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .map(|p| serde_yaml_ng::from_str(&std::fs::read_to_string(p).unwrap()).unwrap())
            .collect()
    }

    #[test]
    fn every_key_is_documented() {
        let undocumented: Vec<String> =
            entries(&schema()).into_iter().filter(|e| e.description.is_empty()).map(|e| e.key).collect();
        assert!(undocumented.is_empty(), "keys without a doc comment: {undocumented:#?}");
    }

    #[test]
    fn the_reference_covers_what_the_examples_use() {
        let keys: Vec<String> = entries(&schema()).into_iter().map(|e| e.key).collect();
        for key in
            ["database", "workers.tokens[].value_env", "builders[].steps", "schedulers[] (type: nightly).timezone"]
        {
            assert!(keys.iter().any(|k| k == key), "{key} is missing from {keys:#?}");
        }
        assert!(keys.iter().any(|k| k.ends_with("shell.haltOnFailure")), "step flags are listed");
        assert_eq!(example(&examples(), "schedulers[] (type: nightly).timezone").as_deref(), Some("\"Europe/Berlin\""));
    }

    /// The committed copies are what the types give; `KILN_WRITE_REFERENCE=1 cargo test -p
    /// kiln-master reference` writes them again after a change.
    #[test]
    fn the_committed_reference_is_current() {
        let schema = schema();
        let json = serde_json::to_string_pretty(&schema).unwrap() + "\n";
        let page = markdown(&schema, &examples());
        if std::env::var_os("KILN_WRITE_REFERENCE").is_some() {
            std::fs::create_dir_all(docs("")).unwrap();
            std::fs::write(docs("configuration.schema.json"), &json).unwrap();
            std::fs::write(docs("configuration.md"), &page).unwrap();
        }
        let stale =
            "is not what the configuration types give: run KILN_WRITE_REFERENCE=1 cargo test -p kiln-master reference";
        assert!(
            std::fs::read_to_string(docs("configuration.schema.json")).ok().as_deref() == Some(&json),
            "docs/configuration.schema.json {stale}"
        );
        assert!(
            std::fs::read_to_string(docs("configuration.md")).ok().as_deref() == Some(&page),
            "docs/configuration.md {stale}"
        );
    }
}
