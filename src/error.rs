//! What the controllers' errors share: a bounded category, for metric labels and log fields
//! (never the object's name or the nested message). Each controller has its own error type
//! (`bake::Error`, `catalog::Error`) that keeps the failure it wraps as its source.

/// The kinds of failure a reconcile can end in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum Category {
    /// The object cannot be acted on as it is; retried only when it changes.
    InvalidObject,
    KubeRead,
    KubeWrite,
    Ec2,
}

impl Category {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// An error a reconciler returns.
pub trait ReconcileError: std::error::Error {
    fn category(&self) -> Category;

    /// A write met a newer object than the cached one: optimistic concurrency at work, not a
    /// failure; the newer copy's watch event is on its way.
    fn is_conflict(&self) -> bool {
        false
    }
}

/// Every error and each of its sources, joined: `%error` alone shows only the outermost.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let text = e.to_string();
        // thiserror messages often repeat their source already.
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use strum::VariantArray;

    #[test]
    fn categories_are_snake_case_labels() {
        let labels: Vec<&str> = Category::VARIANTS.iter().map(|c| c.as_str()).collect();
        assert_eq!(labels, ["invalid_object", "kube_read", "kube_write", "ec2"]);
    }

    #[test]
    fn chain_shows_every_source_once() {
        let e = crate::aws::Ec2Error::new("DescribeImages", "Throttling", "slow down");
        assert_eq!(chain(&e), "EC2 DescribeImages failed: Throttling: slow down");
        let io = std::io::Error::other("connection reset");
        let wrapped = crate::k8s::WriteError::Api(kube::Error::Service(Box::new(io)));
        assert!(
            chain(&wrapped).ends_with("connection reset"),
            "{}",
            chain(&wrapped)
        );
    }
}
