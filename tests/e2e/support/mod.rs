//! Support for the tests that run against the local rig (`tests/rig/rig.sh`, `make rig-up`).
//!
//! The rig is found through `BAKER_RIG_DIR` or at `<crate>/target/rig`; a test that needs it and
//! does not find it fails with a message saying how to start it, it never skips quietly.
//! Everything is read from the rig's state directory (its `env` file and `kubeconfig`), not from
//! the test process's environment, so a test behaves the same under `make test`, a bare
//! `cargo test` and an IDE. The scale benchmark (`benches/scale.rs`) includes this module too.

pub mod bake;
pub mod render;
pub mod runc;
pub mod ship;

use std::collections::BTreeMap;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{DeleteParams, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config, Resource};
use serde::de::DeserializeOwned;

/// How often the wait helpers look again. Short: the helpers are bounded by their deadline.
pub const POLL: Duration = Duration::from_millis(200);

/// The label every test namespace carries, so that leftovers are easy to find and remove:
/// `kubectl delete ns -l baker.io/test=true`.
pub const TEST_LABEL: (&str, &str) = ("baker.io/test", "true");

/// A running rig, as described by its state directory.
pub struct Rig {
    dir: PathBuf,
    env: BTreeMap<String, String>,
}

/// The repository's root (the crate's manifest directory).
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The Helm chart, `charts/baker`.
pub fn chart_dir() -> PathBuf {
    repo().join("charts/baker")
}

/// The rig, found once per test binary. Panics with instructions when there is none.
pub fn rig() -> &'static Rig {
    static RIG: OnceLock<Rig> = OnceLock::new();
    RIG.get_or_init(|| Rig::find().unwrap_or_else(|e| panic!("{e:#}")))
}

impl Rig {
    /// The rig's state directory: `BAKER_RIG_DIR`, or `<crate>/target/rig`.
    pub fn state_dir() -> PathBuf {
        match std::env::var_os("BAKER_RIG_DIR") {
            Some(d) if !d.is_empty() => PathBuf::from(d),
            _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("target/rig"),
        }
    }

    fn find() -> Result<Rig> {
        let dir = Self::state_dir();
        let env_file = dir.join("env");
        if !env_file.is_file() || !dir.join("kubeconfig").is_file() {
            bail!(
                "the rig is not up: run `make rig-up` (no {} or kubeconfig there; set BAKER_RIG_DIR to use another rig)",
                env_file.display()
            );
        }
        let env = read_env_file(&env_file)?;
        Ok(Rig { dir, env })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn kubeconfig_path(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// One variable of the rig's `env` file; panics if the file lacks it (a rig of another version).
    pub fn var(&self, name: &str) -> &str {
        self.env.get(name).unwrap_or_else(|| {
            panic!(
                "{} has no {name}: restart the rig (`make rig-down rig-up`)",
                self.dir.join("env").display()
            )
        })
    }

    /// The directory of the rig's kubectl, helm, kube-apiserver, ... (v1.37.x, not the system's).
    pub fn bin_dir(&self) -> PathBuf {
        PathBuf::from(self.var("BAKER_RIG_BIN"))
    }

    pub fn node_name(&self) -> &str {
        self.var("BAKER_RIG_NODE_NAME")
    }

    pub fn ec2_endpoint(&self) -> &str {
        self.var("AWS_ENDPOINT_URL_EC2")
    }

    pub fn region(&self) -> &str {
        self.var("AWS_REGION")
    }

    /// The client config of the rig's admin (a `system:masters` client certificate).
    pub async fn admin_config(&self) -> Result<Config> {
        let kc = Kubeconfig::read_from(self.kubeconfig_path())
            .with_context(|| format!("reading {}", self.kubeconfig_path().display()))?;
        Ok(Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?)
    }

    /// A client acting as the admin. Fails, with instructions, when the apiserver does not answer.
    pub async fn client(&self) -> Result<Client> {
        let client = Client::try_from(self.admin_config().await?)?;
        client.apiserver_version().await.with_context(|| {
            format!(
                "the rig is not up: its apiserver does not answer (run `make rig-up`; logs in {})",
                self.dir.join("logs").display()
            )
        })?;
        Ok(client)
    }

    /// A client that authenticates with a bearer token (e.g. a ServiceAccount's, from a
    /// TokenRequest) instead of the admin's certificate.
    pub async fn client_with_token(&self, token: &str) -> Result<Client> {
        let mut config = self.admin_config().await?;
        // AuthInfo's token is a secrecy::SecretString; going through serde avoids depending on it.
        config.auth_info = serde_json::from_value(serde_json::json!({ "token": token }))?;
        Ok(Client::try_from(config)?)
    }

    /// The rig's dummy AWS credentials.
    fn credentials(&self) -> aws_sdk_ec2::config::Credentials {
        aws_sdk_ec2::config::Credentials::new(
            self.var("AWS_ACCESS_KEY_ID"),
            self.var("AWS_SECRET_ACCESS_KEY"),
            None,
            None,
            "baker-rig",
        )
    }

    /// An EC2 client for the rig's moto endpoint, with its region and dummy credentials.
    pub fn ec2(&self) -> aws_sdk_ec2::Client {
        use aws_sdk_ec2::config::{BehaviorVersion, Region};
        let creds = self.credentials();
        let config = aws_sdk_ec2::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(self.region().to_owned()))
            .endpoint_url(self.ec2_endpoint())
            .credentials_provider(creds)
            .build();
        aws_sdk_ec2::Client::from_conf(config)
    }

    /// An SSM client for the rig's moto endpoint (which serves SSM too).
    pub fn ssm(&self) -> aws_sdk_ssm::Client {
        use aws_sdk_ssm::config::{BehaviorVersion, Region};
        let creds = self.credentials();
        let config = aws_sdk_ssm::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(self.region().to_owned()))
            .endpoint_url(self.ec2_endpoint())
            .credentials_provider(creds)
            .build();
        aws_sdk_ssm::Client::from_conf(config)
    }

