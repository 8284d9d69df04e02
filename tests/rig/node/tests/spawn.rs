//! Spawning container processes for real: private mount namespace, bind
//! mounts, credentials, logs. Needs root (the rig node runs as root); the
//! tests skip themselves otherwise.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use baker_rig_node::logs::{LogFiles, LogWriter, decode_index};
use baker_rig_node::spawn::{BindMount, ProcessSpec, build_command, exit_info};

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Removes the listed paths when dropped, even if the test panics.
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_dir_all(p).or_else(|_| std::fs::remove_file(p));
        }
    }
}

fn unique(name: &str) -> String {
    format!("baker-rig-node-{name}-{}", std::process::id())
}

fn host_path() -> String {
    std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into())
}

fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

fn host_mounts() -> String {
    std::fs::read_to_string("/proc/self/mountinfo").unwrap()
}

fn run(spec: &ProcessSpec) -> std::process::Output {
    build_command(spec)
        .expect("command")
        .stdin(Stdio::null())
        .output()
        .expect("spawn")
}

#[test]
fn bind_mounts_live_in_a_private_namespace() {
    if !is_root() {
        eprintln!("skipping: needs root");
        return;
    }
    let base = std::env::temp_dir().join(unique("ns"));
    let vol = base.join("vol");
    let cfg = base.join("cfg");
    std::fs::create_dir_all(&vol).unwrap();
    std::fs::create_dir_all(&cfg).unwrap();
    std::fs::write(cfg.join("key"), "value-from-cfg").unwrap();
    // Targets that do not exist on the host yet, at the root like real
    // container paths.
    let mnt = PathBuf::from(format!("/{}", unique("mnt-test")));
    let cfg_target = PathBuf::from(format!("/{}", unique("cfg")));
    let _cleanup = Cleanup(vec![base.clone(), mnt.clone(), cfg_target.clone()]);

    let script = format!(
        "echo hi > {m}/x; cat {c}/key; echo; \
         if echo nope > {c}/new 2>/dev/null; then echo rw; else echo ro; fi; \
         grep -c ' {m} ' /proc/self/mountinfo",
        m = mnt.display(),
        c = cfg_target.display()
    );
    let spec = ProcessSpec {
        argv: sh(&script),
        env: vec![("PATH".into(), host_path())],
        mounts: vec![
            BindMount {
                source: vol.clone(),
                target: mnt.clone(),
                read_only: false,
            },
            BindMount {
                source: cfg.clone(),
                target: cfg_target.clone(),
                read_only: true,
            },
        ],
        ..Default::default()
    };
    let out = run(&spec);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout={stdout} stderr={}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout, "value-from-cfg\nro\n1\n");
    // The write went through the bind mount into the volume...
    assert_eq!(std::fs::read_to_string(vol.join("x")).unwrap(), "hi\n");
    // ...while the host sees only the empty mount point and no mount.
    assert!(mnt.is_dir());
    assert!(!mnt.join("x").exists());
    assert!(!host_mounts().contains(&format!(" {} ", mnt.display())));
    assert!(!cfg.join("new").exists());
}

#[test]
fn file_mounts_nested_targets_and_working_dir() {
    if !is_root() {
        eprintln!("skipping: needs root");
        return;
    }
    let base = std::env::temp_dir().join(unique("nested"));
    let vol = base.join("vol");
    std::fs::create_dir_all(&vol).unwrap();
    let tlog = base.join("termination-log");
    std::fs::write(&tlog, "").unwrap();
    let secret = base.join("token");
    std::fs::write(&secret, "s3cr3t").unwrap();
    let root = PathBuf::from(format!("/{}", unique("app")));
    let _cleanup = Cleanup(vec![base.clone(), root.clone()]);

    // /root/sub/token is nested in the /root mount: it must be created
    // inside the namespace, in the volume. So must the working directory.
    let spec = ProcessSpec {
        argv: sh("pwd; cat ../../sub/token; echo; echo done > \"$TLOG\""),
        env: vec![
            ("PATH".into(), host_path()),
            ("TLOG".into(), root.join("termination-log").display().to_string()),
        ],
        working_dir: Some(root.join("work/dir")),
        mounts: vec![
            BindMount {
                source: secret.clone(),
                target: root.join("sub/token"),
                read_only: true,
            },
            BindMount {
                source: vol.clone(),
                target: root.clone(),
                read_only: false,
            },
            BindMount {
                source: tlog.clone(),
                target: root.join("termination-log"),
                read_only: false,
            },
        ],
        ..Default::default()
    };
    let out = run(&spec);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout={stdout} stderr={}",
        String::from_utf8_lossy(&out.stderr)
    );
    let work = root.join("work/dir");
    assert_eq!(stdout, format!("{}\ns3cr3t\n", work.display()));
    assert_eq!(std::fs::read_to_string(&tlog).unwrap(), "done\n");
    // Nested mount points and the working directory were made in the volume.
    assert!(vol.join("work/dir").is_dir());
    assert!(vol.join("sub/token").is_file());
    assert!(!root.join("work").exists());
}

