//! What the phases share: the bench namespace and its templates, operator processes (pid, RSS,
//! readiness, metrics, SIGTERM), watches that timestamp Bake phases and bake pods as the harness
//! sees them, and the teardown.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use baker::api::{Bake, BakePhase, BakeTemplate};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};

use crate::support::Rig;
use crate::support::bake::{Operator, apply_template, bake_yaml, credentials_secret, rig_template};
use crate::support::ship;

/// The label on the bench's namespaces (not the tests' `baker.io/test`: the tests wait for
/// those to go away, and a bench namespace lives for minutes).
pub const BENCH_LABEL: (&str, &str) = ("baker.io/bench", "true");
/// Which part of the bench a Bake belongs to, so each watch sees only its own.
pub const SET_LABEL: &str = "bench.baker.io/set";
/// Creates (and finalizer removals) in flight at once.
pub const IN_FLIGHT: usize = 32;
/// How often long waits say where they are.
pub const PROGRESS: Duration = Duration::from_secs(10);

/// The bench's namespace, its templates and clients.
pub struct Bench {
    pub rig: &'static Rig,
    pub client: Client,
    pub ns: String,
    /// A rig template whose bakes really run packer against moto.
    pub template: String,
    /// The same with a node selector no node has: its bake pods are created and never start,
    /// for the phases that only time the launch.
    pub parked_template: String,
    pub bakes: Api<Bake>,
    pub pods: Api<Pod>,
}

/// The node label no node carries.
pub const PARKED_SELECTOR: (&str, &str) = ("bench.baker.io/no-such-node", "true");

