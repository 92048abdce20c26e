//! Where styxy-preload keeps its files: a private runtime directory for the daemon's
//! socket, port map and token, and a private state directory for logs and state.
//!
//! Every path honours `XDG_RUNTIME_DIR`, `XDG_STATE_HOME` and `HOME`, so a test (or a
//! user) can give everything a private world.

use std::ffi::OsString;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

const APP: &str = "styxy-preload";

/// An environment to read variables from: this process's (`std::env::var_os`), or the
/// one `exec` hands down, or another process's (`/proc/<pid>/environ`).
pub type Vars<'a> = &'a dyn Fn(&str) -> Option<OsString>;

fn env_dir(var: Vars, name: &str) -> Option<PathBuf> {
    var(name).filter(|v| !v.is_empty()).map(PathBuf::from).filter(|p| p.is_absolute())
}

fn uid() -> u32 {
    // SAFETY: getuid cannot fail.
    unsafe { libc::getuid() }
}

/// `$XDG_RUNTIME_DIR/styxy-preload`, or `/tmp/styxy-preload-<uid>` when the variable is unset.
pub fn runtime_dir() -> PathBuf {
    runtime_dir_in(&|k| std::env::var_os(k))
}

/// [`runtime_dir`] for an environment given by `var`.
pub fn runtime_dir_in(var: Vars) -> PathBuf {
    match env_dir(var, "XDG_RUNTIME_DIR") {
        Some(d) => d.join(APP),
        None => PathBuf::from(format!("/tmp/{APP}-{}", uid())),
    }
}

/// `$XDG_STATE_HOME/styxy-preload`, or `$HOME/.local/state/styxy-preload`.
pub fn state_dir() -> PathBuf {
    state_dir_in(&|k| std::env::var_os(k))
}

/// [`state_dir`] for an environment given by `var` (another process's).
fn state_dir_in(var: Vars) -> PathBuf {
    if let Some(d) = env_dir(var, "XDG_STATE_HOME") {
        return d.join(APP);
    }
    let home = env_dir(var, "HOME").unwrap_or_else(|| PathBuf::from(format!("/tmp/{APP}-home-{}", uid())));
    home.join(".local/state").join(APP)
}

pub fn socket_path() -> PathBuf {
    runtime_dir().join("daemon.sock")
}

pub fn portmap_path() -> PathBuf {
    runtime_dir().join("ports.map")
}

pub fn policymap_path() -> PathBuf {
    runtime_dir().join("policy.map")
}

pub fn token_path() -> PathBuf {
    runtime_dir().join("token")
}

pub fn daemon_pid_path() -> PathBuf {
    runtime_dir().join("daemon.pid")
}

pub fn daemon_state_path() -> PathBuf {
    state_dir().join("daemon-state.json")
}

pub fn daemon_log_path() -> PathBuf {
    state_dir().join("daemon.log")
}

/// The event log: `STYXY_PRELOAD_LOG` if set, else `events.jsonl` in the state directory.
pub fn event_log_path() -> PathBuf {
    event_log_path_in(&|k| std::env::var_os(k))
}

/// [`event_log_path`] for an environment given by `var`: the daemon logs a bind the
/// shim asked about where that process would have.
pub fn event_log_path_in(var: Vars) -> PathBuf {
    var("STYXY_PRELOAD_LOG").filter(|v| !v.is_empty()).map(PathBuf::from).unwrap_or_else(|| state_dir_in(var).join("events.jsonl"))
}

/// Creates `dir` (and parents) with mode 0700 and checks that it is a real directory
/// owned by us and not reachable by others: a planted symlink or a shared directory
/// is refused rather than used.
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    match std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Err(io::Error::other(format!("{} is not a directory", dir.display())));
    }
    if meta.uid() != uid() {
        return Err(io::Error::other(format!("{} belongs to another user", dir.display())));
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// `Ok` when `meta` (of `path`, or of its directory) is ours and nobody else may write it.
pub fn owned_by_us(meta: &std::fs::Metadata, path: &Path) -> io::Result<()> {
    if meta.uid() != uid() || meta.mode() & 0o022 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} is not ours alone (owner uid {}, mode {:o})", path.display(), meta.uid(), meta.mode() & 0o7777),
        ));
    }
    Ok(())
}

/// Writes `data` to `path` atomically: a temporary file in the same directory, fsync,
/// rename. Readers see the old or the new content, never a mix.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = OsString::from(path.as_os_str());
    tmp.push(format!(".tmp.{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).custom_flags(libc::O_NOFOLLOW).open(&tmp)?;
    let res = f.write_all(data).and_then(|_| f.sync_all());
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path)
}
