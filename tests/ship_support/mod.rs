//! Support for the "ship it" tests: a `baker run` process with a kubeconfig of the test's choice
//! (a ServiceAccount token, an unreachable apiserver), free ports, and a minimal HTTP client.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Container, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

use crate::bake_support::CREDENTIALS_SECRET;
use crate::support::{ProcessLog, Rig, TestNamespace, try_wait_until};

/// A free TCP port on 127.0.0.1 (bound, then released for the process under test).
pub async fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    Ok(listener.local_addr()?.port())
}

/// A response: status code and body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

/// One HTTP/1.1 request over a fresh connection (closed after the reply).
pub async fn request(addr: &str, method: &str, path: &str, headers: &[(&str, &str)]) -> Result<Reply> {
    let mut stream = TcpStream::connect(addr).await?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("Content-Length: 0\r\n\r\n");
    stream.write_all(head.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no HTTP status in {head:?}"))?;
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok(Reply { status, body })
}

pub async fn get(addr: &str, path: &str) -> Result<Reply> {
    request(addr, "GET", path, &[]).await
}

/// Decodes a chunked body (enough for tests: sizes in hex, then data).
pub fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Waits until `GET path` answers `status`.
pub async fn wait_for_status(addr: &str, path: &str, status: u16, timeout: Duration) -> Result<Reply> {
    try_wait_until(
        timeout,
        &format!("GET {path} on {addr} to answer {status}"),
        || async {
            match get(addr, path).await {
                Ok(r) if r.status == status => Ok(Some(r)),
                _ => Ok(None),
            }
        },
    )
    .await
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
pub struct Baker {
    child: Option<Child>,
    log: ProcessLog,
    pub http: String,
}

impl Baker {
    /// Starts `baker run` for `namespace` with the given kubeconfig, serving HTTP on a free port.
    pub async fn start(
        rig: &Rig,
        name: &str,
        namespace: &str,
        kubeconfig: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Baker> {
        let http = format!("127.0.0.1:{}", free_port().await?);
        let mut full = vec![
            "run",
            "--log-format",
            "text",
            "--namespace",
            namespace,
            "--http-addr",
            &http,
        ];
        full.extend_from_slice(args);
        let mut vars: Vec<(String, String)> = vec![
            ("RUST_LOG".into(), "info,baker=debug,kube=warn".into()),
            ("BAKER_AWS_CREDENTIALS_SECRET".into(), CREDENTIALS_SECRET.into()),
            ("POD_NAME".into(), name.into()),
        ];
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
            &format!("{namespace}-{name}"),
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
    ) -> Result<Baker> {
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
    ) -> Result<Baker> {
        let (log, out, err) =
            ProcessLog::open(&rig.dir().join("logs/tests"), &format!("operator-{log_name}.log"))?;
        let child = Command::new(baker_bin())
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(vars)
            .env("KUBECONFIG", kubeconfig)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .context("starting baker")?;
        Ok(Baker {
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

/// The rig's kubeconfig with its server replaced (e.g. by an address that never answers).
pub fn kubeconfig_with_server(rig: &Rig, server: &str, dir: &Path) -> Result<PathBuf> {
    let text = std::fs::read_to_string(rig.kubeconfig_path())?;
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&text)?;
    if let Some(clusters) = doc.get_mut("clusters").and_then(|c| c.as_sequence_mut()) {
        for c in clusters {
            if let Some(cluster) = c.get_mut("cluster").and_then(|c| c.as_mapping_mut()) {
                cluster.insert("server".into(), server.into());
            }
        }
    }
    let path = dir.join("kubeconfig-server");
    std::fs::write(&path, serde_yaml::to_string(&doc)?)?;
    Ok(path)
}

/// The rig's kubeconfig with its user replaced by a bearer token (a ServiceAccount's).
pub fn kubeconfig_with_token(rig: &Rig, token: &str, dir: &Path) -> Result<PathBuf> {
    let text = std::fs::read_to_string(rig.kubeconfig_path())?;
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&text)?;
    if let Some(users) = doc.get_mut("users").and_then(|c| c.as_sequence_mut()) {
        for u in users {
            let mut user = serde_yaml::Mapping::new();
            user.insert("token".into(), token.into());
            if let Some(m) = u.as_mapping_mut() {
                m.insert("user".into(), serde_yaml::Value::Mapping(user));
            }
        }
    }
    let path = dir.join("kubeconfig-token");
    std::fs::write(&path, serde_yaml::to_string(&doc)?)?;
    Ok(path)
}

/// The value of one sample line of a Prometheus text exposition (`name{labels} value`).
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

/// The instances (`POD_NAME`s) of Baker that reported Events in a namespace: which replicas acted.
pub async fn event_reporters(ns: &TestNamespace) -> Result<std::collections::BTreeSet<String>> {
    Ok(ns
        .api::<Event>()
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.reporting_controller.as_deref() == Some("baker"))
        .filter_map(|e| e.reporting_instance)
        .collect())
}
