//! The operator's HTTP server: `/healthz` (the process answers), `/readyz` (caches synced, and
//! leadership settled) and `/metrics` (Prometheus text format).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

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

/// A client has this long to send a request's headers (also the longest a kept-alive
/// connection may sit idle): a slow or silent client holds a connection no longer.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections served at once; past it, new connections are closed at once, so a flood costs
/// memory for this many only. Far above what probes, Prometheus and people need.
pub const MAX_CONNECTIONS: usize = 1024;

/// Largest request body accepted (no route reads one; this only refuses a large upload early).
pub const MAX_BODY_BYTES: u64 = 64 * 1024;

/// How the HTTP server protects itself from its clients.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: HEADER_READ_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
        }
    }
}

/// Serves `router` on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, router: Router) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "serving HTTP");
    serve_on(listener, router, Limits::default()).await
}

/// Serves `router` on a bound listener: HTTP/1.1 with a header-read timeout, a cap on
/// connections, bodies over [`MAX_BODY_BYTES`] refused with 413. axum's own `serve` sets no
/// header timeout and no cap, so one client could hold connections open forever.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: Limits,
) -> std::io::Result<()> {
    use tower::ServiceExt;
    let router = router.layer(axum::middleware::from_fn(refuse_large_bodies));
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut full_logged = false;
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            // Out of file descriptors, or a connection reset before it was accepted: the
            // listener itself is fine, so keep serving after a breath.
            Err(e) => {
                tracing::warn!(error = %e, "accepting an HTTP connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if !full_logged {
                tracing::warn!(
                    max = limits.max_connections,
                    "HTTP connection limit reached: closing new connections until some end"
                );
                full_logged = true;
            }
            continue;
        };
        full_logged = false;
        let service = hyper_util::service::TowerToHyperService::new(
            router
                .clone()
                .map_request(|r: http::Request<hyper::body::Incoming>| r.map(axum::body::Body::new)),
        );
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
            drop(slot);
        });
    }
}

async fn refuse_large_bodies(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let length = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if length.is_some_and(|l| l > MAX_BODY_BYTES) {
        return (StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n").into_response();
    }
    next.run(request).await
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

    /// A server on a free loopback port, serving the operator's routes.
    async fn server_with(limits: Limits) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let addr = listener.local_addr().expect("its address");
        tokio::spawn(serve_on(listener, router(Arc::new(Health::default())), limits));
        addr
    }

    async fn server() -> SocketAddr {
        server_with(Limits::default()).await
    }

    /// One request on a fresh connection; the status line's code.
    async fn status_of(addr: SocketAddr, request: &str) -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connects");
        stream.write_all(request.as_bytes()).await.expect("sends");
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.expect("an answer");
        String::from_utf8_lossy(&head[9..12])
            .parse()
            .expect("a status code")
    }

    #[tokio::test]
    async fn five_hundred_slow_connections_do_not_stop_healthz_from_answering() {
        use tokio::io::AsyncWriteExt;
        let addr = server().await;
        let mut slow = Vec::new();
        for _ in 0..500 {
            let mut s = tokio::net::TcpStream::connect(addr).await.expect("connects");
            // Half a request line, and then nothing.
            s.write_all(b"GET /heal").await.expect("sends");
            slow.push(s);
        }
        let answered = tokio::time::timeout(
            Duration::from_secs(5),
            status_of(addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"),
        )
        .await
        .expect("healthz answers while 500 connections stall");
        assert_eq!(answered, 200);
        drop(slow);
    }

    #[tokio::test]
    async fn a_large_declared_body_is_refused_before_it_is_read() {
        let addr = server().await;
        let code = status_of(
            addr,
            "POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n\r\n",
        )
        .await;
        assert_eq!(code, 413);
    }

    #[tokio::test]
    async fn a_client_that_never_finishes_its_headers_is_disconnected() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let limits = Limits {
            header_read_timeout: Duration::from_millis(300),
            ..Limits::default()
        };
        let addr = server_with(limits).await;
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connects");
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("sends");
        let mut buf = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        assert!(closed.is_ok(), "the server closed the connection");
    }

    #[tokio::test]
    async fn connections_past_the_cap_are_closed_at_once_and_served_again_once_one_ends() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = server_with(Limits {
            max_connections: 2,
            ..Limits::default()
        })
        .await;
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut s = tokio::net::TcpStream::connect(addr).await.expect("connects");
            s.write_all(b"GET /heal").await.expect("sends");
            held.push(s);
        }
        let mut third = tokio::net::TcpStream::connect(addr)
            .await
            .expect("the kernel accepts");
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), third.read_to_end(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "closed without an answer: {read:?}"
        );
        drop(held);
        let answered = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                // A slot frees once the server notices the dropped connections.
                let code = tokio::time::timeout(
                    Duration::from_millis(500),
                    status_of(addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"),
                )
                .await;
                if let Ok(code) = code {
                    return code;
                }
            }
        })
        .await
        .expect("served again");
        assert_eq!(answered, 200);
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
