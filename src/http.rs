//! The operator's HTTP server: `/healthz` (the process answers), `/readyz` (caches synced, and
//! leadership settled) and `/metrics` (Prometheus text format).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use kube::runtime::reflector::Store;

use crate::api::{AmiCatalog, Bake};
use crate::metrics::Metrics;

/// What this process is doing with respect to the leader lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    /// Leader election is off: the only reconciler.
    Single = 0,
    /// Leader election is on and the first attempt at the lease has not finished.
    Undecided = 1,
    /// Another process holds the lease; this one waits to take over.
    Standby = 2,
    /// This process holds the lease and reconciles.
    Leader = 3,
}

impl Role {
    fn from_u8(v: u8) -> Role {
        match v {
            1 => Role::Undecided,
            2 => Role::Standby,
            3 => Role::Leader,
            _ => Role::Single,
        }
    }
}

/// Readiness: a reconciler is ready once its caches synced; a standby is ready as soon as it
/// knows it is one (it serves the API and waits), so a two-replica rollout completes.
pub fn is_ready(synced: bool, role: Role) -> bool {
    match role {
        Role::Single | Role::Leader => synced,
        Role::Standby => true,
        Role::Undecided => false,
    }
}

/// Shared health state, written by the controller and the leader elector.
pub struct Health {
    role: AtomicU8,
    bakes: OnceLock<Store<Bake>>,
    catalogs: OnceLock<Store<AmiCatalog>>,
    /// The process's metrics, served on `/metrics`.
    pub metrics: Arc<Metrics>,
}

impl Default for Health {
    fn default() -> Self {
        Self::new(Arc::default())
    }
}

impl Health {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            role: AtomicU8::new(Role::Single as u8),
            bakes: OnceLock::new(),
            catalogs: OnceLock::new(),
            metrics,
        }
    }

    pub fn caches_synced(&self, bakes: Store<Bake>) {
        let _ = self.bakes.set(bakes);
    }

    /// The AmiCatalog controller's cache, read when `/metrics` is scraped.
    pub fn catalogs_watched(&self, catalogs: Store<AmiCatalog>) {
        let _ = self.catalogs.set(catalogs);
    }

    pub fn set_role(&self, role: Role) {
        self.role.store(role as u8, Ordering::SeqCst);
        self.metrics
            .leader
            .set(i64::from(matches!(role, Role::Leader | Role::Single)));
    }

    pub fn role(&self) -> Role {
        Role::from_u8(self.role.load(Ordering::SeqCst))
    }

    /// Whether the Bake cache has synced: its store is handed over at the first complete list.
    pub fn synced(&self) -> bool {
        self.bakes.get().is_some()
    }

    pub fn ready(&self) -> bool {
        is_ready(self.synced(), self.role())
    }

    /// The AmiCatalog cache, once the caches run (complete once [`Health::synced`]).
    pub fn catalogs(&self) -> Option<&Store<AmiCatalog>> {
        self.catalogs.get()
    }

    /// The Bakes of the controller's cache, once synced.
    pub fn bakes(&self) -> Option<&Store<Bake>> {
        self.bakes.get()
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(health): State<Arc<Health>>) -> Response {
    if health.ready() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        let why = if health.role() == Role::Undecided {
            "not ready: the leader lease is not settled yet\n"
        } else {
            "not ready: the Bake cache has not synced yet\n"
        };
        (StatusCode::SERVICE_UNAVAILABLE, why).into_response()
    }
}

async fn metrics(State(health): State<Arc<Health>>) -> Response {
    let m = &health.metrics;
    if let Some(store) = health.bakes() {
        let bakes = store.state();
        m.observe_bakes(bakes.iter().map(|b| b.as_ref()));
    }
    if let Some(store) = health.catalogs.get() {
        m.observe_catalogs(store.state().iter().map(|c| c.as_ref()));
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.render(),
    )
        .into_response()
}

/// The routes every operator serves.
pub fn router(health: Arc<Health>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(health)
}

/// Serves `router` on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, router: Router) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "serving HTTP");
    axum::serve(listener, router).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reconciler_is_ready_only_after_its_caches_synced() {
        assert!(!is_ready(false, Role::Single));
        assert!(is_ready(true, Role::Single));
        assert!(!is_ready(false, Role::Leader));
        assert!(is_ready(true, Role::Leader));
    }

    #[test]
    fn a_process_is_not_ready_before_it_knows_whether_it_leads() {
        assert!(!is_ready(false, Role::Undecided));
        assert!(!is_ready(true, Role::Undecided));
    }

    #[test]
    fn a_standby_is_ready_without_caches() {
        assert!(is_ready(false, Role::Standby));
    }

    #[test]
    fn role_round_trips_through_its_atomic() {
        let h = Health::default();
        for r in [Role::Single, Role::Undecided, Role::Standby, Role::Leader] {
            h.set_role(r);
            assert_eq!(h.role(), r);
        }
    }
}