impl Bench {
    /// A fresh namespace `bench-<random>` with the credentials Secret and both templates.
    pub async fn setup(rig: &'static Rig, client: Client) -> Result<Bench> {
        crate::support::bake::install_crds(rig)
            .await
            .context("installing Baker's CRDs")?;
        let ns = format!("bench-{}", crate::support::random_suffix());
        crate::support::create_namespace(&client, &ns, BENCH_LABEL).await?;
        Api::<Secret>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &credentials_secret(rig)?)
            .await
            .context("creating the credentials Secret")?;
        let template = format!("{ns}-t");
        apply_template(&client, &rig_template(&template, ""))
            .await
            .context("applying the bench's BakeTemplate")?;
        let parked_template = format!("{ns}-parked");
        let parked = format!(
            "  pod:\n    nodeSelector:\n      {}: \"{}\"",
            PARKED_SELECTOR.0, PARKED_SELECTOR.1
        );
        apply_template(&client, &rig_template(&parked_template, &parked))
            .await
            .context("applying the bench's parked BakeTemplate")?;
        Ok(Bench {
            rig,
            bakes: Api::namespaced(client.clone(), &ns),
            pods: Api::namespaced(client.clone(), &ns),
            client,
            ns,
            template,
            parked_template,
        })
    }

    /// A Bake of `set` (its label) named `name`.
    pub fn bake(&self, set: &str, name: &str, template: &str, service: &str, version: &str) -> Result<Bake> {
        let mut bake: Bake = serde_yaml::from_str(&bake_yaml(name, template, service, version, "hvm"))
            .context("parsing a Bake manifest")?;
        bake.metadata
            .labels
            .get_or_insert_with(Default::default)
            .insert(SET_LABEL.into(), set.into());
        Ok(bake)
    }

    pub async fn create(&self, bake: &Bake) -> Result<Bake> {
        self.bakes
            .create(&PostParams::default(), bake)
            .await
            .with_context(|| format!("creating Bake {}", bake.name_any()))
    }

    /// Starts `baker run` for the bench namespace with `args`.
    pub async fn operator(&self, args: &[&str]) -> Result<Running> {
        Running::new(Operator::start_with(self.rig, &self.ns, args, &[]).await?).await
    }

    /// Starts `baker run` with its own identity (`POD_NAME`), for leader election.
    pub async fn operator_named(&self, name: &str, args: &[&str]) -> Result<Running> {
        self.operator_with(name, args, &[]).await
    }

    /// The same with extra environment (e.g. an `AWS_ENDPOINT_URL_EC2` of a proxy).
    pub async fn operator_with(&self, name: &str, args: &[&str], env: &[(&str, &str)]) -> Result<Running> {
        let op = Operator::start_as(self.rig, name, &self.ns, &self.rig.kubeconfig_path(), args, env).await?;
        Running::new(op).await
    }

    /// Removes the finalizers of every Bake of `selector` (operators stopped first), deletes
    /// them, and waits until they are gone.
    pub async fn remove_bakes(&self, selector: &str) -> Result<()> {
        let names: Vec<String> = self
            .bakes
            .list_metadata(&ListParams::default().labels(selector))
            .await?
            .items
            .iter()
            .map(|b| b.name_any())
            .collect();
        release(&self.bakes, &names, "removing").await?;
        self.bakes
            .delete_collection(&DeleteParams::default(), &ListParams::default().labels(selector))
            .await
            .with_context(|| format!("deleting Bakes {selector}"))?;
        // Their pods never started (parked) or finished: gone at once, not left to the GC.
        self.pods
            .delete_collection(
                &DeleteParams::default().grace_period(0),
                &ListParams::default().labels("app.kubernetes.io/managed-by=baker"),
            )
            .await
            .context("deleting bake pods")?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let left = self
                .bakes
                .list_metadata(&ListParams::default().labels(selector))
                .await?
                .items;
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} Bakes ({selector}) still there 120 s after their deletion",
                    left.len()
                );
            }
            // Bakes that got the finalizer back between the list and the delete (none should).
            let names = holding_finalizers(&left);
            release(&self.bakes, &names, "removing").await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Strips every Bake's finalizer (the operators are gone, nothing else would) and deletes
    /// the namespace and the templates. Waits a bounded time for the namespace to go.
    pub async fn teardown(self) -> Result<()> {
        let listed = self.bakes.list_metadata(&ListParams::default()).await?.items;
        release(&self.bakes, &holding_finalizers(&listed), "teardown: releasing").await?;
        // Every BakeTemplate named after the namespace: the bench's two and any a run added.
        let templates: Api<BakeTemplate> = Api::all(self.client.clone());
        let prefix = format!("{}-", self.ns);
        let names: Vec<String> = templates
            .list_metadata(&ListParams::default())
            .await?
            .items
            .iter()
            .map(|t| t.name_any())
            .filter(|n| n.starts_with(&prefix))
            .collect();
        for t in &names {
            match templates.delete(t, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.is_not_found() => {}
                Err(e) => return Err(e).with_context(|| format!("deleting BakeTemplate {t}")),
            }
        }
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        namespaces
            .delete(&self.ns, &DeleteParams::default())
            .await
            .with_context(|| format!("deleting namespace {}", self.ns))?;
        let started = Instant::now();
        let mut said = Instant::now();
        while namespaces.get_opt(&self.ns).await?.is_some() {
            if started.elapsed() > Duration::from_secs(300) {
                eprintln!(
                    "warning: namespace {} is still terminating after 5 min; it goes by itself",
                    self.ns
                );
                return Ok(());
            }
            if said.elapsed() >= PROGRESS {
                eprintln!(
                    "teardown: namespace {} terminating ({:.0?})",
                    self.ns,
                    started.elapsed()
                );
                said = Instant::now();
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        eprintln!("teardown: namespace {} gone", self.ns);
        Ok(())
    }
}

/// Removes Baker's finalizer from the named Bakes, `IN_FLIGHT` at a time, saying how far it got
/// every `PROGRESS`.
async fn release(api: &Api<Bake>, names: &[String], what: &str) -> Result<()> {
    if names.is_empty() {
        return Ok(());
    }
    let patch = serde_json::json!({ "metadata": { "finalizers": null } });
    let started = Instant::now();
    let mut said = Instant::now();
    let mut done = 0usize;
    let mut patches = futures::stream::iter(names.iter().map(|name| {
        let patch = &patch;
        async move {
            match api
                .patch(name, &PatchParams::default(), &Patch::Merge(patch))
                .await
            {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
                Err(e) => Err(e).with_context(|| format!("removing the finalizer of Bake {name}")),
            }
        }
    }))
    .buffer_unordered(IN_FLIGHT);
    while let Some(r) = patches.next().await {
        r?;
        done += 1;
        if said.elapsed() >= PROGRESS {
            eprintln!(
                "{what} finalizers: {}/{}",
                crate::report::thousands(done as u64),
                crate::report::thousands(names.len() as u64)
            );
            said = Instant::now();
        }
    }
    eprintln!(
        "{what} finalizers of {} Bakes took {:.1?}",
        crate::report::thousands(names.len() as u64),
        started.elapsed()
    );
    Ok(())
}

/// An operator process with its pid (found from its unique `--http-addr`).
pub struct Running {
    pub op: Operator,
    pub pid: u32,
}

impl Running {
    async fn new(op: Operator) -> Result<Running> {
        let needle = format!("--http-addr\0{}\0", op.http);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(pid) = find_pid(&needle) {
                return Ok(Running { op, pid });
            }
            if Instant::now() > deadline {
                bail!(
                    "no process with `--http-addr {}` 5 s after starting the operator ({})",
                    op.http,
                    crate::support::bake::baker_bin().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn alive(&self) -> bool {
        // A zombie (exited, not reaped yet) keeps its /proc entry but no longer has a cmdline.
        std::fs::read(format!("/proc/{}/cmdline", self.pid)).is_ok_and(|c| !c.is_empty())
    }

    /// Polls `/readyz` every 10 ms until it answers 200; when it did.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(r) = ship::get(&self.op.http, "/readyz").await
                && r.status == 200
            {
                return Ok(Instant::now());
            }
            if !self.alive() {
                bail!(
                    "the operator (pid {}) exited before it was ready; its log:\n{}",
                    self.pid,
                    tail(&self.op.log(), 30)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the operator (pid {}) was not ready after {timeout:?}; its log:\n{}",
                    self.pid,
                    tail(&self.op.log(), 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// VmRSS from /proc, in bytes.
    pub fn rss(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .with_context(|| format!("reading /proc/{}/status", self.pid))?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no VmRSS in /proc/{}/status", self.pid))?;
        Ok(kib * 1024)
    }

    pub async fn metrics(&self) -> Result<Metrics> {
        let reply = ship::get(&self.op.http, "/metrics")
            .await
            .with_context(|| format!("reading the operator's metrics on {}", self.op.http))?;
        if reply.status != 200 {
            bail!("GET /metrics answered {}", reply.status);
        }
        Ok(Metrics::parse(&reply.body))
    }

    /// Waits until the operator has stopped reconciling: `baker_reconciles_total` unchanged for
    /// `quiet`, at most `timeout`. Returns whether it went quiet.
    pub async fn wait_idle(&self, quiet: Duration, timeout: Duration) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        let mut last = self.metrics().await?.sum("baker_reconciles_total", &[]);
        let mut since = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = self.metrics().await?.sum("baker_reconciles_total", &[]);
            if now != last {
                last = now;
                since = Instant::now();
            } else if since.elapsed() >= quiet {
                return Ok(true);
            }
            if Instant::now() > deadline {
                return Ok(false);
            }
        }
    }

    /// SIGTERM, as Kubernetes stops a pod, and waits for the process to exit.
    pub async fn terminate(mut self) -> Result<()> {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .context("running kill -TERM")?;
        if !status.success() {
            bail!("kill -TERM {} failed: {status}", self.pid);
        }
        match self.op.wait_exit(Duration::from_secs(30)).await {
            Ok(_) => Ok(()),
            Err(e) => {
                self.op.kill().await.ok();
                Err(e).context(format!(
                    "the operator (pid {}) did not exit within 30 s of SIGTERM",
                    self.pid
                ))
            }
        }
    }
}

fn find_pid(needle: &str) -> Option<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        if pid == me {
            return None;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
        let text = String::from_utf8_lossy(&cmdline);
        (text.contains(needle) || text.ends_with(needle.trim_end_matches('\0'))).then_some(pid)
    })
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The operator's counters, by series (`family{labels}`).
pub struct Metrics {
    series: BTreeMap<String, f64>,
}

impl Metrics {
    fn parse(text: &str) -> Metrics {
        let series = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                Some((series.to_string(), value.parse().ok()?))
            })
            .collect();
        Metrics { series }
    }

    /// `(labels, value)` of every series of `family`.
    fn family<'a>(&'a self, family: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
        self.series.iter().filter_map(move |(s, v)| {
            let rest = s.strip_prefix(family)?;
            if rest.is_empty() {
                return Some(("", *v));
            }
            Some((rest.strip_prefix('{')?.strip_suffix('}')?, *v))
        })
    }

    /// The sum over the series of `family` whose labels include every `(name, value)` of `want`.
    pub fn sum(&self, family: &str, want: &[(&str, &str)]) -> f64 {
        self.family(family)
            .filter(|(labels, _)| want.iter().all(|(k, v)| label(labels, k) == Some(*v)))
            .map(|(_, v)| v)
            .sum()
    }

    /// The series of `family` grouped by the values of labels `keys`.
    pub fn by(&self, family: &str, keys: &[&str]) -> BTreeMap<Vec<String>, u64> {
        let mut out = BTreeMap::new();
        for (labels, v) in self.family(family) {
            let key: Vec<String> = keys
                .iter()
                .map(|k| label(labels, k).unwrap_or_default().to_string())
                .collect();
            *out.entry(key).or_default() += v as u64;
        }
        out
    }

    /// Requests the operator sent to the API server, by (verb, resource).
    pub fn kube_requests(&self) -> BTreeMap<(String, String), u64> {
        self.by("baker_kube_requests_total", &["verb", "resource"])
            .into_iter()
            .map(|(k, v)| ((k[0].clone(), k[1].clone()), v))
            .collect()
    }

    /// EC2 calls, by action.
    pub fn ec2_calls(&self) -> BTreeMap<String, u64> {
        self.by("baker_ec2_calls_total", &["action"])
            .into_iter()
            .map(|(k, v)| (k[0].clone(), v))
            .collect()
    }
}

fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    labels.split(',').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k.trim() == name).then(|| v.trim().trim_matches('"'))
    })
}

