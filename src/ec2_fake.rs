//! An EC2 that answers in memory, for unit tests of the code that calls EC2.
//!
//! It plugs in below the real SDK: [`FakeEc2::sdk_config`] gives an `SdkConfig` whose HTTP client
//! is the fake, so `crate::aws::Ec2` builds its per-region clients exactly as in production and
//! every call still goes through request serialisation, SigV4 signing, retries, XML parsing,
//! pagination and Baker's metrics interceptor. Nothing opens a socket.
//!
//! The fake reads the EC2 Query request (`Action=...&Filter.1.Name=...`), answers from its state
//! with EC2's XML, and logs each request. Only what Baker calls is served; any other action, and
//! any filter the fake does not know, is answered with EC2's error for it, so a test notices
//! instead of passing on an ignored filter.
//!
//! Images live per region, as in EC2. `CopyImage` reads its source from the source region and
//! makes an `available` copy at once, with a new snapshot per source snapshot and no tags: like
//! the rig's moto, it ignores `TagSpecification`s (each request is recorded, see
//! [`FakeEc2::copy_requests`], so a test can still check what was asked).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use aws_sdk_ec2::config::{Credentials, Region, SharedCredentialsProvider};
use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::{HttpRequest, HttpResponse};
use aws_smithy_runtime_api::client::result::ConnectorError;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_runtime_api::http::StatusCode;
use aws_smithy_runtime_api::shared::IntoShared;

/// The account the fake's credentials belong to: what owner `self` means.
pub(crate) const ACCOUNT: &str = "123456789012";

const XMLNS: &str = "http://ec2.amazonaws.com/doc/2016-11-15/";

/// An error EC2 answers with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FakeError {
    pub code: String,
    pub message: String,
    pub status: u16,
}

impl FakeError {
    pub(crate) fn new(code: &str, message: &str, status: u16) -> Self {
        FakeError {
            code: code.to_string(),
            message: message.to_string(),
            status,
        }
    }

    /// EC2's throttling answer, which the SDK retries with backoff.
    pub(crate) fn throttled() -> Self {
        Self::new("RequestLimitExceeded", "Request limit exceeded.", 503)
    }

    fn bad_request(code: &str, message: String) -> Self {
        FakeError {
            code: code.to_string(),
            message,
            status: 400,
        }
    }
}

/// What an injected failure does to a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    /// EC2 answers with this error.
    Error(FakeError),
    /// No answer: the connection fails (the SDK retries it as a transient error).
    Unreachable,
}

impl From<FakeError> for Failure {
    fn from(e: FakeError) -> Self {
        Failure::Error(e)
    }
}

/// One request that reached the fake: every attempt counts, so retries show here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FakeCall {
    pub region: String,
    pub action: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FakeImage {
    pub id: String,
    pub name: String,
    /// ISO 8601, as EC2 gives it; empty leaves it out.
    pub creation_date: String,
    pub state: String,
    pub virtualization_type: String,
    /// The owning account id.
    pub owner: String,
    /// `amazon` or `aws-marketplace` for their images: owner filters match it too.
    pub owner_alias: Option<String>,
    pub tags: BTreeMap<String, String>,
    /// Snapshots of its EBS block devices, one device each.
    pub snapshot_ids: Vec<String>,
    pub description: Option<String>,
    /// As DescribeImages gives it (`2027-01-01T00:00:00.000Z`); `None` when not deprecated.
    pub deprecation_time: Option<String>,
    /// Who besides the owner may launch it.
    pub launch_permissions: BTreeSet<FakeGrant>,
    /// Whether its snapshots are encrypted, and with which key (a copy made with `Encrypted`).
    pub encrypted: bool,
    pub kms_key_id: Option<String>,
}

/// A launch permission, as `LaunchPermission` names it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum FakeGrant {
    UserId(String),
    OrganizationArn(String),
    OrganizationalUnitArn(String),
}

impl FakeGrant {
    pub(crate) fn value(&self) -> &str {
        match self {
            FakeGrant::UserId(v) | FakeGrant::OrganizationArn(v) | FakeGrant::OrganizationalUnitArn(v) => v,
        }
    }

    fn xml(&self) -> String {
        match self {
            FakeGrant::UserId(v) => el("userId", v),
            FakeGrant::OrganizationArn(v) => el("organizationArn", v),
            FakeGrant::OrganizationalUnitArn(v) => el("organizationalUnitArn", v),
        }
    }
}

/// A snapshot's tags and create-volume permissions.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub(crate) struct FakeSnapshot {
    pub tags: BTreeMap<String, String>,
    /// Accounts that may create volumes from it.
    pub create_volume_permissions: BTreeSet<String>,
}

/// A CopyImage request as the fake read it, whatever the answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FakeCopy {
    /// The region the copy was asked in (its target).
    pub region: String,
    pub source_image_id: String,
    pub source_region: String,
    pub name: String,
    pub description: Option<String>,
    pub encrypted: bool,
    pub kms_key_id: Option<String>,
    pub client_token: Option<String>,
    /// Each `TagSpecification`: its resource type and tags (read, not applied).
    pub tag_specifications: Vec<(String, BTreeMap<String, String>)>,
    /// The copy EC2 answered with, `None` when it refused.
    pub image_id: Option<String>,
}

impl FakeImage {
    /// An available hvm image of [`ACCOUNT`], without tags or snapshots.
    pub(crate) fn new(id: &str, name: &str, creation_date: &str) -> Self {
        FakeImage {
            id: id.to_string(),
            name: name.to_string(),
            creation_date: creation_date.to_string(),
            state: "available".to_string(),
            virtualization_type: "hvm".to_string(),
            owner: ACCOUNT.to_string(),
            owner_alias: None,
            tags: BTreeMap::new(),
            snapshot_ids: Vec::new(),
            description: None,
            deprecation_time: None,
            launch_permissions: BTreeSet::new(),
            encrypted: false,
            kms_key_id: None,
        }
    }

    pub(crate) fn description(mut self, description: &str) -> Self {
        self.description = Some(description.to_string());
        self
    }

    pub(crate) fn tag(mut self, key: &str, value: &str) -> Self {
        self.tags.insert(key.to_string(), value.to_string());
        self
    }

    pub(crate) fn snapshot(mut self, id: &str) -> Self {
        self.snapshot_ids.push(id.to_string());
        self
    }

    pub(crate) fn state(mut self, state: &str) -> Self {
        self.state = state.to_string();
        self
    }

    pub(crate) fn virtualization(mut self, virtualization_type: &str) -> Self {
        self.virtualization_type = virtualization_type.to_string();
        self
    }

    /// Owned by another account, under an alias if given (`amazon`).
    pub(crate) fn owner(mut self, account: &str, alias: Option<&str>) -> Self {
        self.owner = account.to_string();
        self.owner_alias = alias.map(str::to_string);
        self
    }