#[test]
fn credentials_and_session() {
    if !is_root() {
        eprintln!("skipping: needs root");
        return;
    }
    let spec = ProcessSpec {
        argv: sh(
            "id -u; id -g; id -G; read pid comm state ppid pgrp session rest < /proc/$$/stat; \
                  [ \"$pid\" = \"$pgrp\" ] && [ \"$pid\" = \"$session\" ] && echo leader",
        ),
        env: vec![("PATH".into(), host_path())],
        uid: Some(65534),
        gid: Some(65533),
        supplementary_groups: vec![4242],
        ..Default::default()
    };
    let out = run(&spec);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout={stdout} stderr={}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "65534");
    assert_eq!(lines[1], "65533");
    assert!(lines[2].split(' ').any(|g| g == "4242"), "groups: {}", lines[2]);
    assert_eq!(lines[3], "leader");
}

#[test]
fn environment_is_exactly_the_spec() {
    let spec = ProcessSpec {
        argv: vec!["env".into()],
        env: vec![("PATH".into(), host_path()), ("ONLY".into(), "this".into())],
        ..Default::default()
    };
    if !is_root() {
        eprintln!("skipping: needs root");
        return;
    }
    let out = run(&spec);
    let mut vars: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split('=').next().unwrap_or("").to_string())
        .collect();
    vars.sort();
    assert_eq!(vars, vec!["ONLY", "PATH"]);
}

#[test]
fn missing_command_is_a_spawn_error() {
    if !is_root() {
        eprintln!("skipping: needs root");
        return;
    }
    let spec = ProcessSpec {
        argv: vec!["baker-rig-node-no-such-command".into()],
        env: vec![("PATH".into(), host_path())],
        ..Default::default()
    };
    let err = build_command(&spec).unwrap().spawn().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
}

#[tokio::test]
async fn logs_are_copied_with_a_line_index() {
    if !is_root() {
        eprintln!("skipping: needs root");
        return;
    }
    let dir = std::env::temp_dir().join(unique("logs"));
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = Cleanup(vec![dir.clone()]);
    let files = LogFiles::in_dir(&dir);
    let spec = ProcessSpec {
        argv: sh("echo one; echo two >&2; printf three; sleep 0.2; echo; exit 3"),
        env: vec![("PATH".into(), host_path())],
        ..Default::default()
    };
    let (reader, writer) = std::io::pipe().unwrap();
    let log = LogWriter::start(reader, &files).unwrap();
    let mut cmd = build_command(&spec).unwrap();
    cmd.stdin(Stdio::null());
    cmd.stdout(writer.try_clone().unwrap());
    cmd.stderr(writer);
    let mut cmd = tokio::process::Command::from(cmd);
    let mut child = cmd.spawn().unwrap();
    drop(cmd);
    let status = child.wait().await.unwrap();
    assert_eq!(exit_info(status), (3, None));
    log.finish(Duration::from_secs(5)).await;
    assert!(*log.done().borrow());
    let mut content = String::new();
    std::fs::File::open(&files.log)
        .unwrap()
        .read_to_string(&mut content)
        .unwrap();
    assert_eq!(content, "one\ntwo\nthree\n");
    let index = decode_index(&std::fs::read(&files.index).unwrap());
    let offsets: Vec<u64> = index.iter().map(|e| e.offset).collect();
    assert_eq!(offsets, vec![0, 4, 8]);
    assert!(index.windows(2).all(|w| w[0].nanos <= w[1].nanos));
}

#[test]
fn relative_paths_are_rejected() {
    let spec = ProcessSpec {
        argv: vec!["true".into()],
        mounts: vec![BindMount {
            source: Path::new("/").to_path_buf(),
            target: PathBuf::from("relative"),
            read_only: false,
        }],
        ..Default::default()
    };
    assert!(build_command(&spec).is_err());
}
