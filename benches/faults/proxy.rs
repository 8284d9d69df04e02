//! An EC2 fault proxy: an HTTP server on 127.0.0.1 in front of moto that, for each request and
//! with a seeded probability, answers with a throttle (`RequestLimitExceeded`, 503), an outage
//! (`Unavailable`, 503) or an internal error (500), adds latency, or resets the connection;
//! otherwise it forwards the request. It reads each request whole, so it knows the EC2 action.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

/// What the proxy did to one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    Throttle,
    Unavailable,
    InternalError,
    Latency,
    Reset,
}

impl Fault {
    const ALL: [Fault; 5] = [
        Fault::Throttle,
        Fault::Unavailable,
        Fault::InternalError,
        Fault::Latency,
        Fault::Reset,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::Throttle => "throttle",
            Fault::Unavailable => "unavailable",
            Fault::InternalError => "500",
            Fault::Latency => "latency",
            Fault::Reset => "reset",
        }
    }

    /// The EC2 error answer, for the faults that are one.
    fn answer(self) -> Option<(StatusCode, &'static str)> {
        match self {
            Fault::Throttle => Some((StatusCode::SERVICE_UNAVAILABLE, "RequestLimitExceeded")),
            Fault::Unavailable => Some((StatusCode::SERVICE_UNAVAILABLE, "Unavailable")),
            Fault::InternalError => Some((StatusCode::INTERNAL_SERVER_ERROR, "InternalError")),
            Fault::Latency | Fault::Reset => None,
        }
    }
}

/// A small seeded generator (SplitMix64): the same seed gives the same faults in the same order
/// of requests.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

#[derive(Default)]
struct Shared {
    /// Requests per action, and faults per (action, fault).
    requests: BTreeMap<String, u64>,
    faults: BTreeMap<(String, Fault), u64>,
}

/// The running proxy; it stops when dropped.
pub struct FaultProxy {
    pub url: String,
    shared: Arc<Mutex<Shared>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The `Action=` of an EC2 Query request body.
fn action(body: &[u8]) -> String {
    form_urlencoded::parse(body)
        .find(|(k, _)| k == "Action")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| "-".into())
}

impl FaultProxy {
    /// Starts the proxy in front of `upstream` (`host:port`), faulting each request with
    /// probability `rate`, the fault chosen uniformly.
    pub async fn start(upstream: String, rate: f64, seed: u64) -> Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let shared = Arc::new(Mutex::new(Shared::default()));
        let rng = Arc::new(Mutex::new(Rng::new(seed)));
        let state = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (upstream, rng, state) = (upstream.clone(), rng.clone(), state.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        handle(req, upstream.clone(), rate, rng.clone(), state.clone())
                    });
                    // An Err from the service (a reset) drops the connection, as a reset does.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(client), service)
                        .await;
                });
            }
        });
        Ok(FaultProxy { url, shared, task })
    }

    /// Requests seen per action, and faults injected per (action, fault).
    pub fn counts(&self) -> (BTreeMap<String, u64>, BTreeMap<(String, Fault), u64>) {
        let s = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        (s.requests.clone(), s.faults.clone())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("connection reset by the fault proxy")]
struct ResetByProxy;

type Reply = Response<Full<Bytes>>;

async fn handle(
    req: Request<Incoming>,
    upstream: String,
    rate: f64,
    rng: Arc<Mutex<Rng>>,
    state: Arc<Mutex<Shared>>,
) -> Result<Reply, Box<dyn std::error::Error + Send + Sync>> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    let action = action(&body);
    let fault = {
        let mut rng = rng.lock().unwrap_or_else(|p| p.into_inner());
        (rng.unit() < rate).then(|| Fault::ALL[rng.below(Fault::ALL.len())])
    };
    {
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        *s.requests.entry(action.clone()).or_default() += 1;
        if let Some(f) = fault {
            *s.faults.entry((action.clone(), f)).or_default() += 1;
        }
    }
    match fault {
        Some(Fault::Reset) => return Err(Box::new(ResetByProxy)),
        Some(Fault::Latency) => tokio::time::sleep(Duration::from_secs(2)).await,
        Some(f) => {
            if let Some((status, code)) = f.answer() {
                return Ok(error_reply(status, code));
            }
        }
        None => {}
    }
    forward(Request::from_parts(parts, Full::new(body)), &upstream).await
}

fn error_reply(status: StatusCode, code: &str) -> Reply {
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code><Message>injected by the fault proxy</Message></Error></Errors><RequestID>fault-proxy</RequestID></Response>"
    );
    let mut reply = Response::new(Full::new(Bytes::from(xml)));
    *reply.status_mut() = status;
    reply
}

/// Sends the request to moto over a fresh connection and returns its answer whole.
async fn forward(
    req: Request<Full<Bytes>>,
    upstream: &str,
) -> Result<Reply, Box<dyn std::error::Error + Send + Sync>> {
    let stream = TcpStream::connect(upstream).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let reply = sender.send_request(req).await?;
    let (parts, body) = reply.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Response::from_parts(parts, Full::new(body)))
}