    fn owned_by(&self, owner: &str) -> bool {
        let owner = if owner == "self" { ACCOUNT } else { owner };
        self.owner == owner || self.owner_alias.as_deref() == Some(owner)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FakeInstance {
    pub id: String,
    pub image_id: String,
    /// `pending`, `running`, `shutting-down`, `terminated`, `stopping` or `stopped`.
    pub state: String,
    pub key_name: Option<String>,
    /// Group id and name of each security group.
    pub security_groups: Vec<(String, String)>,
    pub tags: BTreeMap<String, String>,
}

impl FakeInstance {
    /// A running instance of an image, without key pair, groups or tags.
    pub(crate) fn new(id: &str, image_id: &str) -> Self {
        FakeInstance {
            id: id.to_string(),
            image_id: image_id.to_string(),
            state: "running".to_string(),
            key_name: None,
            security_groups: Vec::new(),
            tags: BTreeMap::new(),
        }
    }

    pub(crate) fn state(mut self, state: &str) -> Self {
        self.state = state.to_string();
        self
    }

    pub(crate) fn key_name(mut self, name: &str) -> Self {
        self.key_name = Some(name.to_string());
        self
    }

    pub(crate) fn security_group(mut self, id: &str, name: &str) -> Self {
        self.security_groups.push((id.to_string(), name.to_string()));
        self
    }

    pub(crate) fn tag(mut self, key: &str, value: &str) -> Self {
        self.tags.insert(key.to_string(), value.to_string());
        self
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FakeLaunchTemplate {
    pub id: String,
    pub name: String,
    /// The image id of each version, version 1 first; `None` for a version that names none.
    pub versions: Vec<Option<String>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FakeVolume {
    pub id: String,
    /// `available` (unattached) or `in-use`, as EC2 says.
    pub status: String,
    pub tags: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FakeSecurityGroup {
    pub id: String,
    pub name: String,
    pub tags: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FakeKeyPair {
    pub name: String,
    pub id: String,
    pub tags: BTreeMap<String, String>,
}

/// One region's resources.
#[derive(Debug, Default)]
struct RegionState {
    images: Vec<FakeImage>,
    snapshots: BTreeMap<String, FakeSnapshot>,
    instances: Vec<FakeInstance>,
    launch_templates: Vec<FakeLaunchTemplate>,
    volumes: Vec<FakeVolume>,
    security_groups: Vec<FakeSecurityGroup>,
    key_pairs: Vec<FakeKeyPair>,
    /// CopyImage's idempotency: each client token, what it asked and the copy it made.
    copy_tokens: BTreeMap<String, (CopyAsked, String)>,
}

/// What a CopyImage asked, for its client token: the same token asking otherwise is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
struct CopyAsked {
    source_image_id: String,
    source_region: String,
    name: String,
    description: Option<String>,
    encrypted: bool,
    kms_key_id: Option<String>,
}

#[derive(Debug)]
struct Injected {
    /// `None`: every call fails until cleared.
    remaining: Option<usize>,
    failure: Failure,
}

#[derive(Debug, Default)]
struct State {
    regions: BTreeMap<String, RegionState>,
    calls: Vec<FakeCall>,
    failures: HashMap<String, Injected>,
    /// Regions where every request fails this way.
    region_failures: HashMap<String, Failure>,
    copies: Vec<FakeCopy>,
    page_size: Option<usize>,
    requests: u64,
    /// Ids made so far (copies and their snapshots).
    made: u64,
}

/// An in-memory EC2 for every region at once. See the module docs.
#[derive(Debug, Default)]
pub(crate) struct FakeEc2 {
    state: Mutex<State>,
}

impl FakeEc2 {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// An `SdkConfig` whose every client, in any region, talks to this fake.
    ///
    /// Retries stay on, with production's three attempts, so tests see the SDK classify errors as
    /// it does against EC2 (a throttle is retried, a 400 is not); only the backoff shrinks to
    /// milliseconds. Note the SDK's retry quota is shared per region by every client in the
    /// process (500 tokens, 5 per throttled retry): a test that throttles hundreds of calls
    /// should use a region name of its own, which the fake accepts like any other.
    pub(crate) fn sdk_config(self: &Arc<Self>) -> aws_config::SdkConfig {
        aws_config::SdkConfig::builder()
            .behavior_version(aws_config::BehaviorVersion::latest())
            // Ec2 sets each client's region; this one only completes the config.
            .region(Region::new("us-east-1"))
            .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
                "AKIDFAKEEC2",
                "fake-secret",
                None,
                None,
                "ec2-fake",
            )))
            .retry_config(
                aws_sdk_ec2::config::retry::RetryConfig::standard()
                    .with_max_attempts(3)
                    .with_initial_backoff(Duration::from_millis(1))
                    .with_max_backoff(Duration::from_millis(5)),
            )
            .http_client(Connector(Arc::clone(self)))
            .build()
    }

    /// A `crate::aws::Ec2` on this fake.
    pub(crate) fn ec2(self: &Arc<Self>) -> crate::aws::Ec2 {
        crate::aws::Ec2::new(self.sdk_config())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked holding the lock leaves state that is still readable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn with_region<T>(&self, region: &str, f: impl FnOnce(&mut RegionState) -> T) -> T {
        f(self.lock().regions.entry(region.to_string()).or_default())
    }

    /// Registers an image and its snapshots.
    pub(crate) fn add_image(&self, region: &str, image: FakeImage) {
        self.with_region(region, |r| {
            for snapshot in &image.snapshot_ids {
                r.snapshots.entry(snapshot.clone()).or_default();
            }
            r.images.push(image);
        });
    }

    pub(crate) fn add_instance(&self, region: &str, instance: FakeInstance) {
        self.with_region(region, |r| r.instances.push(instance));
    }

    /// A launch template whose versions (1, 2, ...) name these images.
    pub(crate) fn add_launch_template(&self, region: &str, id: &str, name: &str, versions: &[Option<&str>]) {
        let template = FakeLaunchTemplate {
            id: id.to_string(),
            name: name.to_string(),
            versions: versions.iter().map(|v| v.map(str::to_string)).collect(),
        };
        self.with_region(region, |r| r.launch_templates.push(template));
    }

    pub(crate) fn add_volume(&self, region: &str, id: &str, status: &str, tags: &[(&str, &str)]) {
        let volume = FakeVolume {
            id: id.to_string(),
            status: status.to_string(),
            tags: tag_map(tags),
        };
        self.with_region(region, |r| r.volumes.push(volume));
    }

    pub(crate) fn add_security_group(&self, region: &str, id: &str, name: &str, tags: &[(&str, &str)]) {
        let group = FakeSecurityGroup {
            id: id.to_string(),
            name: name.to_string(),
            tags: tag_map(tags),
        };
        self.with_region(region, |r| r.security_groups.push(group));
    }

    pub(crate) fn add_key_pair(&self, region: &str, name: &str, tags: &[(&str, &str)]) {
        let key = FakeKeyPair {
            name: name.to_string(),
            id: format!("key-{name}"),
            tags: tag_map(tags),
        };
        self.with_region(region, |r| r.key_pairs.push(key));
    }

    pub(crate) fn images(&self, region: &str) -> Vec<FakeImage> {
        self.with_region(region, |r| r.images.clone())
    }

    pub(crate) fn snapshots(&self, region: &str) -> BTreeSet<String> {
        self.with_region(region, |r| r.snapshots.keys().cloned().collect())
    }

    pub(crate) fn image(&self, region: &str, id: &str) -> Option<FakeImage> {
        self.with_region(region, |r| r.images.iter().find(|i| i.id == id).cloned())
    }

    pub(crate) fn snapshot(&self, region: &str, id: &str) -> Option<FakeSnapshot> {
        self.with_region(region, |r| r.snapshots.get(id).cloned())
    }

    /// Every CopyImage request that reached a region's EC2, in order.
    pub(crate) fn copy_requests(&self) -> Vec<FakeCopy> {
        self.lock().copies.clone()
    }

    /// Takes a launch permission (an account, organization or OU) off an image, as a person
    /// would in the console; `true` if it had it. Not a request: the call log does not show it.
    pub(crate) fn remove_launch_permission(&self, region: &str, image_id: &str, who: &str) -> bool {
        self.with_region(region, |r| {
            r.images.iter_mut().find(|i| i.id == image_id).is_some_and(|i| {
                let before = i.launch_permissions.len();
                i.launch_permissions.retain(|g| g.value() != who);
                i.launch_permissions.len() < before
            })
        })
    }

    pub(crate) fn instances(&self, region: &str) -> Vec<FakeInstance> {
        self.with_region(region, |r| r.instances.clone())
    }

    pub(crate) fn launch_templates(&self, region: &str) -> Vec<FakeLaunchTemplate> {
        self.with_region(region, |r| r.launch_templates.clone())
    }

    pub(crate) fn volumes(&self, region: &str) -> Vec<FakeVolume> {
        self.with_region(region, |r| r.volumes.clone())
    }

    pub(crate) fn security_groups(&self, region: &str) -> Vec<FakeSecurityGroup> {
        self.with_region(region, |r| r.security_groups.clone())
    }

    pub(crate) fn key_pairs(&self, region: &str) -> Vec<FakeKeyPair> {
        self.with_region(region, |r| r.key_pairs.clone())
    }

    /// Pages every paginated Describe at this many items even when the request sets no
    /// `MaxResults` (EC2 then answers in one page), to prove the caller follows `NextToken`.
    pub(crate) fn set_page_size(&self, size: Option<usize>) {
        self.lock().page_size = size.map(|s| s.max(1));
    }

    /// Every call of `action` fails this way until [`Self::clear_failures`].
    pub(crate) fn fail_always(&self, action: &str, failure: impl Into<Failure>) {
        self.lock().failures.insert(
            action.to_string(),
            Injected {
                remaining: None,
                failure: failure.into(),
            },
        );
    }

    /// The next `times` requests of `action` fail this way; the SDK's retries are requests too.
    pub(crate) fn fail_next(&self, action: &str, times: usize, failure: impl Into<Failure>) {
        self.lock().failures.insert(
            action.to_string(),
            Injected {
                remaining: Some(times),
                failure: failure.into(),
            },
        );
    }

    /// Every request in `region`, of any action, fails this way until [`Self::clear_failures`]:
    /// EC2 answers `OptInRequired` (401) in a region the account has not enabled.
    pub(crate) fn fail_region(&self, region: &str, failure: impl Into<Failure>) {
        self.lock()
            .region_failures
            .insert(region.to_string(), failure.into());
    }

    pub(crate) fn clear_failures(&self) {
        let mut state = self.lock();
        state.failures.clear();
        state.region_failures.clear();
    }

    pub(crate) fn calls(&self) -> Vec<FakeCall> {
        self.lock().calls.clone()
    }

    /// Requests of `action` in any region.
    pub(crate) fn count(&self, action: &str) -> usize {
        self.lock().calls.iter().filter(|c| c.action == action).count()
    }

    /// Requests per action, in any region.
    pub(crate) fn counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for call in &self.lock().calls {
            *counts.entry(call.action.clone()).or_insert(0) += 1;
        }
        counts
    }

    pub(crate) fn count_in(&self, region: &str, action: &str) -> usize {
        self.lock()
            .calls
            .iter()
            .filter(|c| c.region == region && c.action == action)
            .count()
    }

    pub(crate) fn clear_calls(&self) {
        self.lock().calls.clear();
    }

    fn serve(&self, request: &HttpRequest) -> Result<HttpResponse, ConnectorError> {
        let region = region_of(request).unwrap_or_else(|| {
            panic!(
                "fake EC2: no region in the request's signature or host ({})",
                request.uri()
            )
        });
        // Query requests are small and in memory; a streaming body would be a bug here.
        let body = request
            .body()
            .bytes()
            .expect("fake EC2: an EC2 Query request body is in memory");
        let params = Params::parse(body);
        let action = params.get("Action").unwrap_or_default().to_string();

        let mut state = self.lock();
        state.requests += 1;
        let request_id = format!("fake-{:08}", state.requests);
        state.calls.push(FakeCall {
            region: region.clone(),
            action: action.clone(),
        });
        let region_failure = state.region_failures.get(&region).cloned();
        let injected = match state.failures.get_mut(&action) {
            _ if region_failure.is_some() => region_failure,
            Some(Injected {
                remaining: None,
                failure,
            }) => Some(failure.clone()),
            Some(Injected {
                remaining: Some(n),
                failure,
            }) if *n > 0 => {
                *n -= 1;
                Some(failure.clone())
            }
            _ => None,
        };
        let result = match injected {
            Some(Failure::Unreachable) => {
                return Err(ConnectorError::io("fake EC2: connection refused".into()));
            }
            Some(Failure::Error(e)) => Err(e),
            // It reads one region and writes another.
            None if action == "CopyImage" => copy_image(&mut state, &region, &params),
            None => {
                let page_size = state.page_size;
                let r = state.regions.entry(region).or_default();
                handle(r, &action, &params, page_size)
            }
        };
        Ok(match result {
            Ok(inner) => response(
                200,
                format!(
                    r#"<?xml version="1.0" encoding="UTF-8"?><{action}Response xmlns="{XMLNS}"><requestId>{request_id}</requestId>{inner}</{action}Response>"#
                ),
            ),
            Err(e) => response(
                e.status,
                format!(
                    r#"<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error><Code>{}</Code><Message>{}</Message></Error></Errors><RequestID>{request_id}</RequestID></Response>"#,
                    escape(&e.code),
                    escape(&e.message)
                ),
            ),
        })
    }
}

/// The SDK's HTTP client: hands each request to the fake. Implements the SDK's own connector
/// traits, the same ones its test utilities implement.
#[derive(Clone, Debug)]
struct Connector(Arc<FakeEc2>);

impl HttpConnector for Connector {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        HttpConnectorFuture::ready(self.0.serve(&request))
    }
}

impl HttpClient for Connector {
    fn http_connector(&self, _: &HttpConnectorSettings, _: &RuntimeComponents) -> SharedHttpConnector {
        self.clone().into_shared()
    }
}

fn response(status: u16, body: String) -> HttpResponse {
    let status = StatusCode::try_from(status)
        .unwrap_or_else(|e| panic!("fake EC2: {status} is not an HTTP status: {e}"));
    let mut response = HttpResponse::new(status, body.into());
    response
        .headers_mut()
        .insert("content-type", "text/xml;charset=UTF-8");
    response
}

/// The region the request was signed for (the SigV4 credential scope,
/// `Credential=AKID/20260101/eu-west-1/ec2/aws4_request`), else the one in the host
/// (`ec2.eu-west-1.amazonaws.com`). The signature names exactly the region Ec2 gave the client.
fn region_of(request: &HttpRequest) -> Option<String> {
    let signed = request.headers().get("authorization").and_then(|auth| {
        let scope = auth.split("Credential=").nth(1)?.split(',').next()?;
        scope.split('/').nth(2).map(str::to_string)
    });
    signed.or_else(|| {
        let host = request.uri().split("://").nth(1)?.split(['/', ':']).next()?;
        let mut labels = host.split('.');
        (labels.next()? == "ec2").then_some(())?;
        labels.next().map(str::to_string)
    })
}

/// The form-encoded parameters of a Query request.
struct Params(Vec<(String, String)>);

/// A `Filter.N`: its name and values.
type Filter = (String, Vec<String>);

impl Params {
    fn parse(body: &[u8]) -> Self {
        Params(form_urlencoded::parse(body).into_owned().collect())
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// A Query list: `Prefix.1`, `Prefix.2`, ... in index order.
    fn list(&self, prefix: &str) -> Vec<String> {
        let mut items: Vec<(u32, String)> = self
            .0
            .iter()
            .filter_map(|(k, v)| {
                let index = k.strip_prefix(prefix)?.strip_prefix('.')?.parse().ok()?;
                Some((index, v.clone()))
            })
            .collect();
        items.sort();
        items.into_iter().map(|(_, v)| v).collect()
    }

    /// A Query list of structures: `Prefix.1.Field`, `Prefix.2.Field`, ... in index order, each
    /// as the parameters under its index (`Field`, `Sub.1.Key`, ...).
    fn structs(&self, prefix: &str) -> Vec<Params> {
        let mut by_index: BTreeMap<u32, Vec<(String, String)>> = BTreeMap::new();
        for (k, v) in &self.0 {
            let Some(rest) = k.strip_prefix(prefix).and_then(|r| r.strip_prefix('.')) else {
                continue;
            };
            if let Some((n, field)) = rest.split_once('.')
                && let Ok(n) = n.parse::<u32>()
            {
                by_index
                    .entry(n)
                    .or_default()
                    .push((field.to_string(), v.clone()));
            }
        }
        by_index.into_values().map(Params).collect()
    }

    /// Tags as `Tag.N.Key` / `Tag.N.Value` give them.
    fn tags(&self, prefix: &str) -> Result<BTreeMap<String, String>, FakeError> {
        let mut tags = BTreeMap::new();
        for tag in self.structs(prefix) {
            let key = tag.get("Key").ok_or_else(|| {
                FakeError::bad_request("InvalidParameterValue", "Tag keys must not be empty".into())
            })?;
            let value = tag.get("Value").unwrap_or_default();
            // EC2's limits on a tag.
            if key.chars().count() > 128 || value.chars().count() > 256 {
                return Err(FakeError::bad_request(
                    "InvalidParameterValue",
                    format!("Tag {key}: a key has at most 128 characters and a value at most 256"),
                ));
            }
            tags.insert(key.to_string(), value.to_string());
        }
        Ok(tags)
    }

    /// Refuses a parameter the fake does not serve for `action` (besides `Action` and
    /// `Version`): `allowed` names each, or a prefix ending in `.` for a list.
    fn only(&self, action: &str, allowed: &[&str]) -> Result<(), FakeError> {
        let served = |k: &str| {
            k == "Action"
                || k == "Version"
                || allowed.iter().any(|a| {
                    if a.ends_with('.') {
                        k.starts_with(a)
                    } else {
                        k == *a
                    }
                })
        };
        match self.0.iter().find(|(k, _)| !served(k)) {
            Some((k, _)) => Err(FakeError::bad_request(
                "InvalidParameterValue",
                format!("The fake EC2 does not serve the parameter {k} of {action}"),
            )),
            None => Ok(()),
        }
    }

    fn filters(&self) -> Vec<Filter> {
        let mut indices: Vec<u32> = self
            .0
            .iter()
            .filter_map(|(k, _)| k.strip_prefix("Filter.")?.strip_suffix(".Name")?.parse().ok())
            .collect();
        indices.sort();
        indices
            .into_iter()
            .filter_map(|n| {
                let name = self.get(&format!("Filter.{n}.Name"))?.to_string();
                Some((name, self.list(&format!("Filter.{n}.Value"))))
            })
            .collect()
    }
}

fn handle(
    r: &mut RegionState,
    action: &str,
    p: &Params,
    page_size: Option<usize>,
) -> Result<String, FakeError> {
    match action {
        "DescribeImages" => describe_images(r, p, page_size),
        "DescribeInstances" => describe_instances(r, p, page_size),
        "DescribeLaunchTemplates" => describe_launch_templates(r, p, page_size),
        "DescribeLaunchTemplateVersions" => describe_launch_template_versions(r, p, page_size),
        "DescribeSecurityGroups" => describe_security_groups(r, p, page_size),
        "DescribeKeyPairs" => describe_key_pairs(r, p),
        "DescribeVolumes" => describe_volumes(r, p, page_size),
        "DeregisterImage" => deregister_image(r, p),
        "DeleteSnapshot" => delete_snapshot(r, p),
        "TerminateInstances" => terminate_instances(r, p),
        "DeleteSecurityGroup" => delete_security_group(r, p),
        "DeleteKeyPair" => delete_key_pair(r, p),
        "DeleteVolume" => delete_volume(r, p),
        "CreateTags" => create_tags(r, p),
        "ModifyImageAttribute" => modify_image_attribute(r, p),
        "DescribeImageAttribute" => describe_image_attribute(r, p),
        "ModifySnapshotAttribute" => modify_snapshot_attribute(r, p),
        "DescribeSnapshotAttribute" => describe_snapshot_attribute(r, p),
        "EnableImageDeprecation" => enable_image_deprecation(r, p),
        _ => Err(FakeError::bad_request(
            "InvalidAction",
            format!("The action {action} is not valid for this web service."),
        )),
    }
}

fn required<'p>(p: &'p Params, key: &str) -> Result<&'p str, FakeError> {
    p.get(key).ok_or_else(|| {
        FakeError::bad_request(
            "MissingParameter",
            format!("The request must contain the parameter {key}"),
        )
    })
}

/// A resource the Describe filters apply to.
trait Filtered {
    /// The filter names the fake serves for this resource, besides `tag:KEY` and `tag-key`.
    const FILTERS: &'static [&'static str];
    fn tags(&self) -> &BTreeMap<String, String>;
    /// The resource's values for one of [`Self::FILTERS`].
    fn field(&self, name: &str) -> Vec<&str>;
}

/// EC2 refuses a filter it does not know; so does the fake for one it does not serve, rather than
/// ignore it and answer more than EC2 would.
fn check_filters<R: Filtered>(filters: &[Filter]) -> Result<(), FakeError> {
    match filters.iter().find(|(name, _)| {
        !(name.starts_with("tag:") || name == "tag-key" || R::FILTERS.contains(&name.as_str()))
    }) {
        Some((name, _)) => Err(FakeError::bad_request(
            "InvalidParameterValue",
            format!("The filter '{name}' is invalid (the fake EC2 serves only the filters Baker uses)"),
        )),
        None => Ok(()),
    }
}

/// Filters AND together; a filter's values OR together and may use `*` and `?`.
fn matches<R: Filtered>(filters: &[Filter], r: &R) -> bool {
    filters.iter().all(|(name, values)| {
        let have: Vec<&str> = if let Some(key) = name.strip_prefix("tag:") {
            r.tags().get(key).map(String::as_str).into_iter().collect()
        } else if name == "tag-key" {
            r.tags().keys().map(String::as_str).collect()
        } else {
            r.field(name)
        };
        values.iter().any(|v| have.iter().any(|h| glob(v, h)))
    })
}

fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    // Classic two-pointer wildcard match with backtracking to the last `*`.
    let (mut i, mut j, mut star, mut mark) = (0, 0, None, 0);
    while j < t.len() {
        if i < p.len() && (p[i] == '?' || p[i] == t[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some(i);
            mark = j;
            i += 1;
        } else if let Some(s) = star {
            i = s + 1;
            mark += 1;
            j = mark;
        } else {
            return false;
        }
    }
    p[i..].iter().all(|c| *c == '*')
}

/// One page of `items`: `MaxResults` if the request sets it, else the fake's page size, else
/// all; the token is the offset of the next page.
fn page<T>(
    items: Vec<T>,
    p: &Params,
    page_size: Option<usize>,
) -> Result<(Vec<T>, Option<String>), FakeError> {
    let start = match p.get("NextToken") {
        Some(token) => token
            .strip_prefix("fake-page-")
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| *n <= items.len())
            .ok_or_else(|| {
                FakeError::bad_request(
                    "InvalidPaginationToken",
                    format!("Invalid pagination token {token}"),
                )
            })?,
        None => 0,
    };
    let max_results = p.get("MaxResults").and_then(|m| m.parse::<usize>().ok());
    let size = max_results.or(page_size).unwrap_or(usize::MAX).max(1);
    let end = start.saturating_add(size).min(items.len());
    let next = (end < items.len()).then(|| format!("fake-page-{end}"));
    Ok((items.into_iter().skip(start).take(end - start).collect(), next))
}

