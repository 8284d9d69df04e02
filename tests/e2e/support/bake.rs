//! Support for Bake tests on the rig: CRDs installed, an operator process per test (watching only
//! the test's namespace), BakeTemplates per test, and a delaying proxy in front of the rig's EC2
//! endpoint to make a bake last long enough to act on it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use aws_sdk_ec2::types::{Filter, Image, Tag};
use baker::api::catalog::AmiCatalogStatus;
use baker::api::{AmiCatalog, Bake, BakePhase, BakeTemplate, keys};
use futures::TryStreamExt;
use k8s_openapi::api::core::v1::{Container, Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

use crate::support::{
    ProcessLog, Rig, Seen, TestNamespace, rig, try_wait_until, wait_deleted, wait_for_object,
    wait_progressing,
};

/// Installs (or updates) Baker's CRDs with server-side apply and waits until they are served.
pub async fn install_crds(rig: &Rig) -> Result<()> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
    let dir = dir.to_string_lossy().to_string();
    rig.kubectl([
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager=baker-tests",
        "-f",
        &dir,
    ])
    .await?
    .ok()?;
    rig.kubectl(["wait", "--for=condition=Established", "--timeout=60s", "-f", &dir])
        .await?
        .ok()?;
    Ok(())
}

/// How long a Bake's status may stay unchanged before a wait for its phase gives up.
pub const BAKE_TIMEOUT: Duration = Duration::from_secs(180);

/// The Secret bake pods read AWS credentials from (the rig's EC2 endpoint takes any).
pub const CREDENTIALS_SECRET: &str = "aws-credentials";

/// The Secret with the rig's AWS keys that bake pods read (`--aws-credentials-secret`).
pub fn credentials_secret(rig: &Rig) -> Result<Secret> {
    aws_secret(rig, CREDENTIALS_SECRET)
}

/// A Secret `name` with the rig's AWS keys, as `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`.
pub fn aws_secret(rig: &Rig, name: &str) -> Result<Secret> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "stringData": {
            "AWS_ACCESS_KEY_ID": rig.var("AWS_ACCESS_KEY_ID"),
            "AWS_SECRET_ACCESS_KEY": rig.var("AWS_SECRET_ACCESS_KEY"),
        }
    }))?)
}

pub async fn create_credentials_secret(rig: &Rig, ns: &TestNamespace) -> Result<()> {
    ns.api::<Secret>()
        .create(&PostParams::default(), &credentials_secret(rig)?)
        .await?;
    Ok(())
}

/// A free TCP port on 127.0.0.1 (bound, then released for the process under test).
pub async fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    Ok(listener.local_addr()?.port())
}

/// The `baker` binary: `BAKER_BIN` if set (a private copy, when several worktrees share one cargo
/// target directory and overwrite each other's binary), else the one cargo built for this test.
pub fn baker_bin() -> PathBuf {
    match std::env::var_os("BAKER_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_baker")),
    }
}

/// A `baker run` process started by a test; killed when dropped.
pub struct Operator {
    child: Option<Child>,
    log: ProcessLog,
    pub http: String,
}

impl Operator {
    /// Starts `baker run` for one namespace with the rig's admin kubeconfig.
    pub async fn start(rig: &Rig, namespace: &str) -> Result<Operator> {
        Self::start_with(rig, namespace, &[], &[]).await
    }

    /// The same with extra flags and environment (e.g. `BAKER_FAILPOINTS`, or an
    /// `AWS_ENDPOINT_URL_EC2` of a proxy, which wins over the rig's).
    pub async fn start_with(
        rig: &Rig,
        namespace: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Operator> {
        Self::start_as(rig, "op", namespace, &rig.kubeconfig_path(), args, env).await
    }

    /// Starts `baker run` for every namespace, as a cluster-wide install runs. Only one test at a
    /// time may run one: it acts on every test's Bakes.
    pub async fn start_cluster_wide(rig: &Rig, args: &[&str], env: &[(&str, &str)]) -> Result<Operator> {
        Self::start_as(rig, "op", "", &rig.kubeconfig_path(), args, env).await
    }

    /// Starts `baker run --seed-api` (and `extra` flags) for `namespace` with `token` in a token
    /// file, and waits until it is ready; the directory holding the token file goes with it.
    pub async fn start_seed_api(
        rig: &Rig,
        namespace: &str,
        token: &str,
        extra: &[&str],
    ) -> Result<(Operator, tempfile::TempDir)> {
        let dir = tempfile::tempdir()?;
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, format!("{token}\n"))?;
        let token_file = token_file.to_string_lossy().to_string();
        let operator = Self::start_as(
            rig,
            "seed",
            namespace,
            &rig.kubeconfig_path(),
            &[&["--seed-api", "--seed-api-token-file", &token_file], extra].concat(),
            &[],
        )
        .await?;
        crate::support::ship::wait_for_status(&operator.http, "/readyz", 200, Duration::from_secs(60))
            .await?;
        Ok((operator, dir))
    }

