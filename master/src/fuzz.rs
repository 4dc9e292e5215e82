//! The parsers that take untrusted input, each behind one entry point that accepts arbitrary
//! bytes and runs them as the server would, without I/O. The fuzz targets and the property tests
//! drive these; none may panic or allocate without bound, whatever the bytes.
//!
//! Inputs that need more than a body carry it in leading lines (an event name, a query string, a
//! content type), so a seed file reads as the request it stands for.

use std::sync::OnceLock;

use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use serde_json::json;

use crate::changes::github::{GithubHook, default_skips, verify_signature};
use crate::config::Config;
use crate::domain::NewChange;
use crate::http::{hooks, rest, rpc};
use crate::properties::{Properties, SourceView, interpolate};
use crate::store::{Resource, Select};

/// A fuzz target: it takes any bytes and must return.
pub type Target = fn(&[u8]);

/// Every target, by the name its seeds and fuzz binary carry.
pub const TARGETS: [(&str, Target); 9] = [
    ("github_hook", github_hook),
    ("gitlab_hook", gitlab_hook),
    ("base_hook", base_hook),
    ("config", config),
    ("jsonrpc", jsonrpc),
    ("rest_query", rest_query),
    ("interpolate", interpolate_template),
    ("worker_message", worker_message),
    ("buildbot_message", buildbot_message),
];

/// Splits off the first `N` lines; what remains is the body.
fn lines<const N: usize>(data: &[u8]) -> ([&str; N], &[u8]) {
    let mut heads = [""; N];
    let mut rest = data;
    for head in &mut heads {
        let (line, tail) = match rest.iter().position(|b| *b == b'\n') {
            Some(at) => (&rest[..at], &rest[at + 1..]),
            None => (rest, &rest[rest.len()..]),
        };
        *head = std::str::from_utf8(line).unwrap_or("");
        rest = tail;
    }
    (heads, rest)
}

/// Headers as the HTTP layer hands them over: a value that HTTP could not carry is absent.
fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(*name), HeaderValue::from_str(value)) {
            map.insert(name, value);
        }
    }
    map
}

/// What the hook handler checks of parsed changes before storing them.
fn inspect(changes: Vec<NewChange>) {
    for change in &changes {
        let _ = change.nul_field();
    }
}

/// Lines: `X-GitHub-Event`, `Content-Type`, `X-Hub-Signature-256`; then the body.
pub fn github_hook(data: &[u8]) {
    let ([event, kind, signature], body) = lines::<3>(data);
    let _ = verify_signature(Some("fuzz"), body, Some(signature), None);
    // Built once: compiling its skip patterns would otherwise be most of each run.
    static HOOK: OnceLock<GithubHook> = OnceLock::new();
    let hook = HOOK.get_or_init(|| GithubHook {
        secret: None,
        skips: default_skips(),
        codebase: String::new(),
        pullrequest_ref: "merge".into(),
    });
    let headers = headers(&[("x-github-event", event), (header::CONTENT_TYPE.as_str(), kind)]);
    if let Ok(changes) = hooks::github_changes(hook, &headers, body) {
        inspect(changes);
    }
}

/// Lines: the query string, `X-Gitlab-Event`; then the body.
pub fn gitlab_hook(data: &[u8]) {
    let ([query, event], body) = lines::<2>(data);
    let headers = headers(&[("x-gitlab-event", event)]);
    if let Ok(changes) = hooks::gitlab_changes(None, Some(query), &headers, body) {
        inspect(changes);
    }
}

/// Lines: the query string, `Content-Type`; then the body.
pub fn base_hook(data: &[u8]) {
    let ([query, kind], body) = lines::<2>(data);
    let headers = headers(&[(header::CONTENT_TYPE.as_str(), kind)]);
    if let Ok(changes) = hooks::base_changes(Some(query).filter(|q| !q.is_empty()), &headers, body) {
        inspect(changes);
    }
}

/// The whole input is a configuration file.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match Config::parse("fuzz.yaml", text) {
        Ok(config) => {
            let _ = crate::plan::Plan::compile(&config);
            let _ = config.control_access();
            let _ = config.open_api_warning();
            let _ = config.worker_tokens();
        }
        Err(error) => {
            let _ = error.to_string();
        }
    }
}

/// Line: the path posted to (`builds/1`); then the JSON-RPC body.
pub fn jsonrpc(data: &[u8]) {
    let ([path], body) = lines::<1>(data);
    let headers = headers(&[(header::CONTENT_TYPE.as_str(), "application/json")]);
    if let Ok(call) = rpc::call(&headers, body) {
        let _ = rpc::Action::decode(path, &call.method, &call.params);
    }
}

/// Line: a collection (`builds`); then the query string. A query that parses must become SQL
/// whose placeholders are exactly the values it binds.
pub fn rest_query(data: &[u8]) {
    let ([name], query) = lines::<1>(data);
    let resource = Resource::from_plural(name).unwrap_or(Resource::Builds);
    let Ok(pairs) = serde_urlencoded::from_bytes::<Vec<(String, String)>>(query) else { return };
    let Ok(params) = rest::parse_params(Some(resource), pairs, false) else { return };
    let Ok(select) = Select::new(resource, &params.query) else { return };
    let highest = (1..=select.bind_count() + 1).take_while(|n| select.sql.contains(&format!("${n}"))).count();
    assert_eq!(highest, select.bind_count(), "placeholders and binds disagree in {}", select.sql);
}

/// The whole input is an `Interpolate` template, rendered against a build's usual properties.
pub fn interpolate_template(data: &[u8]) {
    let Ok(template) = std::str::from_utf8(data) else { return };
    let mut props = Properties::new();
    props.set("branch", json!("main"), "Build");
    props.set("buildnumber", json!(7), "Build");
    props.set("empty", json!(""), "Build");
    props.set("flag", json!(false), "Build");
    props.set("list", json!(["a", 1, null]), "Build");
    props.set("nested", json!({ "k": { "v": [1, 2] } }), "Build");
    let sources = [SourceView {
        codebase: String::new(),
        branch: Some("main".into()),
        revision: Some("0123abcd".into()),
        repository: "https://example.com/repo.git".into(),
        project: "repo".into(),
    }];
    let _ = interpolate(template, &props, &sources);
}

/// The whole input is one encoded message from a worker.
pub fn worker_message(data: &[u8]) {
    let _ = crate::grpc::read_message(data);
}

/// The whole input is one WebSocket frame from a Buildbot worker (a MessagePack map).
pub fn buildbot_message(data: &[u8]) {
    let _ = crate::msgpack::read_frame(data);
}