fn next_token(next: Option<String>) -> String {
    next.map(|t| el("nextToken", &t)).unwrap_or_default()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

fn el(name: &str, value: &str) -> String {
    format!("<{name}>{}</{name}>", escape(value))
}

fn items(name: &str, items: impl IntoIterator<Item = String>) -> String {
    let inner: String = items.into_iter().map(|i| format!("<item>{i}</item>")).collect();
    format!("<{name}>{inner}</{name}>")
}

fn tag_set(tags: &BTreeMap<String, String>) -> String {
    items("tagSet", tags.iter().map(|(k, v)| el("key", k) + &el("value", v)))
}

fn tag_map(tags: &[(&str, &str)]) -> BTreeMap<String, String> {
    tags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn done() -> String {
    el("return", "true")
}

impl Filtered for FakeImage {
    const FILTERS: &'static [&'static str] =
        &["image-id", "name", "owner-id", "state", "virtualization-type"];
    fn tags(&self) -> &BTreeMap<String, String> {
        &self.tags
    }
    fn field(&self, name: &str) -> Vec<&str> {
        vec![match name {
            "image-id" => self.id.as_str(),
            "name" => &self.name,
            "owner-id" => &self.owner,
            "state" => &self.state,
            "virtualization-type" => &self.virtualization_type,
            _ => return Vec::new(),
        }]
    }
}

fn describe_images(r: &RegionState, p: &Params, page_size: Option<usize>) -> Result<String, FakeError> {
    let filters = p.filters();
    check_filters::<FakeImage>(&filters)?;
    let ids = p.list("ImageId");
    if let Some(missing) = ids.iter().find(|id| !r.images.iter().any(|i| &&i.id == id)) {
        return Err(FakeError::bad_request(
            "InvalidAMIID.NotFound",
            format!("The image id '[{missing}]' does not exist"),
        ));
    }
    let owners = p.list("Owner");
    let found: Vec<&FakeImage> = r
        .images
        .iter()
        .filter(|i| ids.is_empty() || ids.contains(&i.id))
        .filter(|i| owners.is_empty() || owners.iter().any(|o| i.owned_by(o)))
        .filter(|i| matches(&filters, *i))
        .collect();
    let (found, next) = page(found, p, page_size)?;
    let images = found.into_iter().map(|i| {
        let devices = i.snapshot_ids.iter().enumerate().map(|(n, snapshot)| {
            let device = format!("/dev/xvd{}", char::from(b'a' + (n % 26) as u8));
            let key = i
                .kms_key_id
                .as_deref()
                .map(|k| el("kmsKeyId", k))
                .unwrap_or_default();
            el("deviceName", &device)
                + "<ebs>"
                + &el("snapshotId", snapshot)
                + &el("encrypted", if i.encrypted { "true" } else { "false" })
                + &key
                + "</ebs>"
        });
        [
            el("imageId", &i.id),
            el("imageLocation", &format!("{}/{}", i.owner, i.name)),
            el("imageState", &i.state),
            el("imageOwnerId", &i.owner),
            i.owner_alias
                .as_deref()
                .map(|a| el("imageOwnerAlias", a))
                .unwrap_or_default(),
            if i.creation_date.is_empty() {
                String::new()
            } else {
                el("creationDate", &i.creation_date)
            },
            el("isPublic", "false"),
            el("architecture", "x86_64"),
            el("imageType", "machine"),
            el("name", &i.name),
            i.description
                .as_deref()
                .map(|d| el("description", d))
                .unwrap_or_default(),
            i.deprecation_time
                .as_deref()
                .map(|t| el("deprecationTime", t))
                .unwrap_or_default(),
            el("rootDeviceType", "ebs"),
            el("rootDeviceName", "/dev/xvda"),
            items("blockDeviceMapping", devices),
            el("virtualizationType", &i.virtualization_type),
            tag_set(&i.tags),
            el("hypervisor", "xen"),
        ]
        .concat()
    });
    Ok(items("imagesSet", images) + &next_token(next))
}

impl Filtered for FakeInstance {
    const FILTERS: &'static [&'static str] = &["image-id", "instance-id", "instance-state-name", "key-name"];
    fn tags(&self) -> &BTreeMap<String, String> {
        &self.tags
    }
    fn field(&self, name: &str) -> Vec<&str> {
        match name {
            "image-id" => vec![&self.image_id],
            "instance-id" => vec![&self.id],
            "instance-state-name" => vec![&self.state],
            "key-name" => self.key_name.as_deref().into_iter().collect(),
            _ => Vec::new(),
        }
    }
}

fn instance_state(state: &str) -> String {
    let code = match state {
        "pending" => 0,
        "running" => 16,
        "shutting-down" => 32,
        "terminated" => 48,
        "stopping" => 64,
        "stopped" => 80,
        other => panic!("fake EC2: {other} is not an instance state"),
    };
    el("code", &code.to_string()) + &el("name", state)
}

