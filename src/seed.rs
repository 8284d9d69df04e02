//! The seed's HTTP API, served by the operator when `--seed-api` is on: `GET /ping`,
//! `GET /healthcheck`, `GET /status`, `GET /amis`, `GET /amis/{service}` and
//! `POST /bake/{template}/{service}/{version}/{virtualizationType}`, which creates a Bake and
//! streams its packer output, then a final line with the phase and the AMI id.
//!
//! `POST /bake` and the image listings (`/amis`) need `Authorization: Bearer <token>` (the
//! listings not when the admin opts into public reads); the token is read from a file (the chart
//! mounts a Secret there), read again when the file changes, compared in constant time and never
//! logged. A client that disconnects stops only its stream: the Bake goes on. A stream follows a
//! Bake at most for the Bake's own deadline (its template's timeout) plus time to start.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::{AsyncBufReadExt, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, LogParams, ObjectMeta, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::mpsc;

use crate::api::bake::{BakeSpec, VirtualizationType};
use crate::api::catalog::{AmiCatalog, CatalogImage};
use crate::api::{Bake, BakePhase, BakeTemplate};
use crate::http::Health;

/// How many images `GET /amis/{service}` lists.
pub const SERVICE_IMAGES: usize = 10;

pub struct SeedState {
    pub client: Client,
    /// Where `POST /bake` creates Bakes.
    pub namespace: String,
    pub token: TokenFile,
    /// Serve `GET /amis` without the token.
    pub public_reads: bool,
    pub health: Arc<Health>,
}

/// Beyond a Bake's own timeout, how long a `POST /bake` stream waits for it to start (a queue, a
/// pod that is scheduled and pulls its image).
pub const FOLLOW_START_SLACK: Duration = Duration::from_secs(600);

/// The bearer token, from a file that may change (a Secret the kubelet updates in place): read
/// again whenever the file's modification time or size changes.
pub struct TokenFile {
    path: std::path::PathBuf,
    current: std::sync::Mutex<(Option<(std::time::SystemTime, u64)>, String)>,
}

impl TokenFile {
    /// Reads the token; an unreadable file is an error, an empty token is `None`.
    pub fn open(path: std::path::PathBuf) -> std::io::Result<Option<TokenFile>> {
        let token = TokenFile {
            path,
            current: std::sync::Mutex::new((None, String::new())),
        };
        token.refresh()?;
        Ok((!token.token().is_empty()).then_some(token))
    }

    fn stamp(&self) -> std::io::Result<(std::time::SystemTime, u64)> {
        let meta = std::fs::metadata(&self.path)?;
        Ok((meta.modified()?, meta.len()))
    }

    fn refresh(&self) -> std::io::Result<()> {
        let stamp = self.stamp()?;
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.0 != Some(stamp) {
            let token = std::fs::read_to_string(&self.path)?.trim().to_string();
            if current.0.is_some() {
                tracing::info!(path = %self.path.display(), "the seed API token file changed: using the new token");
            }
            *current = (Some(stamp), token);
        }
        Ok(())
    }

    /// The token as the file says now; the last one read if the file cannot be read this moment
    /// (a Secret update swaps a symlink).
    pub fn token(&self) -> String {
        if let Err(e) = self.refresh() {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot read the seed API token file; using the last token read");
        }
        self.current.lock().unwrap_or_else(|p| p.into_inner()).1.clone()
    }
}

/// A request error: HTTP status, the field at fault (if any) and a message.
#[derive(Debug, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub field: Option<&'static str>,
    pub message: String,
}

impl ApiError {
    fn field(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            field: Some(field),
            message: message.into(),
        }
    }

    fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            field: None,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = match self.field {
            Some(f) => json!({ "error": self.message, "field": f }),
            None => json!({ "error": self.message }),
        };
        (self.status, axum::Json(body)).into_response()
    }
}

fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// The Bake a `POST /bake/...` asks for, checked field by field with the CRD's rules.
pub fn parse_bake_request(
    template: &str,
    service: &str,
    version: &str,
    virt: &str,
) -> Result<BakeSpec, ApiError> {
    let template_ok = !template.is_empty()
        && template.len() <= 253
        && template
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !template.starts_with(['-', '.'])
        && !template.ends_with(['-', '.']);
    if !template_ok {
        return Err(ApiError::field(
            "template",
            "template must name a BakeTemplate: lowercase letters, digits, '-' and '.'",
        ));
    }
    if !dns_label(service) {
        return Err(ApiError::field(
            "service",
            "service must be a DNS-1123 label: lowercase letters, digits and '-'",
        ));
    }
    let version_ok = !version.is_empty()
        && version.len() <= 64
        && version.starts_with(|c: char| c.is_ascii_alphanumeric())
        && version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._+~-".contains(c));
    if !version_ok {
        return Err(ApiError::field(
            "version",
            "version must be a package version: letters, digits, '.', '_', '+', '~' and '-'",
        ));
    }
    let virtualization_type = match virt {
        "hvm" => VirtualizationType::Hvm,
        "paravirtual" => VirtualizationType::Paravirtual,
        _ => {
            return Err(ApiError::field(
                "virtualizationType",
                "virtualizationType must be hvm or paravirtual",
            ));
        }
    };
    Ok(BakeSpec {
        template: template.to_string(),
        service: service.to_string(),
        version: version.to_string(),
        virtualization_type,
        rebake: false,
        deregister_image_on_delete: false,
    })
}

/// The prefix of a Bake created through the API: service and version, as a DNS name, leaving room
/// for the generated suffix under the 63-character limit of a Bake's name.
pub fn bake_name_prefix(service: &str, version: &str) -> String {
    let version: String = version
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect::<String>()
        // A DNS name's dot-separated labels are never empty and start and end alphanumeric: a
        // version like `1..0` or `1.-rc` would otherwise make the API server refuse the name.
        .split('.')
        .map(|label| label.trim_matches('-'))
        .filter(|label| !label.is_empty())
        .collect::<Vec<_>>()
        .join(".");
    let mut prefix = format!("{service}-{version}");
    prefix.truncate(50);
    let trimmed = prefix.trim_end_matches(['-', '.']).to_string();
    format!("{trimmed}-")
}

/// Whether an `Authorization` header carries the token (the scheme `Bearer` in any case, as HTTP
/// allows); compared in constant time by `subtle`. A token anywhere else (the query string) is
/// never read.
pub fn authorized(header: Option<&str>, token: &str) -> bool {
    use subtle::ConstantTimeEq;
    let Some((scheme, given)) = header.and_then(|h| h.split_once(' ')) else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return false;
    }
    bool::from(given.trim().as_bytes().ct_eq(token.as_bytes()))
}

/// Refuses a request without the token.
fn require_token(s: &SeedState, headers: &HeaderMap, what: &str) -> Result<(), ApiError> {
    let auth = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if authorized(auth, &s.token.token()) {
        return Ok(());
    }
    Err(ApiError {
        status: StatusCode::UNAUTHORIZED,
        field: Some("Authorization"),
        message: format!("a bearer token is required to {what}"),
    })
}

/// The newest `n` images of a service across catalogs, without duplicates.
pub fn service_images<C: std::ops::Deref<Target = AmiCatalog>>(
    catalogs: &[C],
    service: &str,
    n: usize,
) -> Vec<CatalogImage> {
    let mut seen = std::collections::BTreeSet::new();
    let mut images: Vec<CatalogImage> = catalogs
        .iter()
        .flat_map(|c| {
            c.status
                .iter()
                .flat_map(|s| s.images.iter())
                // An image without a service tag belongs to its catalog's service.
                .filter(move |i| i.service.as_deref().or(c.spec.service.as_deref()) == Some(service))
        })
        .filter(|i| seen.insert(i.image_id.clone()))
        .cloned()
        .collect();
    // ISO 8601 dates sort as strings; images without one go last.
    images.sort_by(|a, b| b.creation_date.cmp(&a.creation_date));
    images.truncate(n);
    images
}

async fn ping() -> &'static str {
    "pong"
}

async fn healthcheck(State(s): State<Arc<SeedState>>) -> Response {
    let ready = s.health.ready();
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    let body = json!({ "healthy": ready, "cachesSynced": s.health.synced() });
    (code, axum::Json(body)).into_response()
}

