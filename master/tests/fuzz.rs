//! A bounded run of every fuzz target on stable Rust: inputs are the seed corpus (real payloads and
//! the example configurations), those seeds mutated byte by byte and structurally (a JSON or YAML
//! node replaced by a value of another type), and plain noise. A target must neither panic nor
//! make one allocation larger than a bound, and every input that once broke one is replayed.
//!
//! The run is reproducible: `KILN_FUZZ_SEED=<n>` picks another part of the input space, and
//! `KILN_FUZZ_CASES=<n>` sets how many inputs each target gets. `scripts/fuzz` runs the same
//! targets under libFuzzer, guided by coverage.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::Once;

use kiln_master::fuzz::TARGETS;
use kiln_proto as pb;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner};
use prost::Message;
use serde_json::Value;

/// Counts the largest single allocation of the current thread, so a case can be checked for an
/// allocation sized by its input rather than by its work.
struct Largest;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every call is passed straight to the system allocator; the thread-local is a
// const-initialised `Cell`, which never allocates.
unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(layout.size())));
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(new_size)));
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Largest = Largest;

/// No input of this harness (at most a few hundred kilobytes) may need one allocation this large.
const ALLOCATION_BOUND: usize = 64 << 20;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace").to_owned()
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut found: Vec<(String, Vec<u8>)> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().is_file())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).expect("a readable seed")))
        .collect();
    found.sort();
    found
}

/// How the body of a target's input is written, for structural mutation.
#[derive(Clone, Copy)]
enum Codec {
    Json,
    Yaml,
    Bytes,
}

/// A target, its framing and its seeds.
struct Target {
    name: &'static str,
    run: fn(&[u8]),
    /// Lines before the body.
    heads: usize,
    codec: Codec,
    seeds: Vec<Vec<u8>>,
}

fn framed(heads: &[&str], body: &[u8]) -> Vec<u8> {
    let mut input: Vec<u8> = heads.iter().flat_map(|h| h.bytes().chain([b'\n'])).collect();
    input.extend_from_slice(body);
    input
}

/// Each target's seeds: its own files under `fuzz/seeds/`, and for the hooks and the config the
/// payloads and examples the other tests use.
fn targets() -> Vec<Target> {
    let root = root();
    let fixtures = |forge: &str| files(&root.join("tests/fixtures").join(forge));
    TARGETS
        .iter()
        .map(|&(name, run)| {
            let mut seeds: Vec<Vec<u8>> = files(&root.join("fuzz/seeds").join(name)).into_iter().map(|f| f.1).collect();
            let (heads, codec) = match name {
                "github_hook" => {
                    for (file, body) in fixtures("github") {
                        let event = match file.trim_end_matches(".json") {
                            "tag" => "push",
                            other => other,
                        };
                        seeds.push(framed(&[event, "application/json", ""], &body));
                    }
                    (3, Codec::Json)
                }
                "gitlab_hook" => {
                    for (_, body) in fixtures("gitlab") {
                        seeds.push(framed(&["codebase=app", "Push Hook"], &body));
                    }
                    (2, Codec::Json)
                }
                "base_hook" => (2, Codec::Bytes),
                "config" => {
                    seeds.extend(files(&root.join("config")).into_iter().map(|f| f.1));
                    (0, Codec::Yaml)
                }
                "jsonrpc" => (1, Codec::Json),
                "rest_query" => (1, Codec::Bytes),
                "interpolate" => (0, Codec::Bytes),
                "worker_message" | "buildbot_message" => (0, Codec::Bytes),
                other => panic!("no framing for the fuzz target {other}"),
            };
            assert!(!seeds.is_empty(), "the fuzz target {name} has no seeds");
            Target { name, run, heads, codec, seeds }
        })
        .collect()
}

/// Text that the parsers give meaning to, for insertion anywhere.
const TOKENS: &[&str] = &[
    "\"",
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "\n",
    " ",
    "\t",
    "\0",
    "%",
    "%(",
    ")s",
    "%(prop:",
    "%(src::",
    "%(kw:",
    ":-",
    ":~",
    ":+",
    ":?|",
    ":#?|",
    "|",
    "%%",
    "&",
    "=",
    "__",
    "__lt",
    "__contains",
    "__ne",
    "%00",
    "%ff",
    "%",
    "+",
    "-",
    "null",
    "true",
    "-1",
    "0",
    "9223372036854775807",
    "-9223372036854775808",
    "18446744073709551616",
    "1e999",
    "refs/heads/",
    "refs/tags/",
    "refs/pull/",
    "*",
    "&a ",
    "*a",
    "<<: *a",
    "---",
    "!!binary ",
    "!!str ",
    "? ",
    "\u{feff}",
    "\u{10ffff}",
    "\\u0000",
    "\\ud800",
    "builderNames",
    "builderid",
    "properties",
    "order",
    "limit",
    "offset",
    "field",
    "property",
];