fn describe_instances(r: &RegionState, p: &Params, page_size: Option<usize>) -> Result<String, FakeError> {
    let filters = p.filters();
    check_filters::<FakeInstance>(&filters)?;
    let ids = p.list("InstanceId");
    let found: Vec<&FakeInstance> = r
        .instances
        .iter()
        .filter(|i| ids.is_empty() || ids.contains(&i.id))
        .filter(|i| matches(&filters, *i))
        .collect();
    let (found, next) = page(found, p, page_size)?;
    // One reservation per instance, as a RunInstances of one instance makes.
    let reservations = found.into_iter().map(|i| {
        let groups = i
            .security_groups
            .iter()
            .map(|(id, name)| el("groupId", id) + &el("groupName", name));
        let instance = [
            el("instanceId", &i.id),
            el("imageId", &i.image_id),
            format!("<instanceState>{}</instanceState>", instance_state(&i.state)),
            i.key_name
                .as_deref()
                .map(|k| el("keyName", k))
                .unwrap_or_default(),
            el("instanceType", "t3.micro"),
            items("groupSet", groups),
            tag_set(&i.tags),
        ]
        .concat();
        el("reservationId", &format!("r-{}", i.id.trim_start_matches("i-")))
            + &el("ownerId", ACCOUNT)
            + &items("instancesSet", [instance])
    });
    Ok(items("reservationSet", reservations) + &next_token(next))
}

impl Filtered for FakeLaunchTemplate {
    const FILTERS: &'static [&'static str] = &["launch-template-name"];
    fn tags(&self) -> &BTreeMap<String, String> {
        static NONE: BTreeMap<String, String> = BTreeMap::new();
        &NONE
    }
    fn field(&self, name: &str) -> Vec<&str> {
        match name {
            "launch-template-name" => vec![&self.name],
            _ => Vec::new(),
        }
    }
}

fn describe_launch_templates(
    r: &RegionState,
    p: &Params,
    page_size: Option<usize>,
) -> Result<String, FakeError> {
    let filters = p.filters();
    check_filters::<FakeLaunchTemplate>(&filters)?;
    let (ids, names) = (p.list("LaunchTemplateId"), p.list("LaunchTemplateName"));
    let found: Vec<&FakeLaunchTemplate> = r
        .launch_templates
        .iter()
        .filter(|t| ids.is_empty() || ids.contains(&t.id))
        .filter(|t| names.is_empty() || names.contains(&t.name))
        .filter(|t| matches(&filters, *t))
        .collect();
    let (found, next) = page(found, p, page_size)?;
    let templates = found.into_iter().map(|t| {
        let latest = t.versions.len().max(1).to_string();
        el("launchTemplateId", &t.id)
            + &el("launchTemplateName", &t.name)
            + &el("defaultVersionNumber", "1")
            + &el("latestVersionNumber", &latest)
    });
    Ok(items("launchTemplates", templates) + &next_token(next))
}

fn describe_launch_template_versions(
    r: &RegionState,
    p: &Params,
    page_size: Option<usize>,
) -> Result<String, FakeError> {
    let template = match (p.get("LaunchTemplateId"), p.get("LaunchTemplateName")) {
        (Some(id), _) => r.launch_templates.iter().find(|t| t.id == id).ok_or_else(|| {
            FakeError::bad_request(
                "InvalidLaunchTemplateId.NotFound",
                format!("The specified launch template, with template ID {id}, does not exist."),
            )
        })?,
        (None, Some(name)) => r
            .launch_templates
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| {
                FakeError::bad_request(
                    "InvalidLaunchTemplateName.NotFoundException",
                    format!("The specified launch template, with template name {name}, does not exist."),
                )
            })?,
        (None, None) => {
            return Err(FakeError::bad_request(
                "MissingParameter",
                "The request must contain the parameter LaunchTemplateId or LaunchTemplateName".into(),
            ));
        }
    };
    let versions: Vec<(usize, &Option<String>)> = template.versions.iter().enumerate().collect();
    let (versions, next) = page(versions, p, page_size)?;
    let versions = versions.into_iter().map(|(n, image)| {
        let data = image.as_deref().map(|i| el("imageId", i)).unwrap_or_default();
        el("launchTemplateId", &template.id)
            + &el("launchTemplateName", &template.name)
            + &el("versionNumber", &(n + 1).to_string())
            + &el("defaultVersion", if n == 0 { "true" } else { "false" })
            + &format!("<launchTemplateData>{data}</launchTemplateData>")
    });
    Ok(items("launchTemplateVersionSet", versions) + &next_token(next))
}

impl Filtered for FakeSecurityGroup {
    const FILTERS: &'static [&'static str] = &["group-id", "group-name"];
    fn tags(&self) -> &BTreeMap<String, String> {
        &self.tags
    }
    fn field(&self, name: &str) -> Vec<&str> {
        match name {
            "group-id" => vec![&self.id],
            "group-name" => vec![&self.name],
            _ => Vec::new(),
        }
    }
}

fn describe_security_groups(
    r: &RegionState,
    p: &Params,
    page_size: Option<usize>,
) -> Result<String, FakeError> {
    let filters = p.filters();
    check_filters::<FakeSecurityGroup>(&filters)?;
    let ids = p.list("GroupId");
    let found: Vec<&FakeSecurityGroup> = r
        .security_groups
        .iter()
        .filter(|g| ids.is_empty() || ids.contains(&g.id))
        .filter(|g| matches(&filters, *g))
        .collect();
    let (found, next) = page(found, p, page_size)?;
    let groups = found.into_iter().map(|g| {
        el("ownerId", ACCOUNT)
            + &el("groupId", &g.id)
            + &el("groupName", &g.name)
            + &el("groupDescription", &g.name)
            + &tag_set(&g.tags)
    });
    Ok(items("securityGroupInfo", groups) + &next_token(next))
}

impl Filtered for FakeKeyPair {
    const FILTERS: &'static [&'static str] = &["key-name", "key-pair-id"];
    fn tags(&self) -> &BTreeMap<String, String> {
        &self.tags
    }
    fn field(&self, name: &str) -> Vec<&str> {
        match name {
            "key-name" => vec![&self.name],
            "key-pair-id" => vec![&self.id],
            _ => Vec::new(),
        }
    }
}

/// DescribeKeyPairs has no pagination in EC2.
fn describe_key_pairs(r: &RegionState, p: &Params) -> Result<String, FakeError> {
    let filters = p.filters();
    check_filters::<FakeKeyPair>(&filters)?;
    let names = p.list("KeyName");
    let keys = r
        .key_pairs
        .iter()
        .filter(|k| names.is_empty() || names.contains(&k.name))
        .filter(|k| matches(&filters, *k))
        .map(|k| el("keyPairId", &k.id) + &el("keyName", &k.name) + &tag_set(&k.tags));
    Ok(items("keySet", keys))
}

impl Filtered for FakeVolume {
    const FILTERS: &'static [&'static str] = &["status", "volume-id"];
    fn tags(&self) -> &BTreeMap<String, String> {
        &self.tags
    }
    fn field(&self, name: &str) -> Vec<&str> {
        match name {
            "status" => vec![&self.status],
            "volume-id" => vec![&self.id],
            _ => Vec::new(),
        }
    }
}

fn describe_volumes(r: &RegionState, p: &Params, page_size: Option<usize>) -> Result<String, FakeError> {
    let filters = p.filters();
    check_filters::<FakeVolume>(&filters)?;
    let ids = p.list("VolumeId");
    let found: Vec<&FakeVolume> = r
        .volumes
        .iter()
        .filter(|v| ids.is_empty() || ids.contains(&v.id))
        .filter(|v| matches(&filters, *v))
        .collect();
    let (found, next) = page(found, p, page_size)?;
    let volumes = found.into_iter().map(|v| {
        el("volumeId", &v.id)
            + &el("size", "8")
            + &el("availabilityZone", "fake-az-1a")
            + &el("status", &v.status)
            + &el("volumeType", "gp3")
            + &tag_set(&v.tags)
    });
    Ok(items("volumeSet", volumes) + &next_token(next))
}

fn deregister_image(r: &mut RegionState, p: &Params) -> Result<String, FakeError> {
    let id = required(p, "ImageId")?;
    let Some(at) = r.images.iter().position(|i| i.id == id) else {
        return Err(FakeError::bad_request(
            "InvalidAMIID.NotFound",
            format!("The image id '[{id}]' does not exist"),
        ));
    };
    // Its snapshots stay, as in EC2: deleting them is the caller's job.
    r.images.remove(at);
    Ok(done())
}

fn delete_snapshot(r: &mut RegionState, p: &Params) -> Result<String, FakeError> {
    let id = required(p, "SnapshotId")?;
    if !r.snapshots.contains_key(id) {
        return Err(FakeError::bad_request(
            "InvalidSnapshot.NotFound",
            format!("The snapshot '{id}' does not exist."),
        ));
    }
    if let Some(image) = r.images.iter().find(|i| i.snapshot_ids.iter().any(|s| s == id)) {
        return Err(FakeError::bad_request(
            "InvalidSnapshot.InUse",
            format!("The snapshot {id} is currently in use by {}", image.id),
        ));
    }
    r.snapshots.remove(id);
    Ok(done())
}

fn terminate_instances(r: &mut RegionState, p: &Params) -> Result<String, FakeError> {
    let ids = p.list("InstanceId");
    if let Some(missing) = ids.iter().find(|id| !r.instances.iter().any(|i| &&i.id == id)) {
        return Err(FakeError::bad_request(
            "InvalidInstanceID.NotFound",
            format!("The instance ID '{missing}' does not exist"),
        ));
    }
    let mut changes = Vec::new();
    for instance in r.instances.iter_mut().filter(|i| ids.contains(&i.id)) {
        let previous = std::mem::replace(&mut instance.state, "terminated".to_string());
        // Terminated at once (EC2 passes through shutting-down) and still described, as EC2 keeps
        // terminated instances visible for a while.
        changes.push(
            el("instanceId", &instance.id)
                + &format!("<currentState>{}</currentState>", instance_state("terminated"))
                + &format!("<previousState>{}</previousState>", instance_state(&previous)),
        );
    }
    Ok(items("instancesSet", changes))
}

fn delete_security_group(r: &mut RegionState, p: &Params) -> Result<String, FakeError> {
    let id = required(p, "GroupId")?;
    let Some(at) = r.security_groups.iter().position(|g| g.id == id) else {
        return Err(FakeError::bad_request(
            "InvalidGroup.NotFound",
            format!("The security group '{id}' does not exist"),
        ));
    };
    if r.instances
        .iter()
        .any(|i| i.state != "terminated" && i.security_groups.iter().any(|(g, _)| g == id))
    {
        return Err(FakeError::bad_request(
            "DependencyViolation",
            format!("resource {id} has a dependent object"),
        ));
    }
    r.security_groups.remove(at);
    Ok(done() + &el("groupId", id))
}

/// Deleting a key pair that does not exist succeeds, as in EC2.
fn delete_key_pair(r: &mut RegionState, p: &Params) -> Result<String, FakeError> {
    let (name, id) = (p.get("KeyName"), p.get("KeyPairId"));
    if name.is_none() && id.is_none() {
        required(p, "KeyName")?;
    }
    let removed = r
        .key_pairs
        .iter()
        .position(|k| Some(k.name.as_str()) == name || Some(k.id.as_str()) == id)
        .map(|at| r.key_pairs.remove(at));
    Ok(done() + &removed.map(|k| el("keyPairId", &k.id)).unwrap_or_default())
}

fn delete_volume(r: &mut RegionState, p: &Params) -> Result<String, FakeError> {
    let id = required(p, "VolumeId")?;
    let Some(at) = r.volumes.iter().position(|v| v.id == id) else {
        return Err(FakeError::bad_request(
            "InvalidVolume.NotFound",
            format!("The volume '{id}' does not exist."),
        ));
    };
    if r.volumes[at].status == "in-use" {
        return Err(FakeError::bad_request(
            "VolumeInUse",
            format!("Volume {id} is currently attached"),
        ));
    }
    r.volumes.remove(at);
    Ok(done())
}

