//! Container logs: the writer that copies a container's stdout+stderr pipe
//! into `<dir>/log` with a parallel timestamp index `<dir>/log.idx`, the
//! registry the logs endpoint looks containers up in, and the pure
//! selection logic for `tailLines`, `sinceSeconds` and `timestamps`.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::io::AsyncReadExt;
use tokio::sync::{Notify, watch};

/// One index record: where a line starts in the log file and when its first
/// byte arrived (Unix nanoseconds). Stored as 16 little-endian bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub offset: u64,
    pub nanos: i64,
}

const INDEX_RECORD: usize = 16;

pub fn encode_index(entries: &[IndexEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * INDEX_RECORD);
    for e in entries {
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.nanos.to_le_bytes());
    }
    out
}

pub fn decode_index(data: &[u8]) -> Vec<IndexEntry> {
    data.chunks_exact(INDEX_RECORD)
        .map(|c| {
            let mut off = [0u8; 8];
            let mut ns = [0u8; 8];
            off.copy_from_slice(&c[..8]);
            ns.copy_from_slice(&c[8..]);
            IndexEntry {
                offset: u64::from_le_bytes(off),
                nanos: i64::from_le_bytes(ns),
            }
        })
        .collect()
}

pub fn now_nanos() -> i64 {
    i64::try_from(k8s_openapi::jiff::Timestamp::now().as_nanosecond()).unwrap_or(i64::MAX)
}

/// Paths of one container's log.
#[derive(Debug, Clone)]
pub struct LogFiles {
    pub log: PathBuf,
    pub index: PathBuf,
}

impl LogFiles {
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            log: dir.join("log"),
            index: dir.join("log.idx"),
        }
    }

    pub fn read_index(&self) -> Vec<IndexEntry> {
        std::fs::read(&self.index)
            .map(|d| decode_index(&d))
            .unwrap_or_default()
    }
}

/// Handle on a running log copier.
pub struct LogWriter {
    done: watch::Receiver<bool>,
    stop: Arc<Notify>,
}

impl LogWriter {
    /// Copies everything read from `pipe` into the log files until EOF, i.e.
    /// until every process holding the write end has exited.
    pub fn start(pipe: std::io::PipeReader, files: &LogFiles) -> std::io::Result<Self> {
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&files.log)?;
        let mut index = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&files.index)?;
        let mut offset = log.metadata()?.len();
        let fd: std::os::fd::OwnedFd = pipe.into();
        let mut rx = tokio::net::unix::pipe::Receiver::from_owned_fd(fd)?;
        let (done_tx, done) = watch::channel(false);
        let stop = Arc::new(Notify::new());
        let stop_rx = stop.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut at_line_start = true;
            loop {
                let n = tokio::select! {
                    r = rx.read(&mut buf) => match r {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            tracing::warn!(error = %e, "reading container output");
                            break;
                        }
                    },
                    _ = stop_rx.notified() => break,
                };
                let chunk = &buf[..n];
                let ts = now_nanos();
                let mut entries = Vec::new();
                for (i, b) in chunk.iter().enumerate() {
                    if at_line_start {
                        entries.push(IndexEntry {
                            offset: offset + i as u64,
                            nanos: ts,
                        });
                    }
                    at_line_start = *b == b'\n';
                }
                // Small local writes: doing them inline keeps ordering simple.
                // Index first, so a follower never sees a line before its
                // timestamp.
                if let Err(e) = index.write_all(&encode_index(&entries)) {
                    tracing::warn!(error = %e, "writing container log index");
                }
                if let Err(e) = log.write_all(chunk) {
                    tracing::warn!(error = %e, "writing container log");
                }
                offset += n as u64;
            }
            let _ = done_tx.send(true);
        });
        Ok(Self { done, stop })
    }

    pub fn done(&self) -> watch::Receiver<bool> {
        self.done.clone()
    }

    /// Waits for the copier to drain the pipe; gives up after `timeout`
    /// (a daemonised grandchild may hold the pipe open forever).
    pub async fn finish(&self, timeout: std::time::Duration) {
        let mut done = self.done.clone();
        if tokio::time::timeout(timeout, done.wait_for(|d| *d))
            .await
            .is_err()
        {
            self.stop.notify_one();
            let _ = done.wait_for(|d| *d).await;
        }
    }
}

