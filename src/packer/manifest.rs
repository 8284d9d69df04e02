//! Reading the manifest Packer's `manifest` post-processor writes into the bake container's
//! termination message. It names the AMI; the operator still confirms it in EC2 by tag.

use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Manifest {
    #[serde(default)]
    builds: Vec<Build>,
    #[serde(default)]
    last_run_uuid: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Build {
    #[serde(default)]
    artifact_id: String,
    #[serde(default)]
    packer_run_uuid: Option<String>,
    #[serde(default)]
    custom_data: Option<serde_json::Map<String, serde_json::Value>>,
}

/// One AMI named by the manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Artifact {
    pub region: String,
    pub ami_id: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("the bake pod left no manifest (empty termination message)")]
    Empty,
    #[error("the bake pod's termination message is not a Packer manifest: {0}")]
    Invalid(String),
    #[error("the Packer manifest names no AMI")]
    NoArtifact,
    #[error("the Packer manifest belongs to another Bake (uid {0})")]
    WrongBake(String),
}

/// Parses the AMIs of the last Packer run from a manifest. `artifact_id` is a comma-separated
/// `region:ami-id` list (one entry per region when images are copied).
pub fn artifacts(text: &str, bake_uid: &str) -> Result<Vec<Artifact>, ManifestError> {
    if text.trim().is_empty() {
        return Err(ManifestError::Empty);
    }
    let manifest: Manifest = serde_json::from_str(text).map_err(|e| ManifestError::Invalid(e.to_string()))?;
    let build = manifest
        .builds
        .iter()
        .rev()
        .find(|b| manifest.last_run_uuid.is_none() || b.packer_run_uuid == manifest.last_run_uuid)
        .ok_or(ManifestError::NoArtifact)?;
    if let Some(uid) = build
        .custom_data
        .as_ref()
        .and_then(|d| d.get("bake_uid"))
        .and_then(|v| v.as_str())
        && uid != bake_uid
    {
        return Err(ManifestError::WrongBake(uid.to_string()));
    }
    let found: Vec<Artifact> = build
        .artifact_id
        .split(',')
        .filter_map(|entry| {
            let (region, ami) = entry.trim().split_once(':')?;
            ami.starts_with("ami-").then(|| Artifact {
                region: region.to_string(),
                ami_id: ami.to_string(),
            })
        })
        .collect();
    if found.is_empty() {
        return Err(ManifestError::NoArtifact);
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: &str = r#"{
      "builds": [{"name": "amazon-ebs", "builder_type": "amazon-ebs", "build_time": 1,
                  "files": null, "artifact_id": "us-east-1:ami-0fff97085b9c7d776",
                  "packer_run_uuid": "r1", "custom_data": {"bake_uid": "abc"}}],
      "last_run_uuid": "r1"}"#;

    #[test]
    fn reads_region_and_ami_of_the_last_run() {
        assert_eq!(
            artifacts(ONE, "abc").unwrap(),
            vec![Artifact {
                region: "us-east-1".into(),
                ami_id: "ami-0fff97085b9c7d776".into()
            }]
        );
    }

    #[test]
    fn copies_to_several_regions_give_one_artifact_each() {
        let text = ONE.replace(
            "us-east-1:ami-0fff97085b9c7d776",
            "us-east-1:ami-1,eu-west-1:ami-2",
        );
        let found = artifacts(&text, "abc").unwrap();
        assert_eq!(found.len(), 2);
        assert_eq!(
            found[1],
            Artifact {
                region: "eu-west-1".into(),
                ami_id: "ami-2".into()
            }
        );
    }

    #[test]
    fn empty_or_garbage_or_foreign_manifests_are_errors() {
        assert_eq!(artifacts("", "abc"), Err(ManifestError::Empty));
        assert!(matches!(
            artifacts("Error: boom", "abc"),
            Err(ManifestError::Invalid(_))
        ));
        assert_eq!(
            artifacts(ONE, "other"),
            Err(ManifestError::WrongBake("abc".into()))
        );
        let none = ONE.replace("us-east-1:ami-0fff97085b9c7d776", "");
        assert_eq!(artifacts(&none, "abc"), Err(ManifestError::NoArtifact));
    }
}
