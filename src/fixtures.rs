//! Test fixtures shared by the unit tests of the pure modules.

use crate::api::template::{BakeTemplateSpec, Builder, SourceImage};
use crate::api::{BakeSpec, VirtualizationType};

/// A minimal BakeTemplate spec: the builder given, eu-west-1, a fixed source AMI, no steps.
pub fn template(builder: Builder) -> BakeTemplateSpec {
    BakeTemplateSpec {
        builder,
        region: "eu-west-1".into(),
        source: SourceImage {
            ami_id: Some("ami-0123456789abcdef0".into()),
            filter: None,
            catalog: None,
        },
        instance_type: None,
        communicator: None,
        ssh_username: None,
        provisioners: vec![],
        ami_name: None,
        ami_description: None,
        tags: Default::default(),
        timeout_seconds: None,
        ec2_endpoint: None,
        packer_image: None,
        pod: None,
        distribution: None,
    }
}

/// A Bake spec for `simple-service` at a version, hvm, with template `ebs-example`.
pub fn bake_spec(version: &str) -> BakeSpec {
    BakeSpec {
        template: "ebs-example".into(),
        service: "simple-service".into(),
        version: version.into(),
        virtualization_type: VirtualizationType::Hvm,
        rebake: false,
        deregister_image_on_delete: false,
    }
}

/// A file of the checkout as text, or a panic naming it (for tests that compare committed files).
pub fn read(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}
