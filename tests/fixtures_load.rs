//! Every committed model fixture opens through the runtime layer: manifest, sizes, the recorded
//! digest against the files' content, and a session per graph whose I/O matches the manifest.

use std::path::Path;

use cip::runtime::{Family, ModelDir, SessionConfig};

fn check(name: &str, family: Family) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let model = ModelDir::open(&dir, Some(family)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let deep = model
        .verify_deep()
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(deep.files > 0);
    let roles: Vec<String> = model.manifest().graphs.keys().cloned().collect();
    assert!(!roles.is_empty(), "{name} declares no graphs");
    for role in roles {
        model
            .session(&role, &SessionConfig::default())
            .unwrap_or_else(|e| panic!("{name}/{role}: {e}"));
    }
}

#[test]
fn sd_tiny_loads() {
    check("sd-tiny", Family::Sd);
}

#[test]
fn blip2_tiny_loads() {
    check("blip2-tiny", Family::Blip2);
}

#[test]
fn vit_gpt2_tiny_loads() {
    check("vit-gpt2-tiny", Family::VitGpt2);
}

#[test]
fn resnet_tiny_loads() {
    check("resnet-tiny", Family::Classifier);
}
