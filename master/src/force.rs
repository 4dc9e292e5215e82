//! A ForceScheduler's custom parameters: their types, defaults and checks, turning what a user
//! submitted into typed build properties. Pure.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

/// One custom parameter of a force scheduler, after Buildbot's parameter classes.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ForceParameter {
    /// The property it sets, and its name in the form.
    pub name: String,
    /// `string`, `text`, `int`, `bool` or `choice`.
    #[serde(rename = "type", default = "default_kind")]
    pub kind: ParameterKind,
    /// Shown in the force form; default: the name.
    #[serde(default)]
    pub label: Option<String>,
    /// The value when none is given.
    #[serde(default)]
    pub default: Option<Value>,
    /// A force without it is refused.
    #[serde(default)]
    pub required: bool,
    /// For `choice`.
    #[serde(default)]
    pub choices: Vec<String>,
    /// For `string` and `text`: the value must match.
    #[serde(default)]
    pub regex: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ParameterKind {
    String,
    Text,
    Int,
    Bool,
    Choice,
}

fn default_kind() -> ParameterKind {
    ParameterKind::String
}

impl ParameterKind {
    /// Buildbot's field type name, for the forceschedulers endpoint.
    pub fn buildbot_type(self) -> &'static str {
        match self {
            ParameterKind::String => "text",
            ParameterKind::Text => "textarea",
            ParameterKind::Int => "int",
            ParameterKind::Bool => "bool",
            ParameterKind::Choice => "list",
        }
    }
}

/// Checks a parameter definition at start-up.
pub fn check_definition(parameter: &ForceParameter) -> Result<(), String> {
    if parameter.kind == ParameterKind::Choice && parameter.choices.is_empty() {
        return Err("a choice needs choices".into());
    }
    if let Some(pattern) = &parameter.regex {
        regex::Regex::new(pattern).map_err(|e| format!("regex: {e}"))?;
    }
    if let Some(default) = &parameter.default {
        coerce(parameter, default).map_err(|e| format!("default: {e}"))?;
    }
    Ok(())
}

fn coerce(parameter: &ForceParameter, value: &Value) -> Result<Value, String> {
    match parameter.kind {
        ParameterKind::Int => match value {
            Value::Number(n) if n.is_i64() => Ok(value.clone()),
            Value::String(s) => {
                s.trim().parse::<i64>().map(Value::from).map_err(|_| format!("{s:?} is not a whole number"))
            }
            other => Err(format!("{other} is not a whole number")),
        },
        ParameterKind::Bool => match value {
            Value::Bool(_) => Ok(value.clone()),
            Value::String(s) if matches!(s.as_str(), "true" | "on" | "1" | "yes") => Ok(Value::Bool(true)),
            Value::String(s) if matches!(s.as_str(), "false" | "off" | "0" | "no" | "") => Ok(Value::Bool(false)),
            other => Err(format!("{other} is not true or false")),
        },
        ParameterKind::Choice => {
            let text = value.as_str().ok_or_else(|| format!("{value} is not one of the choices"))?;
            if parameter.choices.iter().any(|c| c == text) {
                Ok(value.clone())
            } else {
                Err(format!("{text:?} is not one of {}", parameter.choices.join(", ")))
            }
        }
        ParameterKind::String | ParameterKind::Text => {
            let text = match value {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                other => return Err(format!("{other} is not text")),
            };
            if let Some(pattern) = &parameter.regex {
                let re = regex::Regex::new(pattern).map_err(|e| e.to_string())?;
                if !re.is_match(&text) {
                    return Err(format!("{text:?} does not match {pattern}"));
                }
            }
            Ok(Value::String(text))
        }
    }
}

/// The properties a force sets from its custom parameters: each submitted value checked and
/// typed, defaults for the rest. Errors map each bad field to its reason, as Buildbot reports
/// them.
pub fn properties(
    parameters: &[ForceParameter],
    submitted: &BTreeMap<String, Value>,
) -> Result<Vec<(String, Value)>, BTreeMap<String, String>> {
    let mut properties = Vec::new();
    let mut errors = BTreeMap::new();
    for parameter in parameters {
        let given = submitted.get(&parameter.name).filter(|v| !v.is_null() && *v != &Value::String(String::new()));
        match given.or(parameter.default.as_ref()) {
            Some(value) => match coerce(parameter, value) {
                Ok(value) => properties.push((parameter.name.clone(), value)),
                Err(reason) => {
                    errors.insert(parameter.name.clone(), reason);
                }
            },
            None if parameter.required => {
                errors.insert(parameter.name.clone(), "a value is required".into());
            }
            None => {}
        }
    }
    if errors.is_empty() { Ok(properties) } else { Err(errors) }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parameters() -> Vec<ForceParameter> {
        serde_yaml_ng::from_str(
            r#"
- {name: flavour, type: choice, choices: [debug, release], default: debug}
- {name: jobs, type: int, default: 2}
- {name: deploy, type: bool, default: false}
- {name: ticket, type: string, required: true, regex: "^[A-Z]+-[0-9]+$"}
"#,
        )
        .unwrap()
    }

    fn submit(values: Value) -> Result<Vec<(String, Value)>, BTreeMap<String, String>> {
        let map: BTreeMap<String, Value> = serde_json::from_value(values).unwrap();
        properties(&parameters(), &map)
    }

    #[test]
    fn values_are_typed_and_defaults_fill_the_rest() {
        let props = submit(json!({ "jobs": "8", "deploy": "on", "ticket": "KILN-12" })).unwrap();
        assert_eq!(
            props,
            vec![
                ("flavour".into(), json!("debug")),
                ("jobs".into(), json!(8)),
                ("deploy".into(), json!(true)),
                ("ticket".into(), json!("KILN-12")),
            ]
        );
    }

    #[test]
    fn every_bad_field_is_reported() {
        let errors = submit(json!({ "flavour": "fast", "jobs": "many", "deploy": "maybe" })).unwrap_err();
        assert_eq!(errors.keys().collect::<Vec<_>>(), vec!["deploy", "flavour", "jobs", "ticket"]);
        assert_eq!(errors["ticket"], "a value is required");
        let errors = submit(json!({ "ticket": "kiln 12" })).unwrap_err();
        assert!(errors["ticket"].contains("does not match"));
    }

    #[test]
    fn definitions_are_checked() {
        let bad: ForceParameter = serde_yaml_ng::from_str("{name: x, type: choice}").unwrap();
        assert!(check_definition(&bad).is_err());
        let bad_default: ForceParameter = serde_yaml_ng::from_str("{name: x, type: int, default: lots}").unwrap();
        assert!(check_definition(&bad_default).is_err());
    }
}
