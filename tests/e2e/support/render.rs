//! For `packer_validate`: a shipped example template rendered by the `baker` binary, as a person
//! would run `baker template render`, for the combinations and the Bake of the golden files (which
//! the unit test `packer::golden_tests` keeps equal to what Baker renders).

use std::path::{Path, PathBuf};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// Every builder x virtualization type combination with a golden file
/// (`tests/golden/<template>-<virt>.json`), as (example template, virtualization type).
pub fn combinations() -> Vec<(String, String)> {
    let mut found: Vec<(String, String)> = std::fs::read_dir(golden_dir())
        .expect("list tests/golden")
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let (template, virt) = name.strip_suffix(".json")?.rsplit_once('-')?;
            Some((template.to_string(), virt.to_string()))
        })
        .collect();
    found.sort();
    assert!(found.len() >= 4, "too few golden files: {found:?}");
    found
}

/// Renders `examples/templates/<template>.yaml` for the Bake in `tests/golden/bake.yaml` with a
/// fixed source AMI, with `baker template render`.
pub fn render_example(template: &str, virt: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().expect("temp dir");
    let bake = dir.path().join("bake.yaml");
    let manifest = std::fs::read_to_string(golden_dir().join("bake.yaml")).expect("read the golden Bake");
    let manifest = manifest.replace("{template}", template).replace("{virt}", virt);
    std::fs::write(&bake, manifest).expect("write bake");
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
