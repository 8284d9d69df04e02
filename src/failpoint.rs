//! Failpoints: named places where the operator can be made to stop dead, so that tests can prove
//! a crash at that exact moment loses nothing, or to lag, so that they can prove a slow watch
//! loses nothing either. Inactive unless `BAKER_FAILPOINTS` names them (comma-separated); never
//! set it in production.

use std::sync::OnceLock;

/// The bake launch was recorded in status; the pod is not created yet.
pub const LAUNCH_RECORDED: &str = "launch-recorded";
/// The bake pod has ended; the Bake's final status is not written yet.
pub const BEFORE_FINAL_STATUS: &str = "before-final-status";
/// EC2 accepted a copy of the image into another region; the copy is not tagged yet.
pub const COPY_REQUESTED: &str = "copy-requested";

/// Every Bake watch event reaches the cache this much later (pod events do not): the reconciler
/// sees Bakes older than its own writes.
pub const BAKE_CACHE_LAG: &str = "bake-cache-lag";

fn active() -> &'static [String] {
    static ACTIVE: OnceLock<Vec<String>> = OnceLock::new();
    ACTIVE.get_or_init(|| {
        std::env::var("BAKER_FAILPOINTS")
            .map(|v| {
                v.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// Exits the process at once if the failpoint is active (as a crash or a SIGKILL would).
pub fn hit(name: &str) {
    if is_active(name) {
        tracing::error!(failpoint = name, "failpoint hit: exiting");
        std::process::exit(86);
    }
}

/// Whether a failpoint is active.
pub fn is_active(name: &str) -> bool {
    active().iter().any(|a| a == name)
}
