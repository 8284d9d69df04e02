//! A mocked Kubernetes API server for the middle test layer: a `kube::Client` whose requests go to
//! a responder in the test, and are recorded in order, so a scenario can pin which writes a
//! reconcile makes, in which order, and how it takes each answer.
//!
//! Built on `tower::service_fn` (already a dependency) rather than `tower-test`, whose
//! `tokio-test` dependency turns on tokio features the operator does not use: the test build
//! would then compile tokio, kube and the AWS SDK a second time.

use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};

/// One request the client sent.
#[derive(Clone, Debug)]
pub(crate) struct Recorded {
    pub method: Method,
    pub path: String,
    pub body: Value,
}

impl Recorded {
    /// `VERB path`, e.g. `PATCH /apis/baker.io/v1alpha1/namespaces/team/bakes/b/status`.
    pub fn line(&self) -> String {
        format!("{} {}", self.method, self.path)
    }

    fn is_event(&self) -> bool {
        self.path.contains("/events")
    }
}

/// What the responder answers: a status and a JSON body.
pub(crate) type Answer = (StatusCode, Value);

/// The mocked server's log of requests.
#[derive(Clone, Default)]
pub(crate) struct ApiLog(Arc<Mutex<Vec<Recorded>>>);

impl ApiLog {
    pub fn all(&self) -> Vec<Recorded> {
        self.0.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Every request but Events (best effort, and batched by kube's recorder), as `VERB path`.
    pub fn lines(&self) -> Vec<String> {
        self.all()
            .iter()
            .filter(|r| !r.is_event())
            .map(Recorded::line)
            .collect()
    }

    /// The Events published, by reason.
    pub fn event_reasons(&self) -> Vec<String> {
        self.all()
            .iter()
            .filter(|r| r.is_event() && r.method == Method::POST)
            .filter_map(|r| r.body.get("reason").and_then(Value::as_str).map(String::from))
            .collect()
    }
}

/// A client on a mocked API server that answers with `respond`; returns it with the request log.
/// Requests the responder has no answer for (`None`) get what a real server would give an
/// accepted write: the body sent, echoed back (201 for a create, 200 otherwise).
pub(crate) fn client(
    respond: impl Fn(&Recorded) -> Option<Answer> + Send + Sync + 'static,
) -> (Client, ApiLog) {
    let log = ApiLog::default();
    let recorded = log.clone();
    let respond = Arc::new(respond);
    let service = tower::service_fn(move |request: Request<Body>| {
        let (recorded, respond) = (recorded.clone(), respond.clone());
        async move {
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await?;
            let request = Recorded {
                method: parts.method.clone(),
                path: parts.uri.path().to_string(),
                body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            };
            if let Ok(mut log) = recorded.0.lock() {
                log.push(request.clone());
            }
            let (status, body) = respond(&request).unwrap_or_else(|| echo(&request));
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Body::from(body.to_string().into_bytes()))
                .map_err(|e| kube::Error::Service(Box::new(e)))
        }
    });
    (Client::new(service, "default"), log)
}

fn echo(request: &Recorded) -> Answer {
    let status = if request.method == Method::POST {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (status, request.body.clone())
}

/// The API server's refusal, as kube reads it.
pub(crate) fn status(code: u16, reason: &str, message: &str) -> Answer {
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code
        }),
    )
}