#[derive(Debug, Clone)]
enum Edit {
    Set(usize, u8),
    Insert(usize, &'static str),
    Remove(usize, usize),
    Repeat(usize, usize, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Edit::Set(at, byte)),
        (any::<usize>(), select(TOKENS)).prop_map(|(at, token)| Edit::Insert(at, token)),
        (any::<usize>(), 1..64usize).prop_map(|(at, len)| Edit::Remove(at, len)),
        (any::<usize>(), 1..32usize, 1..200usize).prop_map(|(at, len, times)| Edit::Repeat(at, len, times)),
    ]
}

fn apply(mut input: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for edit in edits {
        let at = |n: usize| if input.is_empty() { 0 } else { n % (input.len() + 1) };
        match *edit {
            Edit::Set(n, byte) if !input.is_empty() => {
                let i = n % input.len();
                input[i] = byte;
            }
            Edit::Set(..) => input.push(0),
            Edit::Insert(n, token) => {
                let i = at(n);
                input.splice(i..i, token.bytes());
            }
            Edit::Remove(n, len) => {
                let i = at(n);
                input.drain(i..(i + len).min(input.len()));
            }
            Edit::Repeat(n, len, times) => {
                let i = at(n);
                let piece = input[i..(i + len).min(input.len())].to_vec();
                for _ in 0..times {
                    input.splice(i..i, piece.iter().copied());
                }
            }
        }
    }
    input
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        select(TOKENS).prop_map(|t| Value::String(t.to_owned())),
        vec(any::<char>(), 0..24).prop_map(|c| Value::String(c.into_iter().collect())),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::Array),
            vec((select(TOKENS), inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())),
        ]
    })
}

fn nodes(value: &Value) -> usize {
    1 + match value {
        Value::Array(items) => items.iter().map(nodes).sum(),
        Value::Object(map) => map.values().map(nodes).sum(),
        _ => 0,
    }
}

/// Replaces the node at preorder position `at % nodes` (0 is the root); a replacement of `None`
/// removes the node from its parent.
fn replace_node(value: &mut Value, at: usize, with: Option<Value>) {
    let mut left = at % nodes(value);
    if left == 0 {
        *value = with.unwrap_or(Value::Null);
        return;
    }
    visit(value, &mut left, &mut Some(with));
}

/// Walks the children of `value` in preorder, counting `left` down to the one to change.
fn visit(value: &mut Value, left: &mut usize, with: &mut Option<Option<Value>>) {
    match value {
        Value::Array(items) => {
            for i in 0..items.len() {
                *left -= 1;
                if *left == 0 {
                    match with.take().flatten() {
                        Some(replacement) => items[i] = replacement,
                        None => drop(items.remove(i)),
                    }
                    return;
                }
                visit(&mut items[i], left, with);
                if with.is_none() {
                    return;
                }
            }
        }
        Value::Object(map) => {
            let keys: Vec<String> = map.keys().cloned().collect();
            for key in keys {
                *left -= 1;
                if *left == 0 {
                    match with.take().flatten() {
                        Some(replacement) => drop(map.insert(key, replacement)),
                        None => drop(map.remove(&key)),
                    }
                    return;
                }
                visit(map.get_mut(&key).expect("a key just listed"), left, with);
                if with.is_none() {
                    return;
                }
            }
        }
        _ => {}
    }
}

/// A seed whose body was decoded, changed at a few nodes and written again.
fn structural(framing: (usize, Codec), seed: &[u8], changes: &[(usize, Option<Value>)]) -> Vec<u8> {
    let (lines, codec) = framing;
    let mut heads = Vec::new();
    let mut body = seed;
    for _ in 0..lines {
        let end = body.iter().position(|b| *b == b'\n').map_or(body.len(), |i| i + 1);
        heads.extend_from_slice(&body[..end]);
        body = &body[end..];
    }
    let decoded: Option<Value> = match codec {
        Codec::Json => serde_json::from_slice(body).ok(),
        Codec::Yaml => std::str::from_utf8(body).ok().and_then(|text| serde_yaml_ng::from_str(text).ok()),
        Codec::Bytes => None,
    };
    let Some(mut value) = decoded else { return seed.to_vec() };
    for (at, with) in changes {
        replace_node(&mut value, *at, with.clone());
    }
    let written = match codec {
        Codec::Yaml => serde_yaml_ng::to_string(&value).unwrap_or_default().into_bytes(),
        _ => serde_json::to_vec(&value).unwrap_or_default(),
    };
    heads.extend_from_slice(&written);
    heads
}