async fn status(State(s): State<Arc<SeedState>>) -> Response {
    let mut bakes = BTreeMap::new();
    if let Some(store) = s.health.bakes() {
        let state = store.state();
        let counts = crate::metrics::count_phases(state.iter().map(|b| b.as_ref()));
        for (phase, n) in crate::metrics::PHASES.iter().zip(counts) {
            bakes.insert(phase.as_str(), n);
        }
    }
    let body = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "role": format!("{:?}", s.health.role()),
        "ready": s.health.ready(),
        "bakeNamespace": s.namespace,
        "bakes": bakes,
    });
    axum::Json(body).into_response()
}

/// The catalogs of the operator's cache (no request per call); unavailable until it has synced.
fn catalogs(health: &Health) -> Result<Vec<Arc<AmiCatalog>>, ApiError> {
    match health.catalogs() {
        Some(store) if health.synced() => Ok(store.state()),
        _ => Err(ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            field: None,
            message: "the operator's caches have not synced yet; retry in a moment".into(),
        }),
    }
}

/// Image listings need the token unless the admin made them public.
fn may_read(s: &SeedState, headers: &HeaderMap) -> Result<(), ApiError> {
    if s.public_reads {
        return Ok(());
    }
    require_token(
        s,
        headers,
        "list images (or run the operator with --seed-api-public-reads)",
    )
}

async fn amis(State(s): State<Arc<SeedState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    may_read(&s, &headers)?;
    let catalogs = catalogs(&s.health)?;
    let latest: Vec<_> = catalogs
        .iter()
        .map(|c| {
            json!({
                "catalog": c.name_any(),
                "namespace": c.namespace(),
                "latest": c.status.as_ref().and_then(|s| s.latest.clone()),
            })
        })
        .collect();
    Ok(axum::Json(json!({ "catalogs": latest })).into_response())
}

async fn amis_for_service(
    State(s): State<Arc<SeedState>>,
    headers: HeaderMap,
    Path(service): Path<String>,
) -> Result<Response, ApiError> {
    may_read(&s, &headers)?;
    if !dns_label(&service) {
        return Err(ApiError::field(
            "service",
            "service must be a DNS-1123 label: lowercase letters, digits and '-'",
        ));
    }
    let catalogs = catalogs(&s.health)?;
    let images = service_images(&catalogs, &service, SERVICE_IMAGES);
    Ok(axum::Json(json!({ "service": service, "images": images })).into_response())
}

