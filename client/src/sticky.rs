//! A session's mappings when the coordinator is Styxy, whose allocate is not idempotent
//! (asked twice for 3000, it grants 3000 then 3001): requested port → (port, lock id),
//! shared by every process of the session through small files, plus which pids use
//! each lock, so that `exec` releases only what no live process holds. The built-in
//! daemon keeps all this itself and needs none of it.
//!
//! Layout: `<runtime>/sessions/<session>/map-<requested>` holds `<port> <lock id>`
//! (created with `O_EXCL`: the first process wins, later ones reuse its mapping);
//! `own-<lock id>-<pid>` marks a user of the lock.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use crate::paths;

fn dir(session: &str) -> PathBuf {
    paths::runtime_dir().join("sessions").join(session)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub requested: u16,
    pub port: u16,
    pub lock_id: String,
}

fn parse(requested: u16, s: &str) -> Option<Mapping> {
    let (port, lock) = s.trim().split_once(' ')?;
    Some(Mapping { requested, port: port.parse().ok()?, lock_id: lock.to_string() })
}

/// The session's mapping of `requested`, if a process of the session made one.
pub fn lookup(session: &str, requested: u16) -> Option<Mapping> {
    let s = std::fs::read_to_string(dir(session).join(format!("map-{requested}"))).ok()?;
    parse(requested, &s)
}

/// Records `requested → port`; if another process of the session got there first,
/// returns its mapping instead (`Err`).
pub fn claim(session: &str, m: &Mapping) -> Result<(), Mapping> {
    let d = dir(session);
    if paths::ensure_private_dir(&d).is_err() {
        return Ok(()); // no shared memory of it: this process keeps its own grant
    }
    let path = d.join(format!("map-{}", m.requested));
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(&path)
    {
        Ok(mut f) => {
            let _ = f.write_all(format!("{} {}\n", m.port, m.lock_id).as_bytes());
            Ok(())
        }
        Err(_) => match lookup(session, m.requested) {
            Some(winner) => Err(winner),
            None => Ok(()),
        },
    }
}

/// Marks `pid` as a user of `lock_id`.
pub fn add_owner(session: &str, lock_id: &str, pid: u32) {
    let d = dir(session);
    if paths::ensure_private_dir(&d).is_ok() {
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(d.join(format!("own-{lock_id}-{pid}")));
    }
}

/// Every mapping of the session with the pids that used it.
pub fn entries(session: &str) -> Vec<(Mapping, Vec<u32>)> {
    let Ok(rd) = std::fs::read_dir(dir(session)) else {
        return vec![];
    };
    let names: Vec<String> = rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names
        .iter()
        .filter_map(|n| {
            let requested: u16 = n.strip_prefix("map-")?.parse().ok()?;
            let m = lookup(session, requested)?;
            let prefix = format!("own-{}-", m.lock_id);
            let pids = names.iter().filter_map(|o| o.strip_prefix(&prefix)?.parse().ok()).collect();
            Some((m, pids))
        })
        .collect()
}

/// Forgets a released mapping and its owner marks.
pub fn forget(session: &str, m: &Mapping) {
    let d = dir(session);
    let _ = std::fs::remove_file(d.join(format!("map-{}", m.requested)));
    if let Ok(rd) = std::fs::read_dir(&d) {
        let prefix = format!("own-{}-", m.lock_id);
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(&d); // only when empty
}

/// Until when (ms since the epoch) Styxy asked every local process to stop asking (429
/// `Retry-After`), shared through a file so that other processes skip the request too.
pub fn backoff_until() -> u64 {
    std::fs::read_to_string(paths::runtime_dir().join("styxy-retry-after")).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

pub fn set_backoff_until(ms: u64) {
    let d = paths::runtime_dir();
    if paths::ensure_private_dir(&d).is_ok() {
        let _ = paths::write_atomic(&d.join("styxy-retry-after"), ms.to_string().as_bytes(), 0o600);
    }
}
