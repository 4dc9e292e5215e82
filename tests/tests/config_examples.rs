//! Every example configuration in `config/` parses and validates.

use std::path::Path;

use kiln_master::config::Config;

#[test]
fn every_example_config_is_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            // Example configs may name tokens by environment variable; give them one.
            // SAFETY: this test binary runs this test alone on its thread before reading the env.
            unsafe {
                std::env::set_var("KILN_WORKER_TOKEN", "example");
                std::env::set_var("KILN_API_TOKEN", "example");
                std::env::set_var("GITHUB_HOOK_SECRET", "example");
                std::env::set_var("GITHUB_TOKEN", "example");
                std::env::set_var("CHAT_HOOK_TOKEN", "example");
                std::env::set_var("MAC_MINI_1_PASSWORD", "example");
                std::env::set_var("ARM_BOARD_PASSWORD", "example");
            }
            Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
            checked += 1;
        }
    }
    assert!(checked >= 2, "expected the example configs in {}", dir.display());
}

/// The published JSON Schema accepts every example and refuses a mistyped key, checked by a JSON
/// Schema validator nobody here wrote (Python's `jsonschema`, as editors' YAML plugins use).
#[test]
fn the_published_schema_accepts_the_examples_and_refuses_a_mistyped_key() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = root.join("target/tools/venv/bin/python");
    let dir = tempfile::tempdir().unwrap();
    let mistyped = dir.path().join("mistyped.yaml");
    let example = std::fs::read_to_string(root.join("config/quickstart.yaml")).unwrap();
    std::fs::write(&mistyped, example.replacen("builders:", "buildres: []\nbuilders:", 1)).unwrap();
    let script = r#"
import json, sys, yaml, jsonschema
schema = json.load(open(sys.argv[1]))
jsonschema.Draft7Validator.check_schema(schema)
validator = jsonschema.Draft7Validator(schema)
for path in sys.argv[2:]:
    errors = list(validator.iter_errors(yaml.safe_load(open(path))))
    print(path, "invalid" if errors else "valid", "; ".join(e.message for e in errors)[:300])
"#;
    let mut examples: Vec<_> = std::fs::read_dir(root.join("config"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    examples.sort();
    let output = std::process::Command::new(&python)
        .arg("-c")
        .arg(script)
        .arg(root.join("docs/configuration.schema.json"))
        .args(&examples)
        .arg(&mistyped)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (scripts/test installs it)", python.display()));
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{report}{}", String::from_utf8_lossy(&output.stderr));
    for example in &examples {
        assert!(report.contains(&format!("{} valid", example.display())), "{report}");
    }
    assert!(report.contains(&format!("{} invalid", mistyped.display())) && report.contains("buildres"), "{report}");
}