    /// Starts `baker run` named `name` (its `POD_NAME`) for `namespace` with the given
    /// kubeconfig, serving HTTP on a free port.
    pub async fn start_as(
        rig: &Rig,
        name: &str,
        namespace: &str,
        kubeconfig: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Operator> {
        let http = format!("127.0.0.1:{}", free_port().await?);
        let mut full = vec!["run", "--log-format", "text", "--http-addr", &http];
        // No namespace: every namespace.
        if !namespace.is_empty() {
            full.extend(["--namespace", namespace]);
        }
        full.extend_from_slice(args);
        let mut vars: Vec<(String, String)> = vec![
            ("RUST_LOG".into(), "info,baker=debug,kube=warn".into()),
            ("BAKER_AWS_CREDENTIALS_SECRET".into(), CREDENTIALS_SECRET.into()),
            ("POD_NAME".into(), name.into()),
        ];
        // moto serves SSM on the same endpoint as EC2.
        vars.push(("AWS_ENDPOINT_URL_SSM".into(), rig.ec2_endpoint().to_string()));
        for key in [
            "AWS_ENDPOINT_URL_EC2",
            "AWS_REGION",
            "AWS_DEFAULT_REGION",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
        ] {
            vars.push((key.into(), rig.var(key).to_string()));
        }
        vars.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Self::spawn(
            rig,
            &format!(
                "{}-{name}",
                if namespace.is_empty() {
                    "cluster"
                } else {
                    namespace
                }
            ),
            &full,
            vars,
            kubeconfig,
            http.clone(),
        )
    }

    /// Starts `baker` as `container` of a pod named `pod` in `namespace` would run: the
    /// container's args, and its environment with field and Secret references resolved as the
    /// kubelet would resolve them. Two things differ from a pod, because these are host
    /// processes: the HTTP server listens on a free loopback port (a pod has its own network
    /// namespace), and the API server is reached through `kubeconfig` rather than in-cluster.
    pub async fn start_as_container(
        rig: &Rig,
        pod: &str,
        namespace: &str,
        container: &Container,
        secrets: &Api<Secret>,
        kubeconfig: &Path,
    ) -> Result<Operator> {
        if container.volume_mounts.as_ref().is_some_and(|m| !m.is_empty()) {
            bail!("{pod}: volume mounts are not emulated for host processes");
        }
        let http = format!("127.0.0.1:{}", free_port().await?);
        let mut vars = Vec::new();
        for var in container.env.iter().flatten() {
            let value = match (&var.value, &var.value_from) {
                (Some(v), None) => v.clone(),
                (None, Some(from)) => match (&from.field_ref, &from.secret_key_ref) {
                    (Some(f), None) if f.field_path == "metadata.name" => pod.to_string(),
                    (Some(f), None) if f.field_path == "metadata.namespace" => namespace.to_string(),
                    (None, Some(r)) => {
                        let secret = secrets.get(&r.name).await?;
                        let bytes = secret
                            .data
                            .and_then(|d| d.get(&r.key).cloned())
                            .with_context(|| format!("{}: no key {}", r.name, r.key))?;
                        String::from_utf8(bytes.0)?
                    }
                    _ => bail!("{pod}: env {} has a source not emulated here", var.name),
                },
                _ => String::new(),
            };
            vars.push((var.name.clone(), value));
        }
        vars.push(("BAKER_HTTP_ADDR".into(), http.clone()));
        let mut args: Vec<&str> = container.command.iter().flatten().map(String::as_str).collect();
        args.extend(container.args.iter().flatten().map(String::as_str));
        Self::spawn(rig, pod, &args, vars, kubeconfig, http)
    }

    /// Runs the `baker` binary with `args` and only the environment `vars` (plus PATH and
    /// KUBECONFIG), logging to the rig's test log directory.
    fn spawn(
        rig: &Rig,
        log_name: &str,
        args: &[&str],
        vars: Vec<(String, String)>,
        kubeconfig: &Path,
        http: String,
    ) -> Result<Operator> {
        let (log, out, err) =
            ProcessLog::open(&rig.dir().join("logs/tests"), &format!("operator-{log_name}.log"))?;
        let child = Command::new(baker_bin())
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(vars)
            .env("KUBECONFIG", kubeconfig)
            // The rig's mark: `rig down` stops this process even if the test was killed before
            // it could drop it.
            .env(
                "BAKER_RIG_INSTANCE",
                rig.dir()
                    .canonicalize()
                    .unwrap_or_else(|_| rig.dir().to_path_buf()),
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .context("starting baker")?;
        Ok(Operator {
            child: Some(child),
            log,
            http,
        })
    }

    pub fn log(&self) -> String {
        self.log.read()
    }

    /// SIGKILL, as a crash or a lost node would.
    pub async fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }

    /// Waits for the process to exit by itself.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<Option<i32>> {
        let Some(child) = self.child.as_mut() else {
            bail!("not running")
        };
        let status = tokio::time::timeout(timeout, child.wait()).await??;
        self.child = None;
        Ok(status.code())
    }
}

