//! Where each key of a YAML document is: the line of every mapping key and sequence item, by the
//! dotted path that configuration errors name (`builders[0].steps[1].shell.command`).

use std::collections::HashMap;

use granit_parser::{Event, Parser};

/// One open collection while walking the document.
enum Open {
    /// A mapping at `path`; `key` is the key whose value comes next, `None` while a key is due.
    Map { path: String, key: Option<String> },
    /// A sequence at `path` and the index of its next item.
    Seq { path: String, next: usize },
}

/// The 1-based line of each key and item of `text`, as far as it parses.
pub fn key_lines(text: &str) -> HashMap<String, usize> {
    let mut lines = HashMap::new();
    let mut stack: Vec<Open> = Vec::new();
    for event in Parser::new_from_str(text) {
        let Ok((event, span)) = event else { break };
        let line = span.start.line();
        match event {
            Event::Scalar(value, ..) if matches!(stack.last(), Some(Open::Map { key: None, .. })) => {
                if let Some(Open::Map { path, key }) = stack.last_mut() {
                    let full = join(path, &value);
                    lines.entry(full).or_insert(line);
                    *key = Some(value.into_owned());
                }
            }
            Event::Scalar(..) | Event::Alias(..) => value_done(&mut stack, &mut lines, line),
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                let path = match stack.last_mut() {
                    None => String::new(),
                    Some(Open::Map { path, key }) => join(path, key.as_deref().unwrap_or("?")),
                    Some(Open::Seq { path, next }) => {
                        let item = format!("{path}[{next}]");
                        lines.entry(item.clone()).or_insert(line);
                        item
                    }
                };
                stack.push(if matches!(event, Event::MappingStart(..)) {
                    Open::Map { path, key: None }
                } else {
                    Open::Seq { path, next: 0 }
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                stack.pop();
                finish_value(&mut stack);
            }
            _ => {}
        }
    }
    lines
}

/// The line of `key`, or of the nearest enclosing key that has one.
pub fn line_of(lines: &HashMap<String, usize>, key: &str) -> Option<usize> {
    let mut key = key;
    loop {
        if let Some(line) = lines.get(key) {
            return Some(*line);
        }
        let cut = key.rfind(['.', '['])?;
        key = &key[..cut];
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_owned() } else { format!("{path}.{key}") }
}

/// A scalar value ends where it starts: a sequence records the item's line.
fn value_done(stack: &mut [Open], lines: &mut HashMap<String, usize>, line: usize) {
    if let Some(Open::Seq { path, next }) = stack.last() {
        lines.entry(format!("{path}[{next}]")).or_insert(line);
    }
    finish_value(stack);
}

/// The value of the innermost collection's current entry is complete.
fn finish_value(stack: &mut [Open]) {
    match stack.last_mut() {
        Some(Open::Map { key, .. }) => *key = None,
        Some(Open::Seq { next, .. }) => *next += 1,
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_items_are_found_by_their_path() {
        let text = "database: x\nbuilders:\n  - name: b\n    steps:\n      - shell:\n          command: [a, b]\n          env: {X: 1}\n      - git: {mode: full}\n";
        let lines = key_lines(text);
        assert_eq!(lines["database"], 1);
        assert_eq!(lines["builders[0]"], 3);
        assert_eq!(lines["builders[0].steps[0].shell.command"], 6);
        assert_eq!(lines["builders[0].steps[0].shell.command[1]"], 6);
        assert_eq!(lines["builders[0].steps[0].shell.env.X"], 7);
        assert_eq!(lines["builders[0].steps[1].git.mode"], 8);
        assert_eq!(line_of(&lines, "builders[0].steps[1].git.repourl"), Some(8), "the nearest enclosing key");
        assert_eq!(line_of(&lines, "nowhere"), None);
    }

    #[test]
    fn a_broken_document_gives_what_came_before() {
        let lines = key_lines("a: 1\nb: [\n");
        assert_eq!(lines.get("a"), Some(&1));
    }
}
