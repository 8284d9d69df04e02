//! The kubelet HTTPS endpoint, as far as the apiserver needs it for
//! `kubectl logs`: `GET /containerLogs/{namespace}/{pod}/{container}` and
//! `GET /healthz`.

use std::convert::Infallible;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::logs::{
    Budget, LogFiles, LogRegistry, LookupError, now_nanos, parse_query, render_follow, select,
};

type Body = BoxBody<Bytes, io::Error>;

const FOLLOW_POLL: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading certificate {path}: {source}")]
    Cert {
        path: String,
        source: tokio_rustls::rustls::pki_types::pem::Error,
    },
    #[error("certificate file {0} holds no certificate")]
    NoCert(String),
    #[error("reading private key {path}: {source}")]
    Key {
        path: String,
        source: tokio_rustls::rustls::pki_types::pem::Error,
    },
    #[error("TLS configuration: {0}")]
    Config(#[from] tokio_rustls::rustls::Error),
}

/// Server TLS config from PEM files (the rig makes an EC P-256 pair).
pub fn tls_config(cert: &Path, key: &Path) -> Result<ServerConfig, TlsError> {
    let cert_path = cert.display().to_string();
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Cert {
            path: cert_path.clone(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCert(cert_path));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Key {
        path: key.display().to_string(),
        source,
    })?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    let body = Full::new(Bytes::from(body.into()))
        .map_err(|never: Infallible| match never {})
        .boxed();
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn read_from(path: &Path, pos: u64) -> Vec<u8> {
    let mut buf = Vec::new();
    let Ok(mut f) = tokio::fs::File::open(path).await else {
        return buf;
    };
    if f.seek(io::SeekFrom::Start(pos)).await.is_ok() {
        let _ = f.read_to_end(&mut buf).await;
    }
    buf
}

async fn follow(
    files: LogFiles,
    mut done: watch::Receiver<bool>,
    mut pos: u64,
    mut at_line_start: bool,
    timestamps: bool,
    mut budget: Budget,
    tx: mpsc::Sender<Bytes>,
) {
    loop {
        // Read `done` before the file: once the writer is done, one more
        // empty read proves the log is drained.
        let finished = *done.borrow_and_update();
        let new = read_from(&files.log, pos).await;
        if !new.is_empty() {
            let index = if timestamps {
                files.read_index()
            } else {
                Vec::new()
            };
            let out = render_follow(&new, pos, &index, timestamps, at_line_start);
            pos += new.len() as u64;
            at_line_start = new.ends_with(b"\n");
            let out = budget.take(out);
            if !out.is_empty() && tx.send(Bytes::from(out)).await.is_err() {
                return;
            }
            if budget.exhausted() {
                return;
            }
            continue;
        }
        if finished {
            return;
        }
        tokio::select! {
            _ = tx.closed() => return,
            changed = done.changed() => {
                if changed.is_err() {
                    tokio::time::sleep(FOLLOW_POLL).await;
                }
            }
            _ = tokio::time::sleep(FOLLOW_POLL) => {}
        }
    }
}

async fn container_logs(
    logs: &LogRegistry,
    namespace: &str,
    pod: &str,
    container: &str,
    query: &str,
) -> Response<Body> {
    let opts = match parse_query(query, now_nanos()) {
        Ok(o) => o,
        Err(m) => return text(StatusCode::BAD_REQUEST, m),
    };
    if opts.previous {
        return text(
            StatusCode::BAD_REQUEST,
            format!(
                "previous terminated container \"{container}\" in pod \"{pod}\" not found \
                 (baker-rig-node never restarts containers)"
            ),
        );
    }
    let (files, done) = match logs.lookup(namespace, pod, container) {
        Ok(found) => found,
        Err(e @ LookupError::Waiting { .. }) => {
            return text(StatusCode::BAD_REQUEST, e.to_string());
        }
        Err(e) => return text(StatusCode::NOT_FOUND, e.to_string()),
    };
    let content = tokio::fs::read(&files.log).await.unwrap_or_default();
    let index = if opts.timestamps || opts.since_nanos.is_some() {
        files.read_index()
    } else {
        Vec::new()
    };
    let mut budget = Budget(opts.limit_bytes);
    let initial = budget.take(select(&content, &index, &opts));
    if !opts.follow || budget.exhausted() {
        return text(StatusCode::OK, String::new()).map(|_| {
            Full::new(Bytes::from(initial))
                .map_err(|never: Infallible| match never {})
                .boxed()
        });
    }

    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let at_line_start = content.is_empty() || content.ends_with(b"\n");
    let pos = content.len() as u64;
    let timestamps = opts.timestamps;
    tokio::spawn(async move {
        if !initial.is_empty() && tx.send(Bytes::from(initial)).await.is_err() {
            return;
        }
        follow(files, done, pos, at_line_start, timestamps, budget, tx).await;
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, io::Error>(Frame::data(b)), rx))
    });
    let mut r = Response::new(StreamBody::new(stream).boxed());
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Routes one request (split from [`handle`] so it can be tested without
/// a connection).
pub async fn route(method: &Method, path: &str, query: &str, logs: &LogRegistry) -> Response<Body> {
    if method != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    if path == "/healthz" {
        return text(StatusCode::OK, "ok");
    }
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if let ["containerLogs", ns, pod, container] = parts.as_slice()
        && !ns.is_empty()
        && !pod.is_empty()
        && !container.is_empty()
    {
        return container_logs(logs, ns, pod, container, query).await;
    }
    text(StatusCode::NOT_FOUND, "404 page not found\n")
}

async fn handle(req: Request<Incoming>, logs: LogRegistry) -> Result<Response<Body>, Infallible> {
    let uri = req.uri();
    Ok(route(req.method(), uri.path(), uri.query().unwrap_or(""), &logs).await)
}

/// Accepts TLS connections on `listener` forever.
pub async fn serve(listener: TcpListener, tls: ServerConfig, logs: LogRegistry) {
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accepting kubelet connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let logs = logs.clone();
        tokio::spawn(async move {
            let stream = match acceptor.accept(tcp).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(error = %e, %peer, "TLS handshake failed");
                    return;
                }
            };
            let service = service_fn(move |req| handle(req, logs.clone()));
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, %peer, "kubelet connection ended");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::ContainerLogState;

    async fn body(r: Response<Body>) -> (StatusCode, String) {
        let status = r.status();
        let bytes = r.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    fn registry_with_log(dir: &Path, content: &[u8], done: watch::Receiver<bool>) -> LogRegistry {
        std::fs::create_dir_all(dir).unwrap();
        let files = LogFiles::in_dir(dir);
        std::fs::write(&files.log, content).unwrap();
        let r = LogRegistry::default();
        r.add_pod("ns", "p", "u", &["c".to_string(), "w".to_string()]);
        r.set_container("ns", "p", "u", "c", ContainerLogState::Available { files, done });
        r
    }

    fn temp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("baker-rig-node-{name}-{}", std::process::id()))
    }

    #[tokio::test]
    async fn routes() {
        let dir = temp("routes");
        let (_tx, done) = watch::channel(true);
        let logs = registry_with_log(&dir, b"a\nb\nc\n", done);
        let get = Method::GET;
        assert_eq!(
            body(route(&get, "/healthz", "", &logs).await).await,
            (StatusCode::OK, "ok".into())
        );
        assert_eq!(
            route(&get, "/pods", "", &logs).await.status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            route(&Method::POST, "/healthz", "", &logs).await.status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            body(route(&get, "/containerLogs/ns/p/c", "tailLines=2", &logs).await).await,
            (StatusCode::OK, "b\nc\n".into())
        );
        assert_eq!(
            body(route(&get, "/containerLogs/ns/p/c", "limitBytes=3", &logs).await).await,
            (StatusCode::OK, "a\nb".into())
        );
        let (st, msg) = body(route(&get, "/containerLogs/ns/q/c", "", &logs).await).await;
        assert_eq!(st, StatusCode::NOT_FOUND);
        assert!(msg.contains("not found"));
        assert_eq!(
            route(&get, "/containerLogs/ns/p/zz", "", &logs).await.status(),
            StatusCode::NOT_FOUND
        );
        let (st, msg) = body(route(&get, "/containerLogs/ns/p/w", "", &logs).await).await;
        assert_eq!(st, StatusCode::BAD_REQUEST);
        assert!(msg.contains("waiting to start"));
        assert_eq!(
            route(&get, "/containerLogs/ns/p/c", "previous=true", &logs)
                .await
                .status(),
            StatusCode::BAD_REQUEST
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn follow_streams_until_done() {
        let dir = temp("follow");
        let (tx, done) = watch::channel(false);
        let logs = registry_with_log(&dir, b"first\n", done);
        let resp = route(&Method::GET, "/containerLogs/ns/p/c", "follow=true", &logs).await;
        let log_path = LogFiles::in_dir(&dir).log;
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut f = std::fs::OpenOptions::new().append(true).open(&log_path).unwrap();
            std::io::Write::write_all(&mut f, b"second\n").unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            tx.send(true).unwrap();
        });
        let (status, text) = tokio::time::timeout(Duration::from_secs(10), body(resp))
            .await
            .expect("follow must end once the container is done");
        writer.await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(text, "first\nsecond\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
