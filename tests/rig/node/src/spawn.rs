//! Starting a container's process on the host: own session, private mount
//! namespace with the container's bind mounts, working directory and
//! credentials. Everything that can be prepared is prepared in the parent;
//! the `pre_exec` hook only issues raw syscalls, as it runs between fork and
//! exec of a multi-threaded process.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, ExitStatus};

/// One bind mount into the container's mount namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    pub source: PathBuf,
    pub target: PathBuf,
    pub read_only: bool,
}

/// What to run and how.
#[derive(Clone, Default)]
pub struct ProcessSpec {
    /// `argv[0]` is the program, looked up on the `PATH` of `env` in the
    /// child, after the mounts (so it may live in a volume).
    pub argv: Vec<String>,
    /// The complete environment; nothing is inherited.
    pub env: Vec<(String, String)>,
    pub working_dir: Option<PathBuf>,
    pub mounts: Vec<BindMount>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub supplementary_groups: Vec<u32>,
}

// Env values may carry credentials: Debug shows the names only.
impl std::fmt::Debug for ProcessSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessSpec")
            .field("argv0", &self.argv.first())
            .field("env_names", &self.env.iter().map(|(k, _)| k).collect::<Vec<_>>())
            .field("working_dir", &self.working_dir)
            .field("mounts", &self.mounts)
            .field("uid", &self.uid)
            .field("gid", &self.gid)
            .field("supplementary_groups", &self.supplementary_groups)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("no command to run")]
    NoCommand,
    #[error("{what} {path:?} contains a NUL byte")]
    Nul { what: &'static str, path: String },
    #[error("mount target {0:?} must be an absolute path")]
    RelativeTarget(PathBuf),
    #[error("mount source {path:?}: {source}")]
    Source { path: PathBuf, source: io::Error },
    #[error("cannot create mount target {path:?}: {source}")]
    Target { path: PathBuf, source: io::Error },
    #[error("working directory {0:?} must be an absolute path")]
    RelativeWorkingDir(PathBuf),
    #[error("cannot create working directory {path:?}: {source}")]
    WorkingDir { path: PathBuf, source: io::Error },
}

fn cstring(what: &'static str, path: &Path) -> Result<CString, SpawnError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| SpawnError::Nul {
        what,
        path: path.display().to_string(),
    })
}

/// Normalises an absolute path lexically (`.` and `..`), as runc does for
/// mount destinations.
fn clean_absolute(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(p) => out.push(p),
            Component::Prefix(_) => return None,
        }
    }
    path.is_absolute().then_some(out)
}

/// The directories to create, root first, so that `path` (and, when
/// `include_self`, `path` itself) exists.
fn dir_chain(path: &Path, include_self: bool) -> Vec<PathBuf> {
    let mut chain: Vec<PathBuf> = path
        .ancestors()
        .skip(if include_self { 0 } else { 1 })
        .filter(|p| *p != Path::new("/") && !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .collect();
    chain.reverse();
    chain
}

struct PreparedMount {
    source: CString,
    target: CString,
    read_only: bool,
    /// Created inside the namespace, for targets nested under another
    /// mount (which hides what the host has there).
    mkdirs: Vec<CString>,
    create_file: bool,
}

struct Prepared {
    mounts: Vec<PreparedMount>,
    workdir_mkdirs: Vec<CString>,
    workdir: CString,
    creds: Option<(libc::uid_t, libc::gid_t, Vec<libc::gid_t>)>,
}

fn last_err() -> io::Error {
    io::Error::last_os_error()
}

/// mkdir that tolerates an existing entry. Async-signal-safe.
fn mkdir_exist_ok(path: &CString) -> io::Result<()> {
    // SAFETY: `path` is a valid NUL-terminated string.
    if unsafe { libc::mkdir(path.as_ptr(), 0o755) } != 0 {
        let e = last_err();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(e);
        }
    }
    Ok(())
}