    /// A command with the rig's environment: its bin dir first on PATH, its KUBECONFIG, the EC2
    /// endpoint, region and dummy credentials, packer's checkpoint disabled.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.envs(&self.env).stdin(Stdio::null());
        cmd
    }

    /// Runs the rig's kubectl as the admin and captures its output. It does not fail on a non-zero
    /// exit: look at `status`, or call `ok()`.
    pub async fn kubectl<I, S>(&self, args: I) -> Result<CmdOutput>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = self.command(self.bin_dir().join("kubectl"));
        cmd.arg("--kubeconfig").arg(self.kubeconfig_path()).args(args);
        run(cmd).await
    }

    /// Runs the rig's helm against the rig.
    pub async fn helm<I, S>(&self, args: I) -> Result<CmdOutput>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = self.command(self.bin_dir().join("helm"));
        cmd.env("KUBECONFIG", self.kubeconfig_path()).args(args);
        run(cmd).await
    }
}

/// What a finished command printed.
#[derive(Debug)]
pub struct CmdOutput {
    pub what: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Self if the command succeeded, else an error with its status and output.
    pub fn ok(self) -> Result<Self> {
        if self.success() {
            Ok(self)
        } else {
            bail!(
                "`{}` failed ({}):\n{}{}",
                self.what,
                self.status,
                self.stdout,
                self.stderr
            )
        }
    }
}

/// Runs a command to completion off the async runtime's threads and captures its output.
pub async fn run(mut cmd: Command) -> Result<CmdOutput> {
    let what = format!("{cmd:?}");
    tokio::task::spawn_blocking(move || {
        let out = cmd.output().with_context(|| format!("running {what}"))?;
        Ok(CmdOutput {
            what,
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    })
    .await?
}

/// Reads the rig's `env` file: `export NAME=value` lines whose values are shell words (single
/// or double quotes, `$NAME` expanded from earlier lines or the process environment).
pub fn read_env_file(path: &Path) -> Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_env(&text).with_context(|| format!("parsing {}", path.display()))
}

pub fn parse_env(text: &str) -> Result<BTreeMap<String, String>> {
    let mut vars = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        let Some(assignment) = line.strip_prefix("export ") else {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            bail!("line {}: not an `export NAME=value` line: {line}", n + 1);
        };
        let (name, value) = assignment
            .split_once('=')
            .ok_or_else(|| anyhow!("line {}: no `=`: {line}", n + 1))?;
        let value = shell_word(value, &vars).with_context(|| format!("line {}", n + 1))?;
        vars.insert(name.trim().to_owned(), value);
    }
    Ok(vars)
}

