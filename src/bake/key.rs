//! The bake key: a hash of everything that determines the image a Bake produces, so that two
//! Bakes asking for the same image share one packer run and one AMI.
//!
//! It covers the rendered Packer template (builder, region, resolved source AMI id, provisioning
//! steps, naming, tags, endpoint; the service, version and virtualization type are in it as
//! variables) and the bake image (the Packer version). It leaves out who asked: the Bake's name,
//! namespace and UID, and the template's timeout, which cannot change the image.

use sha2::{Digest, Sha256};

use crate::packer::{BakeIdentity, RenderError, RenderInput, render};

/// Versioned so that a change in what the key covers never matches keys made before it.
const KEY_VERSION: &str = "baker-key-v1";

/// Length of the key in hex characters: 160 bits, short enough for a label value.
const KEY_HEX_LEN: usize = 40;

/// Computes the bake key for a render input and a bake image. An input that cannot be rendered
/// has no meaningful key; its key is computed from the error text so that it is still stable.
pub fn bake_key(input: &RenderInput<'_>, packer_image: &str) -> String {
    let neutral = BakeIdentity {
        name: String::new(),
        namespace: String::new(),
        uid: String::new(),
    };
    let neutral_input = RenderInput {
        identity: &neutral,
        bake_key: "",
        ..input.clone()
    };
    let rendered = match render(&neutral_input) {
        Ok(value) => value.to_string(),
        Err(e) => format!("unrenderable: {e}"),
    };
    let mut hash = Sha256::new();
    for part in [KEY_VERSION, packer_image, &rendered] {
        hash.update(part.as_bytes());
        hash.update([0u8]);
    }
    let digest = hash.finalize();
    let mut hex = String::with_capacity(KEY_HEX_LEN);
    for byte in digest.iter() {
        hex.push_str(&format!("{byte:02x}"));
    }
    hex.truncate(KEY_HEX_LEN);
    hex
}

/// A rendered template and its key: what a Bake's pod runs, and the key tagged on its image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keyed {
    pub key: String,
    pub rendered: String,
}

/// Computes the key of `input` (its `bake_key` is ignored) and renders it with that key. The
/// operator and the CLI's dry run both render through here, so a dry run shows what a Bake gets.
pub fn render_keyed(input: &RenderInput<'_>, packer_image: &str) -> Result<Keyed, RenderError> {
    let key = bake_key(input, packer_image);
    let rendered = crate::packer::render_string(&RenderInput {
        bake_key: &key,
        ..input.clone()
    })?;
    Ok(Keyed { key, rendered })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::BakeSpec;
    use crate::api::template::{BakeTemplateSpec, Builder};
    use crate::fixtures;
    use crate::packer::ResolvedSource;

    fn spec(version: &str) -> BakeSpec {
        fixtures::bake_spec(version)
    }

    fn template() -> BakeTemplateSpec {
        fixtures::template(Builder::AmazonEbs)
    }

    fn key(spec: &BakeSpec, t: &BakeTemplateSpec, who: &str, source: &str, image: &str) -> String {
        let identity = BakeIdentity {
            name: who.into(),
            namespace: who.into(),
            uid: who.into(),
        };
        let input = RenderInput {
            bake: spec,
            identity: &identity,
            template_name: "t",
            template: t,
            source: ResolvedSource::AmiId(source.into()),
            default_ec2_endpoint: None,
            bake_key: "",
        };
        bake_key(&input, image)
    }

    #[test]
    fn same_inputs_from_different_bakes_give_the_same_key() {
        let (s, t) = (spec("1.0"), template());
        let a = key(&s, &t, "a", "ami-11111111", "packer:1");
        assert_eq!(a, key(&s, &t, "b", "ami-11111111", "packer:1"));
        assert_eq!(a.len(), KEY_HEX_LEN);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn version_source_image_packer_image_and_steps_change_the_key() {
        let (s, t) = (spec("1.0"), template());
        let base = key(&s, &t, "a", "ami-11111111", "packer:1");
        assert_ne!(base, key(&spec("1.1"), &t, "a", "ami-11111111", "packer:1"));
        assert_ne!(base, key(&s, &t, "a", "ami-22222222", "packer:1"));
        assert_ne!(base, key(&s, &t, "a", "ami-11111111", "packer:2"));
        let mut tagged = template();
        tagged.tags.insert("team".into(), "x".into());
        assert_ne!(base, key(&s, &tagged, "a", "ami-11111111", "packer:1"));
    }

    #[test]
    fn the_timeout_does_not_change_the_key() {
        let s = spec("1.0");
        let mut slow = template();
        slow.timeout_seconds = Some(7200);
        assert_eq!(
            key(&s, &template(), "a", "ami-11111111", "p"),
            key(&s, &slow, "a", "ami-11111111", "p")
        );
    }
}
