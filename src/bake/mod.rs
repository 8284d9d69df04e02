//! Bakes: the reconciler, the bake pod (pure) and status transitions (pure).

pub mod controller;
pub mod pod;
pub mod status;