fn inputs(target: &Target) -> BoxedStrategy<Vec<u8>> {
    let seeds = target.seeds.clone();
    let edited = (select(seeds.clone()), vec(edit(), 1..6)).prop_map(|(seed, edits)| apply(seed, &edits));
    let noise = vec(any::<u8>(), 0..512);
    match target.codec {
        Codec::Bytes => prop_oneof![1 => select(seeds), 6 => edited, 2 => noise].boxed(),
        Codec::Json | Codec::Yaml => {
            let framing = (target.heads, target.codec);
            let changed =
                (select(seeds.clone()), vec((any::<usize>(), proptest::option::weighted(0.8, json_value())), 1..4))
                    .prop_map(move |(seed, changes)| structural(framing, &seed, &changes));
            prop_oneof![1 => select(seeds), 4 => edited, 4 => changed, 1 => noise].boxed()
        }
    }
}

fn check(target: &Target, input: &[u8]) -> Result<(), TestCaseError> {
    LARGEST.with(|l| l.set(0));
    (target.run)(input);
    let largest = LARGEST.with(Cell::get);
    if largest > ALLOCATION_BOUND {
        return Err(TestCaseError::fail(format!(
            "one allocation of {largest} bytes for an input of {} bytes",
            input.len()
        )));
    }
    Ok(())
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn fuzz(name: &str) {
    let target = targets().into_iter().find(|t| t.name == name).expect("a known target");
    // Every input that once broke a target is replayed first.
    for (file, input) in files(&root().join("fuzz/regressions").join(name)) {
        let outcome = std::panic::catch_unwind(|| check(&target, &input));
        assert!(matches!(outcome, Ok(Ok(()))), "the regression input fuzz/regressions/{name}/{file} fails again");
    }
    let cases = env_number("KILN_FUZZ_CASES", 3000) as u32;
    let seed = env_number("KILN_FUZZ_SEED", 1);
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..8 + name.len().min(24)].copy_from_slice(&name.as_bytes()[..name.len().min(24)]);
    let config = Config { cases, failure_persistence: None, max_shrink_iters: 2000, ..Config::default() };
    let mut runner = TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &key));
    // Shrinking panics thousands of times: only the report below is printed.
    quiet_panics();
    QUIET.with(|q| q.set(true));
    let result = runner.run(&inputs(&target), |input| check(&target, &input));
    QUIET.with(|q| q.set(false));
    match result {
        Ok(()) => {}
        Err(TestError::Fail(reason, input)) => {
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
            std::fs::create_dir_all(&dir).expect("a directory for the failing input");
            let saved = dir.join(name);
            std::fs::write(&saved, &input).expect("the failing input saved");
            panic!(
                "the fuzz target {name} broke (KILN_FUZZ_SEED={seed}): {reason}\nminimal input, saved as {}; \
                 move it to fuzz/regressions/{name}/ and fix the parser:\n{}",
                saved.display(),
                String::from_utf8_lossy(&input)
            );
        }
        Err(error) => panic!("the fuzz target {name} did not run: {error}"),
    }
}

thread_local! {
    static QUIET: Cell<bool> = const { Cell::new(false) };
}

/// Silences the panics of the threads that set [`QUIET`].
fn quiet_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(Cell::get) {
                default(info);
            }
        }));
    });
}

#[test]
fn github_hook() {
    fuzz("github_hook");
}

#[test]
fn gitlab_hook() {
    fuzz("gitlab_hook");
}

#[test]
fn base_hook() {
    fuzz("base_hook");
}

#[test]
fn config() {
    fuzz("config");
}

#[test]
fn jsonrpc() {
    fuzz("jsonrpc");
}

#[test]
fn rest_query() {
    fuzz("rest_query");
}

#[test]
fn interpolate() {
    fuzz("interpolate");
}

#[test]
fn worker_message() {
    fuzz("worker_message");
}

#[test]
fn buildbot_message() {
    fuzz("buildbot_message");
}

/// Each seed of the worker messages decodes, and between them they carry every kind of message a
/// worker sends, so mutation starts from each.
#[test]
fn worker_message_seeds_cover_every_message() {
    let target = targets().into_iter().find(|t| t.name == "worker_message").expect("the target");
    let mut kinds = std::collections::BTreeSet::new();
    for seed in &target.seeds {
        let message = pb::WorkerMessage::decode(seed.as_slice()).expect("a seed decodes");
        let kind = match message.body.expect("a seed has a body") {
            pb::worker_message::Body::Update(update) => {
                format!("{:?}", update.body.expect("an update body")).split('(').next().unwrap_or_default().to_owned()
            }
            other => format!("{other:?}").split('(').next().unwrap_or_default().to_owned(),
        };
        kinds.insert(kind);
    }
    let expected = [
        "Complete",
        "Draining",
        "Elapsed",
        "FailureReason",
        "FileData",
        "Files",
        "Heartbeat",
        "Output",
        "Property",
        "Rc",
        "Register",
        "Stat",
    ];
    assert_eq!(kinds.into_iter().collect::<Vec<_>>(), expected);
}