fn shell_word(s: &str, vars: &BTreeMap<String, String>) -> Result<String> {
    let lookup = |name: &str| {
        vars.get(name)
            .cloned()
            .or_else(|| std::env::var(name).ok())
            .unwrap_or_default()
    };
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some('\''), '\'') | (Some('"'), '"') => quote = None,
            (Some('\''), c) => out.push(c),
            (None, '\'' | '"') => quote = Some(c),
            (Some('"') | None, '\\') => out.extend(chars.next()),
            (Some('"') | None, '$') => {
                let braced = chars.next_if_eq(&'{').is_some();
                let mut name = String::new();
                while let Some(c) = chars.next_if(|c| c.is_ascii_alphanumeric() || *c == '_') {
                    name.push(c);
                }
                if braced && chars.next() != Some('}') {
                    bail!("unterminated ${{ in {s}");
                }
                out.push_str(&lookup(&name));
            }
            (None, c) if c.is_whitespace() => bail!("more than one word in {s}"),
            (_, c) => out.push(c),
        }
    }
    if quote.is_some() {
        bail!("unterminated quote in {s}");
    }
    Ok(out)
}

/// A short random lower-case hex string, for names that must not collide between test runs.
pub fn random_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // RandomState is seeded randomly per process; the counter and clock separate calls within one.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.write_u32(std::process::id());
    format!("{:08x}", h.finish() as u32)
}

/// A fresh namespace `<prefix>-<random>` labelled `baker.io/test=true`, deleted at the end.
///
/// Call `cleanup().await` at the end of the test. If the test fails before that, `Drop` deletes
/// the namespace from a separate thread. Set `BAKER_TEST_KEEP_NAMESPACES=1` to keep them for
/// debugging.
pub struct TestNamespace {
    name: String,
    client: Client,
    done: bool,
}

impl TestNamespace {
    pub async fn new(client: &Client, prefix: &str) -> Result<Self> {
        let name = format!("{prefix}-{}", random_suffix());
        create_namespace(client, &name, TEST_LABEL).await?;
        Ok(TestNamespace {
            name,
            client: client.clone(),
            done: false,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// An API for a namespaced kind in this namespace, as the admin.
    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// Starts the namespace's deletion (tolerating that it is already gone or going); does not
    /// wait for it to finish.
    pub async fn cleanup(mut self) -> Result<()> {
        self.done = true;
        if keep_namespaces() {
            return Ok(());
        }
        delete_namespace(&self.client, &self.name).await
    }
}

/// Creates the namespace `name` with the label `label`, which marks it for finding and removal.
pub async fn create_namespace(client: &Client, name: &str, label: (&str, &str)) -> Result<()> {
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some([(label.0.to_owned(), label.1.to_owned())].into()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .with_context(|| format!("creating namespace {name}"))?;
    Ok(())
}

fn keep_namespaces() -> bool {
    std::env::var_os("BAKER_TEST_KEEP_NAMESPACES").is_some_and(|v| !v.is_empty() && v != "0")
}

async fn delete_namespace(client: &Client, name: &str) -> Result<()> {
    match Api::<Namespace>::all(client.clone())
        .delete(name, &DeleteParams::default())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
        Err(e) => Err(e).with_context(|| format!("deleting namespace {name}")),
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if self.done || keep_namespaces() {
            return;
        }
        // The test's runtime may be unwinding or blocked here, and a kube Client is tied to the
        // runtime that made it, so a new thread with its own runtime and client does the delete.
        let name = std::mem::take(&mut self.name);
        let handle = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let client = Client::try_from(rig().admin_config().await?)?;
                tokio::time::timeout(Duration::from_secs(20), delete_namespace(&client, &name))
                    .await
                    .map_err(|_| anyhow!("timed out deleting namespace {name}"))?
            })
        });
        match handle.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("warning: test namespace cleanup failed: {e:#}"),
            Err(_) => eprintln!("warning: test namespace cleanup panicked"),
        }
    }
}

/// Polls `probe` until it returns `Some`, at most `timeout` in all (a probe that hangs is cut
/// off at the deadline too). The error names `what` was awaited.
pub async fn wait_until<T, F, Fut>(timeout: Duration, what: &str, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    try_wait_until(timeout, what, || {
        let fut = probe();
        async move { Ok(fut.await) }
    })
    .await
}

/// Like `wait_until`, for probes that can fail: an error counts as "not yet" (the API may be
/// briefly unavailable, an object not created yet) and the last one is reported on timeout.
pub async fn try_wait_until<T, F, Fut>(timeout: Duration, what: &str, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    let deadline = start + timeout;
    let mut last_error: Option<anyhow::Error> = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, probe()).await {
            Ok(Ok(Some(v))) => return Ok(v),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => last_error = Some(e),
            Err(_) => {}
        }
        if Instant::now() >= deadline {
            let err = anyhow!("timed out after {:.1?} waiting for {what}", start.elapsed());
            return Err(match last_error {
                Some(e) => err.context(format!("last error: {e:#}")),
                None => err,
            });
        }
        tokio::time::sleep(POLL.min(deadline.saturating_duration_since(Instant::now()))).await;
    }
}