/// Applies a BakeTemplate from YAML text (cluster-scoped; tests give each a unique name).
pub async fn apply_template(client: &Client, yaml: &str) -> Result<BakeTemplate> {
    let template: BakeTemplate = serde_yaml::from_str(yaml)?;
    let api: Api<BakeTemplate> = Api::all(client.clone());
    let applied = api
        .patch(
            &template.name_any(),
            &PatchParams::apply("baker-tests").force(),
            &Patch::Apply(&template),
        )
        .await?;
    Ok(applied)
}

/// A rig template (`communicator: none`, the rig's source images) named `name`, with extra spec
/// lines appended (indented two spaces, e.g. `"  ec2Endpoint: http://..."`).
pub fn rig_template(name: &str, extra: &str) -> String {
    format!(
        "apiVersion: baker.io/v1alpha1
kind: BakeTemplate
metadata:
  name: {name}
spec:
  builder: amazon-ebs
  region: us-east-1
  instanceType: t3.micro
  communicator: none
{source}
{extra}
",
        source = if extra.contains("source:") {
            String::new()
        } else {
            "  source:\n    filter:\n      owners: [self]\n      name: \"baker-rig-source-{virtualizationType}-*\"".to_string()
        }
    )
}

pub fn bake_yaml(name: &str, template: &str, service: &str, version: &str, virt: &str) -> String {
    format!(
        "apiVersion: baker.io/v1alpha1
kind: Bake
metadata:
  name: {name}
spec:
  template: {template}
  service: {service}
  version: \"{version}\"
  virtualizationType: {virt}
"
    )
}

pub async fn create_bake(ns: &TestNamespace, yaml: &str) -> Result<Bake> {
    let bake: Bake = serde_yaml::from_str(yaml)?;
    Ok(ns.api::<Bake>().create(&PostParams::default(), &bake).await?)
}

/// Waits until the Bake reaches `phase`, and returns it. Fails early, with the status, if it
/// reaches another terminal phase, and fails when its status has not changed for `stall`, naming
/// the phase, reason and message it was stuck at.
pub async fn wait_for_phase(api: &Api<Bake>, name: &str, phase: BakePhase, stall: Duration) -> Result<Bake> {
    let what = format!("Bake {name} to reach {}", phase.as_str());
    let bake = wait_progressing(stall, &what, || async {
        let bake = api.get(name).await?;
        match bake.phase() {
            Some(p) if p == phase => Ok(Seen::Done(bake)),
            Some(p) if p.is_terminal() => Ok(Seen::Done(bake)),
            _ => Ok(Seen::Waiting {
                state: format!(
                    "phase {:?}, reason {:?}: {}",
                    bake.phase(),
                    ready_reason(&bake),
                    bake.status
                        .as_ref()
                        .and_then(|s| s.message.clone())
                        .unwrap_or_default()
                ),
            }),
        }
    })
    .await?;
    if bake.phase() != Some(phase) {
        bail!(
            "Bake {name} ended {:?} instead of {}: {:#?}",
            bake.phase(),
            phase.as_str(),
            bake.status
        );
    }
    Ok(bake)
}

