//! Baker: a Kubernetes operator that bakes Amazon Machine Images with HashiCorp Packer.
//!
//! The library holds all the logic; the `baker` binary only parses arguments and calls in here.
//! Pure parts (template rendering, pod specs, status transitions) live apart from the code that
//! talks to the Kubernetes API and EC2, and are unit-tested beside their definitions.

pub mod api;
pub mod aws;
pub mod bake;
pub mod catalog;
pub mod channel;
pub mod cli;
pub mod config;
pub mod distribution;
#[cfg(test)]
pub(crate) mod ec2_fake;
pub mod error;
pub mod failpoint;
#[cfg(test)]
mod fixtures;
pub mod http;
pub mod k8s;
pub mod leader;
pub mod metrics;
#[cfg(test)]
pub(crate) mod mock_api;
pub mod operator;
pub mod packer;
pub mod schedule;
pub mod seed;
pub mod usage;