/// What a progress-bounded probe saw.
pub enum Seen<T> {
    Done(T),
    /// Not yet; `state` says where things stand, and any change of it counts as progress.
    Waiting {
        state: String,
    },
}

/// Polls `probe` until it returns `Done`, failing only when the state it reports has not changed
/// for `stall`: a slow machine passes as long as things move, and a stuck run fails with the
/// state it was stuck in. An error counts as "no change" and the last one is reported.
pub async fn wait_progressing<T, F, Fut>(stall: Duration, what: &str, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Seen<T>>>,
{
    let start = Instant::now();
    let mut changed = start;
    let mut state = String::from("(nothing seen yet)");
    let mut last_error: Option<anyhow::Error> = None;
    loop {
        let left = (changed + stall).saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, probe()).await {
            Ok(Ok(Seen::Done(v))) => return Ok(v),
            Ok(Ok(Seen::Waiting { state: now })) => {
                if now != state {
                    state = now;
                    changed = Instant::now();
                }
            }
            Ok(Err(e)) => last_error = Some(e),
            Err(_) => {}
        }
        if changed.elapsed() >= stall {
            let err = anyhow!(
                "no progress for {stall:?} (after {:.1?} in all) waiting for {what}; stuck at: {state}",
                start.elapsed()
            );
            return Err(match last_error {
                Some(e) => err.context(format!("last error: {e:#}")),
                None => err,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until the object `name` exists and satisfies `cond`, and returns it.
pub async fn wait_for_object<K>(
    api: &Api<K>,
    name: &str,
    timeout: Duration,
    what: &str,
    cond: impl Fn(&K) -> bool,
) -> Result<K>
where
    K: Resource + Clone + DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    // On timeout the failure shows the status last seen: the state it was stuck in.
    let last = std::sync::Mutex::new(None::<serde_json::Value>);
    let found = try_wait_until(timeout, what, || async {
        let object = api.get_opt(name).await?;
        if let Some(o) = &object {
            let status = serde_json::to_value(o)?.get("status").cloned();
            *last.lock().map_err(|_| anyhow!("poisoned"))? = Some(status.unwrap_or_default());
        }
        Ok(object.filter(|o| cond(o)))
    })
    .await;
    found.map_err(|e| {
        let seen = last.lock().ok().and_then(|l| l.clone());
        match seen {
            Some(status) => anyhow!("{e:#}; {name}'s last status: {status}"),
            None => anyhow!("{e:#}; {name} was never seen"),
        }
    })
}

/// Waits until the object `name` no longer exists.
pub async fn wait_deleted<K>(api: &Api<K>, name: &str, timeout: Duration) -> Result<()>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
    <K as Resource>::DynamicType: Default,
{
    let what = format!("{} {name} to be deleted", K::kind(&Default::default()));
    try_wait_until(timeout, &what, || async {
        Ok(api.get_opt(name).await?.is_none().then_some(()))
    })
    .await
}

/// The phase of a pod ("Pending", "Running", "Succeeded", "Failed"), if reported.
pub fn pod_phase(pod: &Pod) -> Option<&str> {
    pod.status.as_ref()?.phase.as_deref()
}

/// Waits until the pod reaches one of `phases` and returns it.
pub async fn wait_for_pod_phase(
    api: &Api<Pod>,
    name: &str,
    phases: &[&str],
    timeout: Duration,
) -> Result<Pod> {
    let what = format!("pod {name} to reach phase {}", phases.join(" or "));
    wait_for_object(api, name, timeout, &what, |p| {
        pod_phase(p).is_some_and(|ph| phases.contains(&ph))
    })
    .await
}

/// The log file of one process a test started. Several processes of a test may share a file (an
/// operator and its restarted successor): `read` returns only what was written since this one
/// opened it.
pub struct ProcessLog {
    pub path: PathBuf,
    start: u64,
}

impl ProcessLog {
    /// Opens `dir/name` for appending; the two handles are the process's stdout and stderr.
    pub fn open(dir: &Path, name: &str) -> Result<(ProcessLog, std::fs::File, std::fs::File)> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(name);
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        let err = out.try_clone()?;
        let start = out.metadata()?.len();
        Ok((ProcessLog { path, start }, out, err))
    }

    /// What this process has logged so far.
    pub fn read(&self) -> String {
        let bytes = std::fs::read(&self.path).unwrap_or_default();
        let from = usize::try_from(self.start).unwrap_or(usize::MAX).min(bytes.len());
        String::from_utf8_lossy(&bytes[from..]).into_owned()
    }
}
