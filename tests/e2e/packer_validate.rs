//! Every rendered builder x virtualization combination passes the real `packer validate`.
//! Needs Debian's `packer` on PATH (`make test` and `.ci/run` install it); fails, never skips,
//! when it is missing.

use std::path::Path;
use std::process::Command;

use crate::support::render::{combinations, render_example};

#[test]
#[ignore = "needs the rig: make test"]
fn packer_validate_accepts_every_rendered_combination() {
    let version = Command::new("packer")
        .arg("version")
        .output()
        .unwrap_or_else(|e| {
            panic!("packer is not on PATH ({e}); install Debian's packer package (make test does)")
        });
    assert!(version.status.success(), "packer version failed");
    let dir = tempfile::tempdir().expect("temp dir");
    for (template, virt) in combinations() {
        let path = dir.path().join(format!("{template}-{virt}.json"));
        std::fs::write(&path, render_example(&template, &virt)).expect("write template");
        validate(&path, &["-syntax-only"], &format!("{template}/{virt}"));
        validate(&path, &[], &format!("{template}/{virt}"));
    }
}

/// Runs `packer validate` with `flags` on the template at `path`, and fails with packer's output
/// if it refuses it. The credentials are dummies: the full validation wants some, never uses them.
fn validate(path: &Path, flags: &[&str], what: &str) {
    let out = Command::new("packer")
        .arg("validate")
        .args(flags)
        .arg(path)
        .env("CHECKPOINT_DISABLE", "1")
        .env("AWS_ACCESS_KEY_ID", "validate-only")
        .env("AWS_SECRET_ACCESS_KEY", "validate-only")
        .output()
        .expect("run packer validate");
    assert!(
        out.status.success(),
        "packer validate {flags:?} rejected {what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
