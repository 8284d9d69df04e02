//! Errors of the Bake reconciler, named for the action that failed, each keeping what caused it.

use crate::aws::Ec2Error;
use crate::error::{Category, ReconcileError};
use crate::k8s::WriteError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the object has no {0}")]
    MissingField(&'static str),

    /// The launch decision kept asking for facts; a bug, reported rather than looped on.
    #[error("the launch decision asked for more facts than a reconcile gathers")]
    Undecided,

    #[error("reading the Bake failed")]
    GetBake(#[source] kube::Error),

    #[error("creating the template ConfigMap failed")]
    CreateConfigMap(#[source] kube::Error),

    #[error("creating the bake pod failed")]
    CreatePod(#[source] kube::Error),

    #[error("writing Bake status failed")]
    PatchStatus(#[source] kube::Error),

    #[error("updating the Bake's finalizers failed")]
    PatchFinalizers(#[source] kube::Error),

    /// A write guarded by resourceVersion or UID met a newer object: the cached copy was behind.
    /// Not a failure; the reconciler runs again on the newer copy.
    #[error("the cached Bake is older than the API server's (writing {0}); retrying with the newer one")]
    Conflict(&'static str),

    #[error("stopping the bake pod failed")]
    DeletePod(#[source] kube::Error),

    /// The name is held by the child of a deleted Bake of the same name that garbage collection
    /// has not removed yet.
    #[error("{kind} {name} still belongs to a deleted Bake of the same name; waiting for garbage collection")]
    ChildOfPreviousBake { kind: &'static str, name: String },

    #[error(transparent)]
    Ec2(#[from] Ec2Error),
}

impl Error {
    /// A failed status write: a successor of the same name is a conflict, anything else a failure.
    pub fn status_write(e: WriteError) -> Self {
        match e {
            WriteError::Replaced => Error::Conflict("Bake status"),
            WriteError::Api(e) => Error::PatchStatus(e),
        }
    }
}

impl ReconcileError for Error {
    fn category(&self) -> Category {
        match self {
            Error::MissingField(_) | Error::Undecided => Category::InvalidObject,
            Error::GetBake(_) => Category::KubeRead,
            Error::CreateConfigMap(_)
            | Error::CreatePod(_)
            | Error::PatchStatus(_)
            | Error::PatchFinalizers(_)
            | Error::Conflict(_)
            | Error::DeletePod(_)
            | Error::ChildOfPreviousBake { .. } => Category::KubeWrite,
            Error::Ec2(_) => Category::Ec2,
        }
    }

    fn is_conflict(&self) -> bool {
        matches!(self, Error::Conflict(_))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
