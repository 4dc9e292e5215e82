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
            }
            Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
            checked += 1;
        }
    }
    assert!(checked >= 2, "expected the example configs in {}", dir.display());
}
