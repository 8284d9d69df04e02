//! Running Baker's images (`make images`: OCI archives under `target/images/`) with runc, one
//! container of a pod spec at a time, the way a kubelet would set it up: the container's command,
//! working directory, environment, user and groups, read-only root filesystem, capabilities and
//! no-new-privileges, and its volumes (ConfigMaps and emptyDirs from directories of the test,
//! hostPaths as they are). The container keeps the host's network (moto and the API server are on
//! its loopback); seccomp profiles are not applied (runc has no `RuntimeDefault` of its own).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::{Container, PodSpec};
use serde_json::{Value, json};

/// An image archive `make images` built: fails, saying how to build it, when it is missing.
pub fn image_archive(name: &str) -> Result<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("target/images/{name}.oci.tar"));
    ensure!(
        path.is_file(),
        "{} is missing: build the images first with `make images` (make test does)",
        path.display()
    );
    Ok(path)
}

/// Runs a command, failing with its output when it fails.
fn run(cmd: &mut std::process::Command) -> Result<std::process::Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

/// An image unpacked into a runc bundle (`config.json` from the image's config, and `rootfs/`).
pub struct Bundle {
    pub dir: tempfile::TempDir,
}

impl Bundle {
    /// Unpacks `archive` (an OCI archive of one image, tagged `latest`).
    pub fn unpack(archive: &Path) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("baker-bundle").tempdir()?;
        let layout = dir.path().join("layout");
        std::fs::create_dir(&layout)?;
        run(std::process::Command::new("tar")
            .arg("-xf")
            .arg(archive)
            .arg("-C")
            .arg(&layout))?;
        run(std::process::Command::new("umoci")
            .arg("unpack")
            .arg("--image")
            .arg(format!("{}:latest", layout.display()))
            .arg(dir.path().join("bundle")))?;
        Ok(Self { dir })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("bundle")
    }

    pub fn rootfs(&self) -> PathBuf {
        self.path().join("rootfs")
    }

    /// The runtime config umoci derived from the image's config.
    pub fn config(&self) -> Result<Value> {
        let text = std::fs::read_to_string(self.path().join("config.json"))?;
        Ok(serde_json::from_str(&text)?)
    }

    fn write_config(&self, config: &Value) -> Result<()> {
        std::fs::write(
            self.path().join("config.json"),
            serde_json::to_vec_pretty(config)?,
        )?;
        Ok(())
    }

    /// Sets the bundle up as `pod` runs `container`: `volumes` maps each ConfigMap or emptyDir
    /// volume's name to a directory of the test, `env` gives values for variables the pod takes
    /// from Secrets or the downward API (others are as the spec says), and any variables a
    /// kubelet would add.
    pub fn as_pod(
        &self,
        pod: &PodSpec,
        container: &str,
        volumes: &BTreeMap<String, PathBuf>,
        env: &BTreeMap<String, String>,
    ) -> Result<()> {
        let c = pod
            .containers
            .iter()
            .find(|c| c.name == container)
            .with_context(|| format!("the pod has no container {container}"))?;
        let mut config = self.config()?;
        apply(&mut config, pod, c, volumes, env)?;
        self.write_config(&config)
    }

    fn spawn(&self, id: &str) -> Result<tokio::process::Child> {
        tokio::process::Command::new("runc")
            .arg("run")
            .arg("--bundle")
            .arg(self.path())
            .arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting runc (Debian's runc package)")
    }

    /// Runs the bundle to its end (or `timeout`) and returns its exit status and output.
    pub async fn run(&self, id: &str, timeout: Duration) -> Result<(i32, String)> {
        let child = self.spawn(id)?;
        let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Ok(out) => out?,
            Err(_) => {
                remove(id);
                bail!("container {id} did not end within {timeout:?}");
            }
        };
        Ok((out.status.code().unwrap_or(-1), output(&out)))
    }

    /// Starts the bundle in the background; the container is killed and deleted on drop.
    pub fn start(&self, id: &str) -> Result<Running> {
        Ok(Running {
            id: id.to_string(),
            child: Some(self.spawn(id)?),
        })
    }
}

/// Kills and deletes a container, whatever state it is in.
fn remove(id: &str) {
    let _ = std::process::Command::new("runc")
        .args(["kill", id, "KILL"])
        .output();
    let _ = std::process::Command::new("runc")
        .args(["delete", "--force", id])
        .output();
}