/// Bakes by phase and Ready reason, e.g. `Queued/Queued=150 Running/Running=1`: progress for
/// waits over many Bakes, and what was stuck when one fails.
pub fn tally(bakes: &[Bake]) -> String {
    let mut counts = BTreeMap::<String, usize>::new();
    for b in bakes {
        let key = format!(
            "{}/{}",
            b.phase().map(|p| p.as_str()).unwrap_or("none"),
            ready_reason(b).unwrap_or_default()
        );
        *counts.entry(key).or_default() += 1;
    }
    counts
        .iter()
        .map(|(k, n)| format!("{k}={n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Which client chunks a [`SlowProxy`] holds back, and for how long.
#[derive(Clone, Debug)]
pub enum Delay {
    /// Every chunk.
    All(Duration),
    /// Chunks of requests for this EC2 action (e.g. `RunInstances`).
    On(&'static str, Duration),
    /// Every chunk once a request for this action has gone through.
    After(&'static str, Duration),
}

/// A TCP proxy on 127.0.0.1 in front of an HTTP endpoint that holds back what the client sends,
/// by rule: a way to make packer's EC2 calls slow, or to stall it at a chosen step.
pub struct SlowProxy {
    pub url: String,
    task: tokio::task::JoinHandle<()>,
    down: Arc<AtomicBool>,
}

/// What a [`relay`] does with a chunk the client sent.
pub enum Chunk {
    Pass,
    /// Sends it on after this long.
    Hold(Duration),
    /// Closes the connection instead.
    Cut,
}

/// `host:port` of an `http://host:port/` endpoint.
pub fn host_port(endpoint: &str) -> String {
    endpoint
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string()
}

/// Relays one client connection to `upstream` (`host:port`), showing each chunk the client sends
/// to `inspect` first; what the server sends goes back untouched. The proxies of the tests are
/// built on it.
pub async fn relay(client: TcpStream, upstream: String, mut inspect: impl FnMut(&[u8]) -> Chunk + Send) {
    let Ok(server) = TcpStream::connect(&upstream).await else {
        return;
    };
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = cr.read(&mut buf).await {
            if n == 0 {
                break;
            }
            match inspect(&buf[..n]) {
                Chunk::Pass => {}
                Chunk::Hold(d) => tokio::time::sleep(d).await,
                Chunk::Cut => break,
            }
            if sw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = sw.shutdown().await;
    };
    let down = async move {
        let _ = tokio::io::copy(&mut sr, &mut cw).await;
        let _ = cw.shutdown().await;
    };
    tokio::join!(up, down);
}

fn mentions(chunk: &[u8], action: &str) -> bool {
    let needle = format!("Action={action}");
    chunk.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// A BakeTemplate `<namespace>-t` whose packer reaches the rig's EC2 through a [`SlowProxy`] with
/// `delay`, plus `extra` template lines (e.g. `"  timeoutSeconds: 10"`). Returns the proxy (it
/// stops when dropped) and the template's name.
pub async fn slow_template(
    client: &Client,
    ns: &TestNamespace,
    delay: Delay,
    extra: &str,
) -> Result<(SlowProxy, String)> {
    let proxy = SlowProxy::start(rig().ec2_endpoint(), delay).await?;
    let lines = format!("  ec2Endpoint: {}\n{extra}", proxy.url);
    let template = namespace_template(client, ns, lines.trim_end()).await?;
    Ok((proxy, template))
}

impl SlowProxy {
    pub async fn start(upstream: &str, delay: Delay) -> Result<SlowProxy> {
        let upstream = host_port(upstream);
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let tripped = Arc::new(AtomicBool::new(false));
        let down = Arc::new(AtomicBool::new(false));
        let is_down = down.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                // An endpoint that is down: the connection is dropped at once.
                if is_down.load(SeqCst) {
                    drop(client);
                    continue;
                }
                let delay = delay.clone();
                let tripped = tripped.clone();
                let conn_down = is_down.clone();
                tokio::spawn(relay(client, upstream.clone(), move |chunk| {
                    if conn_down.load(SeqCst) {
                        return Chunk::Cut;
                    }
                    let hold = match &delay {
                        Delay::All(d) => Some(*d),
                        Delay::On(action, d) => mentions(chunk, action).then_some(*d),
                        Delay::After(action, d) => {
                            let held = tripped.load(SeqCst).then_some(*d);
                            if mentions(chunk, action) {
                                tripped.store(true, SeqCst);
                            }
                            held
                        }
                    };
                    hold.map_or(Chunk::Pass, Chunk::Hold)
                }));
            }
        });
        Ok(SlowProxy { url, task, down })
    }

    /// Takes the endpoint down (new connections are dropped) or brings it back.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, SeqCst);
    }
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The Ready condition's reason of a Bake.
pub fn ready_reason(bake: &Bake) -> Option<String> {
    bake.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.reason.clone())
}

/// The Bake's AMI, which a Succeeded Bake has.
pub fn ami_of(bake: &Bake) -> Result<String> {
    bake.status
        .as_ref()
        .and_then(|s| s.ami_id.clone())
        .context("the Bake has no amiId")
}

/// The Bake's status message, after checking that its Ready reason is `reason`.
pub fn expect_reason(bake: &Bake, reason: &str) -> Result<String> {
    let message = bake
        .status
        .as_ref()
        .and_then(|s| s.message.clone())
        .unwrap_or_default();
    ensure!(
        ready_reason(bake).as_deref() == Some(reason),
        "expected reason {reason}, got {:?}: {message}",
        ready_reason(bake)
    );
    Ok(message)
}

/// The Events in a namespace.
async fn events(ns: &TestNamespace) -> Result<impl Iterator<Item = Event>> {
    Ok(ns
        .api::<Event>()
        .list(&Default::default())
        .await?
        .items
        .into_iter())
}

/// Notes of the Events with `reason` in a namespace.
pub async fn event_notes(ns: &TestNamespace, reason: &str) -> Result<Vec<String>> {
    Ok(events(ns)
        .await?
        .filter(|e| e.reason.as_deref() == Some(reason))
        .filter_map(|e| e.note)
        .collect())
}

/// The instances (`POD_NAME`s) of Baker that reported Events in a namespace: which replicas acted.
pub async fn event_reporters(ns: &TestNamespace) -> Result<BTreeSet<String>> {
    Ok(events(ns)
        .await?
        .filter(|e| e.reporting_controller.as_deref() == Some("baker"))
        .filter_map(|e| e.reporting_instance)
        .collect())
}

/// Ends a test's namespace: deletes its Bakes while the test's operator still runs (so their
/// cleanup finalizers are honoured), then the namespace. Call it before the operator is dropped.
pub async fn finish(ns: TestNamespace) -> Result<()> {
    let bakes = ns.api::<Bake>();
    bakes
        .delete_collection(&Default::default(), &Default::default())
        .await?;
    let gone = try_wait_until(
        Duration::from_secs(60),
        "the test's Bakes to be deleted",
        || async {
            Ok(bakes
                .list(&Default::default())
                .await?
                .items
                .is_empty()
                .then_some(()))
        },
    )
    .await;
    if gone.is_err() {
        release_bakes(&bakes).await?;
    }
    // The test's BakeTemplates are cluster-scoped and named after its namespace.
    let templates: Api<BakeTemplate> = Api::all(bakes.into_client());
    for t in templates.list(&Default::default()).await?.items {
        if t.name_any().starts_with(&format!("{}-", ns.name())) {
            templates.delete(&t.name_any(), &Default::default()).await.ok();
        }
    }
    ns.cleanup().await
}

/// Removes Baker's finalizer from every Bake being deleted that the API can see: for leftovers of
/// tests whose operator is gone, which would otherwise keep their namespace terminating forever.
pub async fn release_bakes(bakes: &Api<Bake>) -> Result<()> {
    for bake in bakes.list(&Default::default()).await?.items {
        if bake.finalizers().is_empty() || bake.metadata.deletion_timestamp.is_none() {
            continue;
        }
        let api: Api<Bake> =
            Api::namespaced(bakes.clone().into_client(), &bake.namespace().unwrap_or_default());
        let patch = serde_json::json!({ "metadata": { "finalizers": null } });
        let _ = api
            .patch(&bake.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
            .await;
    }
    Ok(())
}

/// A Bake `name` whose pod cannot start, under an operator that gives bake pods `seconds` to
/// start. Returns the Bake's message once it says why (`why` holds it; long before the timeout),
/// then the Bake once it failed and its pod is gone (stopped, so it can never start packer after
/// the Bake said Failed), and the operator, which must outlive [`finish`].
pub async fn pod_never_starts(
    ns: &TestNamespace,
    template: &str,
    name: &str,
    seconds: u32,
    why: impl Fn(&str) -> bool,
) -> Result<(String, Bake, Operator)> {
    let timeout = seconds.to_string();
    let operator =
        Operator::start_with(rig(), ns.name(), &["--pod-start-timeout-seconds", &timeout], &[]).await?;
    create_bake(ns, &bake_yaml(name, template, "svc", "1.0.0", "hvm")).await?;
    let bakes = ns.api::<Bake>();
    let what = "the Bake's message to say why its pod cannot start";
    let pending = wait_for_message(&bakes, name, Duration::from_secs(60), what, why).await?;
    let failed = wait_for_phase(&bakes, name, BakePhase::Failed, BAKE_TIMEOUT).await?;
    wait_deleted(&ns.api::<Pod>(), &format!("bake-{name}"), Duration::from_secs(60)).await?;
    Ok((pending, failed, operator))
}

/// Waits until the Bake's status message satisfies `want` (failing when it stops changing for
/// `stall`), and returns it.
pub async fn wait_for_message(
    api: &Api<Bake>,
    name: &str,
    stall: Duration,
    what: &str,
    want: impl Fn(&str) -> bool,
) -> Result<String> {
    wait_progressing(stall, what, || async {
        let bake = api.get(name).await?;
        let message = bake
            .status
            .as_ref()
            .and_then(|s| s.message.clone())
            .unwrap_or_default();
        Ok(if want(&message) {
            Seen::Done(message)
        } else {
            Seen::Waiting { state: message }
        })
    })
    .await
}

/// Where a Bake test starts: the rig, an admin client, and a fresh namespace `<prefix>-<random>`
/// with the credentials Secret bake pods read (the CRDs installed first).
pub async fn namespace(prefix: &str) -> Result<(&'static Rig, Client, TestNamespace)> {
    let (rig, client, ns) = bare_namespace(prefix).await?;
    create_credentials_secret(rig, &ns).await?;
    Ok((rig, client, ns))
}

/// [`namespace`] with a rig BakeTemplate `<namespace>-t` with `extra` spec lines (see
/// [`rig_template`]); the last value is the template's name.
pub async fn namespace_with_template(
    prefix: &str,
    extra: &str,
) -> Result<(&'static Rig, Client, TestNamespace, String)> {
    let (rig, client, ns) = namespace(prefix).await?;
    let template = namespace_template(&client, &ns, extra).await?;
    Ok((rig, client, ns, template))
}

/// A namespace *without* the credentials Secret (so bake pods there can never start their
/// container), with a rig BakeTemplate `<namespace>-t`.
pub async fn namespace_without_credentials(
    prefix: &str,
) -> Result<(&'static Rig, Client, TestNamespace, String)> {
    let (rig, client, ns) = bare_namespace(prefix).await?;
    let template = namespace_template(&client, &ns, "").await?;
    Ok((rig, client, ns, template))
}

async fn bare_namespace(prefix: &str) -> Result<(&'static Rig, Client, TestNamespace)> {
    let rig = rig();
    let client = rig.client().await?;
    install_crds(rig).await?;
    let ns = TestNamespace::new(&client, prefix).await?;
    Ok((rig, client, ns))
}

/// Applies the rig BakeTemplate `<namespace>-t` ([`finish`] deletes it) and returns its name.
async fn namespace_template(client: &Client, ns: &TestNamespace, extra: &str) -> Result<String> {
    let template = format!("{}-t", ns.name());
    apply_template(client, &rig_template(&template, extra)).await?;
    Ok(template)
}

/// Records, for the bake pods of a namespace, every pod (by UID) ever seen, the order their names
/// were first seen in, and the most that were unfinished at once.
pub struct PodWatch {
    order: Arc<Mutex<Vec<String>>>,
    uids: Arc<Mutex<BTreeSet<String>>>,
    max_active: Arc<Mutex<usize>>,
    task: tokio::task::JoinHandle<()>,
}

impl PodWatch {
    pub fn start(pods: Api<Pod>) -> PodWatch {
        let order = Arc::new(Mutex::new(Vec::new()));
        let uids = Arc::new(Mutex::new(BTreeSet::new()));
        let max_active = Arc::new(Mutex::new(0));
        let (o, u, m) = (order.clone(), uids.clone(), max_active.clone());
        let task = tokio::spawn(async move {
            let mut active: BTreeMap<String, bool> = BTreeMap::new();
            let stream = watcher(
                pods,
                watcher::Config::default().labels("app.kubernetes.io/managed-by=baker"),
            )
            .applied_objects();
            futures::pin_mut!(stream);
            while let Ok(Some(pod)) = stream.try_next().await {
                let name = pod.name_any();
                if let Ok(mut uids) = u.lock() {
                    uids.insert(pod.uid().unwrap_or_default());
                }
                let done = matches!(crate::support::pod_phase(&pod), Some("Succeeded" | "Failed"));
                if let Ok(mut order) = o.lock()
                    && !order.contains(&name)
                {
                    order.push(name.clone());
                }
                active.insert(name, !done);
                let now = active.values().filter(|a| **a).count();
                if let Ok(mut max) = m.lock() {
                    *max = (*max).max(now);
                }
            }
        });
        PodWatch {
            order,
            uids,
            max_active,
            task,
        }
    }

    pub fn order(&self) -> Vec<String> {
        self.order.lock().map(|o| o.clone()).unwrap_or_default()
    }

    /// How many distinct bake pods (by UID) ever existed.
    pub fn pods_seen(&self) -> usize {
        self.uids.lock().map(|u| u.len()).unwrap_or_default()
    }

    pub fn max_active(&self) -> usize {
        self.max_active.lock().map(|m| *m).unwrap_or_default()
    }
}

impl Drop for PodWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Records the order in which the Bakes of a namespace got their launch record (`status.podName`).
/// The operator writes launch records one at a time under its launch lock, so this is the order
/// it admitted them in; the pods themselves are created after the lock is released, and two Bakes
/// admitted together may create theirs in either order.
pub struct LaunchOrder {
    order: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl LaunchOrder {
    pub fn start(bakes: Api<Bake>) -> LaunchOrder {
        let order = Arc::new(Mutex::new(Vec::new()));
        let o = order.clone();
        let task = tokio::spawn(async move {
            let stream = watcher(bakes, watcher::Config::default()).applied_objects();
            futures::pin_mut!(stream);
            while let Ok(Some(bake)) = stream.try_next().await {
                let launched = bake.status.as_ref().is_some_and(|s| s.pod_name.is_some());
                let name = bake.name_any();
                if let Ok(mut order) = o.lock()
                    && launched
                    && !order.contains(&name)
                {
                    order.push(name);
                }
            }
        });
        LaunchOrder { order, task }
    }

    pub fn order(&self) -> Vec<String> {
        self.order.lock().map(|o| o.clone()).unwrap_or_default()
    }
}

impl Drop for LaunchOrder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Registers `count` images named `<prefix>-<i>` in moto and tags them all at once.
pub async fn register_images(
    ec2: &aws_sdk_ec2::Client,
    prefix: &str,
    count: usize,
    tags: &[(&str, &str)],
) -> Result<Vec<String>> {
    let mut ids = Vec::with_capacity(count);
    for i in 0..count {
        let out = ec2
            .register_image()
            .name(format!("{prefix}-{i:03}"))
            .root_device_name("/dev/xvda")
            .send()
            .await
            .with_context(|| format!("registering {prefix}-{i:03}"))?;
        ids.push(out.image_id().unwrap_or_default().to_string());
    }
    let mut request = ec2.create_tags().set_resources(Some(ids.clone()));
    for (k, v) in tags {
        request = request.tags(Tag::builder().key(*k).value(*v).build());
    }
    request.send().await.context("tagging images")?;
    Ok(ids)
}

/// This account's images tagged `key=value`.
pub async fn images_tagged(ec2: &aws_sdk_ec2::Client, key: &str, value: &str) -> Result<Vec<Image>> {
    let out = ec2
        .describe_images()
        .owners("self")
        .filters(Filter::builder().name(format!("tag:{key}")).values(value).build())
        .send()
        .await?;
    Ok(out.images().to_vec())
}

/// This account's images tagged with the Bake's UID: the AMIs baked for it.
pub async fn images_of(bake: &Bake) -> Result<Vec<Image>> {
    images_tagged(&rig().ec2(), keys::BAKE_UID, &bake.uid().unwrap_or_default()).await
}

/// The value of an image's tag `key`.
pub fn tag<'a>(image: &'a Image, key: &str) -> Option<&'a str> {
    image
        .tags()
        .iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
}

/// The ids of `images`.
pub fn image_ids(images: &[Image]) -> Vec<String> {
    images
        .iter()
        .filter_map(|i| i.image_id().map(str::to_string))
        .collect()
}

/// Whether this account still has the image `id`.
pub async fn image_exists(ec2: &aws_sdk_ec2::Client, id: &str) -> Result<bool> {
    let out = ec2
        .describe_images()
        .owners("self")
        .filters(Filter::builder().name("image-id").values(id).build())
        .send()
        .await?;
    Ok(!out.images().is_empty())
}

/// Applies AmiCatalog `name` for the rig's region; `spec` holds its other spec fields, a line each
/// (e.g. `"service: x\nlimit: 5"`).
pub async fn apply_catalog(api: &Api<AmiCatalog>, name: &str, spec: &str) -> Result<AmiCatalog> {
    let mut yaml = format!(
        "apiVersion: baker.io/v1alpha1\nkind: AmiCatalog\nmetadata:\n  name: {name}\nspec:\n  region: {}\n",
        rig().region()
    );
    for line in spec.lines() {
        yaml.push_str(&format!("  {line}\n"));
    }
    let catalog: AmiCatalog = serde_yaml::from_str(&yaml)?;
    Ok(api
        .patch(
            name,
            &PatchParams::apply("baker-tests").force(),
            &Patch::Apply(&catalog),
        )
        .await?)
}

/// Waits, a minute at most, until the catalog's status satisfies `cond`.
pub async fn wait_catalog(
    api: &Api<AmiCatalog>,
    name: &str,
    what: &str,
    cond: impl Fn(&AmiCatalogStatus) -> bool,
) -> Result<AmiCatalog> {
    let timeout = Duration::from_secs(60);
    wait_for_object(api, name, timeout, what, |c| c.status.as_ref().is_some_and(&cond)).await
}

/// A TCP proxy on 127.0.0.1 in front of the rig's EC2 endpoint that counts the EC2 actions sent
/// through it, and can be switched off (connections refused) and on again on the same port.
pub struct CountingProxy {
    addr: std::net::SocketAddr,
    upstream: String,
    pub counts: Arc<Mutex<HashMap<String, usize>>>,
    /// Every request body sent through it, for tests that look at parameters.
    sent: Arc<Mutex<Vec<u8>>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// The actions named in a chunk of AWS query-protocol requests (`Action=DescribeImages&...`).
fn actions(chunk: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(chunk);
    text.split("Action=")
        .skip(1)
        .filter_map(|rest| {
            let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric()).collect();
            (!name.is_empty()).then_some(name)
        })
        .collect()
}

impl CountingProxy {
    pub async fn start(upstream: &str) -> Result<CountingProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let mut proxy = CountingProxy {
            addr: listener.local_addr()?,
            upstream: host_port(upstream),
            counts: Arc::default(),
            sent: Arc::default(),
            task: None,
        };
        proxy.serve(listener);
        Ok(proxy)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn serve(&mut self, listener: TcpListener) {
        let upstream = self.upstream.clone();
        let counts = self.counts.clone();
        let sent = self.sent.clone();
        self.task = Some(tokio::spawn(async move {
            // Connections live in this set, so switching off also cuts kept-alive connections.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let counts = counts.clone();
                let sent = sent.clone();
                connections.spawn(relay(client, upstream.clone(), move |chunk| {
                    sent.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .extend_from_slice(chunk);
                    for action in actions(chunk) {
                        let mut counts = counts.lock().unwrap_or_else(|p| p.into_inner());
                        *counts.entry(action).or_default() += 1;
                    }
                    Chunk::Pass
                }));
            }
        }));
    }

    /// Stops listening and cuts open connections: EC2 is down.
    pub fn switch_off(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// Listens again on the same port.
    pub async fn switch_on(&mut self) -> Result<()> {
        let listener = try_wait_until(Duration::from_secs(10), "the proxy's port to be free", || async {
            Ok(Some(TcpListener::bind(self.addr).await?))
        })
        .await?;
        self.serve(listener);
        Ok(())
    }

    pub fn count(&self, action: &str) -> usize {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.get(action).copied().unwrap_or_default()
    }

    pub fn total(&self) -> usize {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.values().sum()
    }
}

impl CountingProxy {
    /// The `Action=...` requests sent through the proxy whose body holds `needle`, URL-decoded.
    pub fn requests_with(&self, action: &str, needle: &str) -> Vec<String> {
        let sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
        let text = String::from_utf8_lossy(&sent);
        text.split("Action=")
            .skip(1)
            .filter(|r| r.starts_with(action))
            .map(|r| {
                let body: String = r.chars().take_while(|c| !c.is_whitespace()).collect();
                form_urlencoded::parse(format!("Action={body}").as_bytes())
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join("&")
            })
            .filter(|r| r.contains(needle))
            .collect()
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.switch_off();
    }
}

/// A new image named `name`, owned by the rig's account: a copy of the rig's hvm source image,
/// made now (the rig's moto makes copies EBS-rooted, so packer accepts them as a source).
pub async fn source_copy(rig: &Rig, name: &str) -> Result<String> {
    let ec2 = rig.ec2();
    let sources = ec2
        .describe_images()
        .owners("self")
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("name")
                .values("baker-rig-source-hvm-*")
                .build(),
        )
        .send()
        .await?;
    let source = sources
        .images()
        .first()
        .and_then(|i| i.image_id())
        .context("the rig's hvm source image")?
        .to_string();
    let copy = ec2
        .copy_image()
        .source_image_id(&source)
        .source_region(rig.region())
        .name(name)
        .send()
        .await?;
    Ok(copy.image_id().unwrap_or_default().to_string())
}
