//! Every YAML file under `examples/` is admitted by the rig's API server as it stands: the CRD
//! schemas and CEL rules accept what the documentation tells people to apply.

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::support::bake::namespace;

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            yaml_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the rig: make test"]
async fn every_example_is_admitted_by_the_api_server() -> Result<()> {
    let (rig, _, ns) = namespace("examples").await?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    yaml_files(&root.join("examples"), &mut files)?;
    files.sort();
    assert!(files.len() >= 8, "too few examples found: {files:?}");
    let mut refused = Vec::new();
    for file in &files {
        // A server-side dry run: admission (schema, CEL, defaulting) without storing anything.
        let out = rig
            .kubectl([
                "apply",
                "--dry-run=server",
                "--namespace",
                ns.name(),
                "-f",
                &file.to_string_lossy(),
            ])
            .await?;
        if !out.success() {
            refused.push(format!("{}: {}", file.display(), out.stderr.trim()));
        }
    }
    assert!(refused.is_empty(), "refused:\n{}", refused.join("\n"));
    ns.cleanup().await
}