fn output(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A container started with [`Bundle::start`].
pub struct Running {
    id: String,
    child: Option<tokio::process::Child>,
}

impl Running {
    /// Stops it, and returns what it printed.
    pub async fn stop(mut self) -> String {
        let Some(child) = self.child.take() else {
            return String::new();
        };
        let _ = std::process::Command::new("runc")
            .args(["kill", &self.id, "KILL"])
            .output();
        let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output()).await;
        remove(&self.id);
        match out {
            Ok(Ok(out)) => output(&out),
            _ => String::new(),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.child.is_some() {
            remove(&self.id);
        }
    }
}

/// The capabilities a container gets from containerd and CRI-O when its spec drops and adds
/// nothing (Kubernetes' default set).
const DEFAULT_CAPABILITIES: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Linux capabilities by number.
const CAPABILITIES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// Every capability this process may hand on (its bounding set), for a privileged container, as
/// containerd gives one.
fn all_capabilities() -> Vec<String> {
    let bounding = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapBnd:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(0);
    CAPABILITIES
        .iter()
        .enumerate()
        .filter(|(bit, _)| bounding & (1 << bit) != 0)
        .map(|(_, name)| format!("CAP_{name}"))
        .collect()
}

fn capabilities(c: &Container) -> Vec<String> {
    let sc = c.security_context.as_ref();
    if sc.and_then(|s| s.privileged) == Some(true) {
        return all_capabilities();
    }
    let caps = sc.and_then(|s| s.capabilities.as_ref());
    let named = |list: Option<&Vec<String>>| -> Vec<String> {
        list.into_iter()
            .flatten()
            .map(|n| format!("CAP_{}", n.trim_start_matches("CAP_")))
            .collect()
    };
    let drop = named(caps.and_then(|c| c.drop.as_ref()));
    let add = named(caps.and_then(|c| c.add.as_ref()));
    let mut out: Vec<String> = if drop.iter().any(|d| d == "CAP_ALL") {
        Vec::new()
    } else {
        DEFAULT_CAPABILITIES
            .iter()
            .map(|s| s.to_string())
            .filter(|c| !drop.contains(c))
            .collect()
    };
    out.extend(add);
    out
}

fn apply(
    config: &mut Value,
    pod: &PodSpec,
    c: &Container,
    volumes: &BTreeMap<String, PathBuf>,
    env: &BTreeMap<String, String>,
) -> Result<()> {
    let sc = c.security_context.as_ref();
    let psc = pod.security_context.as_ref();
    let privileged = sc.and_then(|s| s.privileged) == Some(true);
    let process = &mut config["process"];
    // Kubernetes: command replaces the image's entrypoint, args its cmd.
    let image_args: Vec<String> = serde_json::from_value(process["args"].clone()).unwrap_or_default();
    let args = match (&c.command, &c.args) {
        (Some(cmd), args) => cmd.iter().chain(args.iter().flatten()).cloned().collect(),
        (None, Some(args)) => image_args.iter().take(1).chain(args.iter()).cloned().collect(),
        (None, None) => image_args,
    };
    process["args"] = json!(args);
    process["terminal"] = json!(false);
    if let Some(dir) = &c.working_dir {
        process["cwd"] = json!(dir);
    }
    let mut vars: BTreeMap<String, String> = serde_json::from_value::<Vec<String>>(process["env"].clone())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
    for e in c.env.iter().flatten() {
        match (&e.value, env.get(&e.name)) {
            (_, Some(given)) => vars.insert(e.name.clone(), given.clone()),
            (Some(v), None) => vars.insert(e.name.clone(), v.clone()),
            (None, None) => None,
        };
    }
    // What a kubelet adds beyond the spec (here: a kubeconfig in place of the ServiceAccount's
    // token) comes in `env` too.
    for (name, value) in env {
        if !c.env.iter().flatten().any(|e| &e.name == name) {
            vars.insert(name.clone(), value.clone());
        }
    }
    process["env"] = json!(vars.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>());
    let uid = sc.and_then(|s| s.run_as_user).or(psc.and_then(|p| p.run_as_user));
    let gid = sc
        .and_then(|s| s.run_as_group)
        .or(psc.and_then(|p| p.run_as_group));
    if let Some(uid) = uid {
        process["user"]["uid"] = json!(uid);
    }
    if let Some(gid) = gid {
        process["user"]["gid"] = json!(gid);
    }
    if let Some(fs_group) = psc.and_then(|p| p.fs_group) {
        process["user"]["additionalGids"] = json!([fs_group]);
    }
    let run_as_non_root = sc
        .and_then(|s| s.run_as_non_root)
        .or(psc.and_then(|p| p.run_as_non_root));
    if run_as_non_root == Some(true) {
        let uid = process["user"]["uid"].as_i64().unwrap_or(0);
        ensure!(uid != 0, "runAsNonRoot, but the container would run as root");
    }
    process["noNewPrivileges"] = json!(sc.and_then(|s| s.allow_privilege_escalation) == Some(false));
    let caps = capabilities(c);
    process["capabilities"] = json!({
        "bounding": caps, "effective": caps, "permitted": caps, "inheritable": [], "ambient": [],
    });
    config["root"]["readonly"] = json!(sc.and_then(|s| s.read_only_root_filesystem) == Some(true));
    // The host's network: moto and the API server listen on its loopback.
    if let Some(ns) = config["linux"]["namespaces"].as_array_mut() {
        ns.retain(|n| n["type"] != "network");
    }
    if privileged {
        config["linux"]["maskedPaths"] = json!([]);
        config["linux"]["readonlyPaths"] = json!([]);
    }
    let mounts = config["mounts"]
        .as_array_mut()
        .context("config.json has mounts")?;
    for m in c.volume_mounts.iter().flatten() {
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == m.name)
            .with_context(|| format!("no volume {}", m.name))?;
        let source = match (&volume.host_path, volumes.get(&m.name)) {
            (_, Some(dir)) => dir.clone(),
            (Some(host), None) => PathBuf::from(&host.path),
            (None, None) => bail!("no directory given for volume {}", m.name),
        };
        // The container's /dev from the host replaces runc's own.
        mounts.retain(|existing| existing["destination"] != json!(m.mount_path));
        let mut options = vec!["rbind"];
        options.push(if m.read_only == Some(true) { "ro" } else { "rw" });
        mounts.push(json!({
            "destination": m.mount_path, "type": "bind",
            "source": source, "options": options,
        }));
    }
    if let Some(path) = &c.termination_message_path
        && !privileged
    {
        let file = volumes
            .get("termination-log")
            .context("give a file for the termination log as volume `termination-log`")?;
        mounts.push(json!({
            "destination": path, "type": "bind", "source": file, "options": ["bind", "rw"],
        }));
    }
    Ok(())
}