async fn bake(
    State(s): State<Arc<SeedState>>,
    headers: HeaderMap,
    Path((template, service, version, virt)): Path<(String, String, String, String)>,
) -> Result<Response, ApiError> {
    require_token(&s, &headers, "bake")?;
    let spec = parse_bake_request(&template, &service, &version, &virt)?;
    // An unknown template is the client's error, said at once, and makes no Bake.
    let templates: Api<BakeTemplate> = Api::all(s.client.clone());
    let Some(found) = templates
        .get_opt(&template)
        .await
        .map_err(|e| ApiError::internal(format!("reading the BakeTemplate failed: {e}")))?
    else {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            field: Some("template"),
            message: format!("no BakeTemplate {template:?}"),
        });
    };
    let deadline = tokio::time::Instant::now()
        + Duration::from_secs(u64::try_from(found.spec.timeout_seconds()).unwrap_or_default())
        + FOLLOW_START_SLACK;
    let bake = Bake {
        metadata: ObjectMeta {
            generate_name: Some(bake_name_prefix(&service, &version)),
            namespace: Some(s.namespace.clone()),
            ..Default::default()
        },
        spec,
        status: None,
    };
    let api: Api<Bake> = Api::namespaced(s.client.clone(), &s.namespace);
    let created = api
        .create(&PostParams::default(), &bake)
        .await
        .map_err(|e| match e {
            kube::Error::Api(status) if status.code == 422 || status.code == 400 => ApiError {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                field: None,
                message: status.message,
            },
            e => ApiError::internal(format!("creating the Bake failed: {e}")),
        })?;
    let name = created.name_any();
    tracing::info!(bake = %name, namespace = %s.namespace, "Bake created through the HTTP API");
    let (tx, rx) = mpsc::channel::<String>(64);
    tokio::spawn(async move {
        let (namespace, bake) = (s.namespace.clone(), name.clone());
        if tokio::time::timeout_at(deadline, follow(s, name, tx.clone()))
            .await
            .is_err()
        {
            let _ = tx
                .send(format!(
                    "stopped following: the Bake passed its deadline without ending; it goes on: kubectl -n {namespace} get bake {bake}\n"
                ))
                .await;
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|line| (Ok::<_, std::convert::Infallible>(line), rx))
    });
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// Streams a Bake's packer output to `tx`, then its final phase and AMI. Returns early, leaving
/// the Bake alone, when the client has gone.
async fn follow(s: Arc<SeedState>, name: String, tx: mpsc::Sender<String>) {
    let bakes: Api<Bake> = Api::namespaced(s.client.clone(), &s.namespace);
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &s.namespace);
    if tx
        .send(format!("bake {}/{name} created\n", s.namespace))
        .await
        .is_err()
    {
        return;
    }
    let poll = Duration::from_secs(1);
    let mut streamed = false;
    let final_bake = loop {
        if tx.is_closed() {
            return;
        }
        let bake = match bakes.get_opt(&name).await {
            Ok(Some(b)) => b,
            Ok(None) => {
                let _ = tx.send(format!("bake {name} was deleted\n")).await;
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, bake = %name, "reading the Bake failed");
                tokio::time::sleep(poll).await;
                continue;
            }
        };
        let pod_name = bake.status.as_ref().and_then(|st| st.pod_name.clone());
        if bake.phase().is_some_and(|p| p.is_terminal()) {
            // A bake quicker than the poll ended before its log was followed: its pod, kept
            // until the Bake goes, still has the whole log.
            if let (false, Some(pod_name)) = (streamed, pod_name)
                && !stream_log(&pods, &pod_name, false, &tx).await
            {
                return;
            }
            break bake;
        }
        if let (false, Some(pod_name)) = (streamed, pod_name) {
            let started = pods
                .get_opt(&pod_name)
                .await
                .ok()
                .flatten()
                .and_then(|p| p.status.and_then(|st| st.phase))
                .is_some_and(|phase| phase != "Pending");
            if started {
                streamed = true;
                if !stream_log(&pods, &pod_name, true, &tx).await {
                    return;
                }
                continue;
            }
        }
        tokio::time::sleep(poll).await;
    };
    let status = final_bake.status.unwrap_or_default();
    let phase = status.phase.unwrap_or(BakePhase::Failed);
    let mut last = format!("phase={}", phase.as_str());
    if let Some(ami) = status.ami_id {
        last.push_str(&format!(" amiId={ami}"));
    }
    if phase != BakePhase::Succeeded
        && let Some(m) = status.message
    {
        last.push_str(&format!(" message={m:?}"));
    }
    let _ = tx.send(format!("{last}\n")).await;
}

/// Sends a pod's log to `tx` line by line, following it while the pod runs if `follow`.
/// Returns false when the client has gone.
async fn stream_log(pods: &Api<Pod>, pod: &str, follow: bool, tx: &mpsc::Sender<String>) -> bool {
    let params = LogParams {
        follow,
        ..Default::default()
    };
    match pods.log_stream(pod, &params).await {
        Ok(reader) => {
            let mut lines = reader.lines();
            while let Some(Ok(line)) = lines.next().await {
                if tx.send(format!("{line}\n")).await.is_err() {
                    return false;
                }
            }
            true
        }
        // The pod may be gone already (deleted with a timed-out Bake, say): say so and go on.
        Err(e) => tx
            .send(format!("cannot read the bake pod's log: {e}\n"))
            .await
            .is_ok(),
    }
}

