//! Every test that needs the local rig (`make rig-up`), in one binary: each module was a test
//! binary of its own, and each of those linked kube and the AWS SDK again.
//!
//! Every test is `#[ignore]`d, so a plain `cargo test` passes on a machine without a rig and lists
//! them as ignored. `make test` runs them module by module (`tests/rig/test-binaries.sh`), with
//! moto's EC2 state reset before each; `make test ONLY=<filter>` runs the tests whose name holds
//! the filter. By hand, against a rig that is up:
//!
//! ```sh
//! source target/rig/env && cargo test --test e2e -- --include-ignored bake_lifecycle::
//! ```
//!
//! Run one module at a time: `tenancy` runs operators for every namespace, and `requests` counts
//! the API server's requests, so neither may share the rig with another module's tests.

mod support;

mod bad_input;
mod bake;
mod bake_lifecycle;
mod catalog;
mod channel;
mod chart;
mod distribution;
mod examples;
mod images;
mod packer_validate;
mod real_node;
mod requests;
mod rig;
mod schedule;
mod seed_api;
mod ship;
mod tenancy;
