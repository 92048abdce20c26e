//! Where styxy-preload keeps its files: a private runtime directory for the daemon's
//! socket, port map and token, and a private state directory for logs and state.
//!
//! Every path honours `XDG_RUNTIME_DIR`, `XDG_STATE_HOME` and `HOME`, so a test (or a
//! user) can give everything a private world.

use std::ffi::OsString;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
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

/// The uid the kernel shows for a uid this user namespace does not map
/// (`/proc/sys/kernel/overflowuid`, 65534 unless changed): anybody's, so nobody's.
pub fn overflow_uid() -> u32 {
    static UID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *UID.get_or_init(|| {
        let read = read_regular(Path::new("/proc/sys/kernel/overflowuid"), 32).ok();
        read.and_then(|b| String::from_utf8(b).ok()?.trim().parse().ok()).unwrap_or(65534)
    })
}

/// `uid` (a file's owner, a socket's peer) is this user's: our uid, and not the overflow
/// uid, which stands for every unmapped user (inside `unshare -U`, ours too).
pub fn is_own_uid(uid: u32) -> bool {
    uid == self::uid() && uid != overflow_uid()
}

/// `$XDG_RUNTIME_DIR/styxy-preload`, or the private `/tmp` fallback ([`tmp_fallback`],
/// `/tmp/styxy-preload-<uid>`) when the variable is unset, created if need be.
pub fn runtime_dir() -> PathBuf {
    runtime_dir_of(&|k| std::env::var_os(k), true)
}

/// [`runtime_dir`] for an environment given by `var`, found but never created (the
/// hooks' logic, inside other programs, only looks for the daemon there).
pub fn runtime_dir_in(var: Vars) -> PathBuf {
    runtime_dir_of(var, false)
}

fn runtime_dir_of(var: Vars, create: bool) -> PathBuf {
    match env_dir(var, "XDG_RUNTIME_DIR") {
        Some(d) => d.join(APP),
        None => tmp_fallback(APP, create),
    }
}

/// A directory of ours under `/tmp` for when the environment names none: `/tmp/<name>-<uid>`
/// (created here, mode 0700, when missing and `create`), or, when another user made that
/// first (or made it writable by others), the first of ours among
/// `/tmp/<name>-<uid>.XXXXXX`, made with `mkdtemp` when there is none and `create`:
/// someone else's directory is never used, and never stops a command. The shim finds the
/// same one (preload/shim/maps.rs `runtime_file`). Under the overflow uid nothing is
/// provably ours: the plain path, which [`ensure_private_dir`] then refuses, saying so.
fn tmp_fallback(name: &str, create: bool) -> PathBuf {
    let base = PathBuf::from(format!("/tmp/{name}-{}", uid()));
    if !is_own_uid(uid()) {
        return base;
    }
    if create {
        let _ = std::fs::DirBuilder::new().mode(0o700).create(&base);
    }
    match std::fs::symlink_metadata(&base) {
        Ok(m) if !private_to_us(&m) => own_sibling(&base).or_else(|| create.then(|| made_sibling(&base)).flatten()).unwrap_or(base),
        _ => base, // ours, or not there (yet): said by whoever uses it
    }
}

/// A new `<base>.XXXXXX` (`mkdtemp`, mode 0700); then the first of ours, which two
/// processes racing both use (the other stays empty).
fn made_sibling(base: &Path) -> Option<PathBuf> {
    let mut template = std::ffi::CString::new(format!("{}.XXXXXX", base.display())).ok()?.into_bytes_with_nul();
    // SAFETY: mkdtemp fills in the NUL-terminated template's trailing XXXXXX in place.
    if unsafe { libc::mkdtemp(template.as_mut_ptr().cast()) }.is_null() {
        return None;
    }
    own_sibling(base)
}

/// A real directory of ours nobody else may write in (or enter: `0o077`, [`ensure_private_dir`]'s
/// standard, is applied when it is ours).
fn private_to_us(m: &std::fs::Metadata) -> bool {
    m.is_dir() && is_own_uid(m.uid()) && m.mode() & 0o022 == 0
}

/// The first (by name) of `<base>.XXXXXX` in `/tmp` that is ours alone.
fn own_sibling(base: &Path) -> Option<PathBuf> {
    let prefix = format!("{}.", base.file_name()?.to_str()?);
    let dir = base.parent()?;
    let names = std::fs::read_dir(dir).ok()?.filter_map(|e| e.ok()?.file_name().into_string().ok());
    let mut own: Vec<String> = names
        .filter(|n| n.len() == prefix.len() + 6 && n.starts_with(&prefix))
        .filter(|n| std::fs::symlink_metadata(dir.join(n)).is_ok_and(|m| private_to_us(&m)))
        .collect();
    own.sort();
    own.first().map(|n| dir.join(n))
}