/// The routes of the seed's API.
pub fn router(state: Arc<SeedState>) -> Router {
    Router::new()
        .route("/ping", get(ping))
        .route("/healthcheck", get(healthcheck))
        .route("/status", get(status))
        .route("/amis", get(amis))
        .route("/amis/{service}", get(amis_for_service))
        .route(
            "/bake/{template}/{service}/{version}/{virtualization_type}",
            post(bake),
        )
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_request_becomes_a_bake_spec() {
        let spec = parse_bake_request("ebs-example", "simple-service", "1.0.4", "hvm").unwrap();
        assert_eq!(spec.service, "simple-service");
        assert_eq!(spec.virtualization_type, VirtualizationType::Hvm);
    }

    #[test]
    fn each_bad_value_is_refused_naming_its_field() {
        let field = |r: Result<BakeSpec, ApiError>| r.unwrap_err().field;
        assert_eq!(
            field(parse_bake_request("Bad_T", "s", "1", "hvm")),
            Some("template")
        );
        assert_eq!(
            field(parse_bake_request("t", "Simple_Service", "1", "hvm")),
            Some("service")
        );
        assert_eq!(
            field(parse_bake_request("t", "s", "1.0;rm", "hvm")),
            Some("version")
        );
        assert_eq!(field(parse_bake_request("t", "s", "-1", "hvm")), Some("version"));
        assert_eq!(
            field(parse_bake_request("t", "s", "1", "xen")),
            Some("virtualizationType")
        );
    }

    #[test]
    fn only_the_exact_bearer_token_authorizes() {
        assert!(authorized(Some("Bearer s3cret"), "s3cret"));
        assert!(!authorized(Some("Bearer s3cre"), "s3cret"));
        assert!(!authorized(Some("s3cret"), "s3cret"));
        assert!(!authorized(None, "s3cret"));
        assert!(!authorized(Some("Bearer "), ""));
        assert!(
            authorized(Some("bearer s3cret"), "s3cret"),
            "the scheme is case-insensitive"
        );
        assert!(authorized(Some("BEARER s3cret"), "s3cret"));
        assert!(!authorized(Some("Basic s3cret"), "s3cret"));
        assert!(!authorized(Some("Bearer s3cret2"), "s3cret"));
    }

    #[test]
    fn the_token_file_is_read_again_when_it_changes_and_the_last_token_kept_when_unreadable() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("token");
        std::fs::write(&path, "first\n").expect("write");
        let token = TokenFile::open(path.clone())
            .expect("readable")
            .expect("not empty");
        assert_eq!(token.token(), "first");
        // A different size is a change even within one mtime tick.
        std::fs::write(&path, "second-token\n").expect("write");
        assert_eq!(token.token(), "second-token");
        std::fs::remove_file(&path).expect("remove");
        assert_eq!(
            token.token(),
            "second-token",
            "kept while the file is being swapped"
        );
        std::fs::write(&path, "  \n").expect("write");
        assert!(
            TokenFile::open(path).expect("readable").is_none(),
            "an empty token is none"
        );
    }

    #[test]
    fn bake_names_are_dns_names_with_room_for_a_suffix() {
        assert_eq!(
            bake_name_prefix("simple-service", "1.0.4"),
            "simple-service-1.0.4-"
        );
        assert_eq!(bake_name_prefix("svc", "1.0+Build_7"), "svc-1.0-build-7-");
        assert!(bake_name_prefix(&"s".repeat(63), "1.0").len() <= 51);
        assert_eq!(bake_name_prefix("svc", "1..0"), "svc-1.0-");
        assert_eq!(bake_name_prefix("svc", "1.-RC.~2"), "svc-1.rc.2-");
    }

    fn catalog(service: Option<&str>, images: &[(&str, &str, Option<&str>)]) -> AmiCatalog {
        let mut c = AmiCatalog::new(
            "c",
            serde_json::from_value(json!({ "region": "us-east-1", "service": service })).unwrap(),
        );
        c.status = Some(crate::api::catalog::AmiCatalogStatus {
            images: images
                .iter()
                .map(|(id, date, svc)| CatalogImage {
                    image_id: id.to_string(),
                    creation_date: Some(date.to_string()),
                    service: svc.map(String::from),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        });
        c
    }

    #[test]
    fn service_images_are_the_newest_first_without_duplicates_and_at_most_n() {
        let a = catalog(
            None,
            &[
                ("ami-1", "2026-01-01T00:00:00Z", Some("svc")),
                ("ami-2", "2026-03-01T00:00:00Z", Some("svc")),
                ("ami-x", "2026-04-01T00:00:00Z", Some("other")),
            ],
        );
        let b = catalog(
            Some("svc"),
            &[
                ("ami-3", "2026-02-01T00:00:00Z", None),
                ("ami-2", "2026-03-01T00:00:00Z", None),
            ],
        );
        let ids: Vec<_> = service_images(&[Arc::new(a.clone()), Arc::new(b.clone())], "svc", 10)
            .into_iter()
            .map(|i| i.image_id)
            .collect();
        assert_eq!(ids, ["ami-2", "ami-3", "ami-1"]);
        assert_eq!(service_images(&[Arc::new(a), Arc::new(b)], "svc", 2).len(), 2);
    }
}
