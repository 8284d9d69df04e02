//! Bakes: the reconciler, cleanup on deletion, the bake key and launch queue (pure), the bake pod
//! (pure) and status transitions (pure).

pub mod cleanup;
pub mod context;
pub mod controller;
mod distribute;
pub mod error;
pub mod key;
pub mod launch;
pub mod pod;
pub mod queue;
pub mod status;
pub mod watch;

pub use error::{Error, Result};
