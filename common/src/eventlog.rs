//! The event log: one JSON object per line, appended with a single `write()` to a
//! `0600` file in a private directory, never through a symlink. The preload library
//! writes it; `styxy-preload log` and `stats` read it.

use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::paths;

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Coordinated, and the requested port was granted.
    Kept,
    /// Coordinated, and another port was granted.
    Remapped,
    /// Left alone: no coordinator, an error answer, a single-instance type…
    Passthrough,
    /// Seen and never changed: port-0 or unbound listens, observe mode, listen confirmations.
    Observed,
    /// A connect the session's remaps redirected.
    Redirected,
    /// A connect refused because another session holds the port (isolation).
    Isolated,
    /// The daemon's upstream Styxy gave a port it granted here to another client.
    Conflict,
    Error,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Kept => "kept",
            Action::Remapped => "remapped",
            Action::Passthrough => "passthrough",
            Action::Observed => "observed",
            Action::Redirected => "redirected",
            Action::Isolated => "isolated",
            Action::Conflict => "conflict",
            Action::Error => "error",
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Event {
    /// Milliseconds since the Unix epoch.
    pub ts: u64,
    pub session: Option<String>,
    pub pid: u32,
    pub comm: String,
    /// `bind`, `listen` or `connect`.
    #[serde(default)]
    pub call: String,
    pub requested_port: u16,
    pub port: u16,
    /// `ipv4` or `ipv6`.
    pub family: String,
    pub service_type: Option<String>,
    pub action: Action,
    pub reason: Option<String>,
    pub latency_us: u64,
    pub backend: Option<String>,
    /// `EADDRINUSE` retries before the bind succeeded.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retries: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The reason of an observed bind that repeats a start: the same process binding the
/// same port again (a server's dual-stack twin, a probe then the real bind). Written by
/// the hooks' logic and by the daemon for the shim; `log` hides these unless `--all`.
pub fn bound_again(port: u16) -> String {
    format!("{BOUND_AGAIN} on {port}")
}

/// The reason of a remap: `port` is another session's, or taken; `holder` as
/// [`crate::api::Holder::describe`] says it. Written by the hooks' logic and the daemon.
pub fn taken(port: u16, holder: &str) -> String {
    format!("port {port} is taken{holder}")
}

/// Fallback mode: `port` is not the process's to have, and `comm` moves on by itself.
pub fn left_to_own_fallback(port: u16, comm: &str) -> String {
    format!("port {port} is taken; left to {comm}'s own fallback")
}

/// Fallback mode: `comm` settled on its port after `from`, the one it first wanted.
pub fn moved_by_itself(comm: &str, from: u16) -> String {
    format!("{comm} moved from {from} by itself")
}

/// Who serves a port another session holds, as a refused connect names it: "session A's
/// server (python3, pid 4242)", or "another session's server" when it is not known.
/// Said by the daemon (for the shim) and by the hooks' logic.
pub fn server_of(session: Option<&str>, comm: Option<&str>, pid: Option<u32>) -> String {
    let Some(session) = session else { return "another session's server".into() };
    let comm = comm.unwrap_or("?");
    match pid {
        Some(pid) => format!("session {session}'s server ({comm}, pid {pid})"),
        None => format!("session {session}'s server ({comm})"),
    }
}

/// The reason of a refused connect's event: `port` is `server` ([`server_of`]).
pub fn refused(port: u16, server: &str) -> String {
    format!("port {port} is {server}")
}

/// The line a process's first refused connect tells the person (`session`: the caller's).
pub fn refused_notice(port: u16, server: &str, session: &str) -> String {
    format!(
        "connect to port {port} refused: it is {server}; session {session} has no server on {port} — start yours in this \
         session (then {port} leads to it), see every session's with `styxy-preload ports`, or run with `exec --no-isolate` \
         to reach other sessions' servers"
    )
}

const BOUND_AGAIN: &str = "bound again by this process (a twin or after a probe)";

impl Event {
    /// A repeat of a start this process already logged ([`bound_again`]).
    pub fn is_repeat(&self) -> bool {
        self.action == Action::Observed && self.reason.as_deref().is_some_and(|r| r.starts_with(BOUND_AGAIN))
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Where and how a process logs, as its environment says: the file
/// (`paths::event_log_path_in`), the cap in bytes (`STYXY_PRELOAD_LOG_MAX`, default 16 MiB:
/// past it the file becomes `<log>.1`, replacing the previous one, and a new file
/// starts), and whether its directory is ours to create private (not when
/// `STYXY_PRELOAD_LOG` names the file). The hooks read their own environment; the daemon
/// reads the environment of the process the shim asked for.
#[derive(Debug, Clone, Default)]
pub struct Log {
    pub path: PathBuf,
    pub max: u64,
    pub private_dir: bool,
}

impl Log {
    pub fn of(var: paths::Vars) -> Log {
        let named = var(crate::envvars::LOG).is_some_and(|v| !v.is_empty());
        let max = var(crate::envvars::LOG_MAX).and_then(|v| v.to_str()?.parse().ok()).filter(|v| *v > 0);
        Log { path: paths::event_log_path_in(var), max: max.unwrap_or(16 << 20), private_dir: !named }
    }

    /// This process's log.
    pub fn own() -> Log {
        Log::of(&|k| std::env::var_os(k))
    }

    /// Appends one event with a single `write()` (atomic for lines this short on
    /// `O_APPEND`). The private directory is created on first use only: the common case
    /// costs one open, one fstat, one write.
    pub fn append(&self, ev: &Event) -> io::Result<()> {
        append_to(&self.path, ev, self.max, self.private_dir)
    }
}

pub fn rotated_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".1");
    PathBuf::from(p)
}

/// The log, opened to append: a regular file only, never blocking (a FIFO named as a
/// process's log is refused, not waited on: the daemon writes events for the shim).
fn open_append(path: &Path) -> io::Result<std::fs::File> {
    paths::open_regular(std::fs::OpenOptions::new().append(true).create(true).mode(0o600), path)
}

/// [`Log::append`]: `path` capped at `max` bytes, its directory created private or not.
fn append_to(path: &Path, ev: &Event, max: u64, private_dir: bool) -> io::Result<()> {
    let mut line = serde_json::to_vec(ev).map_err(io::Error::other)?;
    line.push(b'\n');
    let mut f = match open_append(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let dir = path.parent().ok_or(e)?;
            if private_dir {
                paths::ensure_private_dir(dir)?;
            } else {
                std::fs::create_dir_all(dir)?;
            }
            open_append(path)?
        }
        r => r?,
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len + line.len() as u64 > max && len > 0 {
        // Whoever renames first wins; a racing writer appends to the renamed file, still read.
        let _ = std::fs::rename(path, rotated_path(path));
        f = open_append(path)?;
    }
    f.write_all(&line)
}

/// Every event in the rotated file then the current one, oldest first. Lines that do
/// not parse (a torn write after a crash, a foreign line) are skipped.
pub fn read_all(path: &Path) -> io::Result<Vec<Event>> {
    read_with_len(path).map(|(ev, _)| ev)
}

/// As `read_all`, plus how many bytes of the current file were read (where a
/// follower continues).
pub fn read_with_len(path: &Path) -> io::Result<(Vec<Event>, u64)> {
    let mut out = Vec::new();
    let mut found = false;
    let mut len = 0;
    for p in [rotated_path(path), path.to_path_buf()] {
        match paths::read_regular(&p, u64::MAX) {
            Ok(data) => {
                found = true;
                len = data.len() as u64;
                out.extend(parse_lines(&data));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    if !found {
        return Err(io::Error::new(io::ErrorKind::NotFound, format!("no event log at {}", path.display())));
    }
    Ok((out, len))
}

pub fn parse_lines(data: &[u8]) -> Vec<Event> {
    data.split(|b| *b == b'\n').filter(|l| !l.is_empty()).filter_map(|l| serde_json::from_slice(l).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(port: u16) -> Event {
        Event {
            ts: now_ms(),
            session: Some("s".into()),
            pid: 1,
            comm: "x".into(),
            call: "bind".into(),
            requested_port: 3000,
            port,
            family: "ipv4".into(),
            service_type: Some("dev".into()),
            action: Action::Remapped,
            reason: None,
            latency_us: 10,
            backend: Some("unix".into()),
            retries: 0,
        }
    }

    #[test]
    fn append_read_rotate() {
        let dir = std::env::temp_dir().join(format!("styxy-evlog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("events.jsonl");
        let append = |p: &Path, e: &Event| Log { path: p.to_path_buf(), max: 16 << 20, private_dir: true }.append(e);
        append(&path, &ev(3001)).unwrap();
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{torn\n").unwrap();
        append(&path, &ev(3002)).unwrap();
        let got = read_all(&path).unwrap();
        assert_eq!(got.iter().map(|e| e.port).collect::<Vec<_>>(), vec![3001, 3002]);
        let mode = std::fs::metadata(&path).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
        // a symlink at the log path is not followed
        let link = dir.join("link.jsonl");
        std::os::unix::fs::symlink(dir.join("target"), &link).unwrap();
        assert!(append(&link, &ev(1)).is_err());
        assert!(!dir.join("target").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
