//! Files committed beside the code that must agree with it: the CRD YAML under `crds/` generated
//! from the Rust types (regenerate with `make crds`), its copy in the Helm chart, and the chart's
//! pinned versions and RBAC comments. Pure: they read the checkout, nothing else.

use std::path::{Path, PathBuf};

use crate::fixtures::read;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn chart_dir() -> PathBuf {
    root().join("charts/baker")
}

#[test]
fn committed_crds_match_the_rust_types() {
    let dir = root().join("crds");
    let mut stale = Vec::new();
    for crd in super::crds() {
        let file = dir.join(super::crd_file_name(&crd));
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
    let yaml = super::crds_yaml().expect("CRDs serialise");
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

/// The sorted file names in `dir`.
fn file_names(dir: &Path) -> Vec<std::ffi::OsString> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .and_then(|entries| entries.map(|e| e.map(|e| e.file_name())).collect())
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()));
    names.sort();
    names
}

#[test]
fn chart_crds_are_the_generated_crds_byte_for_byte() {
    let generated = root().join("crds");
    let copied = chart_dir().join("crds");
    let names = file_names(&generated);
    assert_eq!(
        names,
        file_names(&copied),
        "charts/baker/crds must hold exactly the files of crds/"
    );
    for name in names {
        assert!(
            read(&generated.join(&name)) == read(&copied.join(&name)),
            "charts/baker/crds/{} differs from crds/: run `make chart-crds`",
            name.to_string_lossy()
        );
    }
}

/// The value of `ARG name=value` (or `FROM image:value` for a `FROM` prefix) in a Dockerfile.
fn dockerfile_value(text: &str, prefix: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(prefix))
        .map(|v| v.split_whitespace().next().unwrap_or("").to_string())
}

#[test]
fn chart_defaults_and_dockerfiles_pin_the_same_versions_as_the_crate() {
    let yaml = |file: &str| -> serde_yaml::Value {
        serde_yaml::from_str(&read(&chart_dir().join(file))).expect("the chart's YAML parses")
    };
    let chart = yaml("Chart.yaml");
    let values = yaml("values.yaml");
    let bake = read(&root().join("images/bake.Dockerfile"));
    let operator = read(&root().join("images/operator.Dockerfile"));

    // The operator image's default tag is the chart's appVersion: the crate's version.
    assert_eq!(
        chart["appVersion"].as_str(),
        Some(env!("CARGO_PKG_VERSION")),
        "Chart.yaml appVersion"
    );
    // It is built with the crate's minimum Rust.
    assert_eq!(
        dockerfile_value(&operator, "FROM docker.io/library/rust:").as_deref(),
        Some(format!("{}-bookworm", env!("CARGO_PKG_RUST_VERSION")).as_str()),
        "images/operator.Dockerfile build stage"
    );
    // The default bake image's tag names the Packer the bake Dockerfile pins.
    let packer = dockerfile_value(&bake, "ARG PACKER_VERSION=").expect("PACKER_VERSION");
    let bake_image = values["bakeImage"].as_str().expect("values.yaml bakeImage");
    assert!(
        bake_image.ends_with(&format!(":packer-{packer}")),
        "values.yaml bakeImage {bake_image} is not the bake image of Packer {packer}"
    );
}

#[test]
fn every_rbac_rule_of_the_chart_has_a_comment_naming_its_code() {
    for file in [
        "clusterrole.yaml",
        "role-bake-namespaces.yaml",
        "role-leader-election.yaml",
    ] {
        let text = read(&chart_dir().join("templates").join(file));
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if line.trim_start().starts_with("- apiGroups:") {
                let above = lines[..i].last().map(|l| l.trim_start()).unwrap_or("");
                assert!(above.starts_with('#'), "{file}:{}: rule without a comment", i + 1);
            }
        }
    }
}