/// `$XDG_STATE_HOME/styxy-preload`, or `$HOME/.local/state/styxy-preload`, or, without
/// `HOME`, the same under the private `/tmp` fallback ([`tmp_fallback`],
/// `/tmp/styxy-preload-home-<uid>`).
pub fn state_dir() -> PathBuf {
    state_dir_in(&|k| std::env::var_os(k))
}

/// [`state_dir`] for an environment given by `var` (another process's).
fn state_dir_in(var: Vars) -> PathBuf {
    if let Some(d) = env_dir(var, "XDG_STATE_HOME") {
        return d.join(APP);
    }
    let home = env_dir(var, "HOME").unwrap_or_else(|| tmp_fallback(&format!("{APP}-home"), true));
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

/// What the daemon says of each block of ports, as links (`blocklink`).
pub fn block_links_dir() -> PathBuf {
    runtime_dir().join(crate::blocklink::DIR)
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
    var(crate::envvars::LOG).filter(|v| !v.is_empty()).map(PathBuf::from).unwrap_or_else(|| state_dir_in(var).join("events.jsonl"))
}

/// Creates `dir` (and parents) with mode 0700 and checks that it is a real directory
/// owned by us and not reachable by others: a planted symlink or a shared directory
/// is refused rather than used.
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    if uid() == overflow_uid() {
        return Err(io::Error::other(format!(
            "this process's uid is the overflow uid {} (this user namespace does not map it): nothing in {} can be told from another user's; map your uid in the namespace (unshare --map-current-user)",
            uid(),
            dir.display()
        )));
    }
    match std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Err(io::Error::other(format!("{} is not a directory", dir.display())));
    }
    if !is_own_uid(meta.uid()) {
        return Err(io::Error::other(format!("{} belongs to another user", dir.display())));
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// `Ok` when `meta` (of `path`, or of its directory) is ours and nobody else may write it.
pub fn owned_by_us(meta: &std::fs::Metadata, path: &Path) -> io::Result<()> {
    if !is_own_uid(meta.uid()) || meta.mode() & 0o022 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} is not ours alone (owner uid {}, mode {:o})", path.display(), meta.uid(), meta.mode() & 0o7777),
        ));
    }
    Ok(())
}

/// Opens `path` as `opts` says, as a regular file only: never through a symlink, never
/// blocking on a FIFO or a device someone planted there (`O_NONBLOCK|O_NOFOLLOW`, no
/// controlling terminal, close-on-exec), the kind checked on the opened fd.
pub fn open_regular(opts: &mut std::fs::OpenOptions, path: &Path) -> io::Result<std::fs::File> {
    let f = opts.custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_NOCTTY | libc::O_CLOEXEC).open(path)?;
    if !f.metadata()?.file_type().is_file() {
        return Err(io::Error::other(format!("{} is not a regular file", path.display())));
    }
    Ok(f)
}

/// The content of the regular file at `path` ([`open_regular`]), at most `max` bytes.
pub fn read_regular(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut data = Vec::new();
    open_regular(std::fs::OpenOptions::new().read(true), path)?.take(max).read_to_end(&mut data)?;
    Ok(data)
}

/// Writes `data` to `path` atomically: a temporary file in the same directory, fsync,
/// rename. Readers see the old or the new content, never a mix.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    use std::io::Write;
    let mut tmp = OsString::from(path.as_os_str());
    tmp.push(format!(".tmp.{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let mut f = open_regular(std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode), &tmp)?;
    let res = f.write_all(data).and_then(|_| f.sync_all());
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_or_a_symlink_is_refused_at_once_never_waited_on() {
        let dir = std::env::temp_dir().join(format!("styxy-paths-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo on a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // nobody writes it: a blocking open for reading would wait forever
        let err = read_regular(&fifo, 16).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        // nobody reads it: a blocking open for writing would wait forever
        assert!(open_regular(std::fs::OpenOptions::new().append(true), &fifo).is_err());
        std::fs::write(dir.join("file"), b"data").unwrap();
        std::os::unix::fs::symlink(dir.join("file"), dir.join("link")).unwrap();
        assert!(read_regular(&dir.join("link"), 16).is_err());
        assert_eq!(read_regular(&dir.join("file"), 2).unwrap(), b"da");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
