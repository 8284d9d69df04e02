//! The CRD YAML under `crds/` is generated from the Rust types; this fails when they drift.
//! Regenerate with `make crds`.

use std::path::Path;

#[test]
fn committed_crds_match_the_rust_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
    let mut stale = Vec::new();
    for crd in baker::api::crds() {
        let file = dir.join(baker::api::crd_file_name(&crd));
        let expected = serde_yaml::to_string(&crd).expect("CRDs serialise");
        match std::fs::read_to_string(&file) {
            Ok(committed) if committed == expected => {}
            Ok(_) => stale.push(format!("{} differs", file.display())),
            Err(e) => stale.push(format!("{} unreadable: {e}", file.display())),
        }
    }
    assert!(stale.is_empty(), "CRDs out of date (run `make crds`): {stale:?}");
}

#[test]
fn crds_carry_the_admission_rules_users_rely_on() {
    let yaml = baker::api::crds_yaml().expect("CRDs serialise");
    for needle in [
        "spec is immutable",
        "service must be a DNS-1123 label",
        "version must be a package version",
        "set exactly one of source.amiId, source.filter or source.catalog",
        "x-kubernetes-list-map-keys",
    ] {
        assert!(yaml.contains(needle), "CRDs lack {needle:?}");
    }
}