fn image_not_found(id: &str) -> FakeError {
    FakeError::bad_request(
        "InvalidAMIID.NotFound",
        format!("The image id '[{id}]' does not exist"),
    )
}

fn snapshot_not_found(id: &str) -> FakeError {
    FakeError::bad_request(
        "InvalidSnapshot.NotFound",
        format!("The snapshot '{id}' does not exist."),
    )
}

fn image_mut<'r>(r: &'r mut RegionState, id: &str) -> Result<&'r mut FakeImage, FakeError> {
    r.images
        .iter_mut()
        .find(|i| i.id == id)
        .ok_or_else(|| image_not_found(id))
}

/// EC2's time format in answers, to the millisecond.
fn ec2_time(t: jiff::Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%S.000Z").to_string()
}

/// CopyImage, in the target region `region`: reads the source image in `SourceRegion`, makes an
/// available copy with the same name, the given description and a new snapshot per source
/// snapshot, and applies no tags (see the module docs). A client token already used answers its
/// copy again (refused if it asked otherwise); a name taken in the region is refused, as EC2
/// allows one image of a name per region.
fn copy_image(state: &mut State, region: &str, p: &Params) -> Result<String, FakeError> {
    p.only(
        "CopyImage",
        &[
            "SourceImageId",
            "SourceRegion",
            "Name",
            "Description",
            "Encrypted",
            "KmsKeyId",
            "ClientToken",
            "TagSpecification.",
        ],
    )?;
    let source_image_id = required(p, "SourceImageId")?.to_string();
    let source_region = required(p, "SourceRegion")?.to_string();
    let name = required(p, "Name")?.to_string();
    let mut tag_specifications = Vec::new();
    for spec in p.structs("TagSpecification") {
        let resource = spec.get("ResourceType").unwrap_or_default().to_string();
        tag_specifications.push((resource, spec.tags("Tag")?));
    }
    let asked = CopyAsked {
        source_image_id,
        source_region,
        name,
        description: p.get("Description").map(str::to_string),
        encrypted: p.get("Encrypted") == Some("true"),
        kms_key_id: p.get("KmsKeyId").map(str::to_string),
    };
    let client_token = p.get("ClientToken").map(str::to_string);
    let made = make_copy(state, region, &asked, client_token.as_deref());
    state.copies.push(FakeCopy {
        region: region.to_string(),
        source_image_id: asked.source_image_id,
        source_region: asked.source_region,
        name: asked.name,
        description: asked.description,
        encrypted: asked.encrypted,
        kms_key_id: asked.kms_key_id,
        client_token,
        tag_specifications,
        image_id: made.as_ref().ok().cloned(),
    });
    made.map(|id| el("imageId", &id))
}

fn make_copy(
    state: &mut State,
    region: &str,
    asked: &CopyAsked,
    client_token: Option<&str>,
) -> Result<String, FakeError> {
    if let Some(token) = client_token
        && let Some((before, id)) = state.regions.get(region).and_then(|r| r.copy_tokens.get(token))
    {
        return if before == asked {
            Ok(id.clone())
        } else {
            Err(FakeError::bad_request(
                "IdempotentParameterMismatch",
                format!("The client token {token} was used before with other parameters"),
            ))
        };
    }
    // EC2: "If you specify a KMS key, you must also set the encrypted state to true."
    if asked.kms_key_id.is_some() && !asked.encrypted {
        return Err(FakeError::bad_request(
            "InvalidParameterCombination",
            "KmsKeyId requires Encrypted to be true".into(),
        ));
    }
    let source = state
        .regions
        .get(&asked.source_region)
        .and_then(|r| r.images.iter().find(|i| i.id == asked.source_image_id))
        .cloned()
        .ok_or_else(|| image_not_found(&asked.source_image_id))?;
    let target = state.regions.entry(region.to_string()).or_default();
    if let Some(taken) = target.images.iter().find(|i| i.name == asked.name) {
        return Err(FakeError::bad_request(
            "InvalidAMIName.Duplicate",
            format!("AMI name {} is already in use by AMI {}", asked.name, taken.id),
        ));
    }
    state.made += 1;
    let id = format!("ami-c{:016x}", state.made);
    let snapshot_ids: Vec<String> = source
        .snapshot_ids
        .iter()
        .enumerate()
        .map(|(n, _)| format!("snap-c{:012x}{n:04x}", state.made))
        .collect();
    let copy = FakeImage {
        id: id.clone(),
        creation_date: ec2_time(jiff::Timestamp::now()),
        description: asked.description.clone(),
        snapshot_ids,
        encrypted: asked.encrypted || source.encrypted,
        kms_key_id: asked.kms_key_id.clone(),
        ..FakeImage::new("", &asked.name, "")
    }
    .virtualization(&source.virtualization_type);
    for snapshot in &copy.snapshot_ids {
        target.snapshots.entry(snapshot.clone()).or_default();
    }
    target.images.push(copy);
    if let Some(token) = client_token {
        target
            .copy_tokens
            .insert(token.to_string(), (asked.clone(), id.clone()));
    }
    Ok(id)
}

/// CreateTags on images and snapshots: every resource must exist, or nothing is tagged.
fn create_tags(r: &mut RegionState, p: &Params) -> Result<String, FakeError> {
    p.only("CreateTags", &["ResourceId.", "Tag."])?;
    let ids = p.list("ResourceId");
    if ids.is_empty() {
        required(p, "ResourceId.1")?;
    }
    let tags = p.tags("Tag")?;
    for id in &ids {
        if id.starts_with("ami-") {
            if !r.images.iter().any(|i| &i.id == id) {
                return Err(image_not_found(id));
            }
        } else if id.starts_with("snap-") {
            if !r.snapshots.contains_key(id) {
                return Err(snapshot_not_found(id));
            }
        } else {
            return Err(FakeError::bad_request(
                "InvalidParameterValue",
                format!("The fake EC2 tags only images and snapshots, not {id}"),
            ));
        }
    }
    for id in &ids {
        let target = match r.images.iter_mut().find(|i| &i.id == id) {
            Some(image) => &mut image.tags,
            None => match r.snapshots.get_mut(id) {
                Some(snapshot) => &mut snapshot.tags,
                None => continue,
            },
        };
        target.extend(tags.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    Ok(done())
}

/// One `LaunchPermission.Add.N` / `.Remove.N`.
fn grant(p: &Params) -> Result<FakeGrant, FakeError> {
    match (
        p.get("UserId"),
        p.get("OrganizationArn"),
        p.get("OrganizationalUnitArn"),
    ) {
        (Some(user), None, None) => {
            if user.len() != 12 || !user.bytes().all(|b| b.is_ascii_digit()) {
                return Err(FakeError::bad_request(
                    "InvalidAMIAttributeItemValue",
                    format!("Invalid attribute item value \"{user}\" for userId item type."),
                ));
            }
            Ok(FakeGrant::UserId(user.to_string()))
        }
        (None, Some(org), None) => Ok(FakeGrant::OrganizationArn(org.to_string())),
        (None, None, Some(unit)) => Ok(FakeGrant::OrganizationalUnitArn(unit.to_string())),
        _ => Err(FakeError::bad_request(
            "InvalidParameterValue",
            "The fake EC2 serves a launch permission of exactly one UserId, OrganizationArn or OrganizationalUnitArn (no Group)".into(),
        )),
    }
}

/// ModifyImageAttribute, launch permissions only (`LaunchPermission.Add.N` and `.Remove.N`);
/// any permission EC2 refuses leaves the image as it was.
fn modify_image_attribute(r: &mut RegionState, p: &Params) -> Result<String, FakeError> {
    p.only(
        "ModifyImageAttribute",
        &["ImageId", "LaunchPermission.Add.", "LaunchPermission.Remove."],
    )?;
    let id = required(p, "ImageId")?;
    let add = p
        .structs("LaunchPermission.Add")
        .iter()
        .map(grant)
        .collect::<Result<Vec<_>, _>>()?;
    let remove = p
        .structs("LaunchPermission.Remove")
        .iter()
        .map(grant)
        .collect::<Result<Vec<_>, _>>()?;
    let image = image_mut(r, id)?;
    image.launch_permissions.extend(add);
    image.launch_permissions.retain(|g| !remove.contains(g));
    Ok(done())
}

fn describe_image_attribute(r: &mut RegionState, p: &Params) -> Result<String, FakeError> {
    p.only("DescribeImageAttribute", &["ImageId", "Attribute"])?;
    let id = required(p, "ImageId")?;
    let attribute = required(p, "Attribute")?;
    if attribute != "launchPermission" {
        return Err(FakeError::bad_request(
            "InvalidParameterValue",
            format!("The fake EC2 describes only the launchPermission attribute, not {attribute}"),
        ));
    }
    let image = image_mut(r, id)?;
    let permissions = image.launch_permissions.iter().map(FakeGrant::xml);
    Ok(el("imageId", id) + &items("launchPermission", permissions))
}

fn create_volume_attribute<'p>(p: &'p Params, action: &str) -> Result<&'p str, FakeError> {
    let attribute = required(p, "Attribute")?;
    if attribute != "createVolumePermission" {
        return Err(FakeError::bad_request(
            "InvalidParameterValue",
            format!(
                "The fake EC2 serves only the createVolumePermission attribute in {action}, not {attribute}"
            ),
        ));
    }
    required(p, "SnapshotId")
}

/// ModifySnapshotAttribute, create-volume permissions of accounts (`OperationType`, `UserId.N`).
fn modify_snapshot_attribute(r: &mut RegionState, p: &Params) -> Result<String, FakeError> {
    p.only(
        "ModifySnapshotAttribute",
        &["SnapshotId", "Attribute", "OperationType", "UserId."],
    )?;
    let id = create_volume_attribute(p, "ModifySnapshotAttribute")?;
    let users = p.list("UserId");
    let snapshot = r.snapshots.get_mut(id).ok_or_else(|| snapshot_not_found(id))?;
    match required(p, "OperationType")? {
        "add" => snapshot.create_volume_permissions.extend(users),
        "remove" => snapshot.create_volume_permissions.retain(|u| !users.contains(u)),
        other => {
            return Err(FakeError::bad_request(
                "InvalidParameterValue",
                format!("Value ({other}) for parameter operationType is invalid."),
            ));
        }
    }
    Ok(done())
}

fn describe_snapshot_attribute(r: &mut RegionState, p: &Params) -> Result<String, FakeError> {
    p.only("DescribeSnapshotAttribute", &["SnapshotId", "Attribute"])?;
    let id = create_volume_attribute(p, "DescribeSnapshotAttribute")?;
    let snapshot = r.snapshots.get(id).ok_or_else(|| snapshot_not_found(id))?;
    let users = snapshot.create_volume_permissions.iter().map(|u| el("userId", u));
    Ok(el("snapshotId", id) + &items("createVolumePermission", users))
}

/// EnableImageDeprecation: EC2 rounds the time to the nearest minute, and refuses one in the
/// past or more than ten years ahead (documented; the error code is the fake's guess).
fn enable_image_deprecation(r: &mut RegionState, p: &Params) -> Result<String, FakeError> {
    p.only("EnableImageDeprecation", &["ImageId", "DeprecateAt"])?;
    let id = required(p, "ImageId")?;
    let text = required(p, "DeprecateAt")?;
    let at: jiff::Timestamp = text.parse().map_err(|_| {
        FakeError::bad_request(
            "InvalidParameterValue",
            format!("Value ({text}) for parameter deprecateAt is invalid."),
        )
    })?;
    let seconds = (at.as_second() + 30).div_euclid(60) * 60;
    let at = jiff::Timestamp::from_second(seconds)
        .map_err(|e| FakeError::bad_request("InvalidParameterValue", format!("deprecateAt {text}: {e}")))?;
    let now = jiff::Timestamp::now();
    let latest = now
        .saturating_add(jiff::SignedDuration::from_hours(10 * 8766))
        .unwrap_or(now);
    if at < now || at > latest {
        return Err(FakeError::bad_request(
            "InvalidParameterValue",
            format!("The deprecation time {text} must be in the future and at most 10 years from now."),
        ));
    }
    image_mut(r, id)?.deprecation_time = Some(ec2_time(at));
    Ok(done())
}