/// What the logs endpoint knows about one container.
#[derive(Debug, Clone)]
pub enum ContainerLogState {
    /// Not started (yet); the string says why, like kubelet's
    /// "is waiting to start: ContainerCreating".
    Waiting(String),
    Available {
        files: LogFiles,
        done: watch::Receiver<bool>,
    },
}

#[derive(Debug, Clone)]
struct PodLogs {
    uid: String,
    containers: BTreeMap<String, ContainerLogState>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    #[error("pod {namespace}/{pod} not found on this node")]
    PodNotFound { namespace: String, pod: String },
    #[error("container {container} is not valid for pod {pod}")]
    ContainerNotFound { pod: String, container: String },
    #[error("container \"{container}\" in pod \"{pod}\" is waiting to start: {reason}")]
    Waiting {
        pod: String,
        container: String,
        reason: String,
    },
}

/// Pods this node runs or ran, by namespace/name, for the logs endpoint.
#[derive(Debug, Clone, Default)]
pub struct LogRegistry {
    inner: Arc<Mutex<HashMap<(String, String), PodLogs>>>,
}

impl LogRegistry {
    fn with<R>(&self, f: impl FnOnce(&mut HashMap<(String, String), PodLogs>) -> R) -> R {
        // A poisoned lock only means another thread panicked mid-update;
        // the map itself is still usable.
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    /// Registers a pod (replacing an older pod of the same name).
    pub fn add_pod(&self, namespace: &str, pod: &str, uid: &str, containers: &[String]) {
        let entry = PodLogs {
            uid: uid.to_string(),
            containers: containers
                .iter()
                .map(|c| (c.clone(), ContainerLogState::Waiting("ContainerCreating".into())))
                .collect(),
        };
        self.with(|m| m.insert((namespace.into(), pod.into()), entry));
    }

    pub fn set_container(
        &self,
        namespace: &str,
        pod: &str,
        uid: &str,
        container: &str,
        state: ContainerLogState,
    ) {
        self.with(|m| {
            if let Some(p) = m.get_mut(&(namespace.to_string(), pod.to_string()))
                && p.uid == uid
            {
                p.containers.insert(container.to_string(), state);
            }
        });
    }

    /// Forgets a pod, unless the name now belongs to a newer pod.
    pub fn remove_pod(&self, namespace: &str, pod: &str, uid: &str) {
        self.with(|m| {
            let key = (namespace.to_string(), pod.to_string());
            if m.get(&key).is_some_and(|p| p.uid == uid) {
                m.remove(&key);
            }
        });
    }

    pub fn lookup(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
    ) -> Result<(LogFiles, watch::Receiver<bool>), LookupError> {
        self.with(|m| {
            let p =
                m.get(&(namespace.to_string(), pod.to_string()))
                    .ok_or_else(|| LookupError::PodNotFound {
                        namespace: namespace.into(),
                        pod: pod.into(),
                    })?;
            match p.containers.get(container) {
                None => Err(LookupError::ContainerNotFound {
                    pod: pod.into(),
                    container: container.into(),
                }),
                Some(ContainerLogState::Waiting(reason)) => Err(LookupError::Waiting {
                    pod: pod.into(),
                    container: container.into(),
                    reason: reason.clone(),
                }),
                Some(ContainerLogState::Available { files, done }) => Ok((files.clone(), done.clone())),
            }
        })
    }
}

/// Query options of `GET /containerLogs/...`, as the apiserver forwards them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LogOptions {
    pub follow: bool,
    pub previous: bool,
    pub timestamps: bool,
    pub tail_lines: Option<u64>,
    pub limit_bytes: Option<u64>,
    /// Only lines at or after this instant (Unix nanoseconds).
    pub since_nanos: Option<i64>,
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_bool(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "" | "true" | "True" | "TRUE" | "1" | "t" | "T" => Ok(true),
        "false" | "False" | "FALSE" | "0" | "f" | "F" => Ok(false),
        _ => Err(format!("invalid value for {key}: {v:?}")),
    }
}

