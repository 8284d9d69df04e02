//! Packer: rendering templates (pure) and reading what Packer reports back.

pub mod manifest;
pub mod render;

pub use manifest::{Artifact, ManifestError, artifacts};
pub use render::{BakeIdentity, RenderError, RenderInput, ResolvedSource, render, render_string};
