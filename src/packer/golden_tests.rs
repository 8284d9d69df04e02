//! Golden files for the Packer templates rendered from the shipped example templates, for both
//! builders and both virtualization types. Regenerate with `BAKER_UPDATE_GOLDEN=1 cargo test
//! --lib golden` and review the diff.
//!
//! Rendered by `cli::render_from_files`, the whole of `baker template render` but the printing,
//! so the files are what a person gets at the command line. The e2e test `packer_validate` renders
//! the combinations these files cover through the binary itself, and validates them.

use std::path::Path;

use crate::fixtures::read;

/// Every builder x virtualization type combination, as (example template, virtualization type).
const COMBINATIONS: [(&str, &str); 4] = [
    ("ebs-example", "hvm"),
    ("ebs-example", "paravirtual"),
    ("chroot-example", "hvm"),
    ("chroot-example", "paravirtual"),
];

/// Renders `examples/templates/<template>.yaml` for the Bake in `tests/golden/bake.yaml` with a
/// fixed source AMI.
fn render_example(template: &str, virt: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().expect("temp dir");
    let bake = dir.path().join("bake.yaml");
    let manifest = read(&root.join("tests/golden/bake.yaml"));
    let manifest = manifest.replace("{template}", template).replace("{virt}", virt);
    std::fs::write(&bake, manifest).expect("write bake");
    // No EC2 endpoint, as the command line has none when AWS_ENDPOINT_URL_EC2 is unset.
    crate::cli::render_from_files(
        &root.join(format!("examples/templates/{template}.yaml")),
        &bake,
        Some("ami-0123456789abcdef0".into()),
        None,
    )
    .unwrap_or_else(|e| panic!("rendering {template}/{virt}: {e}"))
}

#[test]
fn rendered_templates_match_golden_files() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let update = std::env::var_os("BAKER_UPDATE_GOLDEN").is_some();
    let mut mismatched = Vec::new();
    for (template, virt) in COMBINATIONS {
        let rendered = render_example(template, virt);
        let file = dir.join(format!("{template}-{virt}.json"));
        if update {
            std::fs::write(&file, &rendered).expect("write golden file");
            continue;
        }
        let golden = std::fs::read_to_string(&file).unwrap_or_default();
        if golden != rendered {
            mismatched.push(file.display().to_string());
        }
    }
    assert!(
        mismatched.is_empty(),
        "rendered templates differ from {mismatched:?}; set BAKER_UPDATE_GOLDEN=1 to regenerate"
    );
}