impl Prepared {
    /// Runs in the forked child: only raw syscalls, no allocation.
    fn apply(&self) -> io::Result<()> {
        let root = c"/";
        // SAFETY: plain syscalls on valid NUL-terminated strings and
        // pointers owned by `self`, which outlives the call.
        unsafe {
            if libc::setsid() < 0 {
                return Err(last_err());
            }
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(last_err());
            }
            // Keep our mounts from propagating back to the host.
            if libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                return Err(last_err());
            }
            for m in &self.mounts {
                for d in &m.mkdirs {
                    mkdir_exist_ok(d)?;
                }
                if m.create_file {
                    let fd = libc::open(
                        m.target.as_ptr(),
                        libc::O_WRONLY | libc::O_CREAT | libc::O_CLOEXEC,
                        0o644,
                    );
                    if fd < 0 {
                        return Err(last_err());
                    }
                    libc::close(fd);
                }
                if libc::mount(
                    m.source.as_ptr(),
                    m.target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(last_err());
                }
                if m.read_only
                    && libc::mount(
                        std::ptr::null(),
                        m.target.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                        std::ptr::null(),
                    ) != 0
                {
                    return Err(last_err());
                }
            }
            for d in &self.workdir_mkdirs {
                mkdir_exist_ok(d)?;
            }
            if libc::chdir(self.workdir.as_ptr()) != 0 {
                return Err(last_err());
            }
            // Credentials last: mounts need root.
            if let Some((uid, gid, groups)) = &self.creds {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0 {
                    return Err(last_err());
                }
                if libc::setgid(*gid) != 0 {
                    return Err(last_err());
                }
                if libc::setuid(*uid) != 0 {
                    return Err(last_err());
                }
            }
        }
        Ok(())
    }
}

fn is_nested(target: &Path, earlier: &[PathBuf]) -> bool {
    earlier.iter().any(|e| target.starts_with(e))
}

/// Builds the command. Mount targets (and the working directory) that are
/// not hidden by another mount are created on the host now, so errors are
/// reported with their path; nested ones are created in the namespace.
/// The caller sets stdio and spawns.
pub fn build_command(spec: &ProcessSpec) -> Result<Command, SpawnError> {
    let (program, args) = spec.argv.split_first().ok_or(SpawnError::NoCommand)?;

    let mut mounts: Vec<BindMount> = Vec::with_capacity(spec.mounts.len());
    for m in &spec.mounts {
        let target = clean_absolute(&m.target).ok_or_else(|| SpawnError::RelativeTarget(m.target.clone()))?;
        mounts.push(BindMount { target, ..m.clone() });
    }
    // Parents before children, like runc: sort by depth, stable.
    mounts.sort_by_key(|m| m.target.components().count());

    let mut prepared_mounts = Vec::with_capacity(mounts.len());
    let mut done_targets: Vec<PathBuf> = Vec::new();
    for m in &mounts {
        let meta = std::fs::metadata(&m.source).map_err(|source| SpawnError::Source {
            path: m.source.clone(),
            source,
        })?;
        let is_file = !meta.is_dir();
        let nested = is_nested(&m.target, &done_targets);
        let target_err = |source| SpawnError::Target {
            path: m.target.clone(),
            source,
        };
        let mut mkdirs = Vec::new();
        if nested {
            for d in dir_chain(&m.target, !is_file) {
                mkdirs.push(cstring("mount target", &d)?);
            }
        } else if is_file {
            if let Some(parent) = m.target.parent() {
                std::fs::create_dir_all(parent).map_err(target_err)?;
            }
            if !m.target.exists() {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&m.target)
                    .map_err(target_err)?;
            }
        } else {
            std::fs::create_dir_all(&m.target).map_err(target_err)?;
        }
        prepared_mounts.push(PreparedMount {
            source: cstring("mount source", &m.source)?,
            target: cstring("mount target", &m.target)?,
            read_only: m.read_only,
            mkdirs,
            create_file: nested && is_file,
        });
        done_targets.push(m.target.clone());
    }

    let workdir = match &spec.working_dir {
        Some(w) => clean_absolute(w).ok_or_else(|| SpawnError::RelativeWorkingDir(w.clone()))?,
        // The image's WORKDIR is unknown; `/` is the runtime default.
        None => PathBuf::from("/"),
    };
    let mut workdir_mkdirs = Vec::new();
    if is_nested(&workdir, &done_targets) {
        for d in dir_chain(&workdir, true) {
            workdir_mkdirs.push(cstring("working directory", &d)?);
        }
    } else {
        std::fs::create_dir_all(&workdir).map_err(|source| SpawnError::WorkingDir {
            path: workdir.clone(),
            source,
        })?;
    }

    let creds =
        (spec.uid.is_some() || spec.gid.is_some() || !spec.supplementary_groups.is_empty()).then(|| {
            (
                spec.uid.unwrap_or(0),
                spec.gid.unwrap_or(0),
                spec.supplementary_groups.clone(),
            )
        });

    let prepared = Prepared {
        mounts: prepared_mounts,
        workdir_mkdirs,
        workdir: cstring("working directory", &workdir)?,
        creds,
    };

    let mut cmd = Command::new(program);
    cmd.args(args);
    cmd.env_clear();
    cmd.envs(spec.env.iter().map(|(k, v)| (k, v)));
    // SAFETY: `apply` only performs async-signal-safe syscalls on data
    // prepared above; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || prepared.apply());
    }
    Ok(cmd)
}