#[cfg(test)]
mod tests {
    use aws_sdk_ec2::error::ProvideErrorMetadata;

    use super::*;
    use crate::api::keys::{BAKE_UID, SOURCE_AMI};
    use crate::api::{ImageFilter, VirtualizationType};

    const REGION: &str = "eu-west-1";

    fn day(d: u32) -> String {
        format!("2026-01-{d:02}T00:00:00.000Z")
    }

    fn ids<T>(items: &[T], id: impl Fn(&T) -> &str) -> Vec<String> {
        items.iter().map(|i| id(i).to_string()).collect()
    }

    #[tokio::test]
    async fn resolve_source_picks_the_newest_available_image_that_matches_every_part_of_the_filter() {
        let fake = FakeEc2::new();
        let base = |id: &str, d| FakeImage::new(id, &format!("base-hvm-{d}"), &day(d)).tag("role", "base");
        fake.add_image(REGION, base("ami-old", 1));
        fake.add_image(REGION, base("ami-want", 5));
        // Each newer than the one wanted, each failing one part of the filter.
        fake.add_image(REGION, base("ami-pending", 9).state("pending"));
        fake.add_image(REGION, base("ami-pv", 9).virtualization("paravirtual"));
        fake.add_image(
            REGION,
            FakeImage::new("ami-name", "other-hvm-9", &day(9)).tag("role", "base"),
        );
        fake.add_image(REGION, base("ami-untagged", 9).tag("role", "app"));
        fake.add_image(REGION, base("ami-theirs", 9).owner("210987654321", None));
        fake.add_image("us-east-1", base("ami-elsewhere", 9));
        let filter = ImageFilter {
            owners: vec!["self".into()],
            name: Some("base-{virtualizationType}-*".into()),
            tags: BTreeMap::from([("role".to_string(), "base".to_string())]),
        };

        let found = fake
            .ec2()
            .resolve_source(REGION, &filter, VirtualizationType::Hvm)
            .await
            .expect("resolve_source succeeds");

        let found = found.expect("an image matches");
        assert_eq!(found.image_id, "ami-want");
        assert_eq!(found.name.as_deref(), Some("base-hvm-5"));
        assert_eq!(found.creation_date, Some(day(5)));
        assert_eq!(found.state.as_deref(), Some("available"));
        assert_eq!(found.virtualization_type.as_deref(), Some("hvm"));
        assert_eq!(fake.count_in(REGION, "DescribeImages"), 1);
        assert_eq!(fake.count_in("us-east-1", "DescribeImages"), 0);
    }

    #[tokio::test]
    async fn resolve_source_reads_images_of_other_owners_by_account_or_alias() {
        let fake = FakeEc2::new();
        fake.add_image(
            REGION,
            FakeImage::new("ami-amzn", "al2023-1", &day(1)).owner("137112412989", Some("amazon")),
        );
        fake.add_image(REGION, FakeImage::new("ami-mine", "al2023-2", &day(2)));
        let filter = |owner: &str| ImageFilter {
            owners: vec![owner.into()],
            name: Some("al2023-?".into()),
            tags: BTreeMap::new(),
        };
        let ec2 = fake.ec2();
        for owner in ["amazon", "137112412989"] {
            let found = ec2
                .resolve_source(REGION, &filter(owner), VirtualizationType::Hvm)
                .await
                .expect("resolve_source succeeds");
            assert_eq!(
                found.map(|i| i.image_id).as_deref(),
                Some("ami-amzn"),
                "owner {owner}"
            );
        }
    }

    #[tokio::test]
    async fn images_tagged_finds_every_image_with_that_tag_value_newest_first_with_tags_and_snapshots() {
        let fake = FakeEc2::new();
        fake.add_image(
            REGION,
            FakeImage::new("ami-1", "a", &day(1))
                .tag(BAKE_UID, "u1")
                .snapshot("snap-1"),
        );
        fake.add_image(
            REGION,
            FakeImage::new("ami-2", "b", &day(2))
                .tag(BAKE_UID, "u1")
                .tag("team", "a&b <c>")
                .snapshot("snap-2a")
                .snapshot("snap-2b"),
        );
        fake.add_image(REGION, FakeImage::new("ami-3", "c", &day(3)).tag(BAKE_UID, "u2"));
        fake.add_image(REGION, FakeImage::new("ami-4", "d", &day(4)));

        let found = fake
            .ec2()
            .images_tagged(REGION, BAKE_UID, "u1")
            .await
            .expect("images_tagged");

        assert_eq!(ids(&found, |i| &i.image_id), ["ami-2", "ami-1"]);
        assert_eq!(found[0].snapshot_ids, ["snap-2a", "snap-2b"]);
        // Escaped in the XML, read back as written.
        assert_eq!(found[0].tags.get("team").map(String::as_str), Some("a&b <c>"));
        assert!(found[0].baked_by_baker());
    }

    #[tokio::test]
    async fn images_capped_follows_next_token_and_stops_reading_once_it_has_max_images() {
        let fake = FakeEc2::new();
        for d in 1..=7 {
            fake.add_image(REGION, FakeImage::new(&format!("ami-{d}"), "x", &day(d)));
        }
        fake.set_page_size(Some(2));
        let ec2 = fake.ec2();
        let owners = ["self".to_string()];

        let (images, cut) = ec2
            .images_capped(REGION, &owners, vec![], 3)
            .await
            .expect("capped");
        // Two pages (four images) read, the newest three of those kept, more left unread.
        assert_eq!(ids(&images, |i| &i.image_id), ["ami-4", "ami-3", "ami-2"]);
        assert!(cut);
        assert_eq!(fake.count("DescribeImages"), 2);

        fake.clear_calls();
        let (images, cut) = ec2
            .images_capped(REGION, &owners, vec![], 100)
            .await
            .expect("all");
        assert_eq!(images.len(), 7);
        assert_eq!(images[0].image_id, "ami-7");
        assert!(!cut);
        assert_eq!(fake.count("DescribeImages"), 4);
    }

    #[tokio::test]
    async fn images_capped_reports_no_cut_when_the_last_page_ends_exactly_at_max() {
        let fake = FakeEc2::new();
        for d in 1..=4 {
            fake.add_image(REGION, FakeImage::new(&format!("ami-{d}"), "x", &day(d)));
        }
        fake.set_page_size(Some(2));
        let (images, cut) = fake
            .ec2()
            .images_capped(REGION, &["self".to_string()], vec![], 4)
            .await
            .expect("capped");
        assert_eq!(images.len(), 4);
        assert!(!cut);
    }

    #[tokio::test]
    async fn instances_using_reports_live_instances_of_the_images_across_pages() {
        let fake = FakeEc2::new();
        fake.add_instance(REGION, FakeInstance::new("i-1", "ami-a"));
        fake.add_instance(REGION, FakeInstance::new("i-2", "ami-b").state("terminated"));
        fake.add_instance(REGION, FakeInstance::new("i-3", "ami-c").state("stopped"));
        fake.add_instance(REGION, FakeInstance::new("i-4", "ami-z"));
        fake.add_instance(REGION, FakeInstance::new("i-5", "ami-a"));
        fake.set_page_size(Some(1));
        let asked: Vec<String> = ["ami-a", "ami-b", "ami-c"].map(String::from).to_vec();

        let uses = fake
            .ec2()
            .instances_using(REGION, &asked)
            .await
            .expect("instances_using");

        assert_eq!(
            uses,
            BTreeMap::from([
                ("ami-a".to_string(), "used by instance i-1".to_string()),
                ("ami-c".to_string(), "used by instance i-3".to_string()),
            ])
        );
        // Three instances match: three pages, the last without a token.
        assert_eq!(fake.count("DescribeInstances"), 3);
    }

    #[tokio::test]
    async fn launch_template_images_reports_every_version_of_every_template() {
        let fake = FakeEc2::new();
        fake.add_launch_template(REGION, "lt-1", "web", &[Some("ami-a"), None, Some("ami-b")]);
        fake.add_launch_template(REGION, "lt-2", "db", &[Some("ami-c"), Some("ami-a")]);
        fake.add_launch_template("us-east-1", "lt-3", "far", &[Some("ami-far")]);
        fake.set_page_size(Some(1));

        let uses = fake
            .ec2()
            .launch_template_images(REGION)
            .await
            .expect("launch_template_images");

        assert_eq!(
            uses,
            BTreeMap::from([
                (
                    "ami-a".to_string(),
                    "named by launch template web version 1".to_string()
                ),
                (
                    "ami-b".to_string(),
                    "named by launch template web version 3".to_string()
                ),
                (
                    "ami-c".to_string(),
                    "named by launch template db version 1".to_string()
                ),
            ])
        );
        assert_eq!(fake.count("DescribeLaunchTemplates"), 2);
        assert_eq!(fake.count("DescribeLaunchTemplateVersions"), 5);
        assert_eq!(fake.launch_templates("us-east-1").len(), 1);
    }

    #[tokio::test]
    async fn launch_template_images_skips_a_template_deleted_after_it_was_listed() {
        let fake = FakeEc2::new();
        fake.add_launch_template(REGION, "lt-1", "gone", &[Some("ami-a")]);
        fake.add_launch_template(REGION, "lt-2", "kept", &[Some("ami-b")]);
        let gone = FakeError::new(
            "InvalidLaunchTemplateId.NotFound",
            "The specified launch template, with template ID lt-1, does not exist.",
            400,
        );
        fake.fail_next("DescribeLaunchTemplateVersions", 1, gone);

        let uses = fake
            .ec2()
            .launch_template_images(REGION)
            .await
            .expect("a template deleted mid-scan is no error");

        assert_eq!(
            uses,
            BTreeMap::from([(
                "ami-b".to_string(),
                "named by launch template kept version 1".to_string()
            )])
        );
    }

    #[tokio::test]
    async fn launch_template_images_fails_on_any_other_error() {
        let fake = FakeEc2::new();
        fake.add_launch_template(REGION, "lt-1", "web", &[Some("ami-a")]);
        let denied = FakeError::new("UnauthorizedOperation", "You are not authorized.", 403);
        fake.fail_always("DescribeLaunchTemplateVersions", denied);

        let err = fake
            .ec2()
            .launch_template_images(REGION)
            .await
            .expect_err("a refusal stops the scan");

        assert_eq!(err.code, "UnauthorizedOperation");
    }

    #[tokio::test]
    async fn bases_among_reports_images_whose_source_tag_names_one_of_the_ids() {
        let fake = FakeEc2::new();
        fake.add_image(REGION, FakeImage::new("ami-base", "base", &day(1)));
        fake.add_image(
            REGION,
            FakeImage::new("ami-child", "child", &day(2)).tag(SOURCE_AMI, "ami-base"),
        );
        fake.add_image(
            REGION,
            FakeImage::new("ami-other", "other", &day(3)).tag(SOURCE_AMI, "ami-x"),
        );
        fake.add_image(
            REGION,
            FakeImage::new("ami-foreign", "foreign", &day(4))
                .tag(SOURCE_AMI, "ami-lone")
                .owner("210987654321", None),
        );
        let asked: Vec<String> = ["ami-base", "ami-lone"].map(String::from).to_vec();

        let uses = fake.ec2().bases_among(REGION, &asked).await.expect("bases_among");

        // Only this account's images count: another account's child is not ours to know of.
        assert_eq!(
            uses,
            BTreeMap::from([("ami-base".to_string(), "the base of image ami-child".to_string())])
        );
    }

