//! Errors of the reconcilers, named for the action that failed, each with a bounded category for
//! metric labels and log fields (never the object name or the nested message).

use crate::aws::Ec2Error;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the object has no {0}")]
    MissingField(&'static str),

    /// The launch decision kept asking for facts; a bug, reported rather than looped on.
    #[error("the launch decision asked for more facts than a reconcile gathers")]
    Undecided,

    #[error("reading the Bake failed: {0}")]
    GetBake(#[source] kube::Error),

    #[error("creating the template ConfigMap failed: {0}")]
    CreateConfigMap(#[source] kube::Error),

    #[error("creating the bake pod failed: {0}")]
    CreatePod(#[source] kube::Error),

    #[error("writing Bake status failed: {0}")]
    PatchStatus(#[source] kube::Error),

    #[error("updating the Bake's finalizers failed: {0}")]
    PatchFinalizers(#[source] kube::Error),

    /// A write guarded by resourceVersion met a newer object: the cached copy was behind. Not a
    /// failure; the reconciler runs again on the newer copy.
    #[error("the cached Bake is older than the API server's (writing {0}); retrying with the newer one")]
    Conflict(&'static str),

    #[error("writing AmiCatalog status failed: {0}")]
    PatchCatalogStatus(#[source] kube::Error),

    #[error("the cache of {0} is not running")]
    CacheNotReady(&'static str),

    #[error("stopping the bake pod failed: {0}")]
    DeletePod(#[source] kube::Error),

    /// The name is held by the child of a deleted Bake of the same name that garbage collection
    /// has not removed yet.
    #[error("{kind} {name} still belongs to a deleted Bake of the same name; waiting for garbage collection")]
    ChildOfPreviousBake { kind: &'static str, name: String },

    #[error(transparent)]
    Ec2(#[from] Ec2Error),
}

impl Error {
    /// Every value [`Error::category`] returns, so metrics can show zeros for each.
    pub const CATEGORIES: [&'static str; 4] = ["invalid_object", "kube_read", "kube_write", "ec2"];

    /// A short, bounded label for metrics and logs.
    pub fn category(&self) -> &'static str {
        match self {
            Error::MissingField(_) | Error::Undecided => "invalid_object",
            Error::GetBake(_) | Error::CacheNotReady(_) => "kube_read",
            Error::CreateConfigMap(_)
            | Error::CreatePod(_)
            | Error::PatchStatus(_)
            | Error::PatchFinalizers(_)
            | Error::Conflict(_)
            | Error::PatchCatalogStatus(_)
            | Error::DeletePod(_)
            | Error::ChildOfPreviousBake { .. } => "kube_write",
            Error::Ec2(_) => "ec2",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_category_is_listed() {
        let errors = [
            Error::MissingField("x"),
            Error::CacheNotReady("Bakes"),
            Error::PatchStatus(kube::Error::LinesCodecMaxLineLengthExceeded),
            Error::Ec2(crate::aws::Ec2Error {
                action: "DescribeImages",
                code: "x".into(),
                message: "y".into(),
            }),
        ];
        for e in errors {
            assert!(Error::CATEGORIES.contains(&e.category()), "{}", e.category());
        }
    }
}
