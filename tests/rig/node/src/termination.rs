//! Termination message selection, as kubelet's `getTerminationMessage`:
//! the last 4096 bytes of the termination-log file; with
//! `FallbackToLogsOnError`, an empty file and a nonzero exit, the first 2048
//! bytes of the last 80 log lines instead.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// kubecontainer.MaxContainerTerminationMessageLength
pub const MAX_MESSAGE_BYTES: usize = 4096;
/// kubecontainer.MaxContainerTerminationMessageLogLines
pub const MAX_LOG_LINES: usize = 80;
/// kubecontainer.MaxContainerTerminationMessageLogLength
pub const MAX_LOG_BYTES: usize = 2048;

/// Keeps at most `max` bytes from the end of `data`, starting on a UTF-8
/// character boundary.
pub fn tail_bytes(data: &[u8], max: usize) -> &[u8] {
    if data.len() <= max {
        return data;
    }
    let mut start = data.len() - max;
    // Skip UTF-8 continuation bytes so no character is cut in half.
    while start < data.len() && (data[start] & 0xC0) == 0x80 {
        start += 1;
    }
    &data[start..]
}

/// Keeps at most `max` bytes from the start of `data`, ending on a UTF-8
/// character boundary.
pub fn head_bytes(data: &[u8], max: usize) -> &[u8] {
    if data.len() <= max {
        return data;
    }
    let mut end = max;
    while end > 0 && (data[end] & 0xC0) == 0x80 {
        end -= 1;
    }
    &data[..end]
}

/// The last `n` lines of `data` (a final line without newline counts).
pub fn tail_lines(data: &[u8], n: usize) -> &[u8] {
    if n == 0 {
        return &data[data.len()..];
    }
    // Ignore the final newline when counting, like kubelet's tail.
    let body = data.strip_suffix(b"\n").unwrap_or(data);
    let mut seen = 0;
    for (i, b) in body.iter().enumerate().rev() {
        if *b == b'\n' {
            seen += 1;
            if seen == n {
                return &data[i + 1..];
            }
        }
    }
    data
}

/// Chooses the termination message from the termination-log content and the
/// container log.
pub fn select_message(
    file: &[u8],
    fallback_to_logs_on_error: bool,
    exit_code: i32,
    log: impl FnOnce() -> Vec<u8>,
) -> String {
    let from_file = tail_bytes(file, MAX_MESSAGE_BYTES);
    if !from_file.is_empty() || !fallback_to_logs_on_error || exit_code == 0 {
        return String::from_utf8_lossy(from_file).into_owned();
    }
    let log = log();
    let tail = tail_lines(&log, MAX_LOG_LINES);
    String::from_utf8_lossy(head_bytes(tail, MAX_LOG_BYTES)).into_owned()
}

/// Reads at most the last `max` bytes of a file; missing file → empty.
pub fn read_file_tail(path: &Path, max: usize) -> std::io::Result<Vec<u8>> {
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let max = max as u64;
    if len > max {
        file.seek(SeekFrom::Start(len - max))?;
    }
    let mut buf = Vec::new();
    file.take(max).read_to_end(&mut buf)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_content_wins() {
        let msg = select_message(b"bye\n", true, 1, || b"log line\n".to_vec());
        assert_eq!(msg, "bye\n");
        let msg = select_message(b"done", false, 0, || unreachable!());
        assert_eq!(msg, "done");
    }

    #[test]
    fn file_is_capped_to_last_4096_bytes() {
        let mut data = vec![b'a'; 5000];
        data.extend_from_slice(b"END");
        let msg = select_message(&data, false, 0, Vec::new);
        assert_eq!(msg.len(), MAX_MESSAGE_BYTES);
        assert!(msg.ends_with("END"));
    }

    #[test]
    fn file_cap_respects_char_boundaries() {
        // 'é' is two bytes; 2049 of them are 4098 bytes, so the cut falls
        // inside the first kept character.
        let data = "é".repeat(2049);
        let msg = select_message(data.as_bytes(), false, 0, Vec::new);
        assert_eq!(msg, "é".repeat(2048));
    }

    #[test]
    fn fallback_only_on_error_with_empty_file() {
        let log = || b"one\ntwo\n".to_vec();
        assert_eq!(select_message(b"", true, 2, log), "one\ntwo\n");
        assert_eq!(select_message(b"", true, 0, log), "");
        assert_eq!(select_message(b"", false, 2, log), "");
    }

    #[test]
    fn fallback_takes_last_80_lines_capped_at_2048() {
        let log: String = (0..100).map(|i| format!("line {i}\n")).collect();
        let msg = select_message(b"", true, 1, || log.clone().into_bytes());
        assert!(msg.starts_with("line 20\n"));
        assert!(msg.ends_with("line 99\n"));

        let long: String = (0..100).map(|i| format!("{i:04}{}\n", "é".repeat(40))).collect();
        let msg = select_message(b"", true, 1, || long.clone().into_bytes());
        assert!(msg.len() <= MAX_LOG_BYTES && msg.len() > MAX_LOG_BYTES - 2);
        assert!(msg.starts_with("0020"));
    }

    #[test]
    fn tail_lines_counts_from_the_end() {
        assert_eq!(tail_lines(b"a\nb\nc\n", 2), b"b\nc\n");
        assert_eq!(tail_lines(b"a\nb\nc", 2), b"b\nc");
        assert_eq!(tail_lines(b"a\nb\n", 5), b"a\nb\n");
        assert_eq!(tail_lines(b"a\nb\n", 0), b"");
        assert_eq!(tail_lines(b"", 3), b"");
    }

    #[test]
    fn byte_caps() {
        assert_eq!(head_bytes("aé".as_bytes(), 2), b"a");
        assert_eq!(tail_bytes("éa".as_bytes(), 2), b"a");
        assert_eq!(head_bytes(b"abc", 10), b"abc");
    }

    #[test]
    fn read_tail_of_missing_file_is_empty() {
        let missing = std::env::temp_dir().join("baker-rig-node-no-such-file");
        assert!(read_file_tail(&missing, 10).unwrap().is_empty());
    }
}