    #[tokio::test]
    async fn remove_image_deregisters_it_then_deletes_its_snapshots() {
        let fake = FakeEc2::new();
        fake.add_image(
            REGION,
            FakeImage::new("ami-1", "a", &day(1))
                .tag(BAKE_UID, "u1")
                .snapshot("snap-1a")
                .snapshot("snap-1b"),
        );
        fake.add_image(
            REGION,
            FakeImage::new("ami-2", "b", &day(2))
                .tag(BAKE_UID, "u2")
                .snapshot("snap-2"),
        );
        let ec2 = crate::aws::Ec2::new(fake.sdk_config());
        // The summary as retention has it: read from EC2, snapshots included.
        let image = ec2
            .images_tagged(REGION, BAKE_UID, "u1")
            .await
            .expect("describe")
            .remove(0);

        ec2.remove_image(REGION, &image).await.expect("remove_image");

        assert_eq!(ids(&fake.images(REGION), |i| &i.id), ["ami-2"]);
        assert_eq!(fake.snapshots(REGION), BTreeSet::from(["snap-2".to_string()]));
        // The fake refuses to delete a snapshot a registered image uses, as EC2 does: the
        // success shows the image went first.
        assert_eq!(fake.count("DeregisterImage"), 1);
        assert_eq!(fake.count("DeleteSnapshot"), 2);
    }

    #[tokio::test]
    async fn remove_image_takes_a_snapshot_already_gone_as_done_but_not_an_image_already_gone() {
        let fake = FakeEc2::new();
        fake.add_image(
            REGION,
            FakeImage::new("ami-1", "a", &day(1))
                .tag(BAKE_UID, "u1")
                .snapshot("snap-1")
                .snapshot("snap-2"),
        );
        let ec2 = fake.ec2();
        let image = ec2
            .images_tagged(REGION, BAKE_UID, "u1")
            .await
            .expect("describe")
            .remove(0);
        fake.fail_next(
            "DeleteSnapshot",
            1,
            FakeError::new(
                "InvalidSnapshot.NotFound",
                "The snapshot 'snap-1' does not exist.",
                400,
            ),
        );

        ec2.remove_image(REGION, &image)
            .await
            .expect("a missing snapshot is fine");
        assert!(
            fake.snapshots(REGION).contains("snap-1"),
            "the injected answer left it"
        );
        assert!(!fake.snapshots(REGION).contains("snap-2"));

        let again = ec2
            .remove_image(REGION, &image)
            .await
            .expect_err("the image is gone");
        assert_eq!(again.action, "DeregisterImage");
        assert_eq!(again.code, "InvalidAMIID.NotFound");
        assert_eq!(again.message, "The image id '[ami-1]' does not exist");
        // A client error is not retried.
        assert_eq!(fake.count("DeregisterImage"), 2);
    }

    /// One Bake's leftovers in REGION beside another Bake's, a person's, and the same Bake's UID
    /// in another region.
    fn seed_leftovers(fake: &FakeEc2) {
        let mine = [(BAKE_UID, "uid-1")];
        let theirs = [(BAKE_UID, "uid-2")];
        fake.add_instance(
            REGION,
            FakeInstance::new("i-mine", "ami-src")
                .tag(BAKE_UID, "uid-1")
                .key_name("packer_1")
                .security_group("sg-packer", "packer_1")
                .security_group("sg-bastion", "team-bastion"),
        );
        fake.add_instance(
            REGION,
            FakeInstance::new("i-gone", "ami-src")
                .tag(BAKE_UID, "uid-1")
                .state("terminated"),
        );
        fake.add_instance(
            REGION,
            FakeInstance::new("i-theirs", "ami-src")
                .tag(BAKE_UID, "uid-2")
                .key_name("packer_2")
                .security_group("sg-packer-2", "packer_2"),
        );
        fake.add_security_group(REGION, "sg-packer", "packer_1", &[]);
        fake.add_security_group(REGION, "sg-bastion", "team-bastion", &[]);
        fake.add_security_group(REGION, "sg-tagged", "extra", &mine);
        fake.add_security_group(REGION, "sg-packer-2", "packer_2", &theirs);
        fake.add_key_pair(REGION, "packer_1", &[]);
        fake.add_key_pair(REGION, "tagged-key", &mine);
        fake.add_key_pair(REGION, "packer_2", &theirs);
        fake.add_volume(REGION, "vol-mine", "available", &mine);
        fake.add_volume(REGION, "vol-attached", "in-use", &mine);
        fake.add_volume(REGION, "vol-theirs", "available", &theirs);
        fake.add_image(
            REGION,
            FakeImage::new("ami-mine", "m", &day(1))
                .tag(BAKE_UID, "uid-1")
                .snapshot("snap-mine"),
        );
        fake.add_image(
            REGION,
            FakeImage::new("ami-theirs", "t", &day(2))
                .tag(BAKE_UID, "uid-2")
                .snapshot("snap-theirs"),
        );
        fake.add_image(
            REGION,
            FakeImage::new("ami-src", "src", &day(1)).snapshot("snap-src"),
        );
        fake.add_volume("us-east-1", "vol-far", "available", &mine);
    }

    #[tokio::test]
    async fn sweep_removes_what_carries_the_bake_uid_and_the_packer_groups_and_keys_of_its_instances() {
        let fake = FakeEc2::new();
        seed_leftovers(&fake);
        let ec2 = fake.ec2();

        let report = ec2.sweep(REGION, "uid-1", true).await.expect("sweep");

        assert_eq!(report.instances, ["i-mine"]);
        assert_eq!(report.security_groups, ["sg-packer", "sg-tagged"]);
        assert_eq!(report.key_pairs, ["packer_1", "tagged-key"]);
        assert_eq!(report.volumes, ["vol-mine"]);
        assert_eq!(report.images, ["ami-mine"]);
        assert_eq!(report.snapshots, ["snap-mine"]);

        let states: Vec<(String, String)> = fake
            .instances(REGION)
            .into_iter()
            .map(|i| (i.id, i.state))
            .collect();
        assert_eq!(
            states,
            [
                ("i-mine".to_string(), "terminated".to_string()),
                ("i-gone".to_string(), "terminated".to_string()),
                ("i-theirs".to_string(), "running".to_string()),
            ]
        );
        assert_eq!(
            ids(&fake.security_groups(REGION), |g| &g.id),
            ["sg-bastion", "sg-packer-2"]
        );
        assert_eq!(ids(&fake.key_pairs(REGION), |k| &k.name), ["packer_2"]);
        assert_eq!(
            ids(&fake.volumes(REGION), |v| &v.id),
            ["vol-attached", "vol-theirs"]
        );
        assert_eq!(ids(&fake.images(REGION), |i| &i.id), ["ami-theirs", "ami-src"]);
        assert_eq!(
            fake.snapshots(REGION),
            BTreeSet::from(["snap-src".to_string(), "snap-theirs".to_string()])
        );
        assert_eq!(fake.volumes("us-east-1").len(), 1);
        assert_eq!(fake.count("TerminateInstances"), 1);
    }

    #[tokio::test]
    async fn sweep_without_images_keeps_the_bakes_image_and_a_second_sweep_finds_nothing_new() {
        let fake = FakeEc2::new();
        seed_leftovers(&fake);
        let ec2 = fake.ec2();

        let first = ec2.sweep(REGION, "uid-1", false).await.expect("sweep");
        assert!(first.images.is_empty() && first.snapshots.is_empty());
        assert_eq!(fake.count("DescribeImages"), 0);
        assert!(fake.images(REGION).iter().any(|i| i.id == "ami-mine"));

        let second = ec2.sweep(REGION, "uid-1", false).await.expect("a second sweep");
        assert!(second.instances.is_empty());
        assert!(
            second.security_groups.is_empty(),
            "a group already gone is skipped"
        );
        assert!(second.volumes.is_empty());
        assert_eq!(fake.count("TerminateInstances"), 1);
    }

    #[tokio::test]
    async fn sweep_stops_at_a_group_that_still_has_a_dependent_instance() {
        let fake = FakeEc2::new();
        // A group tagged with the Bake's UID that an instance of another Bake still uses.
        fake.add_instance(
            REGION,
            FakeInstance::new("i-theirs", "ami-src").security_group("sg-shared", "packer_x"),
        );
        fake.add_security_group(REGION, "sg-shared", "packer_x", &[(BAKE_UID, "uid-1")]);

        let err = fake
            .ec2()
            .sweep(REGION, "uid-1", false)
            .await
            .expect_err("a dependent instance");

        assert_eq!(err.action, "DeleteSecurityGroup");
        assert_eq!(err.code, "DependencyViolation");
        assert_eq!(fake.security_groups(REGION).len(), 1);
    }

    #[tokio::test]
    async fn a_throttle_that_outlasts_the_retries_surfaces_as_request_limit_exceeded_after_three_attempts() {
        let fake = FakeEc2::new();
        fake.add_image(REGION, FakeImage::new("ami-1", "a", &day(1)).tag(BAKE_UID, "u"));
        fake.fail_always("DescribeImages", FakeError::throttled());
        let ec2 = fake.ec2();

        let err = ec2
            .images_tagged(REGION, BAKE_UID, "u")
            .await
            .expect_err("throttled");

        assert_eq!(err.action, "DescribeImages");
        assert_eq!(err.code, "RequestLimitExceeded");
        assert_eq!(err.message, "Request limit exceeded.");
        assert_eq!(fake.count("DescribeImages"), 3);

        fake.clear_failures();
        let found = ec2
            .images_tagged(REGION, BAKE_UID, "u")
            .await
            .expect("EC2 answers again");
        assert_eq!(found.len(), 1);
    }

    #[tokio::test]
    async fn a_throttle_shorter_than_the_retries_is_absorbed_by_them() {
        let fake = FakeEc2::new();
        fake.add_instance(REGION, FakeInstance::new("i-1", "ami-a"));
        fake.fail_next("DescribeInstances", 2, FakeError::throttled());

        let uses = fake
            .ec2()
            .instances_using(REGION, &["ami-a".to_string()])
            .await
            .expect("the third attempt succeeds");

        assert_eq!(uses.len(), 1);
        assert_eq!(fake.count("DescribeInstances"), 3);
    }

    #[tokio::test]
    async fn an_unreachable_endpoint_surfaces_as_unreachable_after_the_retries() {
        let fake = FakeEc2::new();
        fake.fail_always("DescribeLaunchTemplates", Failure::Unreachable);

        let err = fake
            .ec2()
            .launch_template_images(REGION)
            .await
            .expect_err("unreachable");

        assert_eq!(err.action, "DescribeLaunchTemplates");
        assert_eq!(err.code, "Unreachable");
        assert_eq!(fake.count("DescribeLaunchTemplates"), 3);
    }

    #[tokio::test]
    async fn an_action_the_fake_does_not_serve_answers_invalid_action_and_is_logged() {
        let fake = FakeEc2::new();

        let err = fake
            .ec2()
            .client(REGION)
            .describe_regions()
            .send()
            .await
            .expect_err("not served");

        assert_eq!(err.code(), Some("InvalidAction"));
        assert_eq!(
            fake.calls(),
            [FakeCall {
                region: REGION.to_string(),
                action: "DescribeRegions".to_string(),
            }]
        );
    }

    #[tokio::test]
    async fn a_filter_the_fake_does_not_serve_is_refused_not_ignored() {
        let fake = FakeEc2::new();
        fake.add_image(REGION, FakeImage::new("ami-1", "a", &day(1)));
        let architecture = aws_sdk_ec2::types::Filter::builder()
            .name("architecture")
            .values("arm64")
            .build();

        let err = fake
            .ec2()
            .images_capped(REGION, &[], vec![architecture], 10)
            .await
            .expect_err("refused");

        assert_eq!(err.code, "InvalidParameterValue");
        assert!(err.message.contains("'architecture'"), "{}", err.message);
    }