/// The verbs that write.
pub const WRITE_VERBS: [&str; 4] = ["create", "patch", "update", "delete"];

/// What grew from `before` to `after`.
pub fn delta<K: Ord + Clone>(before: &BTreeMap<K, u64>, after: &BTreeMap<K, u64>) -> BTreeMap<K, u64> {
    after
        .iter()
        .filter_map(|(k, n)| {
            let d = n.saturating_sub(before.get(k).copied().unwrap_or(0));
            (d > 0).then(|| (k.clone(), d))
        })
        .collect()
}

/// `{"verb resource": n}` for the JSON report.
pub fn requests_json(requests: &BTreeMap<(String, String), u64>) -> serde_json::Value {
    requests
        .iter()
        .map(|((verb, resource), n)| (format!("{verb} {resource}"), serde_json::json!(n)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// Writes among `requests`, leaving out `events` and `leases` (not about the Bakes' work).
pub fn writes(requests: &BTreeMap<(String, String), u64>, resources: Option<&[&str]>) -> u64 {
    requests
        .iter()
        .filter(|((verb, resource), _)| {
            WRITE_VERBS.contains(&verb.as_str())
                && resource != "events"
                && resource != "leases"
                && resources.is_none_or(|r| r.contains(&resource.as_str()))
        })
        .map(|(_, n)| n)
        .sum()
}

/// What the harness's watch saw of one Bake.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    pub phase: Option<BakePhase>,
    pub resource_version: String,
    /// When the watch first saw it in a terminal phase.
    pub finished: Option<Instant>,
    /// Every version seen: when, and `phase/reason` (`+fin` once Baker's finalizer is on).
    pub history: Vec<(Instant, String)>,
    pub message: String,
}

#[derive(Default)]
pub struct BakeWatchState {
    pub synced: bool,
    pub bakes: HashMap<String, Seen>,
    /// Modifications of a Bake that was Queued before and still is after.
    pub queued_rewrites: u64,
    /// Those of them before any Bake of the watch finished (no slot freed yet).
    pub queued_rewrites_before_first_finish: u64,
    /// Bakes whose queued rewrite was seen, with how many.
    pub rewritten: BTreeMap<String, u64>,
    /// A few rewrites: the Bake, its message before and after.
    pub rewrite_samples: Vec<(String, String, String)>,
    pub first_finish: Option<Instant>,
    pub finished: usize,
    pub failed: Vec<String>,
    pub errors: u64,
}

/// A watch on the bench namespace's Bakes of one set, as a client sees them.
pub struct BakeWatch {
    pub state: Arc<Mutex<BakeWatchState>>,
    task: tokio::task::JoinHandle<()>,
}

impl BakeWatch {
    /// Starts the watch and waits until its first list is in.
    pub async fn start(bakes: Api<Bake>, set: &str) -> Result<BakeWatch> {
        let state = Arc::new(Mutex::new(BakeWatchState::default()));
        let s = state.clone();
        let config = watcher::Config::default().labels(&format!("{SET_LABEL}={set}"));
        let task = tokio::spawn(async move {
            let stream = watcher(bakes, config).default_backoff();
            futures::pin_mut!(stream);
            while let Some(event) = stream.next().await {
                let now = Instant::now();
                let Ok(mut st) = s.lock() else { return };
                match event {
                    Ok(watcher::Event::Apply(b) | watcher::Event::InitApply(b)) => st.saw(&b, now),
                    Ok(watcher::Event::InitDone) => st.synced = true,
                    Ok(_) => {}
                    Err(_) => st.errors += 1,
                }
            }
        });
        let watch = BakeWatch { state, task };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !watch.with(|s| s.synced)? {
            if Instant::now() > deadline {
                bail!("the harness's Bake watch did not sync within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(watch)
    }

    pub fn with<T>(&self, f: impl FnOnce(&BakeWatchState) -> T) -> Result<T> {
        let state = self
            .state
            .lock()
            .map_err(|_| anyhow!("the Bake watch's state is poisoned"))?;
        Ok(f(&state))
    }

    /// When the watch first saw `name` finished, and in which phase.
    pub fn finished(&self, name: &str) -> Result<Option<(Instant, Option<BakePhase>)>> {
        self.with(|s| s.bakes.get(name).and_then(|b| b.finished.map(|t| (t, b.phase))))
    }
}

impl BakeWatchState {
    fn saw(&mut self, bake: &Bake, now: Instant) {
        let name = bake.name_any();
        let phase = bake.phase();
        let rv = bake.resource_version().unwrap_or_default();
        let message: String = bake
            .status
            .as_ref()
            .and_then(|s| s.message.as_deref())
            .unwrap_or_default()
            .chars()
            .take(160)
            .collect();
        let before = self.bakes.get(&name).cloned();
        let was_finished = before.as_ref().and_then(|b| b.finished);
        let mut history = before.as_ref().map(|b| b.history.clone()).unwrap_or_default();
        if before.as_ref().is_none_or(|b| b.resource_version != rv) {
            let fin = if bake.finalizers().is_empty() { "" } else { "+fin" };
            let reason = crate::support::bake::ready_reason(bake).unwrap_or_else(|| "-".into());
            let phase = phase.map_or("-", |p| p.as_str());
            history.push((now, format!("{phase}/{reason}{fin}")));
        }
        if let Some(prev) = &before
            && prev.resource_version != rv
            && prev.phase == Some(BakePhase::Queued)
            && phase == Some(BakePhase::Queued)
        {
            self.queued_rewrites += 1;
            if self.first_finish.is_none() {
                self.queued_rewrites_before_first_finish += 1;
            }
            *self.rewritten.entry(name.clone()).or_default() += 1;
            if self.rewrite_samples.len() < 10 {
                self.rewrite_samples
                    .push((name.clone(), prev.message.clone(), message.clone()));
            }
        }
        let finished = match was_finished {
            Some(t) => Some(t),
            None if phase.is_some_and(|p| p.is_terminal()) => {
                self.finished += 1;
                self.first_finish.get_or_insert(now);
                if phase == Some(BakePhase::Failed) {
                    self.failed.push(name.clone());
                }
                Some(now)
            }
            None => None,
        };
        self.bakes.insert(
            name,
            Seen {
                phase,
                resource_version: rv,
                finished,
                history,
                message,
            },
        );
    }
}

impl Drop for BakeWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// When the harness first saw each bake pod, by the name of the Bake that owns it.
pub struct PodTimes {
    seen: Arc<Mutex<HashMap<String, PodSeen>>>,
    synced: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl PodTimes {
    /// Starts the watch and waits until its first list is in.
    pub async fn start(pods: Api<Pod>) -> Result<PodTimes> {
        let seen: Arc<Mutex<HashMap<String, PodSeen>>> = Arc::default();
        let synced = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, y) = (seen.clone(), synced.clone());
        let config = watcher::Config::default().labels("app.kubernetes.io/managed-by=baker");
        let task = tokio::spawn(async move {
            let stream = watcher(pods, config).default_backoff();
            futures::pin_mut!(stream);
            while let Ok(Some(event)) = stream.try_next().await {
                let now = Instant::now();
                match event {
                    watcher::Event::Apply(p) | watcher::Event::InitApply(p) => {
                        let Ok(mut seen) = s.lock() else { return };
                        let phase = crate::support::pod_phase(&p).unwrap_or("-").to_string();
                        for owner in p.owner_references().iter().filter(|o| o.kind == "Bake") {
                            let pod = seen.entry(owner.name.clone()).or_insert_with(|| PodSeen {
                                created: now,
                                phases: Vec::new(),
                            });
                            if !pod.phases.iter().any(|(p, _)| *p == phase) {
                                pod.phases.push((phase.clone(), now));
                            }
                        }
                    }
                    watcher::Event::InitDone => y.store(true, std::sync::atomic::Ordering::SeqCst),
                    _ => {}
                }
            }
        });
        let times = PodTimes { seen, synced, task };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !times.synced.load(std::sync::atomic::Ordering::SeqCst) {
            if Instant::now() > deadline {
                bail!("the harness's pod watch did not sync within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(times)
    }

    /// Waits until a pod of Bake `bake` has been seen; when it was.
    pub async fn wait(&self, bake: &str, timeout: Duration) -> Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self
                .seen
                .lock()
                .map_err(|_| anyhow!("the pod watch's state is poisoned"))?
                .get(bake)
                .map(|p| p.created);
            if let Some(t) = seen {
                return Ok(t);
            }
            if Instant::now() > deadline {
                bail!("no bake pod of Bake {bake} within {timeout:?}");
            }
            // The time is taken by the watch task as the event arrives, so this poll only
            // delays the harness, not the figure.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// What the watch saw of the pod of Bake `bake`.
    pub fn get(&self, bake: &str) -> Option<PodSeen> {
        self.seen.lock().ok()?.get(bake).cloned()
    }
}

/// A bake pod as the harness saw it: when it appeared, and when each phase was first seen.
#[derive(Clone, Debug)]
pub struct PodSeen {
    pub created: Instant,
    pub phases: Vec<(String, Instant)>,
}

impl PodSeen {
    pub fn phase(&self, phase: &str) -> Option<Instant> {
        self.phases.iter().find(|(p, _)| p == phase).map(|(_, t)| *t)
    }
}

impl Drop for PodTimes {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Where Bakes spend the time from their apply: for the k-th version the watch saw of each, the
/// median offset in ms, labelled as most Bakes were at that step (`phase/reason+fin`).
pub fn timeline(samples: &[(Instant, Vec<(Instant, String)>)]) -> Vec<serde_json::Value> {
    let steps = samples.iter().map(|(_, h)| h.len()).max().unwrap_or(0);
    (0..steps)
        .map(|k| {
            let mut labels = BTreeMap::<&str, usize>::new();
            let mut offsets = Vec::new();
            for (t0, history) in samples {
                if let Some((t, label)) = history.get(k) {
                    *labels.entry(label.as_str()).or_default() += 1;
                    offsets.push(t.saturating_duration_since(*t0).as_secs_f64() * 1e3);
                }
            }
            let label = labels
                .iter()
                .max_by_key(|(_, n)| **n)
                .map(|(l, _)| l.to_string())
                .unwrap_or_default();
            serde_json::json!({
                "step": k,
                "label": label,
                "bakes": offsets.len(),
                "median_ms": crate::report::median(&offsets),
            })
        })
        .collect()
}

/// The timeline as one line for the progress output.
pub fn timeline_line(steps: &[serde_json::Value]) -> String {
    steps
        .iter()
        .map(|s| {
            format!(
                "{} @{:.0} ms",
                s["label"].as_str().unwrap_or_default(),
                s["median_ms"].as_f64().unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join(" -> ")
}

/// The names of the listed Bakes that still hold a finalizer.
fn holding_finalizers<K: ResourceExt>(listed: &[K]) -> Vec<String> {
    listed
        .iter()
        .filter(|b| !b.finalizers().is_empty())
        .map(|b| b.name_any())
        .collect()
}
