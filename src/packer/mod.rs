//! Packer: rendering templates (pure) and reading what Packer reports back.

#[cfg(test)]
mod golden_tests;
pub mod manifest;
pub mod render;

pub use manifest::{Artifact, ManifestError, artifacts};
pub use render::{BakeIdentity, RenderError, RenderInput, ResolvedSource, render, render_string};
