//! Support for the "ship it" tests: kubeconfigs of the test's choice (a ServiceAccount token, an
//! unreachable apiserver) for `Operator::start_as`, a minimal HTTP client, metrics samples.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{Rig, try_wait_until};

/// A response: status code and body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

/// One HTTP/1.1 request over a fresh connection (closed after the reply).
pub async fn request(addr: &str, method: &str, path: &str, headers: &[(&str, &str)]) -> Result<Reply> {
    request_declaring(addr, method, path, headers, 0).await
}

/// [`request`] whose head declares a body of `length` bytes that is never sent: a server must
/// answer (or refuse) from the head alone.
pub async fn request_declaring(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    length: u64,
) -> Result<Reply> {
    let mut stream = TcpStream::connect(addr).await?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {length}\r\n\r\n"));
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
