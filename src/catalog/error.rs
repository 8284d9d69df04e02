//! Errors of the AmiCatalog reconciler. EC2 failures are not among them: a sync that cannot read
//! EC2 says so in the catalog's status and tries again at its retry interval.

use crate::error::{Category, ReconcileError};
use crate::k8s::WriteError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the object has no {0}")]
    MissingField(&'static str),

    #[error("the cache of {0} is not running")]
    CacheNotReady(&'static str),

    #[error("writing AmiCatalog status failed")]
    PatchStatus(#[source] kube::Error),

    /// The catalog was deleted and recreated under its name while it synced.
    #[error("the AmiCatalog was replaced while it synced; the next sync writes the new one")]
    Replaced,
}

impl From<WriteError> for Error {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Replaced => Error::Replaced,
            WriteError::Api(e) => Error::PatchStatus(e),
        }
    }
}

impl ReconcileError for Error {
    fn category(&self) -> Category {
        match self {
            Error::MissingField(_) => Category::InvalidObject,
            Error::CacheNotReady(_) => Category::KubeRead,
            Error::PatchStatus(_) | Error::Replaced => Category::KubeWrite,
        }
    }

    fn is_conflict(&self) -> bool {
        matches!(self, Error::Replaced)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