fn parse_num<T: std::str::FromStr>(key: &str, v: &str) -> Result<T, String> {
    v.parse().map_err(|_| format!("invalid value for {key}: {v:?}"))
}

/// Parses the query string; `now_nanos` anchors `sinceSeconds`.
pub fn parse_query(query: &str, now_nanos: i64) -> Result<LogOptions, String> {
    let mut o = LogOptions::default();
    let mut since_seconds: Option<i64> = None;
    let mut since_time: Option<i64> = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_decode(k);
        let v = percent_decode(v);
        match k.as_str() {
            "follow" => o.follow = parse_bool(&k, &v)?,
            "previous" => o.previous = parse_bool(&k, &v)?,
            "timestamps" => o.timestamps = parse_bool(&k, &v)?,
            "tailLines" => {
                let n: i64 = parse_num(&k, &v)?;
                // Negative means "all", as in kubelet.
                o.tail_lines = u64::try_from(n).ok();
            }
            "limitBytes" => {
                let n: i64 = parse_num(&k, &v)?;
                if n < 1 {
                    return Err("limitBytes must be greater than zero".into());
                }
                o.limit_bytes = u64::try_from(n).ok();
            }
            "sinceSeconds" => {
                let n: i64 = parse_num(&k, &v)?;
                if n < 1 {
                    return Err("sinceSeconds must be greater than zero".into());
                }
                since_seconds = Some(n);
            }
            "sinceTime" => {
                let t: k8s_openapi::jiff::Timestamp = v
                    .parse()
                    .map_err(|_| format!("invalid value for sinceTime: {v:?}"))?;
                since_time = Some(i64::try_from(t.as_nanosecond()).unwrap_or(i64::MAX));
            }
            // Anything else (e.g. `stream`, `insecureSkipTLSVerifyBackend`)
            // is not ours to judge.
            _ => {}
        }
    }
    if since_seconds.is_some() && since_time.is_some() {
        return Err("at most one of sinceTime or sinceSeconds may be specified".into());
    }
    o.since_nanos = since_time
        .or_else(|| since_seconds.map(|s| now_nanos.saturating_sub(s.saturating_mul(1_000_000_000))));
    Ok(o)
}

/// Timestamp of the line starting at `offset`: the latest index record at or
/// before it.
fn timestamp_for(index: &[IndexEntry], offset: u64) -> Option<i64> {
    let pos = index.partition_point(|e| e.offset <= offset);
    pos.checked_sub(1).map(|i| index[i].nanos)
}

/// Formats like kubelet's `timeFormatOut` (RFC 3339, nine fraction digits).
pub fn format_timestamp(nanos: i64) -> String {
    match k8s_openapi::jiff::Timestamp::from_nanosecond(i128::from(nanos)) {
        Ok(t) => format!(
            "{}.{:09}Z",
            t.strftime("%Y-%m-%dT%H:%M:%S"),
            t.subsec_nanosecond()
        ),
        Err(_) => "0001-01-01T00:00:00.000000000Z".into(),
    }
}

/// Splits `data` (which starts at file offset `base`) into lines, each with
/// its offset; the last line may lack a newline.
pub fn split_lines(data: &[u8], base: u64) -> Vec<(u64, &[u8])> {
    let mut lines = Vec::new();
    let mut start = 0;
    for (i, b) in data.iter().enumerate() {
        if *b == b'\n' {
            lines.push((base + start as u64, &data[start..=i]));
            start = i + 1;
        }
    }
    if start < data.len() {
        lines.push((base + start as u64, &data[start..]));
    }
    lines
}

/// Renders lines, prefixing each with its timestamp when asked to.
pub fn render_lines(lines: &[(u64, &[u8])], index: &[IndexEntry], timestamps: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for (offset, line) in lines {
        if timestamps {
            let ts = timestamp_for(index, *offset).unwrap_or_else(now_nanos);
            out.extend_from_slice(format_timestamp(ts).as_bytes());
            out.push(b' ');
        }
        out.extend_from_slice(line);
    }
    out
}