/// Describes a failed spawn the way container runtimes do.
pub fn describe_spawn_error(program: &str, err: &io::Error) -> String {
    match err.kind() {
        io::ErrorKind::NotFound => {
            format!("exec: \"{program}\": executable file not found in $PATH")
        }
        io::ErrorKind::PermissionDenied => format!("exec: \"{program}\": permission denied"),
        _ => format!("failed to start container process \"{program}\": {err}"),
    }
}

/// Exit code and signal, reporting a signal death as a shell would (128+n).
pub fn exit_info(status: ExitStatus) -> (i32, Option<i32>) {
    match (status.code(), status.signal()) {
        (Some(code), _) => (code, None),
        (None, Some(sig)) => (128 + sig, Some(sig)),
        (None, None) => (-1, None),
    }
}

/// Sends `signal` to the process group `pgid`. Returns false if the group no
/// longer exists.
pub fn signal_group(pgid: i32, signal: i32) -> bool {
    if pgid <= 1 {
        return false;
    }
    // SAFETY: kill(2) with a negative pid targets a process group only.
    unsafe { libc::kill(-pgid, signal) == 0 }
}

/// Whether any process of group `pgid` is still alive.
pub fn group_alive(pgid: i32) -> bool {
    signal_group(pgid, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_paths() {
        assert_eq!(
            clean_absolute(Path::new("/a/./b/../c/")),
            Some(PathBuf::from("/a/c"))
        );
        assert_eq!(clean_absolute(Path::new("/../x")), Some(PathBuf::from("/x")));
        assert_eq!(clean_absolute(Path::new("rel")), None);
    }

    #[test]
    fn chains() {
        assert_eq!(
            dir_chain(Path::new("/a/b/c"), true),
            vec![
                PathBuf::from("/a"),
                PathBuf::from("/a/b"),
                PathBuf::from("/a/b/c")
            ]
        );
        assert_eq!(
            dir_chain(Path::new("/a/b/f"), false),
            vec![PathBuf::from("/a"), PathBuf::from("/a/b")]
        );
        assert!(dir_chain(Path::new("/"), true).is_empty());
    }

    #[test]
    fn exit_codes() {
        assert_eq!(exit_info(ExitStatus::from_raw(3 << 8)), (3, None));
        assert_eq!(exit_info(ExitStatus::from_raw(libc::SIGKILL)), (137, Some(9)));
        assert_eq!(exit_info(ExitStatus::from_raw(libc::SIGTERM)), (143, Some(15)));
    }

    #[test]
    fn spawn_error_messages() {
        let e = io::Error::from(io::ErrorKind::NotFound);
        assert_eq!(
            describe_spawn_error("nope", &e),
            "exec: \"nope\": executable file not found in $PATH"
        );
    }

    #[test]
    fn empty_argv_is_an_error() {
        assert!(matches!(
            build_command(&ProcessSpec::default()),
            Err(SpawnError::NoCommand)
        ));
    }
}
