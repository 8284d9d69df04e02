//! Every rendered builder x virtualization combination passes the real `packer validate`.
//! Needs Debian's `packer` on PATH (`make test` and `.ci/run` install it); fails, never skips,
//! when it is missing.

mod support_render;

use std::process::Command;

use support_render::{COMBINATIONS, render_example};

#[test]
fn packer_validate_accepts_every_rendered_combination() {
    let version = Command::new("packer")
        .arg("version")
        .output()
        .unwrap_or_else(|e| {
            panic!("packer is not on PATH ({e}); install Debian's packer package (make test does)")
        });
    assert!(version.status.success(), "packer version failed");
    let dir = tempfile::tempdir().expect("temp dir");
    for (template, virt) in COMBINATIONS {
        let path = dir.path().join(format!("{template}-{virt}.json"));
        std::fs::write(&path, render_example(template, virt)).expect("write template");
        let out = Command::new("packer")
            .args(["validate", "-syntax-only"])
            .arg(&path)
            .env("CHECKPOINT_DISABLE", "1")
            .output()
            .expect("run packer validate -syntax-only");
        assert!(
            out.status.success(),
            "packer validate -syntax-only rejected {template}/{virt}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let out = Command::new("packer")
            .arg("validate")
            .arg(&path)
            .env("CHECKPOINT_DISABLE", "1")
            .env("AWS_ACCESS_KEY_ID", "validate-only")
            .env("AWS_SECRET_ACCESS_KEY", "validate-only")
            .output()
            .expect("run packer validate");
        assert!(
            out.status.success(),
            "packer validate rejected {template}/{virt}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