/// Renders bytes appended to the log while following: `base` is their file
/// offset; `at_line_start` says whether the previous chunk ended a line (if
/// not, the first line here continues one already prefixed).
pub fn render_follow(
    data: &[u8],
    base: u64,
    index: &[IndexEntry],
    timestamps: bool,
    at_line_start: bool,
) -> Vec<u8> {
    if !timestamps {
        return data.to_vec();
    }
    let lines = split_lines(data, base);
    let mut out = Vec::with_capacity(data.len());
    for (i, line) in lines.iter().enumerate() {
        if i == 0 && !at_line_start {
            out.extend_from_slice(line.1);
        } else {
            out.extend(render_lines(std::slice::from_ref(line), index, true));
        }
    }
    out
}

/// Selects what a non-streamed request returns from the whole log `content`:
/// `sinceSeconds`/`sinceTime` first, then `tailLines`, then timestamps.
/// `limitBytes` is applied by the caller to the rendered bytes.
pub fn select(content: &[u8], index: &[IndexEntry], opts: &LogOptions) -> Vec<u8> {
    let mut lines = split_lines(content, 0);
    if let Some(since) = opts.since_nanos {
        lines.retain(|(off, _)| timestamp_for(index, *off).is_none_or(|ts| ts >= since));
    }
    if let Some(n) = opts.tail_lines {
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        let skip = lines.len().saturating_sub(n);
        lines.drain(..skip);
    }
    render_lines(&lines, index, opts.timestamps)
}

/// A byte budget for `limitBytes`; `None` means unlimited.
#[derive(Debug, Clone, Copy)]
pub struct Budget(pub Option<u64>);

impl Budget {
    /// Cuts `data` to what the budget still allows and charges it.
    pub fn take(&mut self, mut data: Vec<u8>) -> Vec<u8> {
        if let Some(left) = self.0.as_mut() {
            let keep = usize::try_from(*left).unwrap_or(usize::MAX).min(data.len());
            data.truncate(keep);
            *left -= keep as u64;
        }
        data
    }

