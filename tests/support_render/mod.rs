//! Shared by the rendering tests: render a shipped example template for a Bake.
#![allow(dead_code)]

use std::path::Path;

/// Every builder x virtualization type combination, as (example template, virtualization type).
pub const COMBINATIONS: [(&str, &str); 4] = [
    ("ebs-example", "hvm"),
    ("ebs-example", "paravirtual"),
    ("chroot-example", "hvm"),
    ("chroot-example", "paravirtual"),
];

/// Renders `examples/templates/<template>.yaml` for simple-service 1.0.4 with a fixed source AMI,
/// with `baker template render`.
pub fn render_example(template: &str, virt: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().expect("temp dir");
    let bake = dir.path().join("bake.yaml");
    std::fs::write(
        &bake,
        format!(
            "apiVersion: baker.io/v1alpha1\nkind: Bake\nmetadata:\n  name: simple-service-1.0.4\n  namespace: team-a\n  uid: 6b1f2d8e-1111-4c4c-9a9a-000000000001\nspec:\n  template: {template}\n  service: simple-service\n  version: 1.0.4\n  virtualizationType: {virt}\n"
        ),
    )
    .expect("write bake");
    // Through the real command line, as a person would run it.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_baker"))
        .args([
            "template",
            "render",
            "--source-ami",
            "ami-0123456789abcdef0",
            "--template",
        ])
        .arg(root.join(format!("examples/templates/{template}.yaml")))
        .arg("--bake")
        .arg(&bake)
        .env_remove("AWS_ENDPOINT_URL_EC2")
        .output()
        .expect("run baker template render");
    assert!(
        out.status.success(),
        "baker template render failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}