    #[tokio::test]
    async fn the_call_log_counts_requests_per_region_and_action() {
        let fake = FakeEc2::new();
        let ec2 = fake.ec2();
        for region in [REGION, REGION, "us-east-1"] {
            ec2.images_tagged(region, BAKE_UID, "u")
                .await
                .expect("images_tagged");
        }
        ec2.instances_using("us-east-1", &["ami-1".to_string()])
            .await
            .expect("instances_using");

        assert_eq!(fake.count("DescribeImages"), 3);
        assert_eq!(fake.count_in(REGION, "DescribeImages"), 2);
        assert_eq!(fake.count_in("us-east-1", "DescribeImages"), 1);
        assert_eq!(fake.count_in("us-east-1", "DescribeInstances"), 1);
        assert_eq!(fake.count_in(REGION, "DescribeInstances"), 0);
        assert_eq!(fake.calls().len(), 4);
    }

    #[test]
    fn the_region_is_the_one_the_request_was_signed_for_else_the_one_in_the_host() {
        let mut request = HttpRequest::new(String::new().into());
        request
            .set_uri("https://ec2.us-east-1.amazonaws.com/")
            .expect("a URI");
        assert_eq!(region_of(&request).as_deref(), Some("us-east-1"));
        request.headers_mut().insert(
            "authorization",
            "AWS4-HMAC-SHA256 Credential=AKID/20260101/ap-south-2/ec2/aws4_request, SignedHeaders=host, Signature=0",
        );
        assert_eq!(region_of(&request).as_deref(), Some("ap-south-2"));
    }

    #[test]
    fn wildcards_match_like_ec2_filters() {
        assert!(glob("base-*-x86_64", "base-2026.1-x86_64"));
        assert!(glob("a?c", "abc"));
        assert!(glob("*", ""));
        assert!(!glob("a?c", "ac"));
        assert!(!glob("base-*", "other-base-1"));
        assert!(glob("*-*-z", "a-b-c-z"));
    }

    /// The fields of a distributed image's summary CopyImage needs: its id, name, description.
    fn summary(id: &str, name: &str) -> crate::aws::ImageSummary {
        crate::aws::ImageSummary {
            image_id: id.to_string(),
            name: Some(name.to_string()),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn copy_image_makes_an_untagged_available_copy_in_the_target_region_and_refuses_a_second_of_the_same_name()
     {
        let fake = FakeEc2::new();
        fake.add_image(
            REGION,
            FakeImage::new("ami-src", "svc-1", &day(1))
                .tag("team", "payments")
                .snapshot("snap-src"),
        );
        let ec2 = fake.ec2();
        let tags = BTreeMap::from([("team".to_string(), "payments".to_string())]);
        let request = crate::distribution::ec2::CopyRequest {
            tags: &tags,
            description: "svc [baker: copy of ami-src]",
            kms_key_id: Some("alias/copies"),
        };

        let id = ec2
            .copy_image("us-east-1", REGION, &summary("ami-src", "svc-1"), &request)
            .await
            .expect("copied");
        let again = ec2
            .copy_image("us-east-1", REGION, &summary("ami-src", "svc-1"), &request)
            .await
            .expect_err("a second copy of the same name is refused");

        assert_eq!(again.code, "InvalidAMIName.Duplicate");
        assert!(!id.is_empty());
        let copies = fake.images("us-east-1");
        assert_eq!(copies.len(), 1, "{copies:?}");
        let copy = &copies[0];
        assert_eq!((copy.name.as_str(), copy.state.as_str()), ("svc-1", "available"));
        assert_eq!(copy.description.as_deref(), Some("svc [baker: copy of ami-src]"));
        assert!(
            copy.tags.is_empty(),
            "TagSpecifications are not applied: {:?}",
            copy.tags
        );
        assert!(copy.encrypted);
        assert_eq!(copy.snapshot_ids.len(), 1);
        assert_ne!(copy.snapshot_ids[0], "snap-src");
        assert!(fake.snapshots("us-east-1").contains(&copy.snapshot_ids[0]));
        let asked = fake.copy_requests();
        assert_eq!(asked.len(), 2);
        assert_eq!(asked[0].kms_key_id.as_deref(), Some("alias/copies"));
        assert!(asked[0].encrypted);
        assert_eq!(asked[0].source_region, REGION);
        let resources: Vec<&str> = asked[0]
            .tag_specifications
            .iter()
            .map(|(r, t)| {
                assert_eq!(t, &tags);
                r.as_str()
            })
            .collect();
        assert_eq!(resources, ["image", "snapshot"]);

        // Read back as Baker reads it.
        let seen = ec2
            .image("us-east-1", &id)
            .await
            .expect("described")
            .expect("listed");
        assert_eq!(seen.description.as_deref(), Some("svc [baker: copy of ami-src]"));
        assert!(seen.encrypted);
        assert_eq!(ec2.image("us-east-1", "ami-none").await, Ok(None));
    }

    #[tokio::test]
    async fn copy_image_refuses_a_name_another_image_holds_in_the_region_and_an_unknown_source() {
        let fake = FakeEc2::new();
        fake.add_image(REGION, FakeImage::new("ami-src", "svc-1", &day(1)));
        fake.add_image("us-east-1", FakeImage::new("ami-other", "svc-1", &day(2)));
        let ec2 = fake.ec2();
        let tags = BTreeMap::new();
        let request = crate::distribution::ec2::CopyRequest {
            tags: &tags,
            description: "d",
            kms_key_id: None,
        };

        let taken = ec2
            .copy_image("us-east-1", REGION, &summary("ami-src", "svc-1"), &request)
            .await
            .expect_err("the name is taken");
        let unknown = ec2
            .copy_image("us-west-2", REGION, &summary("ami-gone", "svc-1"), &request)
            .await
            .expect_err("no such source");

        assert_eq!(taken.code, "InvalidAMIName.Duplicate");
        assert_eq!(unknown.code, "InvalidAMIID.NotFound");
        assert_eq!(fake.images("us-east-1").len(), 1);
        assert!(fake.copy_requests().iter().all(|c| c.image_id.is_none()));
    }

    #[tokio::test]
    async fn tags_shares_and_deprecation_reach_images_and_snapshots_and_read_back() {
        use crate::distribution::Grantee;
        let fake = FakeEc2::new();
        fake.add_image(REGION, FakeImage::new("ami-1", "a", &day(1)).snapshot("snap-1"));
        let ec2 = fake.ec2();
        let org = "arn:aws:organizations::123456789012:organization/o-abc1234567";
        let grantees = [
            Grantee::Account("111111111111".into()),
            Grantee::Organization(org.into()),
        ];
        let at: jiff::Timestamp = "2036-01-01T00:00:20Z".parse().expect("a time");

        ec2.tag(
            REGION,
            &["ami-1".to_string(), "snap-1".to_string()],
            &BTreeMap::from([("k".to_string(), "v".to_string())]),
        )
        .await
        .expect("tagged");
        ec2.share(REGION, "ami-1", &grantees).await.expect("shared");
        ec2.share_snapshot(REGION, "snap-1", &["111111111111".to_string()])
            .await
            .expect("snapshot shared");
        ec2.deprecate(REGION, "ami-1", at).await.expect("deprecated");

        let image = fake.image(REGION, "ami-1").expect("the image");
        assert_eq!(image.tags.get("k").map(String::as_str), Some("v"));
        assert_eq!(
            fake.snapshot(REGION, "snap-1").map(|s| s.tags),
            Some(BTreeMap::from([("k".to_string(), "v".to_string())]))
        );
        // Rounded to the minute, as EC2 does.
        assert_eq!(
            image.deprecation_time.as_deref(),
            Some("2036-01-01T00:00:00.000Z")
        );
        assert_eq!(
            ec2.launch_grantees(REGION, "ami-1").await.expect("read"),
            BTreeSet::from(grantees.clone())
        );
        assert_eq!(
            ec2.snapshot_accounts(REGION, "snap-1").await.expect("read"),
            BTreeSet::from(["111111111111".to_string()])
        );
        let seen = ec2.image(REGION, "ami-1").await.expect("read").expect("listed");
        assert_eq!(seen.deprecation_time.as_deref(), Some("2036-01-01T00:00:00.000Z"));

        assert!(fake.remove_launch_permission(REGION, "ami-1", org));
        assert_eq!(
            ec2.launch_grantees(REGION, "ami-1").await.expect("read"),
            BTreeSet::from([grantees[0].clone()])
        );
    }

    #[tokio::test]
    async fn an_account_id_that_is_not_twelve_digits_is_refused_and_nothing_is_shared() {
        use crate::distribution::Grantee;
        let fake = FakeEc2::new();
        fake.add_image(REGION, FakeImage::new("ami-1", "a", &day(1)));
        let grantees = [
            Grantee::Account("111111111111".into()),
            Grantee::Account("12345".into()),
        ];

        let err = fake
            .ec2()
            .share(REGION, "ami-1", &grantees)
            .await
            .expect_err("refused");

        assert_eq!(err.code, "InvalidAMIAttributeItemValue");
        assert!(err.message.contains("\"12345\""), "{}", err.message);
        assert!(
            fake.image(REGION, "ami-1")
                .expect("the image")
                .launch_permissions
                .is_empty()
        );
    }

    #[tokio::test]
    async fn a_deprecation_time_in_the_past_is_refused_as_ec2_documents() {
        let fake = FakeEc2::new();
        fake.add_image(REGION, FakeImage::new("ami-1", "a", &day(1)));
        let past: jiff::Timestamp = "2020-01-01T00:00:00Z".parse().expect("a time");

        let err = fake
            .ec2()
            .deprecate(REGION, "ami-1", past)
            .await
            .expect_err("in the past");

        assert_eq!(err.code, "InvalidParameterValue");
        assert_eq!(
            fake.image(REGION, "ami-1").expect("the image").deprecation_time,
            None
        );
    }

    #[tokio::test]
    async fn a_region_made_to_fail_refuses_every_action_there_and_only_there() {
        let fake = FakeEc2::new();
        fake.add_image(REGION, FakeImage::new("ami-1", "a", &day(1)));
        fake.add_image("us-east-1", FakeImage::new("ami-2", "a", &day(1)));
        fake.fail_region(
            "us-east-1",
            FakeError::new("OptInRequired", "You are not subscribed to this service.", 401),
        );
        let ec2 = fake.ec2();

        let described = ec2.images_named("us-east-1", "a").await.expect_err("refused");
        let tagged = ec2
            .tag(
                "us-east-1",
                &["ami-2".to_string()],
                &BTreeMap::from([("k".to_string(), "v".to_string())]),
            )
            .await
            .expect_err("refused");

        assert_eq!(
            (described.code.as_str(), tagged.code.as_str()),
            ("OptInRequired", "OptInRequired")
        );
        // A 401 is not retried.
        assert_eq!(fake.count_in("us-east-1", "DescribeImages"), 1);
        assert_eq!(ec2.images_named(REGION, "a").await.expect("served").len(), 1);
        fake.clear_failures();
        assert_eq!(ec2.images_named("us-east-1", "a").await.expect("served").len(), 1);
    }

    #[tokio::test]
    async fn images_named_and_copies_of_find_a_regions_images_by_name_and_copy_tag() {
        let fake = FakeEc2::new();
        fake.add_image(
            REGION,
            FakeImage::new("ami-copy", "svc-1", &day(2)).tag(crate::api::keys::COPY_OF, "ami-src"),
        );
        fake.add_image(REGION, FakeImage::new("ami-other", "svc-2", &day(3)));
        fake.add_image(
            REGION,
            FakeImage::new("ami-theirs", "svc-1", &day(2)).owner("210987654321", None),
        );
        let ec2 = fake.ec2();

        let named = ec2.images_named(REGION, "svc-1").await.expect("named");
        let copies = ec2.copies_of(REGION, "ami-src").await.expect("copies");

        assert_eq!(
            named.iter().map(|i| i.image_id.as_str()).collect::<Vec<_>>(),
            ["ami-copy"]
        );
        assert_eq!(
            copies.iter().map(|i| i.image_id.as_str()).collect::<Vec<_>>(),
            ["ami-copy"]
        );
    }
}
