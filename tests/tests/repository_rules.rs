//! Rules of the repository, checked like any other behaviour.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().filter_map(Result::ok) {
        let path = entry.path();
        let name = entry.file_name();
        if path.is_dir() && name != "target" && !name.to_string_lossy().starts_with('.') {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_module_opens_with_a_line_saying_what_it_owns() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut files = Vec::new();
    rust_files(root, &mut files);
    assert!(files.len() > 20, "found the sources");
    let offenders: Vec<String> = files
        .iter()
        .filter(|f| {
            let text = std::fs::read_to_string(f).unwrap();
            !text.lines().find(|l| !l.trim().is_empty()).is_some_and(|l| l.starts_with("//!"))
        })
        .map(|f| f.strip_prefix(root).unwrap().display().to_string())
        .collect();
    assert!(offenders.is_empty(), "modules without a //! header: {offenders:?}");
}

fn master_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("master/src")
}

/// The source files under `dir`, with their text.
fn sources(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut files = Vec::new();
    rust_files(dir, &mut files);
    files.sort();
    files.into_iter().map(|f| (f.clone(), std::fs::read_to_string(&f).unwrap())).collect()
}

/// `file:line: text` for every line of code (not comment) in `files` that mentions `word` as a
/// path segment (`word::` or `use word`).
fn mentions(files: &[(PathBuf, String)], word: &str) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let pattern = regex_lite(word);
    let mut found = Vec::new();
    for (path, text) in files {
        for (n, line) in text.lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            if pattern(code) {
                found.push(format!("{}:{}: {}", path.strip_prefix(root).unwrap().display(), n + 1, code));
            }
        }
    }
    found
}

/// Whether a line names `word` as a crate or module: `word::…`, `use word;` or `word = …` in a
/// `use` group, at a word boundary.
fn regex_lite(word: &str) -> impl Fn(&str) -> bool + '_ {
    move |line: &str| {
        line.match_indices(word).any(|(at, _)| {
            let before = line[..at].chars().next_back();
            let after = &line[at + word.len()..];
            before.is_none_or(|c| !(c.is_alphanumeric() || c == '_'))
                && (after.starts_with("::") || (line.starts_with("use ") && after.starts_with(';')))
        })
    }
}

#[test]
fn only_the_store_speaks_sql() {
    let outside: Vec<_> =
        sources(&master_src()).into_iter().filter(|(p, _)| !p.starts_with(master_src().join("store"))).collect();
    let offenders = mentions(&outside, "sqlx");
    assert!(offenders.is_empty(), "SQL belongs under master/src/store/:\n{}", offenders.join("\n"));
}

#[test]
fn only_the_grpc_endpoint_and_the_worker_session_know_the_wire_format() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let allowed = [root.join("master/src/grpc.rs"), root.join("worker/src/session.rs")];
    let mut files = sources(&master_src());
    files.extend(sources(&root.join("worker/src")));
    files.retain(|(p, _)| !allowed.contains(p));
    let offenders = mentions(&files, "kiln_proto");
    assert!(offenders.is_empty(), "the wire format is grpc.rs's and session.rs's alone:\n{}", offenders.join("\n"));
}

/// Modules of plain domain logic: no transport, database, cluster, git or HTTP client.
const DOMAIN: &[&str] = &[
    "domain.rs",
    "collapse.rs",
    "schedulers.rs",
    "changes",
    "properties.rs",
    "results.rs",
    "scaling.rs",
    "timed.rs",
    "plan.rs",
    "force.rs",
];

#[test]
fn domain_modules_do_no_io() {
    let files: Vec<_> = sources(&master_src())
        .into_iter()
        .filter(|(p, _)| DOMAIN.iter().any(|d| p.starts_with(master_src().join(d))))
        .collect();
    assert!(files.len() >= DOMAIN.len(), "found the domain modules");
    let offenders: Vec<String> = ["tonic", "axum", "kube", "k8s_openapi", "sqlx", "git2", "reqwest"]
        .iter()
        .flat_map(|word| mentions(&files, word))
        .collect();
    assert!(offenders.is_empty(), "domain modules must do no IO:\n{}", offenders.join("\n"));
}

/// The top-level modules of the master each file uses through `crate::`, with the line.
fn module_uses(files: &[(PathBuf, String)]) -> Vec<(String, String, String)> {
    let mut uses = Vec::new();
    for (path, text) in files {
        let relative = path.strip_prefix(master_src()).unwrap();
        let from =
            relative.components().next().unwrap().as_os_str().to_string_lossy().trim_end_matches(".rs").to_owned();
        let mut group = false;
        for (n, line) in text.lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            let mut targets: Vec<String> = Vec::new();
            for (at, _) in code.match_indices("crate::") {
                let rest = &code[at + "crate::".len()..];
                if let Some(inner) = rest.strip_prefix('{') {
                    group = !inner.contains('}');
                    targets
                        .extend(inner.split(['}', ',']).map(|s| s.trim().split("::").next().unwrap_or("").to_owned()));
                } else {
                    targets
                        .push(rest.split(|c: char| !(c.is_alphanumeric() || c == '_')).next().unwrap_or("").to_owned());
                }
            }
            if group && !code.contains("crate::") {
                targets.extend(code.split(['}', ',']).map(|s| s.trim().split("::").next().unwrap_or("").to_owned()));
                group = !code.contains('}');
            }
            for target in
                targets.into_iter().filter(|t| !t.is_empty() && t.chars().all(|c| c.is_lowercase() || c == '_'))
            {
                if target != from {
                    uses.push((from.clone(), target, format!("{}:{}: {}", relative.display(), n + 1, code)));
                }
            }
        }
    }
    uses
}

#[test]
fn no_two_modules_of_the_master_depend_on_each_other() {
    let uses = module_uses(&sources(&master_src()));
    assert!(uses.iter().any(|(from, to, _)| from == "master" && to == "store"), "read the module graph");
    let edges: std::collections::BTreeMap<(String, String), String> =
        uses.into_iter().map(|(from, to, at)| ((from, to), at)).collect();
    // A circle of any length shows as a path back to where it started.
    let mut circles = Vec::new();
    for ((from, to), at) in &edges {
        let mut seen = std::collections::BTreeSet::new();
        let mut stack = vec![(to.clone(), vec![at.clone()])];
        while let Some((module, path)) = stack.pop() {
            if module == *from {
                circles.push(path.join("\n  then "));
                break;
            }
            if !seen.insert(module.clone()) {
                continue;
            }
            for ((a, b), at) in &edges {
                if *a == module {
                    let mut next = path.clone();
                    next.push(at.clone());
                    stack.push((b.clone(), next));
                }
            }
        }
    }
    assert!(circles.is_empty(), "modules that depend on each other:\n{}", circles.join("\n\n"));
}

#[test]
fn only_the_http_error_module_answers_a_server_error() {
    let http = master_src().join("http");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut offenders = Vec::new();
    for (path, text) in sources(&http).into_iter().filter(|(p, _)| *p != http.join("errors.rs")) {
        for (n, line) in text.lines().enumerate() {
            if ["INTERNAL_SERVER_ERROR", "BAD_GATEWAY"].iter().any(|s| line.contains(s)) {
                offenders.push(format!("{}:{}: {}", path.strip_prefix(root).unwrap().display(), n + 1, line.trim()));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "server errors are answered by master/src/http/errors.rs, which keeps causes out of replies:\n{}",
        offenders.join("\n")
    );
}