    pub fn exhausted(&self) -> bool {
        self.0 == Some(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(entries: &[(u64, i64)]) -> Vec<IndexEntry> {
        entries
            .iter()
            .map(|&(offset, nanos)| IndexEntry { offset, nanos })
            .collect()
    }

    #[test]
    fn index_roundtrip() {
        let e = idx(&[(0, 1), (10, -5), (u64::MAX, i64::MAX)]);
        assert_eq!(decode_index(&encode_index(&e)), e);
        // A torn trailing record is ignored.
        let mut bytes = encode_index(&e);
        bytes.pop();
        assert_eq!(decode_index(&bytes).len(), 2);
    }

    #[test]
    fn tail_lines_selection() {
        let content = b"a\nb\nc\n";
        let o = LogOptions {
            tail_lines: Some(2),
            ..Default::default()
        };
        assert_eq!(select(content, &[], &o), b"b\nc\n");
        let o = LogOptions {
            tail_lines: Some(0),
            ..Default::default()
        };
        assert_eq!(select(content, &[], &o), b"");
        let o = LogOptions {
            tail_lines: Some(10),
            ..Default::default()
        };
        assert_eq!(select(content, &[], &o), content);
        // Partial last line counts as a line.
        let o = LogOptions {
            tail_lines: Some(1),
            ..Default::default()
        };
        assert_eq!(select(b"a\nb", &[], &o), b"b");
    }

    #[test]
    fn limit_bytes_after_tail() {
        let o = LogOptions {
            tail_lines: Some(2),
            limit_bytes: Some(3),
            ..Default::default()
        };
        let mut budget = Budget(o.limit_bytes);
        assert_eq!(budget.take(select(b"aa\nbb\ncc\n", &[], &o)), b"bb\n");
        assert!(budget.exhausted());
        assert_eq!(budget.take(b"more".to_vec()), b"");

        let mut unlimited = Budget(None);
        assert_eq!(unlimited.take(b"xyz".to_vec()), b"xyz");
        assert!(!unlimited.exhausted());
    }

    #[test]
    fn since_and_timestamps() {
        let content = b"old\nnew\nnewer\n";
        let index = idx(&[(0, 1_000_000_000), (4, 5_000_000_000), (8, 6_000_000_000)]);
        let o = LogOptions {
            since_nanos: Some(5_000_000_000),
            timestamps: true,
            ..Default::default()
        };
        assert_eq!(
            String::from_utf8(select(content, &index, &o)).unwrap(),
            "1970-01-01T00:00:05.000000000Z new\n1970-01-01T00:00:06.000000000Z newer\n"
        );
    }

    #[test]
    fn follow_rendering() {
        let index = idx(&[(0, 0), (4, 1_000_000_000)]);
        assert_eq!(render_follow(b"ab\ncd", 2, &index, false, false), b"ab\ncd");
        assert_eq!(
            String::from_utf8(render_follow(b"ab\ncd", 2, &index, true, false)).unwrap(),
            "ab\n1970-01-01T00:00:01.000000000Z cd"
        );
        assert_eq!(
            String::from_utf8(render_follow(b"x\n", 4, &index, true, true)).unwrap(),
            "1970-01-01T00:00:01.000000000Z x\n"
        );
    }

    #[test]
    fn timestamp_lookup_uses_latest_entry_before() {
        let index = idx(&[(0, 1), (10, 2)]);
        assert_eq!(timestamp_for(&index, 0), Some(1));
        assert_eq!(timestamp_for(&index, 5), Some(1));
        assert_eq!(timestamp_for(&index, 10), Some(2));
        assert_eq!(timestamp_for(&[], 0), None);
    }

    #[test]
    fn query_parsing() {
        let o = parse_query(
            "follow=true&tailLines=10&limitBytes=5&timestamps=1&previous=false&stream=All",
            0,
        )
        .unwrap();
        assert_eq!(
            o,
            LogOptions {
                follow: true,
                previous: false,
                timestamps: true,
                tail_lines: Some(10),
                limit_bytes: Some(5),
                since_nanos: None,
            }
        );
        let o = parse_query("sinceSeconds=2", 10_000_000_000).unwrap();
        assert_eq!(o.since_nanos, Some(8_000_000_000));
        let o = parse_query("sinceTime=1970-01-01T00%3A00%3A03Z", 0).unwrap();
        assert_eq!(o.since_nanos, Some(3_000_000_000));
        assert_eq!(parse_query("tailLines=-1", 0).unwrap().tail_lines, None);
        assert!(parse_query("tailLines=x", 0).is_err());
        assert!(parse_query("limitBytes=0", 0).is_err());
        assert!(parse_query("sinceSeconds=1&sinceTime=1970-01-01T00:00:00Z", 0).is_err());
        assert_eq!(parse_query("", 0).unwrap(), LogOptions::default());
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    #[test]
    fn registry_lookup() {
        let r = LogRegistry::default();
        r.add_pod("ns", "p", "u1", &["c".to_string()]);
        assert!(matches!(
            r.lookup("ns", "p", "c"),
            Err(LookupError::Waiting { .. })
        ));
        assert!(matches!(
            r.lookup("ns", "p", "x"),
            Err(LookupError::ContainerNotFound { .. })
        ));
        assert!(matches!(
            r.lookup("ns", "q", "c"),
            Err(LookupError::PodNotFound { .. })
        ));
        let (_tx, done) = watch::channel(false);
        let files = LogFiles::in_dir(Path::new("d"));
        r.set_container("ns", "p", "u1", "c", ContainerLogState::Available { files, done });
        assert!(r.lookup("ns", "p", "c").is_ok());
        // A stale uid neither updates nor removes the newer pod.
        r.add_pod("ns", "p", "u2", &["c".to_string()]);
        r.remove_pod("ns", "p", "u1");
        assert!(matches!(
            r.lookup("ns", "p", "c"),
            Err(LookupError::Waiting { .. })
        ));
        r.remove_pod("ns", "p", "u2");
        assert!(r.lookup("ns", "p", "c").is_err());
    }
}
